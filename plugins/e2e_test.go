package plugins_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
	mqtt3packets "github.com/eclipse/paho.mqtt.golang/packets"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/plugins"
)

// The end-to-end tests run a real mochi server with the hooks of
// plugins.Hooks on a loopback port, and real MQTT 5 and 3.1.1 clients.

const wait = 5 * time.Second

// startServer serves MQTT on 127.0.0.1 with the hooks for auth and returns
// the server and its address. It is closed when the test ends.
func startServer(t *testing.T, auth config.Auth) (*mqtt.Server, string) {
	t.Helper()
	log := testLogger(t)
	s := mqtt.New(&mqtt.Options{
		InlineClient: true,
		Logger:       slog.New(slog.NewTextHandler(&tWriter{t: t}, &slog.HandlerOptions{Level: slog.LevelError})),
	})
	hs, err := plugins.Hooks(plugins.Options{Auth: auth, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		if err := s.AddHook(h, nil); err != nil {
			t.Fatal(err)
		}
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "t", Address: "127.0.0.1:0"})
	if err := s.AddListener(tcp); err != nil { // binds the socket
		t.Fatal(err)
	}
	if err := s.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, tcp.Address()
}

// dialV5 connects an MQTT 5 client with username and password (none when
// empty) and returns it with the CONNACK.
func dialV5(t *testing.T, addr, id, user, pass string) (*testutil.V5, *paho.Connack, error) {
	t.Helper()
	return testutil.DialV5(t, addr, &paho.Connect{
		ClientID: id, CleanStart: true,
		Username: user, UsernameFlag: user != "",
		Password: []byte(pass), PasswordFlag: pass != "",
	})
}

func mustV5(t *testing.T, addr, id, user, pass string) *testutil.V5 {
	t.Helper()
	c, ca, err := dialV5(t, addr, id, user, pass)
	if err != nil {
		t.Fatalf("connect %s: %v (CONNACK %+v)", id, err, ca)
	}
	return c
}

// subV5 subscribes to filter at QoS 1 and returns the SUBACK reason code.
func subV5(t *testing.T, c *testutil.V5, filter string) byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}})
	if sa == nil || len(sa.Reasons) != 1 {
		t.Fatalf("subscribe %s: %v, %+v", filter, err, sa)
	}
	return sa.Reasons[0]
}

// pubV5 publishes at QoS 1 and returns the PUBACK reason code.
func pubV5(t *testing.T, c *testutil.V5, topic, payload string) byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	pr, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)})
	if pr == nil {
		t.Fatalf("publish %s: %v", topic, err)
	}
	return pr.ReasonCode
}

// next returns the next message c receives; ordering per publisher makes
// "the next message is the marker" prove that nothing published before the
// marker was delivered.
func next(t *testing.T, c *testutil.V5, wantTopic, wantPayload string) {
	t.Helper()
	m := c.Next(t, wait)
	if m.Topic != wantTopic || string(m.Payload) != wantPayload {
		t.Fatalf("client %s got %s %q, want %s %q", c.ClientID(), m.Topic, m.Payload, wantTopic, wantPayload)
	}
}

// dialV3 connects an MQTT 3.1.1 client; lost receives the error if the
// server drops the connection.
func dialV3(t *testing.T, addr, id, user, pass string) (*testutil.V3, <-chan error, error) {
	t.Helper()
	lost := make(chan error, 1)
	c, err := testutil.DialV3(t, addr, id, func(o *mqtt3.ClientOptions) {
		o.SetUsername(user).SetPassword(pass).SetConnectionLostHandler(func(_ mqtt3.Client, err error) { lost <- err })
	})
	return c, lost, err
}

