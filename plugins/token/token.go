// Package token issues and verifies rtm device credentials: JWTs signed with
// HMAC-SHA256 (HS256) by one of the keys of auth.token_keys, so that any
// broker node verifies a device's CONNECT without a database round trip.
//
// The push API issues tokens (Signer.Issue, Signer.IssueService); the broker's
// auth hook (package plugins) verifies them. A Signer is immutable once made
// and safe for concurrent use.
//
// Key rotation: the first key signs, every key verifies. Each token names its
// key in the JWT header "kid" (the first 8 hex digits of SHA-256 of the key),
// so a new key is rolled in first (old tokens keep verifying) and the old one
// removed later (its tokens are then refused with ErrTokenUnknownKey).
package token

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"
)

// MinKeyLen is the shortest key NewSigner accepts, in bytes.
const MinKeyLen = 16

// MaxLen is the longest token Verify reads and Issue writes, in bytes: the
// largest MQTT password (a two-byte length prefix).
const MaxLen = 65535

// Leeway is the clock skew tolerated between the node that issued a token and
// the one that verifies it, on "iat" and "nbf" only: a token is never used
// after its "exp".
const Leeway = 30 * time.Second

// ErrTokenExpired reports a token whose "exp" has passed.
var ErrTokenExpired = errors.New("token expired")

// ErrTokenInvalid reports a token that is malformed, not signed with HS256
// ("none" included), whose signature does not match, or whose claims are
// missing or not yet valid. It wraps jwt.ErrTokenSignatureInvalid when the
// signature or algorithm is wrong.
var ErrTokenInvalid = errors.New("invalid token")

// ErrTokenUnknownKey reports a well-formed token signed by a key that is not
// (or no longer) among the configured keys.
var ErrTokenUnknownKey = errors.New("token signed by an unknown key")

// ErrInvalidClientID reports a client ID (or service name) that cannot be put
// in a token: one CheckClientID refuses, or so long that the token would not
// fit in an MQTT password.
var ErrInvalidClientID = errors.New("invalid client ID")

// Claims are what a token says.
type Claims struct {
	ClientID string    // JWT "sub": the MQTT client ID (and username) it is valid for
	Service  bool      // JWT "svc": true for rtm's own services (the push API), which get every right
	Expires  time.Time // "exp", UTC, whole seconds
	IssuedAt time.Time // "iat", UTC, whole seconds (zero if the token has none)
	KeyID    string    // JWT header "kid": which key signed it
}

// jwtClaims is the JWT payload.
type jwtClaims struct {
	jwt.RegisteredClaims
	Service bool `json:"svc,omitempty"`
}

// Signer issues tokens with its first key and verifies tokens signed by any
// of its keys.
type Signer struct {
	signKID string
	keys    map[string][]byte // by kid
	parser  *jwt.Parser
}

// NewSigner returns a Signer for keys: keys[0] signs, all verify. It fails if
// there is no key, a key is shorter than MinKeyLen bytes, or two keys are the
// same (or share a key ID). Errors name keys by position, never by value.
func NewSigner(keys []string) (*Signer, error) {
	if len(keys) == 0 {
		return nil, errors.New("token: no key")
	}
	s := &Signer{
		keys: make(map[string][]byte, len(keys)),
		parser: jwt.NewParser(
			jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
			jwt.WithoutClaimsValidation(), // done in Verify: the leeway must not apply to exp
			jwt.WithStrictDecoding(),      // no second spelling of the same signature
		),
	}
	var errs []error
	for i, k := range keys {
		if len(k) < MinKeyLen {
			errs = append(errs, fmt.Errorf("token: key %d is %d bytes, want at least %d", i+1, len(k), MinKeyLen))
			continue
		}
		kid := KeyID(k)
		if _, dup := s.keys[kid]; dup {
			errs = append(errs, fmt.Errorf("token: key %d repeats an earlier key (key ID %s)", i+1, kid))
			continue
		}
		s.keys[kid] = []byte(k)
		if i == 0 {
			s.signKID = kid
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return s, nil
}

// KeyID returns the key ID of key as it appears in a token's "kid" header:
// the first 8 hex digits of its SHA-256.
func KeyID(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:4])
}

// Issue returns a device token for clientID, valid from now for ttl.
func (s *Signer) Issue(clientID string, ttl time.Duration, now time.Time) (token string, c Claims, err error) {
	return s.issue(clientID, false, ttl, now)
}

// IssueService returns a token for one of rtm's own services (the push API),
// which gets every right; name is the client ID and username it must connect
// with.
func (s *Signer) IssueService(name string, ttl time.Duration, now time.Time) (string, Claims, error) {
	return s.issue(name, true, ttl, now)
}

