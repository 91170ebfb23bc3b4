package plugins_test

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/config"
)

func TestAuthenticateToken(t *testing.T) {
	var logs logBuffer
	h := hook(t, tokenAuth(""), logs.logger(slog.LevelInfo))
	s := newSigner(t, keyA)
	now := time.Now()
	expired, _, err := s.Issue("alice", time.Hour, now.Add(-2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	good := deviceToken(t, s, "alice")
	other := deviceToken(t, newSigner(t, keyB), "alice")
	forged := good[:len(good)-10] + strings.Repeat("A", 10)
	for _, tc := range []struct {
		name, id, user, pass string
		want                 bool
		reason               string // logged when refused
	}{
		{"token", "alice", "alice", good, true, ""},
		{"service token", "pushapi", "pushapi", serviceToken(t, s, "pushapi"), true, ""},
		{"expired", "alice", "alice", expired, false, "expired token"},
		{"forged", "alice", "alice", forged, false, "bad signature"},
		{"other key", "alice", "alice", other, false, "unknown key"},
		{"garbage", "alice", "alice", "not-a-token", false, "malformed token"},
		{"other client", "bob", "bob", good, false, "token for another client"},
		{"service token of another service", "pushapi-2", "pushapi-2", serviceToken(t, s, "pushapi"), false, "token for another client"},
		{"username is not the client ID", "alice", "bob", good, false, "username must equal the client ID"},
		{"no username", "alice", "", good, false, "username must equal the client ID"},
		{"no password", "alice", "alice", "", false, "no token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(logs.lines())
			if _, got := connect(h, tc.id, tc.user, tc.pass); got != tc.want {
				t.Fatalf("OnConnectAuthenticate = %v, want %v", got, tc.want)
			}
			lines := logs.lines()[before:]
			if tc.want {
				if len(lines) != 0 {
					t.Fatalf("accepted connection logged %q", lines)
				}
				return
			}
			if len(lines) != 1 || !strings.Contains(lines[0], fmt.Sprintf("reason=%q", tc.reason)) ||
				!strings.Contains(lines[0], "client_id="+tc.id) || !strings.Contains(lines[0], "remote=192.0.2.1:50000") ||
				!strings.Contains(lines[0], "level=INFO") {
				t.Fatalf("log %q, want one Info line with client_id, remote and reason %q", lines, tc.reason)
			}
			if tc.pass != "" && strings.Contains(lines[0], tc.pass) {
				t.Fatalf("log reveals the token: %q", lines[0])
			}
		})
	}
}

func TestAuthenticateAnonymous(t *testing.T) {
	// Without keys everybody is a device.
	h := hook(t, config.Auth{Devices: "anonymous"}, testLogger(t))
	for _, c := range [][3]string{{"a", "", ""}, {"b", "someone", "secret"}, {"c", "c", "eyJ.x.y"}} {
		cl, ok := connect(h, c[0], c[1], c[2])
		if !ok {
			t.Fatalf("anonymous %v refused", c)
		}
		if h.OnACLCheck(cl, "push/news", true) {
			t.Fatalf("anonymous %v may publish to push/news", c)
		}
	}

	// With keys, a valid token gives its identity: the push API's service
	// token works in rtm dev. An invalid one is ignored.
	auth := config.Auth{Devices: "anonymous", TokenKeys: keyA}
	h = hook(t, auth, testLogger(t))
	s := newSigner(t, keyA)
	for _, tc := range []struct {
		name, id, user, pass string
		service              bool
	}{
		{"no credentials", "pushapi", "", "", false},
		{"service token", "pushapi", "pushapi", serviceToken(t, s, "pushapi"), true},
		{"service token, wrong username", "pushapi", "admin", serviceToken(t, s, "pushapi"), false},
		{"service token for another name", "other", "other", serviceToken(t, s, "pushapi"), false},
		{"bad token", "pushapi", "pushapi", "garbage", false},
		{"device token", "alice", "alice", deviceToken(t, s, "alice"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl, ok := connect(h, tc.id, tc.user, tc.pass)
			if !ok {
				t.Fatal("refused")
			}
			if got := h.OnACLCheck(cl, "push/news", true); got != tc.service {
				t.Fatalf("may publish to push/news = %v, want %v (service)", got, tc.service)
			}
		})
	}
}

func TestIdentityLifetime(t *testing.T) {
	h := hook(t, tokenAuth(""), testLogger(t))
	s := newSigner(t, keyA)
	tok := serviceToken(t, s, "pushapi")
	first, ok := connect(h, "pushapi", "pushapi", tok)
	if !ok || !h.OnACLCheck(first, "devices/bob/inbox", true) {
		t.Fatal("service not accepted as a service")
	}
	// A second connection with the same ID (a takeover) gets the identity;
	// the old one is a plain device until mochi disconnects it, so the
	// table holds one entry per client ID.
	second, ok := connect(h, "pushapi", "pushapi", tok)
	if !ok || !h.OnACLCheck(second, "devices/bob/inbox", true) {
		t.Fatal("second connection not a service")
	}
	if h.OnACLCheck(first, "devices/bob/inbox", true) {
		t.Fatal("taken-over connection still a service")
	}
	// The old connection's disconnect leaves the new one alone.
	h.OnDisconnect(first, nil, true)
	if !h.OnACLCheck(second, "devices/bob/inbox", true) {
		t.Fatal("the old connection's disconnect removed the new one's identity")
	}
	// Its own disconnect forgets it: what is left of the session (offline
	// deliveries) is checked as a device.
	h.OnDisconnect(second, nil, false)
	if h.OnACLCheck(second, "devices/bob/inbox", true) {
		t.Fatal("identity kept after disconnect")
	}
	if !h.OnACLCheck(second, "devices/pushapi/inbox", false) {
		t.Fatal("offline session cannot receive its own inbox")
	}
}

func TestRefusalLogIsRateLimited(t *testing.T) {
	var logs logBuffer
	h := hook(t, tokenAuth(""), logs.logger(slog.LevelInfo))
	const n = 500
	for i := range n {
		if _, ok := connect(h, fmt.Sprintf("dev-%d", i), "x", ""); ok {
			t.Fatal("accepted")
		}
	}
	lines := logs.lines()
	// At most 10 a second; the loop may straddle a second boundary or two.
	if len(lines) == 0 || len(lines) > 30 {
		t.Fatalf("%d refusals logged %d lines, want 1..30", n, len(lines))
	}
	// A long, hostile client ID is cut short in the log.
	logs = logBuffer{}
	h = hook(t, tokenAuth(""), logs.logger(slog.LevelInfo))
	connect(h, strings.Repeat("é", 30000), "x", "")
	if l := logs.lines(); len(l) != 1 || len(l[0]) > 600 {
		t.Fatalf("long client ID logged as %d lines, first %d bytes", len(l), len(l[0]))
	}
}
