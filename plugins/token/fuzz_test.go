package token_test

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/rtm-dev/rtm/plugins/token"
)

// FuzzVerify feeds Verify arbitrary strings, seeded with valid tokens and
// tampered ones: it must never panic, and whatever it accepts must be a
// token this key signed, for a usable client ID, not expired.
func FuzzVerify(f *testing.F) {
	s := signer(f, keyA, keyB)
	good := issue(f, s, "alice", time.Hour, t0)
	svc, _, _ := s.IssueService("pushapi", time.Hour, t0)
	old := issue(f, signer(f, keyB), "bob", time.Hour, t0)
	other := issue(f, signer(f, "0123456789abcdef-key-c"), "carol", time.Hour, t0)
	f.Add(good)
	f.Add(svc)
	f.Add(old)
	f.Add(other)
	f.Add(issue(f, s, "日本", time.Minute, t0))
	// Signed with the right key for client IDs Verify refuses.
	for _, id := range []string{"日本/+/#", "a/b", "+", "#", "$SYS", ""} {
		f.Add(forge(f, map[string]any{"alg": "HS256", "kid": token.KeyID(keyA)},
			map[string]any{"sub": id, "iat": t0.Unix(), "exp": t0.Add(time.Hour).Unix()}, keyA))
	}
	f.Add(good[:len(good)-1])
	f.Add(strings.Replace(good, ".", "..", 1))
	f.Add(good + ".")
	f.Add("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.")
	f.Add("eyJhbGciOiJIUzI1NiIsImtpZCI6W119.e30.")
	f.Add("..")
	f.Add("")
	for i := 0; i < len(good); i += 7 {
		f.Add(good[:i] + "_" + good[i+1:])
	}
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := s.Verify(tok, t0)
		if err != nil {
			return
		}
		if token.CheckClientID(c.ClientID) != nil || !utf8.ValidString(c.ClientID) || !t0.Before(c.Expires) {
			t.Fatalf("accepted %q with claims %+v", tok, c)
		}
		if c.KeyID != token.KeyID(keyA) && c.KeyID != token.KeyID(keyB) {
			t.Fatalf("accepted %q with an unknown kid %q", tok, c.KeyID)
		}
	})
}