func (s *Signer) issue(id string, service bool, ttl time.Duration, now time.Time) (string, Claims, error) {
	if err := CheckClientID(id); err != nil {
		return "", Claims{}, err
	}
	if ttl < time.Second {
		return "", Claims{}, fmt.Errorf("token: ttl %v is shorter than 1s", ttl)
	}
	// JWT times are whole seconds; Claims says what the token says.
	iat := time.Unix(now.Unix(), 0).UTC()
	exp := time.Unix(now.Add(ttl).Unix(), 0).UTC()
	t := jwt.NewWithClaims(jwt.SigningMethodHS256, jwtClaims{
		RegisteredClaims: jwt.RegisteredClaims{
			Subject:   id,
			IssuedAt:  jwt.NewNumericDate(iat),
			ExpiresAt: jwt.NewNumericDate(exp),
		},
		Service: service,
	})
	t.Header["kid"] = s.signKID
	signed, err := t.SignedString(s.keys[s.signKID])
	if err != nil {
		return "", Claims{}, fmt.Errorf("token: sign: %w", err)
	}
	if len(signed) > MaxLen {
		return "", Claims{}, fmt.Errorf("%w: the token would be %d bytes, more than an MQTT password holds (%d)",
			ErrInvalidClientID, len(signed), MaxLen)
	}
	return signed, Claims{ClientID: id, Service: service, Expires: exp, IssuedAt: iat, KeyID: s.signKID}, nil
}

// CheckClientID returns an error wrapping ErrInvalidClientID if id cannot be
// a device's client ID (or a service's name) in rtm: empty, longer than 65535
// bytes, not UTF-8, containing U+0000 (MQTT forbids these), or not usable as
// one topic level. A client ID becomes a level of devices/{id}/inbox and of
// the %c of auth.acl rules: with a '/' it would be several levels ("a/b" has
// the inbox devices/a/b/inbox, which the ACL cannot tell from a topic that
// is no inbox), with '+' or '#' a wildcard, and starting with '$' a reserved
// topic where %c is the first level of a rule ("allow sub %c/#" would give
// device "$SYS" the broker's $SYS topics).
func CheckClientID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%w: empty", ErrInvalidClientID)
	case len(id) > 65535:
		return fmt.Errorf("%w: %d bytes, more than 65535", ErrInvalidClientID, len(id))
	case !utf8.ValidString(id):
		return fmt.Errorf("%w: not UTF-8", ErrInvalidClientID)
	case strings.IndexByte(id, 0) >= 0:
		return fmt.Errorf("%w: contains U+0000", ErrInvalidClientID)
	case strings.ContainsAny(id, "/+#"):
		return fmt.Errorf("%w: contains '/', '+' or '#' (it must be one topic level)", ErrInvalidClientID)
	case id[0] == '$':
		return fmt.Errorf("%w: starts with '$' (reserved for the broker's topics)", ErrInvalidClientID)
	}
	return nil
}

// Verify checks token at time now and returns what it says. It fails with an
// error wrapping ErrTokenExpired, ErrTokenInvalid or ErrTokenUnknownKey.
func (s *Signer) Verify(token string, now time.Time) (Claims, error) {
	if len(token) > MaxLen {
		return Claims{}, fmt.Errorf("%w: longer than %d bytes", ErrTokenInvalid, MaxLen)
	}
	var jc jwtClaims
	var kid string
	_, err := s.parser.ParseWithClaims(token, &jc, func(t *jwt.Token) (any, error) {
		k, _ := t.Header["kid"].(string)
		if k == "" {
			return nil, errNoKID
		}
		key, ok := s.keys[k]
		if !ok {
			return nil, ErrTokenUnknownKey
		}
		kid = k
		return key, nil
	})
	switch {
	case err == nil:
	case errors.Is(err, ErrTokenUnknownKey):
		return Claims{}, ErrTokenUnknownKey
	default:
		return Claims{}, fmt.Errorf("%w: %w", ErrTokenInvalid, err)
	}

	// The signature is good: the claims are ours, but check them all the same.
	c := Claims{ClientID: jc.Subject, Service: jc.Service, KeyID: kid}
	// Tokens issued before CheckClientID refused topic characters are
	// refused here.
	if err := CheckClientID(c.ClientID); err != nil {
		return Claims{}, fmt.Errorf("%w: sub: %w", ErrTokenInvalid, err)
	}
	if jc.ExpiresAt == nil {
		return Claims{}, fmt.Errorf("%w: no exp", ErrTokenInvalid)
	}
	c.Expires = jc.ExpiresAt.UTC()
	if jc.IssuedAt != nil {
		c.IssuedAt = jc.IssuedAt.UTC()
		if c.IssuedAt.After(now.Add(Leeway)) {
			return Claims{}, fmt.Errorf("%w: issued in the future (iat %s)", ErrTokenInvalid, c.IssuedAt.UTC().Format(time.RFC3339))
		}
	}
	if jc.NotBefore != nil && jc.NotBefore.After(now.Add(Leeway)) {
		return Claims{}, fmt.Errorf("%w: not valid before %s", ErrTokenInvalid, jc.NotBefore.UTC().Format(time.RFC3339))
	}
	if !now.Before(c.Expires) { // RFC 7519 4.1.4: not accepted on or after exp
		return Claims{}, fmt.Errorf("%w at %s", ErrTokenExpired, c.Expires.UTC().Format(time.RFC3339))
	}
	return c, nil
}

var errNoKID = errors.New("no kid header")
