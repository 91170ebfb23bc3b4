package plugins_test

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
	mqtt3packets "github.com/eclipse/paho.mqtt.golang/packets"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// willConn is a client connected with a will; drop ends its connection
// without DISCONNECT, so the server publishes the will.
type willConn struct {
	drop func()
	v5   *testutil.V5
	v3   *testutil.V3
	lost chan error // MQTT 3.1.1: the server closed the connection
}

// dialWill connects id (MQTT 5 if v5, else 3.1.1) with username user,
// password pass (none if empty) and a QoS 1 will "gone" on topic. A refused
// CONNECT returns its CONNACK code (MQTT 3.1.1: the return code) and an
// error.
func dialWill(t *testing.T, addr string, v5 bool, id, user, pass, topic string, retain bool) (*willConn, byte, error) {
	t.Helper()
	if v5 {
		c, ca, err := testutil.DialV5(t, addr, &paho.Connect{
			ClientID: id, CleanStart: true,
			Username: user, UsernameFlag: user != "",
			Password: []byte(pass), PasswordFlag: pass != "",
			WillMessage: &paho.WillMessage{Topic: topic, QoS: 1, Retain: retain, Payload: []byte("gone")},
		})
		if err != nil {
			if ca == nil {
				return nil, 0, err
			}
			return nil, ca.ReasonCode, err
		}
		return &willConn{v5: c, drop: func() { _ = c.Conn.Close() }}, 0, nil
	}
	conns, lost := make(chan net.Conn, 1), make(chan error, 1)
	c, err := testutil.DialV3(t, addr, id, func(o *mqtt3.ClientOptions) {
		o.SetUsername(user).SetPassword(pass).SetWill(topic, "gone", 1, retain)
		o.SetConnectionLostHandler(func(_ mqtt3.Client, err error) { lost <- err })
		o.SetCustomOpenConnectionFn(func(u *url.URL, _ mqtt3.ClientOptions) (net.Conn, error) {
			conn, err := net.DialTimeout("tcp", u.Host, wait)
			if err == nil {
				conns <- conn
			}
			return conn, err
		})
	})
	if err != nil {
		var code byte
		switch {
		case errors.Is(err, mqtt3packets.ErrorRefusedNotAuthorised):
			code = mqtt3packets.ErrRefusedNotAuthorised
		case errors.Is(err, mqtt3packets.ErrorRefusedIDRejected):
			code = mqtt3packets.ErrRefusedIDRejected
		case errors.Is(err, mqtt3packets.ErrorRefusedBadUsernameOrPassword):
			code = mqtt3packets.ErrRefusedBadUsernameOrPassword
		}
		return nil, code, err
	}
	conn := <-conns
	return &willConn{v3: c, lost: lost, drop: func() { _ = conn.Close() }}, 0, nil
}

// waitGone waits until the server has forgotten client id: for a clean
// session, after it published the client's will.
func waitGone(t *testing.T, s *mqtt.Server, id string) {
	t.Helper()
	testutil.WaitFor(t, wait, func() error {
		if _, ok := s.Clients.Get(id); ok {
			return fmt.Errorf("client %s still known to the server", id)
		}
		return nil
	})
}

