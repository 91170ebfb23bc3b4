package token_test

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/plugins/token"
)

const (
	keyA = "0123456789abcdef-key-a"
	keyB = "0123456789abcdef-key-b"
)

const b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func signer(t testing.TB, keys ...string) *token.Signer {
	t.Helper()
	s, err := token.NewSigner(keys)
	if err != nil {
		t.Fatalf("NewSigner: %v", err)
	}
	return s
}

func issue(t testing.TB, s *token.Signer, id string, ttl time.Duration, now time.Time) string {
	t.Helper()
	tok, _, err := s.Issue(id, ttl, now)
	if err != nil {
		t.Fatalf("Issue(%q): %v", id, err)
	}
	return tok
}

func TestNewSigner(t *testing.T) {
	for _, tc := range []struct {
		name string
		keys []string
		want string // substring of the error, "" for success
	}{
		{"one", []string{keyA}, ""},
		{"two", []string{keyA, keyB}, ""},
		{"none", nil, "no key"},
		{"short", []string{"short"}, "key 1 is 5 bytes"},
		{"second short", []string{keyA, "0123456789abcde"}, "key 2 is 15 bytes"},
		{"duplicate", []string{keyA, keyA}, "key 2 repeats"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := token.NewSigner(tc.keys)
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("NewSigner(%d keys) = %v, want error containing %q", len(tc.keys), err, tc.want)
			}
			if err != nil && strings.Contains(err.Error(), "0123456789") {
				t.Fatalf("error reveals a key: %v", err)
			}
		})
	}
}

