// SPDX-License-Identifier: MIT
// rtm patch 17: tests of the cluster entry points, see PATCHES.md.

package mqtt

import (
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

func TestTopicsIndexOnRouteCountsSubscribers(t *testing.T) {
	x := NewTopicsIndex()
	var events []string
	x.OnRoute = func(filter string, added bool) { events = append(events, fmt.Sprintf("%s %t", filter, added)) }

	x.Subscribe("c1", packets.Subscription{Filter: "a/+"})
	x.Subscribe("c2", packets.Subscription{Filter: "a/+"})
	x.Subscribe("c1", packets.Subscription{Filter: "a/+", Qos: 1}) // a change, not a new route
	x.Subscribe("c1", packets.Subscription{Filter: "$SHARE/g/a/+"})
	x.Subscribe("c2", packets.Subscription{Filter: "$share/g/a/+"})
	x.Subscribe("c2", packets.Subscription{Filter: "$share/h/a/+"})
	require.Equal(t, []string{"a/+ true", "$share/g/a/+ true", "$share/h/a/+ true"}, events)

	events = nil
	x.Unsubscribe("a/+", "c3") // never subscribed
	x.Unsubscribe("a/+", "c1")
	x.Unsubscribe("$share/g/a/+", "c1")
	require.Empty(t, events)
	x.Unsubscribe("a/+", "c2")
	x.Unsubscribe("$share/g/a/+", "c2")
	x.Unsubscribe("$share/h/a/+", "c2")
	x.Unsubscribe("a/+", "c2") // again
	require.Equal(t, []string{"a/+ false", "$share/g/a/+ false", "$share/h/a/+ false"}, events)
	require.Equal(t, "$share/g/x/y", SharedRoute("$SHARE/g/x/y"))
	require.Equal(t, "x/y", SharedRoute("x/y"))
}

// TestDeliverFromPeerKeepsOriginAndSelectsShared: No Local holds for the
// origin's ID, and share groups get the message only when chosen.
func TestDeliverFromPeerKeepsOriginAndSelectsShared(t *testing.T) {
	s := newServer()
	mk := func(id string) (*Client, chan packets.Packet) {
		cl, r, w := newTestClient()
		t.Cleanup(func() { _ = w.Close(); _ = r.Close() })
		cl.ID = id
		cl.Properties.ProtocolVersion = 5
		s.Clients.Add(cl)
		got := make(chan packets.Packet, 10)
		go func() {
			for {
				typ, body, err := readRawPacket(r)
				if err != nil {
					return
				}
				if typ>>4 == packets.Publish {
					pk := packets.Packet{ProtocolVersion: 5}
					_ = pk.FixedHeader.Decode(typ)
					_ = pk.PublishDecode(body)
					got <- pk
				}
			}
		}()
		return cl, got
	}
	_, originGot := mk("origin")
	_, plainGot := mk("plain")
	_, sharedGot := mk("member")
	s.Topics.Subscribe("origin", packets.Subscription{Filter: "a/b", NoLocal: true})
	s.Topics.Subscribe("plain", packets.Subscription{Filter: "a/b"})
	s.Topics.Subscribe("member", packets.Subscription{Filter: "$share/g/a/b"})

	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte("1"), Origin: "origin"}
	s.DeliverFromPeer(pk, nil) // not chosen for the group
	pk.Payload = []byte("2")
	s.DeliverFromPeer(pk, func(route string) bool { return route == "$share/g/a/b" })

	require.Equal(t, "1", string((<-plainGot).Payload))
	require.Equal(t, "2", string((<-plainGot).Payload))
	require.Equal(t, "2", string((<-sharedGot).Payload)) // only the chosen one
	select {
	case p := <-originGot:
		t.Fatalf("No Local subscriber got %q from its own publish", p.Payload)
	case p := <-sharedGot:
		t.Fatalf("share group got %q although another node was chosen", p.Payload)
	default:
	}
}