func TestE2EConnect(t *testing.T) {
	auth := tokenAuth("")
	_, addr := startServer(t, auth)
	s := newSigner(t, keyA)
	expired, _, err := s.Issue("alice", time.Hour, time.Now().Add(-2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	good := deviceToken(t, s, "alice")
	forged := deviceToken(t, newSigner(t, "0123456789abcdef-forger"), "alice")
	parts := strings.Split(good, ".")
	resigned := parts[0] + "." + parts[1] + "." + strings.Repeat("A", len(parts[2]))
	for _, tc := range []struct {
		name, id, user, pass string
		ok                   bool
	}{
		{"token", "alice", "alice", good, true},
		{"service token", "pushapi", "pushapi", serviceToken(t, s, "pushapi"), true},
		{"expired", "alice", "alice", expired, false},
		{"forged (unknown key)", "alice", "alice", forged, false},
		{"forged (bad signature)", "alice", "alice", resigned, false},
		{"token of another client", "bob", "bob", good, false},
		{"username is not the client ID", "alice", "bob", good, false},
		{"no password", "alice", "alice", "", false},
		{"no credentials", "alice", "", "", false},
	} {
		t.Run(tc.name+"/v5", func(t *testing.T) {
			c, ca, err := dialV5(t, addr, tc.id, tc.user, tc.pass)
			if tc.ok {
				if err != nil || ca.ReasonCode != 0 {
					t.Fatalf("connect: %v, CONNACK %+v", err, ca)
				}
				_ = c.Disconnect(&paho.Disconnect{})
				return
			}
			if err == nil || ca == nil || ca.ReasonCode != 0x86 {
				t.Fatalf("connect: %v, CONNACK %+v; want reason 0x86", err, ca)
			}
		})
		t.Run(tc.name+"/v3", func(t *testing.T) {
			c, _, err := dialV3(t, addr, tc.id, tc.user, tc.pass)
			if tc.ok {
				if err != nil {
					t.Fatalf("connect: %v", err)
				}
				c.Disconnect(100)
				return
			}
			// mochi maps v5 0x86 to v3.1.1 return code 5, not authorized
			// (packets.V5CodesToV3); a hook cannot choose the v3 code.
			if !errors.Is(err, mqtt3packets.ErrorRefusedNotAuthorised) {
				t.Fatalf("connect: %v, want %v", err, mqtt3packets.ErrorRefusedNotAuthorised)
			}
		})
	}
}

func TestE2EAnonymous(t *testing.T) {
	_, addr := startServer(t, config.Auth{Devices: "anonymous"})
	c := mustV5(t, addr, "anon-5", "", "")
	c.Sub(t, "sensors/#", 1)
	c.Pub(t, "sensors/a", 1, false, "hi")
	next(t, c, "sensors/a", "hi")
	if _, _, err := dialV3(t, addr, "anon-3", "", ""); err != nil {
		t.Fatalf("v3 anonymous connect: %v", err)
	}
	// Still a device: the namespace rules hold.
	if code := subV5(t, c, "devices/bob/inbox"); code != 0x87 {
		t.Fatalf("anonymous subscribe to another inbox: 0x%02x, want 0x87", code)
	}
}

func TestE2EInbox(t *testing.T) {
	auth := tokenAuth("")
	_, addr := startServer(t, auth)
	s := newSigner(t, keyA)
	api := mustV5(t, addr, "pushapi", "pushapi", serviceToken(t, s, "pushapi"))
	alice := mustV5(t, addr, "alice", "alice", deviceToken(t, s, "alice"))
	bob := mustV5(t, addr, "bob", "bob", deviceToken(t, s, "bob"))
	carl := mustV5(t, addr, "carl", "carl", deviceToken(t, s, "carl"))

	if code := subV5(t, alice, "devices/bob/inbox"); code != 0x87 {
		t.Fatalf("alice subscribe devices/bob/inbox: SUBACK 0x%02x, want 0x87", code)
	}
	alice.Sub(t, "devices/+/inbox", 1)
	carl.Sub(t, "#", 1)
	bob.Sub(t, "devices/bob/inbox", 1)

	for _, to := range []string{"bob", "alice", "carl"} {
		if code := pubV5(t, api, "devices/"+to+"/inbox", "for "+to); code != 0 {
			t.Fatalf("push API publish to %s's inbox: PUBACK 0x%02x", to, code)
		}
	}
	// Each gets its own inbox, and nothing before it (bob's went first).
	next(t, alice, "devices/alice/inbox", "for alice")
	next(t, carl, "devices/carl/inbox", "for carl")
	next(t, bob, "devices/bob/inbox", "for bob")

	// Devices do not write to inboxes, their own included.
	if code := pubV5(t, alice, "devices/bob/inbox", "spoof"); code != 0x87 {
		t.Fatalf("alice publish to bob's inbox: PUBACK 0x%02x, want 0x87", code)
	}
	if code := pubV5(t, alice, "devices/alice/inbox", "spoof"); code != 0x87 {
		t.Fatalf("alice publish to her inbox: PUBACK 0x%02x, want 0x87", code)
	}
	pubV5(t, api, "devices/bob/inbox", "marker")
	next(t, bob, "devices/bob/inbox", "marker")

	// MQTT 3.1.1: the refusal is SUBACK 0x80.
	v3, _, err := dialV3(t, addr, "dora", "dora", deviceToken(t, s, "dora"))
	if err != nil {
		t.Fatal(err)
	}
	tok := v3.SubscribeMultiple(map[string]byte{"devices/bob/inbox": 1, "devices/dora/inbox": 1}, nil)
	testutil.Wait(t, tok)
	got := tok.(*mqtt3.SubscribeToken).Result()
	if got["devices/bob/inbox"] != 0x80 || got["devices/dora/inbox"] != 1 {
		t.Fatalf("v3 SUBACK %v, want devices/bob/inbox 0x80, devices/dora/inbox 1", got)
	}
}

func TestE2EPush(t *testing.T) {
	auth := tokenAuth("")
	_, addr := startServer(t, auth)
	s := newSigner(t, keyA)
	api := mustV5(t, addr, "pushapi", "pushapi", serviceToken(t, s, "pushapi"))
	alice := mustV5(t, addr, "alice", "alice", deviceToken(t, s, "alice"))
	bob := mustV5(t, addr, "bob", "bob", deviceToken(t, s, "bob"))
	bob.Sub(t, "push/x", 1)
	alice.Sub(t, "push/#", 1)

	if code := pubV5(t, alice, "push/x", "from alice"); code != 0x87 {
		t.Fatalf("device publish to push/x: PUBACK 0x%02x, want 0x87", code)
	}
	if code := pubV5(t, api, "push/x", "from api"); code != 0 {
		t.Fatalf("push API publish to push/x: PUBACK 0x%02x", code)
	}
	next(t, bob, "push/x", "from api")
	next(t, alice, "push/x", "from api")

	// MQTT 3.1.1 has no negative PUBACK: a refused QoS 1 publish closes the
	// connection.
	v3, lost, err := dialV3(t, addr, "carl", "carl", deviceToken(t, s, "carl"))
	if err != nil {
		t.Fatal(err)
	}
	v3.Publish("push/x", 1, false, "from carl")
	select {
	case <-lost:
	case <-time.After(wait):
		t.Fatal("v3 client not disconnected after a refused QoS 1 publish")
	}
	pubV5(t, api, "push/x", "marker")
	next(t, bob, "push/x", "marker")
}

func TestE2ESys(t *testing.T) {
	t.Run("denied", func(t *testing.T) {
		srv, addr := startServer(t, tokenAuth(""))
		s := newSigner(t, keyA)
		alice := mustV5(t, addr, "alice", "alice", deviceToken(t, s, "alice"))
		if code := subV5(t, alice, "$SYS/#"); code != 0x87 {
			t.Fatalf("subscribe $SYS/#: SUBACK 0x%02x, want 0x87", code)
		}
		alice.Sub(t, "#", 1)
		if err := srv.Publish("$SYS/rtm/test", []byte("sys"), false, 1); err != nil {
			t.Fatal(err)
		}
		if err := srv.Publish("after/sys", []byte("marker"), false, 1); err != nil {
			t.Fatal(err)
		}
		next(t, alice, "after/sys", "marker")
	})
	t.Run("allowed by a rule", func(t *testing.T) {
		srv, addr := startServer(t, tokenAuth("allow sub $SYS/#"))
		s := newSigner(t, keyA)
		alice := mustV5(t, addr, "alice", "alice", deviceToken(t, s, "alice"))
		if code := subV5(t, alice, "$SYS/#"); code != 1 {
			t.Fatalf("subscribe $SYS/#: SUBACK 0x%02x, want 1", code)
		}
		// A sub rule gives no right to publish there (mochi refuses a
		// client's publish to $SYS/... before the ACL, with 0x87 too).
		if code := pubV5(t, alice, "$SYS/test", "x"); code != 0x87 {
			t.Fatalf("publish to $SYS/test: PUBACK 0x%02x, want 0x87", code)
		}
		if err := srv.Publish("$SYS/rtm/test", []byte("sys"), false, 1); err != nil {
			t.Fatal(err)
		}
		deadline := time.After(wait)
		for { // skip the broker's retained $SYS/broker/... messages
			select {
			case m := <-alice.Messages:
				if m.Topic == "$SYS/rtm/test" {
					if string(m.Payload) != "sys" {
						t.Fatalf("got %q", m.Payload)
					}
					return
				}
			case <-deadline:
				t.Fatal("no $SYS/rtm/test message")
			}
		}
	})
}

func TestE2ERules(t *testing.T) {
	auth := config.Auth{Devices: "anonymous", TokenKeys: keyA,
		ACL: "deny pub sensors/%c/secret; allow pub devices/+/inbox; deny all users/%u/locked"}
	_, addr := startServer(t, auth)
	alice := mustV5(t, addr, "alice", "alice-user", "")
	bob := mustV5(t, addr, "bob", "", "")
	bob.Sub(t, "devices/bob/inbox", 1)
	bob.Sub(t, "sensors/#", 1)

	if code := pubV5(t, alice, "sensors/alice/secret", "no"); code != 0x87 {
		t.Fatalf("deny pub sensors/%%c/secret: PUBACK 0x%02x, want 0x87", code)
	}
	if code := pubV5(t, alice, "sensors/bob/secret", "yes"); code != 0 {
		t.Fatalf("publish sensors/bob/secret: PUBACK 0x%02x, want 0", code)
	}
	next(t, bob, "sensors/bob/secret", "yes")

	if code := pubV5(t, alice, "devices/bob/inbox", "hello bob"); code != 0 {
		t.Fatalf("allow pub devices/+/inbox: PUBACK 0x%02x, want 0", code)
	}
	next(t, bob, "devices/bob/inbox", "hello bob")

	if code := subV5(t, alice, "users/alice-user/locked"); code != 0x87 {
		t.Fatalf("deny all users/%%u/locked: SUBACK 0x%02x, want 0x87", code)
	}
	if code := subV5(t, alice, "users/alice/locked"); code != 1 {
		t.Fatalf("users/alice/locked (client ID, not username): SUBACK 0x%02x, want 1", code)
	}

	// In anonymous mode the push API's service token still makes it a
	// service.
	api := mustV5(t, addr, "pushapi", "pushapi", serviceToken(t, newSigner(t, keyA), "pushapi"))
	bob.Sub(t, "push/news", 1)
	if code := pubV5(t, api, "push/news", "news"); code != 0 {
		t.Fatalf("service publish in anonymous mode: PUBACK 0x%02x", code)
	}
	next(t, bob, "push/news", "news")
}
