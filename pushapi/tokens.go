package pushapi

import (
	"time"

	"github.com/rtm-dev/rtm/plugins/token"
)

// tokenIssuer signs the credentials the push API hands out: device tokens
// (POST /v1/devices/{id}/token) and its own service token.
type tokenIssuer interface {
	issue(clientID string, ttl time.Duration, now time.Time) (string, time.Time, error)
	issueService(name string, ttl time.Duration, now time.Time) (string, time.Time, error)
}

// signer adapts token.Signer, which brokers verify with the same keys.
type signer struct{ s *token.Signer }

func newSigner(keys []string) (tokenIssuer, error) {
	s, err := token.NewSigner(keys)
	if err != nil {
		return nil, err
	}
	return signer{s}, nil
}

func (s signer) issue(clientID string, ttl time.Duration, now time.Time) (string, time.Time, error) {
	t, c, err := s.s.Issue(clientID, ttl, now)
	return t, c.Expires, err
}

func (s signer) issueService(name string, ttl time.Duration, now time.Time) (string, time.Time, error) {
	t, c, err := s.s.IssueService(name, ttl, now)
	return t, c.Expires, err
}

var _ tokenIssuer = signer{}