func TestRoundTrip(t *testing.T) {
	s := signer(t, keyA)
	now := t0.Add(123 * time.Millisecond)
	tok, c, err := s.Issue("alice", time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	want := token.Claims{ClientID: "alice", Expires: t0.Add(time.Hour), IssuedAt: t0, KeyID: token.KeyID(keyA)}
	if c != want {
		t.Fatalf("Issue claims = %+v, want %+v", c, want)
	}
	if len(c.KeyID) != 8 {
		t.Fatalf("kid %q: want 8 hex digits", c.KeyID)
	}
	got, err := s.Verify(tok, now.Add(59*time.Minute))
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if !got.Expires.Equal(want.Expires) || !got.IssuedAt.Equal(want.IssuedAt) || got.ClientID != "alice" || got.Service || got.KeyID != want.KeyID {
		t.Fatalf("Verify = %+v, want %+v", got, want)
	}
}

func TestClientIDs(t *testing.T) {
	s := signer(t, keyA)
	for _, id := range []string{"a", "device-ÄÖ-日本", "a$b", "with space", strings.Repeat("x", 40000)} {
		tok := issue(t, s, id, time.Hour, t0)
		c, err := s.Verify(tok, t0)
		if err != nil || c.ClientID != id {
			t.Fatalf("round trip of a %d-byte ID: %v, %q", len(id), err, c.ClientID)
		}
	}
	bad := []string{"", "a\x00b", "\xff\xfe", strings.Repeat("x", 65536), strings.Repeat("x", 65535),
		"a/b", "/", "a/", "/a", "a//b", "+", "a+", "#", "a#b", "$SYS", "$x"}
	for _, id := range bad {
		if _, _, err := s.Issue(id, time.Hour, t0); !errors.Is(err, token.ErrInvalidClientID) {
			t.Errorf("Issue(%d-byte ID %.10q) = %v, want ErrInvalidClientID", len(id), id, err)
		}
		if _, _, err := s.IssueService(id, time.Hour, t0); !errors.Is(err, token.ErrInvalidClientID) {
			t.Errorf("IssueService(%d-byte ID %.10q) = %v, want ErrInvalidClientID", len(id), id, err)
		}
		if err := token.CheckClientID(id); len(id) != 65535 && !errors.Is(err, token.ErrInvalidClientID) { // 65535 bytes: only the token is too long
			t.Errorf("CheckClientID(%d-byte ID %.10q) = %v, want ErrInvalidClientID", len(id), id, err)
		}
	}
	// A token for such an ID, signed with the right key (as the push API did
	// before it refused them), is refused as well.
	kid := token.KeyID(keyA)
	for _, id := range []string{"a/b", "devices/+", "#", "$SYS"} {
		tok := forge(t, map[string]any{"alg": "HS256", "kid": kid}, map[string]any{"sub": id, "iat": t0.Unix(), "exp": t0.Add(time.Hour).Unix()}, keyA)
		if c, err := s.Verify(tok, t0); !errors.Is(err, token.ErrTokenInvalid) || !errors.Is(err, token.ErrInvalidClientID) {
			t.Errorf("Verify(token for %q) = %+v, %v; want ErrTokenInvalid wrapping ErrInvalidClientID", id, c, err)
		}
	}
	if _, _, err := s.Issue("a", 0, t0); err == nil {
		t.Error("Issue with ttl 0 succeeded")
	}
}

func TestExpiry(t *testing.T) {
	s := signer(t, keyA)
	tok := issue(t, s, "alice", time.Minute, t0)
	if _, err := s.Verify(tok, t0.Add(time.Minute-time.Nanosecond)); err != nil {
		t.Fatalf("just before exp: %v", err)
	}
	// No leeway on exp.
	for _, at := range []time.Time{t0.Add(time.Minute), t0.Add(time.Minute + time.Second), t0.Add(24 * time.Hour)} {
		if _, err := s.Verify(tok, at); !errors.Is(err, token.ErrTokenExpired) {
			t.Fatalf("at exp+%v: %v, want ErrTokenExpired", at.Sub(t0.Add(time.Minute)), err)
		}
	}
	// Leeway on iat: a verifier whose clock is a little behind accepts it,
	// one far behind does not.
	if _, err := s.Verify(tok, t0.Add(-token.Leeway)); err != nil {
		t.Fatalf("clock %v behind: %v", token.Leeway, err)
	}
	if _, err := s.Verify(tok, t0.Add(-token.Leeway-time.Second)); !errors.Is(err, token.ErrTokenInvalid) {
		t.Fatalf("clock far behind: %v, want ErrTokenInvalid", err)
	}
}

// forge signs header and claims (JSON) with key, as an attacker who knows
// the format would.
func forge(t testing.TB, header, claims map[string]any, key string) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	msg := enc(header) + "." + enc(claims)
	if key == "" {
		return msg + "."
	}
	m := hmac.New(sha256.New, []byte(key))
	m.Write([]byte(msg))
	return msg + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

func TestTampered(t *testing.T) {
	s := signer(t, keyA)
	tok := issue(t, s, "alice", time.Hour, t0)
	parts := strings.Split(tok, ".")
	kid := token.KeyID(keyA)
	claims := map[string]any{"sub": "bob", "iat": t0.Unix(), "exp": t0.Add(time.Hour).Unix()}
	flip := func(s string, i int) string {
		c := byte('A')
		if s[i] == 'A' {
			c = 'B'
		}
		return s[:i] + string(c) + s[i+1:]
	}
	payload, _ := json.Marshal(claims)
	for _, tc := range []struct {
		name, tok string
		want      error
	}{
		{"payload replaced", parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload) + "." + parts[2], token.ErrTokenInvalid},
		{"payload byte flipped", parts[0] + "." + flip(parts[1], 5) + "." + parts[2], token.ErrTokenInvalid},
		{"signature byte flipped", parts[0] + "." + parts[1] + "." + flip(parts[2], 10), token.ErrTokenInvalid},
		// The last of 43 characters carries 4 bits of the 32-byte MAC and 2
		// zero bits; setting one gives a second spelling of the same MAC.
		{"signature padding bits", parts[0] + "." + parts[1] + "." + parts[2][:42] + string(b64[strings.IndexByte(b64, parts[2][42])^1]), token.ErrTokenInvalid},
		{"signature removed", parts[0] + "." + parts[1] + ".", token.ErrTokenInvalid},
		{"alg none", forge(t, map[string]any{"alg": "none", "typ": "JWT", "kid": kid}, claims, ""), token.ErrTokenInvalid},
		{"alg none signed", forge(t, map[string]any{"alg": "none", "kid": kid}, claims, keyA), token.ErrTokenInvalid},
		{"alg HS512", forge(t, map[string]any{"alg": "HS512", "kid": kid}, claims, keyA), token.ErrTokenInvalid},
		{"no kid", forge(t, map[string]any{"alg": "HS256"}, claims, keyA), token.ErrTokenInvalid},
		{"kid of key A, signed by key B", forge(t, map[string]any{"alg": "HS256", "kid": kid}, claims, keyB), token.ErrTokenInvalid},
		{"no exp", forge(t, map[string]any{"alg": "HS256", "kid": kid}, map[string]any{"sub": "bob"}, keyA), token.ErrTokenInvalid},
		{"no sub", forge(t, map[string]any{"alg": "HS256", "kid": kid}, map[string]any{"exp": t0.Add(time.Hour).Unix()}, keyA), token.ErrTokenInvalid},
		{"nbf in the future", forge(t, map[string]any{"alg": "HS256", "kid": kid}, map[string]any{"sub": "bob", "exp": t0.Add(time.Hour).Unix(), "nbf": t0.Add(time.Minute).Unix()}, keyA), token.ErrTokenInvalid},
		{"garbage", "not a token", token.ErrTokenInvalid},
		{"empty", "", token.ErrTokenInvalid},
		{"huge", strings.Repeat("a", token.MaxLen+1), token.ErrTokenInvalid},
		{"other key", issue(t, signer(t, keyB), "alice", time.Hour, t0), token.ErrTokenUnknownKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := s.Verify(tc.tok, t0)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Verify = %+v, %v; want %v", c, err, tc.want)
			}
			if c != (token.Claims{}) {
				t.Fatalf("refused token returned claims %+v", c)
			}
		})
	}
	// A correctly forged token is, of course, accepted: the test above is
	// not failing for a reason of its own.
	good := forge(t, map[string]any{"alg": "HS256", "kid": kid}, claims, keyA)
	if c, err := s.Verify(good, t0); err != nil || c.ClientID != "bob" {
		t.Fatalf("control token: %+v, %v", c, err)
	}
}