func TestDetachAndAdoptSession(t *testing.T) {
	a, b := newServer(), newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.ID = "dev"
	cl.Properties.ProtocolVersion = 5
	cl.Properties.Props.SessionExpiryInterval, cl.Properties.Props.SessionExpiryIntervalFlag = 300, true
	a.Clients.Add(cl)
	sub := packets.Subscription{Filter: "in/dev", Qos: 1}
	a.Topics.Subscribe("dev", sub)
	cl.State.Subscriptions.Add(sub.Filter, sub)
	for i := 1; i <= 3; i++ {
		cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i), TopicName: "in/dev"})
	}
	var routes []string
	a.Topics.OnRoute = func(f string, added bool) { routes = append(routes, fmt.Sprintf("%s %t", f, added)) }

	sess, res := a.DetachSession("dev")
	require.Equal(t, Detached, res)
	require.Len(t, sess.Subscriptions, 1)
	require.Len(t, sess.Inflight, 3)
	require.Equal(t, uint16(1), sess.Inflight[0].PacketID)
	require.True(t, sess.ExpirySet)
	require.Equal(t, uint32(300), sess.Expiry)
	require.True(t, cl.Closed())
	_, still := a.Clients.Get("dev")
	require.False(t, still)
	require.Equal(t, []string{"in/dev false"}, routes)
	require.Empty(t, a.Topics.Subscribers("in/dev").Subscriptions)
	_, res = a.DetachSession("dev")
	require.Equal(t, DetachNotFound, res)

	b.AdoptSession("dev", 5, sess)
	held, ok := b.Clients.Get("dev")
	require.True(t, ok)
	require.True(t, held.Closed())
	require.Equal(t, 3, held.State.Inflight.Len())
	require.Contains(t, b.Topics.Subscribers("in/dev").Subscriptions, "dev")
	require.Equal(t, uint32(300), held.Properties.Props.SessionExpiryInterval)

	// Messages for it queue in the adopted session meanwhile.
	b.DeliverFromPeer(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "in/dev", Payload: []byte("x")}, nil)
	require.Equal(t, 4, held.State.Inflight.Len())
}

// TestDeliverToClient (rtm patch 91): a message for one client's session
// reaches that client only, through its own subscription (QoS downgraded),
// and queues while it is offline; an unknown client or one without a
// matching subscription gets nothing.
func TestDeliverToClient(t *testing.T) {
	s := newServer()
	held := s.NewClient(nil, "cluster", "moved", false)
	held.Properties.ProtocolVersion = 5
	held.Stop(packets.ErrSessionTakenOver) // offline: messages queue
	s.Clients.Add(held)
	other := s.NewClient(nil, "cluster", "other", false)
	other.Properties.ProtocolVersion = 5
	other.Stop(packets.ErrSessionTakenOver)
	s.Clients.Add(other)
	s.Topics.Subscribe("moved", packets.Subscription{Filter: "in/#", Qos: 1})
	s.Topics.Subscribe("other", packets.Subscription{Filter: "in/#", Qos: 1})

	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, TopicName: "in/x", Payload: []byte("late")}
	require.True(t, s.DeliverToClient("moved", pk))
	require.Equal(t, 1, held.State.Inflight.Len())
	require.Equal(t, 0, other.State.Inflight.Len())
	got := held.State.Inflight.GetAll(false)[0]
	require.Equal(t, "late", string(got.Payload))
	require.Equal(t, byte(1), got.FixedHeader.Qos)

	require.False(t, s.DeliverToClient("nobody", pk))
	pk.TopicName = "out/x"
	require.False(t, s.DeliverToClient("moved", pk))
	require.Equal(t, 1, held.State.Inflight.Len())
}

func TestSubscribeClientServerSide(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.ID = "dev"
	cl.Properties.ProtocolVersion = 5
	s.Clients.Add(cl)
	var routes []string
	s.Topics.OnRoute = func(f string, added bool) { routes = append(routes, fmt.Sprintf("%s %t", f, added)) }

	require.False(t, s.SubscribeClient(cl, packets.Subscription{Filter: "push/news", Qos: 1}))
	require.True(t, s.SubscribeClient(cl, packets.Subscription{Filter: "push/news", Qos: 1}))
	require.Contains(t, s.Topics.Subscribers("push/news").Subscriptions, "dev")
	_, ok := cl.State.Subscriptions.Get("push/news")
	require.True(t, ok)
	require.Equal(t, int64(1), s.Info.Subscriptions)

	require.True(t, s.UnsubscribeClientFilter(cl, "push/news"))
	require.False(t, s.UnsubscribeClientFilter(cl, "push/news"))
	require.Empty(t, s.Topics.Subscribers("push/news").Subscriptions)
	require.Equal(t, int64(0), s.Info.Subscriptions)
	require.Equal(t, []string{"push/news true", "push/news false"}, routes)
}

// sessionRefuseHook refuses every session it is asked to establish.
type sessionRefuseHook struct{ HookBase }

