package mochifix_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// logRecorder is a slog.Handler that keeps every record at or above Warn, so
// tests can assert on what the broker logged (e.g. recovered panics).
type logRecorder struct {
	mu      sync.Mutex
	records []string
	attrs   []slog.Attr
}

func (h *logRecorder) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }

func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Level.String())
	b.WriteString(" ")
	b.WriteString(r.Message)
	for _, a := range h.attrs {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
	}
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	h.mu.Lock()
	h.records = append(h.records, b.String())
	h.mu.Unlock()
	return nil
}

func (h *logRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	// Children share the parent's record list.
	return &childRecorder{parent: h, attrs: as}
}

func (h *logRecorder) WithGroup(string) slog.Handler { return h }

// matching returns the recorded lines that contain s.
func (h *logRecorder) matching(s string) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for _, r := range h.records {
		if strings.Contains(r, s) {
			out = append(out, r)
		}
	}
	return out
}

type childRecorder struct {
	parent *logRecorder
	attrs  []slog.Attr
}

func (c *childRecorder) Enabled(ctx context.Context, l slog.Level) bool {
	return c.parent.Enabled(ctx, l)
}

func (c *childRecorder) Handle(ctx context.Context, r slog.Record) error {
	r = r.Clone()
	r.AddAttrs(c.attrs...)
	return c.parent.Handle(ctx, r)
}

func (c *childRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	return &childRecorder{parent: c.parent, attrs: append(append([]slog.Attr{}, c.attrs...), as...)}
}

func (c *childRecorder) WithGroup(string) slog.Handler { return c }

// startBroker runs a real mochi server with an allow-all auth hook and a TCP
// listener on an ephemeral loopback port, and returns it with its address.
// The server is closed when the test ends.
func startBroker(t *testing.T, caps func(*mqtt.Capabilities)) (*mqtt.Server, string, *logRecorder) {
	t.Helper()
	return startBrokerWith(t, func(o *mqtt.Options) {
		if caps != nil {
			caps(o.Capabilities)
		}
	})
}

// startBrokerWith is startBroker with access to all the server options
// (Capabilities is set to the defaults before opts is called).
func startBrokerWith(t *testing.T, opts func(*mqtt.Options)) (*mqtt.Server, string, *logRecorder) {
	t.Helper()

	rec := &logRecorder{}
	o := &mqtt.Options{
		InlineClient: false,
		Capabilities: mqtt.NewDefaultServerCapabilities(),
		Logger:       slog.New(rec),
	}
	if opts != nil {
		opts(o)
	}
	s := mqtt.New(o)
	if err := s.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}

	tcp := listeners.NewTCP(listeners.Config{ID: "t1", Address: "127.0.0.1:0"})
	if err := s.AddListener(tcp); err != nil { // AddListener binds the socket (Listener.Init)
		t.Fatal(err)
	}
	if err := s.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeServer(s) })

	return s, tcp.Address(), rec // Address() is the bound address once Init ran
}

// closed holds the servers closed by closeServer (mqtt.Server.Close panics
// when called twice).
var closed sync.Map

// closeServer closes s once; tests may close their server before the
// cleanup does.
func closeServer(s *mqtt.Server) {
	if _, done := closed.LoadOrStore(s, true); !done {
		_ = s.Close()
	}
}

// connectPaho connects a paho v5 client with a clean session.
func connectPaho(t *testing.T, addr, id string, receiveMax uint16, cfg func(*paho.ClientConfig)) *paho.Client {
	t.Helper()

	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	pc := paho.ClientConfig{Conn: conn, PacketTimeout: 10 * time.Second}
	if cfg != nil {
		cfg(&pc)
	}
	c := paho.NewClient(pc)

	cp := &paho.Connect{ClientID: id, KeepAlive: 30, CleanStart: true}
	if receiveMax > 0 {
		cp.Properties = &paho.ConnectProperties{ReceiveMaximum: &receiveMax}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, err := c.Connect(ctx, cp)
	if err != nil {
		t.Fatalf("connect %s: %v", id, err)
	}
	if ca.ReasonCode != 0 {
		t.Fatalf("connect %s: reason code %d", id, ca.ReasonCode)
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	return c
}

func subscribe(t *testing.T, c *paho.Client, topic string, qos byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: qos}}})
	if err != nil {
		t.Fatalf("subscribe %s: %v", topic, err)
	}
	if len(sa.Reasons) != 1 || sa.Reasons[0] != qos {
		t.Fatalf("subscribe %s: reasons %v", topic, sa.Reasons)
	}
}
