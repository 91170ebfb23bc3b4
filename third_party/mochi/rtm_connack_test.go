package mqtt

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// connEndHook records the hooks that tell a connection's fate.
type connEndHook struct {
	HookBase
	mu          sync.Mutex
	established []*Client
	ended       map[*Client]bool // OnDisconnect's expire
	willsSent   []string
}

func (h *connEndHook) ID() string { return "conn-end" }

func (h *connEndHook) Provides(b byte) bool {
	return b == OnSessionEstablished || b == OnDisconnect || b == OnWillSent
}

func (h *connEndHook) OnSessionEstablished(cl *Client, _ packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.established = append(h.established, cl)
}

func (h *connEndHook) OnDisconnect(cl *Client, _ error, expire bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ended == nil {
		h.ended = map[*Client]bool{}
	}
	h.ended[cl] = expire
}

func (h *connEndHook) OnWillSent(cl *Client, _ packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.willsSent = append(h.willsSent, cl.ID)
}

// endOf returns OnDisconnect's expire for the connection of id, and
// whether OnDisconnect was called for one.
func (h *connEndHook) endOf(id string) (expire, ended bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for cl, exp := range h.ended {
		if cl.ID == id {
			return exp, true
		}
	}
	return false, false
}

// connectWithWill encodes a CONNECT of id with a will on will/<id>.
func connectWithWill(t *testing.T, id string, version byte, clean bool, expiry uint32) []byte {
	t.Helper()
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: version,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            clean,
			Keepalive:        30,
			ClientIdentifier: id,
			WillFlag:         true,
			WillTopic:        "will/" + id,
			WillPayload:      []byte("gone"),
		},
	}
	if version == 5 && expiry > 0 {
		pk.Properties.SessionExpiryInterval = expiry
		pk.Properties.SessionExpiryIntervalFlag = true
	}
	var buf bytes.Buffer
	require.NoError(t, pk.ConnectEncode(&buf))
	return buf.Bytes()
}

// TestConnackFailureEndsConnection (rtm patch 115): a client whose CONNACK
// cannot be written (it sent its CONNECT and closed its socket) is ended
// as a connection is: OnDisconnect is called for it, a session that
// expires with its connection leaves Clients (and its subscriptions the
// topic tree), a persistent one stays as an offline session; its will is
// not published (it never learned it was connected). v2.7.9 left both in
// Clients and called no hook.
func TestConnackFailureEndsConnection(t *testing.T) {
	cases := []struct {
		name    string
		version byte
		clean   bool
		expiry  uint32
		expire  bool
	}{
		{"v3 clean session", 4, true, 0, true},
		{"v5 no session expiry", 5, true, 0, true},
		{"v3 persistent", 4, false, 0, false},
		{"v5 persistent", 5, false, 60, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := newServer()
			defer s.Close()
			h := new(connEndHook)
			require.NoError(t, s.AddHook(h, nil))
			id := "connack-fails"

			// An earlier connection's session, with a subscription the
			// new connection inherits unless it starts clean.
			old, _, _ := newTestClient()
			old.ID = id
			old.Properties.ProtocolVersion = c.version
			old.State.Subscriptions.Add("a/b", packets.Subscription{Filter: "a/b", Qos: 1})
			s.Topics.Subscribe(id, packets.Subscription{Filter: "a/b", Qos: 1})
			old.Stop(nil) // offline
			s.Clients.Add(old)

			r, w := net.Pipe()
			done := make(chan error, 1)
			go func() { done <- s.EstablishConnection("tcp", r) }()
			_, err := w.Write(connectWithWill(t, id, c.version, c.clean, c.expiry))
			require.NoError(t, err)
			require.NoError(t, w.Close()) // the CONNACK's write fails

			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("EstablishConnection did not return")
			}
			require.ErrorContains(t, err, "ack connection packet")

			expire, ended := h.endOf(id)
			require.True(t, ended, "no OnDisconnect for a connection whose CONNACK failed")
			require.Equal(t, c.expire, expire)
			h.mu.Lock()
			require.Empty(t, h.willsSent, "will of a client that never got its CONNACK published")
			require.Empty(t, h.established)
			h.mu.Unlock()

			cur, ok := s.Clients.Get(id)
			if c.expire {
				require.False(t, ok, "a session ending with its failed connection stayed in Clients")
				require.Empty(t, s.Topics.Subscribers("a/b").Subscriptions, "its subscription stayed")
				return
			}
			require.True(t, ok, "a persistent session was dropped")
			require.NotEqual(t, old, cur)
			require.True(t, cur.Closed())
			require.Zero(t, cur.Properties.Will.Flag)
			_, subscribed := cur.State.Subscriptions.Get("a/b")
			require.True(t, subscribed, "the inherited subscription is gone")
		})
	}
}