func (h *sessionRefuseHook) ID() string           { return "refuse-hook" }
func (h *sessionRefuseHook) Provides(b byte) bool { return b == OnSessionEstablish }
func (h *sessionRefuseHook) OnSessionEstablish(cl *Client, _ packets.Packet) {
	cl.RefuseSession(packets.ErrServerUnavailable)
}

// TestRefuseSession: an OnSessionEstablish hook that cannot establish the
// session (rtm: it is still moving from another node) refuses the CONNECT
// with the code it gives, 0x88 for MQTT 5 and return code 3 for 3.1.1, and
// the server keeps no client or session for the ID. v2.7.9 has no way to
// refuse there: the client got an empty session.
func TestRefuseSession(t *testing.T) {
	for _, tc := range []struct {
		name    string
		connect []byte
		code    byte
	}{
		{"v5", v5ConnectRaw, packets.ErrServerUnavailable.Code},
		{"v3", packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes, packets.Err3ServerUnavailable.Code},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer()
			defer s.Close()
			require.NoError(t, s.AddHook(new(sessionRefuseHook), nil))
			r, w := net.Pipe()
			defer func() { _ = r.Close(); _ = w.Close() }()
			done := make(chan error, 1)
			go func() { done <- s.EstablishConnection("tcp", r) }()
			go func() { _, _ = w.Write(tc.connect) }()

			hb, body, err := readRawPacket(w)
			require.NoError(t, err)
			require.Equal(t, byte(packets.Connack<<4), hb)
			require.GreaterOrEqual(t, len(body), 2)
			require.Equal(t, byte(0), body[0], "session present")
			require.Equal(t, tc.code, body[1], "CONNACK code")
			require.Error(t, <-done)
			require.Equal(t, 0, s.Clients.Len(), "no client or session kept")
			require.Equal(t, int64(0), s.Info.ClientsConnected)
		})
	}
}

// refusedRecorder records, for each OnSessionEstablish, whether a hook
// before it refused the session.
type refusedRecorder struct {
	HookBase
	refused []bool
}

func (h *refusedRecorder) ID() string           { return "refused-recorder" }
func (h *refusedRecorder) Provides(b byte) bool { return b == OnSessionEstablish }
func (h *refusedRecorder) OnSessionEstablish(cl *Client, _ packets.Packet) {
	h.refused = append(h.refused, cl.SessionRefused())
}

// TestSessionRefusedSeenByLaterHook (rtm patch 34): an OnSessionEstablish
// hook called after one that refused the session sees it refused, and
// after none did, not refused (rtm stores a client's will before its
// CONNACK, and not for a CONNECT that is refused). v2.7.9 has no way to
// know.
func TestSessionRefusedSeenByLaterHook(t *testing.T) {
	for _, refuse := range []bool{true, false} {
		s := newServer()
		if refuse {
			require.NoError(t, s.AddHook(new(sessionRefuseHook), nil))
		}
		rec := new(refusedRecorder)
		require.NoError(t, s.AddHook(rec, nil))
		r, w := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- s.EstablishConnection("tcp", r) }()
		go func() { _, _ = w.Write(v5ConnectRaw) }()
		hb, body, err := readRawPacket(w)
		require.NoError(t, err)
		require.Equal(t, byte(packets.Connack<<4), hb)
		require.GreaterOrEqual(t, len(body), 2)
		_ = w.Close()
		<-done
		_ = r.Close()
		s.Close()
		require.Equal(t, []bool{refuse}, rec.refused, "refused first: %v", refuse)
	}
}

// dropRecorder records, for each OnQosDropped, whether the client was
// taken over then.
type dropRecorder struct {
	HookBase
	takenOver []bool
}

func (h *dropRecorder) ID() string { return "drop-recorder" }

func (h *dropRecorder) Provides(b byte) bool { return b == OnQosDropped }

func (h *dropRecorder) OnQosDropped(cl *Client, _ packets.Packet) {
	h.takenOver = append(h.takenOver, cl.IsTakenOver())
}

// TestDetachSessionMarksTakenOverBeforeDrops (rtm patch 77): the messages
// a detached session takes along are reported to OnQosDropped with the
// client already taken over, so a hook that stores held messages does not
// delete what moved to another server.
func TestDetachSessionMarksTakenOverBeforeDrops(t *testing.T) {
	a := newServer()
	rec := new(dropRecorder)
	require.NoError(t, a.AddHook(rec, nil))
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.ID = "dev"
	cl.Properties.ProtocolVersion = 5
	cl.ops.hooks = a.hooks
	a.Clients.Add(cl)
	for i := 1; i <= 2; i++ {
		cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i), TopicName: "in/dev"})
	}
	_, res := a.DetachSession("dev")
	require.Equal(t, Detached, res)
	require.Equal(t, []bool{true, true}, rec.takenOver)
}