// TestE2EWillACL: a device may not set as its will a topic it may not
// publish to (another device's inbox, a push channel), retained or not,
// MQTT 5 or 3.1.1, token or anonymous: the CONNECT is refused with 0x87
// (3.1.1: 5, not authorized) and nothing is ever delivered or retained. A
// will the device may publish is still sent, and retained.
func TestE2EWillACL(t *testing.T) {
	for _, mode := range []struct {
		name string
		auth config.Auth
	}{
		{"token", tokenAuth("")},
		{"anonymous", config.Auth{Devices: "anonymous", TokenKeys: keyA}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			s, addr := startServer(t, mode.auth)
			sg := newSigner(t, keyA)
			pass := func(id string) string {
				if mode.name == "token" {
					return deviceToken(t, sg, id)
				}
				return ""
			}
			api := mustV5(t, addr, "pushapi", "pushapi", serviceToken(t, sg, "pushapi"))
			bob := mustV5(t, addr, "bob", "bob", pass("bob"))
			bob.Sub(t, "devices/bob/inbox", 1)
			carol := mustV5(t, addr, "carol", "carol", pass("carol"))
			carol.Sub(t, "push/#", 1)

			for _, topic := range []string{"devices/bob/inbox", "push/news"} {
				for _, retain := range []bool{false, true} {
					for _, v5 := range []bool{true, false} {
						name := fmt.Sprintf("will %s retain=%v v5=%v", topic, retain, v5)
						c, code, err := dialWill(t, addr, v5, "alice", "alice", pass("alice"), topic, retain)
						if err == nil {
							t.Errorf("%s: CONNECT accepted", name)
							c.drop()
							waitGone(t, s, "alice")
							continue
						}
						want := byte(0x87)
						if !v5 {
							want = mqtt3packets.ErrRefusedNotAuthorised
						}
						if code != want {
							t.Errorf("%s: %v (code 0x%02x), want CONNACK 0x%02x", name, err, code, want)
						}
					}
				}
			}

			// Nothing forged arrived: the next message each gets is the
			// push API's marker.
			api.Pub(t, "devices/bob/inbox", 1, false, "marker")
			next(t, bob, "devices/bob/inbox", "marker")
			api.Pub(t, "push/news", 1, false, "marker")
			next(t, carol, "push/news", "marker")
			// Nor was anything retained: a new subscriber gets no retained
			// message before the next marker.
			_ = bob.Disconnect(&paho.Disconnect{})
			bob2 := mustV5(t, addr, "bob", "bob", pass("bob"))
			bob2.Sub(t, "devices/bob/inbox", 1)
			dave := mustV5(t, addr, "dave", "dave", pass("dave"))
			dave.Sub(t, "push/#", 1)
			api.Pub(t, "devices/bob/inbox", 1, false, "marker 2")
			api.Pub(t, "push/news", 1, false, "marker 2")
			next(t, bob2, "devices/bob/inbox", "marker 2")
			next(t, dave, "push/news", "marker 2")
			next(t, carol, "push/news", "marker 2")

			// A will the device may publish is sent (and retained) when its
			// connection drops.
			watcher := mustV5(t, addr, "watcher", "watcher", pass("watcher"))
			watcher.Sub(t, "status/#", 1)
			// mochi sends the SUBACK before it looks for retained messages:
			// a will retained in between would arrive twice. The watcher's
			// next packet is handled once the SUBSCRIBE is done.
			watcher.Pub(t, "status/settled", 1, false, "settled")
			next(t, watcher, "status/settled", "settled")
			for _, v5 := range []bool{true, false} {
				id := fmt.Sprintf("dev-v5-%v", v5)
				c, code, err := dialWill(t, addr, v5, id, id, pass(id), "status/"+id, true)
				if err != nil {
					t.Fatalf("will on status/%s: %v (code 0x%02x)", id, err, code)
				}
				c.drop()
				next(t, watcher, "status/"+id, "gone")
			}
			late := mustV5(t, addr, "late", "late", pass("late"))
			late.Sub(t, "status/dev-v5-true", 1)
			if m := late.Next(t, wait); string(m.Payload) != "gone" || !m.Retain {
				t.Fatalf("retained will: %q retain=%v", m.Payload, m.Retain)
			}
			// A service may set any will.
			c, code, err := dialWill(t, addr, true, "pushapi-2", "pushapi-2", serviceToken(t, sg, "pushapi-2"), "push/news", false)
			if err != nil {
				t.Fatalf("service will on push/news: %v (code 0x%02x)", err, code)
			}
			c.drop()
			next(t, carol, "push/news", "gone")
		})
	}
}

// TestE2EClientIDTopicLevels: a client ID that is not one topic level, or
// starts with '$', is refused at CONNECT with 0x85 (3.1.1: 2, identifier
// rejected), with a token or anonymous: "a/b" would have the inbox
// devices/a/b/inbox, which the ACL cannot tell from a topic open to all.
func TestE2EClientIDTopicLevels(t *testing.T) {
	for _, mode := range []struct {
		name string
		auth config.Auth
	}{
		{"token", tokenAuth("")},
		{"anonymous", config.Auth{Devices: "anonymous"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			_, addr := startServer(t, mode.auth)
			// A token the push API could issue before it refused such IDs
			// is refused by the verifier; the ID is refused before that.
			for _, id := range []string{"a/b", "a/", "/a", "a+", "+", "#", "a#", "$SYS", "$x"} {
				pass := ""
				if mode.name == "token" {
					pass = deviceToken(t, newSigner(t, keyA), "x") // any: the ID is refused first
				}
				c, ca, err := dialV5(t, addr, id, id, pass)
				if err == nil || ca == nil || ca.ReasonCode != 0x85 {
					if c != nil {
						_ = c.Disconnect(&paho.Disconnect{})
					}
					t.Errorf("v5 %q: %v, CONNACK %+v; want 0x85", id, err, ca)
				}
				c3, _, err := dialV3(t, addr, id, id, pass)
				if !errors.Is(err, mqtt3packets.ErrorRefusedIDRejected) {
					if c3 != nil {
						c3.Disconnect(100)
					}
					t.Errorf("v3 %q: %v; want %v", id, err, mqtt3packets.ErrorRefusedIDRejected)
				}
			}
			// '$' inside, spaces, and an empty ID the server assigns one
			// for (anonymous) are fine.
			if mode.name == "anonymous" {
				for _, id := range []string{"a$b", "a b", "dev-ÄÖ"} {
					mustV5(t, addr, id, "", "")
				}
				c, ca, err := dialV5(t, addr, "", "", "")
				if err != nil || ca.Properties == nil || strings.ContainsAny(ca.Properties.AssignedClientID, "/+#$") {
					t.Fatalf("empty client ID: %v, %+v", err, ca)
				}
				_ = c.Disconnect(&paho.Disconnect{})
			}
		})
	}
}