// TestResendFailureEndsEstablishedConnection (rtm patch 116): a client
// that got its CONNACK and whose session's resend cannot be written (it
// closed its socket) was connected: OnSessionEstablished and OnDisconnect
// are called, and its will is published. v2.7.9 called neither hook.
func TestResendFailureEndsEstablishedConnection(t *testing.T) {
	s := newServer()
	defer s.Close()
	h := new(connEndHook)
	require.NoError(t, s.AddHook(h, nil))
	id := "resend-fails"

	old, _, _ := newTestClient()
	old.ID = id
	old.Properties.ProtocolVersion = 5
	old.Properties.Props.SessionExpiryInterval = 60
	old.State.Subscriptions.Add("a/b", packets.Subscription{Filter: "a/b", Qos: 1})
	s.Topics.Subscribe(id, packets.Subscription{Filter: "a/b", Qos: 1})
	old.State.Inflight.Set(*packets.TPacketData[packets.Publish].Get(packets.TPublishQos1).Packet)
	old.Stop(nil) // offline
	s.Clients.Add(old)

	r, w := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.EstablishConnection("tcp", r) }()
	_, err := w.Write(connectWithWill(t, id, 5, false, 60))
	require.NoError(t, err)

	// Read the CONNACK exactly, then close before the resend.
	fh := make([]byte, 2)
	_, err = io.ReadFull(w, fh)
	require.NoError(t, err)
	require.Equal(t, byte(packets.Connack<<4), fh[0])
	require.Less(t, fh[1], byte(128))
	_, err = io.ReadFull(w, make([]byte, fh[1]))
	require.NoError(t, err)
	require.NoError(t, w.Close())

	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("EstablishConnection did not return")
	}
	require.ErrorContains(t, err, "resend inflight")

	expire, ended := h.endOf(id)
	require.True(t, ended, "no OnDisconnect for a connection whose resend failed")
	require.False(t, expire)
	h.mu.Lock()
	require.Len(t, h.established, 1, "OnSessionEstablished not called after the CONNACK was sent")
	require.Equal(t, []string{id}, h.willsSent, "the will of a connected client that went was not published")
	h.mu.Unlock()
	cur, ok := s.Clients.Get(id)
	require.True(t, ok)
	require.NotEqual(t, old, cur)
	require.Equal(t, 1, cur.State.Inflight.Len(), "the session's message is lost")
}

// TestExpiredEndKeepsNewerConnection (rtm patch 115): a connection whose
// session expires with it ends (its CONNACK failed, or its network
// connection closed) while a newer CONNECT of its client ID takes the
// session over, after the end checked that it was not taken over and
// before it removed the session: the newer connection must stay in
// Clients with its inherited subscription in the topic tree. v2.7.9
// deleted the client ID from Clients, and the ID's subscriptions from the
// topic tree: the newer client, connected, got no messages.
func TestExpiredEndKeepsNewerConnection(t *testing.T) {
	for _, connackFails := range []bool{true, false} {
		name := "network connection closed"
		if connackFails {
			name = "CONNACK failed"
		}
		t.Run(name, func(t *testing.T) {
			s := newServer()
			defer s.Close()
			id := "end-races-takeover"
			// A subscription the connection inherits and its successor too.
			old, _, _ := newTestClient()
			old.ID = id
			old.Properties.ProtocolVersion = 5
			old.State.Subscriptions.Add("a/b", packets.Subscription{Filter: "a/b", Qos: 1})
			s.Topics.Subscribe(id, packets.Subscription{Filter: "a/b", Qos: 1})
			old.Stop(nil)
			s.Clients.Add(old)

			var newer *Client
			raced := make(chan struct{})
			var once sync.Once
			var newerConn net.Conn
			defer func() {
				if newerConn != nil {
					_ = newerConn.Close() // before s.Close, which waits for its connection
				}
			}()
			s.testBeforeEndSession = func(cl *Client) {
				if cl.ID != id || cl == old {
					return
				}
				once.Do(func() {
					defer close(raced)
					r, w := net.Pipe()
					newerConn = w
					go func() { _, _ = io.Copy(io.Discard, w) }()
					go func() { _ = s.EstablishConnection("tcp", r) }()
					if _, err := w.Write(connectWithWill(t, id, 5, false, 0)); err != nil {
						t.Errorf("newer CONNECT: %v", err)
						return
					}
					for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
						if cur, ok := s.Clients.Get(id); ok && cur != cl {
							newer = cur
							return
						}
					}
					t.Error("the newer CONNECT did not take over")
				})
			}

			r, w := net.Pipe()
			done := make(chan error, 1)
			go func() { done <- s.EstablishConnection("tcp", r) }()
			_, err := w.Write(connectWithWill(t, id, 5, false, 0)) // v5, expiry 0: expires with its connection
			require.NoError(t, err)
			if !connackFails {
				buf := make([]byte, 64)
				_, err = w.Read(buf) // its CONNACK
				require.NoError(t, err)
			}
			require.NoError(t, w.Close())
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("EstablishConnection did not return")
			}
			<-raced
			cur, ok := s.Clients.Get(id)
			require.True(t, ok, "the newer connection was deleted from Clients by the older one's end")
			require.Equal(t, newer, cur)
			subs := s.Topics.Subscribers("a/b").Subscriptions
			require.Contains(t, subs, id, "the newer connection's inherited subscription left the topic tree")
		})
	}
}