// TestTakeoverKeepsMessagesDeliveredMeanwhile (rtm patch 92): messages
// delivered to an offline session while a new connection takes it over all
// end up in the new connection's session. v2.7.9 queued those arriving
// between the copy of the session and the new client's registration in the
// old client, then cleared them.
func TestTakeoverKeepsMessagesDeliveredMeanwhile(t *testing.T) {
	const rounds, msgs = 200, 40
	s := newServer()
	lost := 0
	for round := 0; round < rounds; round++ {
		id := fmt.Sprintf("dev%d", round)
		old := s.NewClient(nil, "cluster", id, false)
		old.Properties.ProtocolVersion = 5
		old.Stop(packets.ErrSessionTakenOver) // offline: messages queue
		s.Clients.Add(old)
		sub := packets.Subscription{Filter: "in/" + id, Qos: 1}
		s.Topics.Subscribe(id, sub)
		old.State.Subscriptions.Add(sub.Filter, sub)
		for j := 0; j < 50; j++ { // more to copy: a wider window
			other := packets.Subscription{Filter: fmt.Sprintf("other/%s/%d", id, j), Qos: 1}
			s.Topics.Subscribe(id, other)
			old.State.Subscriptions.Add(other.Filter, other)
		}

		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := 0; i < msgs; i++ {
				s.DeliverFromPeer(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "in/" + id, Payload: []byte("x")}, nil)
			}
		}()
		nc := s.NewClient(nil, "tcp", id, false)
		nc.Properties.ProtocolVersion = 5
		present := s.inheritClientSession(packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: id}}, nc)
		s.Clients.Add(nc)
		<-done
		require.True(t, present)
		lost += msgs - nc.State.Inflight.Len()
	}
	require.Zero(t, lost, "messages lost across %d take-overs of %d messages each", rounds, msgs)
}

// rtm patch 93: a delivery that finds the session gone from this server
// (detached while the delivery was under way) says so, so DeliverToClient
// reports it undelivered and rtm sends the message on to the session's new
// server; v2.7.9 (and patch 92 before this) reported success.
func TestDeliveryToSessionThatLeftSaysSo(t *testing.T) {
	s := newServer()
	held := s.NewClient(nil, "cluster", "moved", false)
	held.Properties.ProtocolVersion = 5
	held.Stop(packets.ErrSessionTakenOver)
	s.Clients.Add(held)
	sub := packets.Subscription{Filter: "in/#", Qos: 1}
	s.Topics.Subscribe("moved", sub)
	// What DetachSession leaves behind, as a delivery that looked the
	// client up just before it sees it.
	held.State.isTakenOver.Store(true)
	s.Clients.Delete("moved")

	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "in/x", Payload: []byte("late")}
	_, err := s.publishToClient(held, sub, pk)
	require.ErrorIs(t, err, ErrSessionLeft)
	require.Equal(t, 0, held.State.Inflight.Len())
}

// TestSessionCarriesPacketID (rtm patch 38): a session detached from one
// server and adopted by another, then taken over by the client's new
// connection there, assigns packet identifiers after the last one the old
// server used, not from 1 again.
func TestSessionCarriesPacketID(t *testing.T) {
	a, b := newServer(), newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.ID = "dev"
	cl.Properties.ProtocolVersion = 5
	a.Clients.Add(cl)
	for i := 0; i < 5; i++ {
		_, err := cl.NextPacketID()
		require.NoError(t, err)
	}

	sess, res := a.DetachSession("dev")
	require.Equal(t, Detached, res)
	require.Equal(t, uint32(5), sess.PacketID)
	sess.Subscriptions = []packets.Subscription{{Filter: "in/dev", Qos: 1}} // something to adopt
	b.AdoptSession("dev", 5, sess)
	held, ok := b.Clients.Get("dev")
	require.True(t, ok)
	id, err := held.NextPacketID()
	require.NoError(t, err)
	require.Equal(t, uint32(6), id, "the adopted session's next packet identifier")

	// The client's CONNECT (clean start false) takes the session over.
	nc, r2, w2 := newTestClient()
	defer func() { _ = w2.Close(); _ = r2.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r2) }()
	nc.ID = "dev"
	nc.Properties.ProtocolVersion = 5
	require.True(t, b.inheritClientSession(packets.Packet{}, nc))
	id, err = nc.NextPacketID()
	require.NoError(t, err)
	require.Equal(t, uint32(7), id, "the new connection's next packet identifier")
}