// TestE2ETokenExpiry: a connection authenticated by a token is closed when
// the token expires: MQTT 5 with DISCONNECT 0xA0 (maximum connect time),
// MQTT 3.1.1 by closing it; its will is published, as for any connection
// the server closes. A token for the next connection works as before.
func TestE2ETokenExpiry(t *testing.T) {
	s, addr := startServer(t, tokenAuth(""))
	sg := newSigner(t, keyA)
	// 3 s (whole seconds: it expires 2 to 3 s after it was issued), so a
	// slow CONNECT on a loaded machine still finds it valid.
	short := func(id string) string {
		tok, _, err := sg.Issue(id, 3*time.Second, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	watcher := mustV5(t, addr, "watcher", "watcher", deviceToken(t, sg, "watcher"))
	watcher.Sub(t, "status/#", 1)

	c5, _, err := dialWill(t, addr, true, "dev5", "dev5", short("dev5"), "status/dev5", false)
	if err != nil {
		t.Fatal(err)
	}
	c3, _, err := dialWill(t, addr, false, "dev3", "dev3", short("dev3"), "status/dev3", false)
	if err != nil {
		t.Fatal(err)
	}
	// A token that lasts: this connection stays.
	steady := mustV5(t, addr, "steady", "steady", deviceToken(t, sg, "steady"))

	select {
	case d := <-c5.v5.Disconnects:
		if d.ReasonCode != 0xA0 {
			t.Fatalf("v5 DISCONNECT reason 0x%02x, want 0xA0", d.ReasonCode)
		}
	case <-time.After(3 * wait):
		t.Fatal("v5 connection not disconnected after its token expired")
	}
	select {
	case <-c3.lost:
	case <-time.After(3 * wait):
		t.Fatal("v3 connection not closed after its token expired")
	}
	got := map[string]bool{}
	for range 2 {
		m := watcher.Next(t, wait)
		got[m.Topic] = string(m.Payload) == "gone"
	}
	if !got["status/dev5"] || !got["status/dev3"] {
		t.Fatalf("wills received: %v, want both", got)
	}
	waitGone(t, s, "dev5")
	waitGone(t, s, "dev3")
	// The steady connection still works, and an expired token is refused
	// at CONNECT as before.
	steady.Sub(t, "x", 1)
	steady.Pub(t, "x", 1, false, "still here")
	next(t, steady, "x", "still here")
	if _, ca, err := dialV5(t, addr, "dev5", "dev5", short("dev5")); err != nil {
		t.Fatalf("reconnect with a fresh token: %v, %+v", err, ca)
	}
}

// BenchmarkTokenConnectionHeld reports the heap a connection authenticated
// by a token keeps in the hook between CONNECT and disconnect (its identity
// and, from the CONNACK, its expiry timer): bytes/conn; the client itself,
// which mochi holds anyway, is not counted.
func BenchmarkTokenConnectionHeld(b *testing.B) {
	h := hook(b, tokenAuth(""), nil)
	sg := newSigner(b, keyA)
	const n = 10000
	toks := make([]string, n)
	cls := make([]*mqtt.Client, n)
	for i := range n {
		toks[i] = deviceToken(b, sg, fmt.Sprintf("dev-%d", i))
		cls[i] = &mqtt.Client{ID: fmt.Sprintf("dev-%d", i)}
	}
	b.ResetTimer()
	var held float64
	for range b.N {
		before := heapAlloc()
		for i, cl := range cls {
			pk := packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: cl.ID,
				Username: []byte(cl.ID), UsernameFlag: true, Password: []byte(toks[i]), PasswordFlag: true}}
			if h.OnConnect(cl, pk) != nil || !h.OnConnectAuthenticate(cl, pk) {
				b.Fatal("refused")
			}
			h.OnSessionEstablished(cl, pk)
		}
		held += float64(heapAlloc()-before) / n
		for _, cl := range cls {
			h.OnDisconnect(cl, nil, true)
		}
	}
	b.ReportMetric(held/float64(b.N), "bytes/conn")
}

func heapAlloc() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestExpiryWithoutIdentity: a connection whose identity a newer connection
// with the same client ID took (and which stays up if that one fails before
// its CONNACK) is still closed when its token expires.
func TestExpiryWithoutIdentity(t *testing.T) {
	h := hook(t, tokenAuth(""), nil)
	sg := newSigner(t, keyA)
	short, _, err := sg.Issue("alice", 2*time.Second, time.Now()) // valid 1 to 2 s
	if err != nil {
		t.Fatal(err)
	}
	first, ok := connect(h, "alice", "alice", short)
	if !ok {
		t.Fatal("first connection refused")
	}
	if _, ok := connect(h, "alice", "alice", deviceToken(t, sg, "alice")); !ok {
		t.Fatal("second connection refused")
	}
	h.OnSessionEstablished(first, packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: "alice",
		Username: []byte("alice"), UsernameFlag: true, Password: []byte(short), PasswordFlag: true}})
	testutil.WaitFor(t, 3*wait, func() error {
		if err := first.StopCause(); !errors.Is(err, packets.ErrMaxConnectTime) {
			return fmt.Errorf("first connection: stop cause %v, want %v", err, packets.ErrMaxConnectTime)
		}
		return nil
	})
}