// TestDetachSessionKeepsNewerConnection (rtm patch 119): a CONNECT of the
// client ID takes the session over between DetachSession's lookup and its
// lock. DetachSession must report the takeover and leave the newer
// connection in Clients with its inherited subscription; v2.7.9's pattern
// (look up, lock, delete by ID) deleted the newer connection from Clients
// and returned an empty session as detached.
func TestDetachSessionKeepsNewerConnection(t *testing.T) {
	s := newServer()
	defer s.Close()
	id := "detach-races-takeover"
	old, _, _ := newTestClient()
	old.ID = id
	old.Properties.ProtocolVersion = 5
	old.Properties.Props.SessionExpiryInterval, old.Properties.Props.SessionExpiryIntervalFlag = 300, true
	old.State.Subscriptions.Add("a/b", packets.Subscription{Filter: "a/b", Qos: 1})
	s.Topics.Subscribe(id, packets.Subscription{Filter: "a/b", Qos: 1})
	old.Stop(nil) // an offline session
	s.Clients.Add(old)

	var newer *Client
	var newerConn net.Conn
	defer func() {
		if newerConn != nil {
			_ = newerConn.Close() // before s.Close, which waits for its connection
		}
	}()
	s.testBeforeDetach = func(cl *Client) {
		r, w := net.Pipe()
		newerConn = w
		go func() { _, _ = io.Copy(io.Discard, w) }()
		go func() { _ = s.EstablishConnection("tcp", r) }()
		if _, err := w.Write(connectWithWill(t, id, 5, false, 300)); err != nil {
			t.Errorf("newer CONNECT: %v", err)
			return
		}
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			if cur, ok := s.Clients.Get(id); ok && cur != cl {
				newer = cur
				return
			}
		}
		t.Error("the newer CONNECT did not take over")
	}
	sess, res := s.DetachSession(id)
	require.NotNil(t, newer)
	require.Equal(t, DetachTakenOver, res, "a session taken over meanwhile reported as %v", res)
	require.Empty(t, sess.Subscriptions)
	cur, ok := s.Clients.Get(id)
	require.True(t, ok, "the newer connection was deleted from Clients by the detach")
	require.Equal(t, newer, cur)
	require.Contains(t, s.Topics.Subscribers("a/b").Subscriptions, id, "the newer connection's inherited subscription left the topic tree")

	// With no CONNECT in between, the newer connection is detached.
	s.testBeforeDetach = nil
	sess, res = s.DetachSession(id)
	require.Equal(t, Detached, res)
	require.Len(t, sess.Subscriptions, 1)
	_, ok = s.Clients.Get(id)
	require.False(t, ok)
}

// TestDetachClientLeavesNewerConnection (rtm patch 119): a caller that
// read a client and decided to end its session detaches only that one: a
// CONNECT that took the session over since is left as it is.
func TestDetachClientLeavesNewerConnection(t *testing.T) {
	s := newServer()
	defer s.Close()
	id := "detach-client"
	old, _, _ := newTestClient()
	old.ID = id
	old.Properties.ProtocolVersion = 5
	old.State.Subscriptions.Add("a/b", packets.Subscription{Filter: "a/b", Qos: 1})
	s.Topics.Subscribe(id, packets.Subscription{Filter: "a/b", Qos: 1})
	old.Stop(nil)
	s.Clients.Add(old)

	r, w := net.Pipe()
	defer func() { _ = w.Close() }()
	go func() { _, _ = io.Copy(io.Discard, w) }()
	go func() { _ = s.EstablishConnection("tcp", r) }()
	_, err := w.Write(connectWithWill(t, id, 5, false, 300))
	require.NoError(t, err)
	var newer *Client
	for deadline := time.Now().Add(10 * time.Second); newer == nil && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if cur, ok := s.Clients.Get(id); ok && cur != old {
			newer = cur
		}
	}
	require.NotNil(t, newer, "the newer CONNECT did not take over")

	sess, res := s.DetachClient(old)
	require.Equal(t, DetachTakenOver, res)
	require.Empty(t, sess.Subscriptions)
	cur, ok := s.Clients.Get(id)
	require.True(t, ok)
	require.Equal(t, newer, cur)
	require.Contains(t, s.Topics.Subscribers("a/b").Subscriptions, id)
	require.False(t, newer.Closed(), "the newer connection was disconnected")
}