func TestRotation(t *testing.T) {
	old := signer(t, keyA)
	oldTok := issue(t, old, "alice", time.Hour, t0)

	// Roll the new key in first: it signs, the old one still verifies.
	both := signer(t, keyB, keyA)
	if c, err := both.Verify(oldTok, t0); err != nil || c.KeyID != token.KeyID(keyA) {
		t.Fatalf("old token during rotation: %+v, %v", c, err)
	}
	newTok, c, err := both.Issue("alice", time.Hour, t0)
	if err != nil || c.KeyID != token.KeyID(keyB) {
		t.Fatalf("issue during rotation: %+v, %v", c, err)
	}
	// Brokers not yet updated (old key only) do not know the new key.
	if _, err := old.Verify(newTok, t0); !errors.Is(err, token.ErrTokenUnknownKey) {
		t.Fatalf("new token on an old node: %v, want ErrTokenUnknownKey", err)
	}

	// Remove the old key: its tokens are refused as signed by an unknown key.
	only := signer(t, keyB)
	if _, err := only.Verify(oldTok, t0); !errors.Is(err, token.ErrTokenUnknownKey) {
		t.Fatalf("old token after rotation: %v, want ErrTokenUnknownKey", err)
	}
	if _, err := only.Verify(newTok, t0); err != nil {
		t.Fatalf("new token after rotation: %v", err)
	}
}

func TestServiceToken(t *testing.T) {
	s := signer(t, keyA)
	tok, c, err := s.IssueService("pushapi-1", time.Hour, t0)
	if err != nil || !c.Service || c.ClientID != "pushapi-1" {
		t.Fatalf("IssueService = %+v, %v", c, err)
	}
	got, err := s.Verify(tok, t0)
	if err != nil || !got.Service || got.ClientID != "pushapi-1" {
		t.Fatalf("Verify service token = %+v, %v", got, err)
	}
	// A device token is not a service token, and cannot be made one without
	// the key.
	dev := issue(t, s, "alice", time.Hour, t0)
	if c, _ := s.Verify(dev, t0); c.Service {
		t.Fatal("device token verified as a service token")
	}
	parts := strings.Split(dev, ".")
	payload, _ := json.Marshal(map[string]any{"sub": "alice", "svc": true, "iat": t0.Unix(), "exp": t0.Add(time.Hour).Unix()})
	if _, err := s.Verify(parts[0]+"."+base64.RawURLEncoding.EncodeToString(payload)+"."+parts[2], t0); !errors.Is(err, token.ErrTokenInvalid) {
		t.Fatalf("device token promoted to service: %v, want ErrTokenInvalid", err)
	}
}
