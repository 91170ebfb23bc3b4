package plugins_test

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/plugins"
	"github.com/rtm-dev/rtm/plugins/token"
)

const (
	keyA = "0123456789abcdef-key-a"
	keyB = "0123456789abcdef-key-b"
)

// tokenAuth is auth.devices=token with keyA and the extra rules acl.
func tokenAuth(acl string) config.Auth {
	return config.Auth{Devices: "token", TokenKeys: keyA, TokenTTL: time.Hour, ACL: acl}
}

// newSigner returns a signer for keys, failing the test on error.
func newSigner(t testing.TB, keys ...string) *token.Signer {
	t.Helper()
	s, err := token.NewSigner(keys)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// deviceToken issues a token for id valid for an hour from now.
func deviceToken(t testing.TB, s *token.Signer, id string) string {
	t.Helper()
	tok, _, err := s.Issue(id, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// serviceToken issues a service token for name valid for an hour from now.
func serviceToken(t testing.TB, s *token.Signer, name string) string {
	t.Helper()
	tok, _, err := s.IssueService(name, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// hook returns the single hook of plugins.Hooks for auth, logging to log.
func hook(t testing.TB, auth config.Auth, log *slog.Logger) mqtt.Hook {
	t.Helper()
	hs, err := plugins.Hooks(plugins.Options{Auth: auth, Logger: log})
	if err != nil {
		t.Fatalf("Hooks: %v", err)
	}
	if len(hs) != 1 {
		t.Fatalf("Hooks returned %d hooks, want 1", len(hs))
	}
	if err := hs[0].Init(nil); err != nil {
		t.Fatalf("Init: %v", err)
	}
	return hs[0]
}

// connect runs h's CONNECT checks (OnConnect, then OnConnectAuthenticate)
// for a client without a server, as mochi does, and returns the client and
// the verdict. An empty password is sent
// without the password flag.
func connect(h mqtt.Hook, clientID, username, password string) (*mqtt.Client, bool) {
	cl := &mqtt.Client{ID: clientID}
	cl.Net.Remote = "192.0.2.1:50000"
	cl.Properties.Username = []byte(username)
	pk := packets.Packet{Connect: packets.ConnectParams{
		ClientIdentifier: clientID,
		Username:         []byte(username),
		UsernameFlag:     username != "",
		Password:         []byte(password),
		PasswordFlag:     password != "",
	}}
	if err := h.OnConnect(cl, pk); err != nil {
		return cl, false
	}
	return cl, h.OnConnectAuthenticate(cl, pk)
}

// logBuffer is a concurrency-safe log sink.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) lines() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := strings.TrimSpace(b.buf.String())
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

func (b *logBuffer) logger(level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: level}))
}

// testLogger sends log lines to t.Log until the test ends.
func testLogger(t testing.TB) *slog.Logger {
	w := &tWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}