// TestPacketExcludeSkipsPlainSubscribers: rtm patch 24. A message with
// Exclude set is not delivered to the clients it names through a plain
// subscription, neither from a peer (DeliverFromPeer) nor from a local
// publisher (publishToSubscribers, which an OnPublish hook's packet
// reaches); a shared subscription's chosen member still gets it.
func TestPacketExcludeSkipsPlainSubscribers(t *testing.T) {
	s := newServer()
	mk := func(id string) chan packets.Packet {
		cl, r, w := newTestClient()
		t.Cleanup(func() { _ = w.Close(); _ = r.Close() })
		cl.ID = id
		cl.Properties.ProtocolVersion = 5
		s.Clients.Add(cl)
		got := make(chan packets.Packet, 10)
		go func() {
			for {
				typ, body, err := readRawPacket(r)
				if err != nil {
					return
				}
				if typ>>4 == packets.Publish {
					pk := packets.Packet{ProtocolVersion: 5}
					_ = pk.FixedHeader.Decode(typ)
					_ = pk.PublishDecode(body)
					got <- pk
				}
			}
		}()
		return got
	}
	keptGot, skippedGot, memberGot := mk("kept"), mk("skipped"), mk("member")
	s.Topics.Subscribe("kept", packets.Subscription{Filter: "a/b"})
	s.Topics.Subscribe("skipped", packets.Subscription{Filter: "a/+"})
	s.Topics.Subscribe("member", packets.Subscription{Filter: "$share/g/a/b"})
	exclude := func(id string) bool { return id == "skipped" || id == "member" }

	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte("peer"), Exclude: exclude}
	s.DeliverFromPeer(pk, func(route string) bool { return true })
	pk.Payload = []byte("local")
	s.publishToSubscribers(pk)

	for _, want := range []string{"peer", "local"} {
		require.Equal(t, want, string((<-keptGot).Payload))
		require.Equal(t, want, string((<-memberGot).Payload)) // shared: not excluded
	}
	// Then one without Exclude: the first the excluded client gets.
	pk.Payload, pk.Exclude = []byte("after"), nil
	s.publishToSubscribers(pk)
	require.Equal(t, "after", string((<-skippedGot).Payload), "the excluded client got an excluded message first")
}

// TestAdoptSessionQueueBeforeNewDeliveries (rtm patch 121): messages
// delivered while AdoptSession installs a moved session come after its
// queue, and none of the queue is skipped. Before, the subscriptions went
// live first: a message delivered meanwhile took its place (and maybe a
// packet id of the queue, which was then skipped as present) among the
// queued messages still being set, and its client got it before older
// ones (rtm's session move, publisher on the destination).
func TestAdoptSessionQueueBeforeNewDeliveries(t *testing.T) {
	const queued = 1000
	s := newServer()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for i := 0; i < 20; i++ {
				s.DeliverFromPeer(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
					TopicName: fmt.Sprintf("in/dev%d", i), Payload: []byte("new")}, nil)
			}
		}
	}()
	for i := 0; i < 20; i++ {
		id := fmt.Sprintf("dev%d", i)
		sess := Session{Subscriptions: []packets.Subscription{{Filter: "in/" + id, Qos: 1}}, PacketID: queued}
		for n := 1; n <= queued; n++ {
			sess.Inflight = append(sess.Inflight, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
				PacketID: uint16(n), TopicName: "in/" + id, Payload: []byte(fmt.Sprint(n))})
		}
		s.AdoptSession(id, 5, sess)
	}
	close(stop)
	<-done
	for i := 0; i < 20; i++ {
		cl, ok := s.Clients.Get(fmt.Sprintf("dev%d", i))
		require.True(t, ok)
		all := cl.State.Inflight.GetAll(false)
		require.GreaterOrEqual(t, len(all), queued)
		for n := 1; n <= queued; n++ {
			require.Equal(t, fmt.Sprint(n), string(all[n-1].Payload), "client %s: message %d of the queue", cl.ID, n)
		}
		for _, pk := range all[queued:] {
			require.Equal(t, "new", string(pk.Payload))
		}
	}
}
