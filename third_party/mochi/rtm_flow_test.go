// SPDX-License-Identifier: MIT
// rtm patches 20-23: tests of bounded flow control, see PATCHES.md.

package mqtt

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// flowServer starts a server on 127.0.0.1:0 whose sessions and write queues
// hold limit messages, with FlowControl.MaxWait maxWait. It returns the
// server, its address, and a counter of OnPublishDropped calls.
func flowServer(t *testing.T, limit int, maxWait time.Duration) (*Server, string, *atomic.Int64) {
	t.Helper()
	cc := NewDefaultServerCapabilities()
	cc.MaximumInflight = uint16(limit)
	cc.MaximumClientWritesPending = int32(limit)
	cc.MaximumMessageExpiryInterval = 0
	s := New(&Options{Logger: logger, Capabilities: cc, FlowControl: FlowControl{MaxWait: maxWait}})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	dropped := &countDropsHook{}
	require.NoError(t, s.AddHook(dropped, nil))
	l := listeners.NewTCP(listeners.Config{ID: "t", Address: "127.0.0.1:0"})
	require.NoError(t, s.AddListener(l))
	require.NoError(t, s.Serve())
	t.Cleanup(func() { _ = s.Close() })
	return s, l.Address(), &dropped.n
}

type countDropsHook struct {
	HookBase
	n atomic.Int64
}

func (h *countDropsHook) ID() string                               { return "count-drops" }
func (h *countDropsHook) Provides(b byte) bool                     { return b == OnPublishDropped }
func (h *countDropsHook) OnPublishDropped(*Client, packets.Packet) { h.n.Add(1) }

// rawClient is a minimal MQTT 3.1.1 client over TCP, so a test controls
// exactly when it reads and acknowledges.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	wmu  sync.Mutex
}

func dialRaw(t *testing.T, addr, id string) *rawClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	c.send(packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        60,
			ClientIdentifier: id,
		},
	})
	typ, _ := c.read()
	require.Equal(t, packets.Connack, typ, "CONNACK")
	return c
}

func (c *rawClient) send(pk packets.Packet) {
	c.t.Helper()
	pk.ProtocolVersion = 4
	buf := new(bytes.Buffer)
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(buf)
	case packets.Publish:
		err = pk.PublishEncode(buf)
	case packets.Puback:
		err = pk.PubackEncode(buf)
	}
	require.NoError(c.t, err)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err = c.conn.Write(buf.Bytes())
	if err != nil && !errors.Is(err, net.ErrClosed) {
		c.t.Errorf("write: %v", err)
	}
}

// read reads one packet: its type and, for a PUBLISH, the decoded packet
// (packet id and payload); for acks the packet id.
func (c *rawClient) read() (byte, packets.Packet) {
	var pk packets.Packet
	_ = c.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	hb, err := c.r.ReadByte()
	if err != nil {
		return 0, pk
	}
	n, _, err := packets.DecodeLength(c.r)
	if err != nil {
		return 0, pk
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.r, body); err != nil {
		return 0, pk
	}
	pk.FixedHeader.Decode(hb)
	pk.ProtocolVersion = 4
	switch pk.FixedHeader.Type {
	case packets.Publish:
		_ = pk.PublishDecode(body)
	case packets.Puback, packets.Suback:
		if len(body) >= 2 {
			pk.PacketID = uint16(body[0])<<8 | uint16(body[1])
		}
	}
	return pk.FixedHeader.Type, pk
}

func (c *rawClient) subscribe(filter string) {
	c.t.Helper()
	c.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    1,
		Filters:     packets.Subscriptions{{Filter: filter, Qos: 1}},
	})
	typ, _ := c.read()
	require.Equal(c.t, packets.Suback, typ, "SUBACK")
}

// consume reads and acknowledges QoS 1 PUBLISHes until n are received or
// the connection fails; it returns how many it received.
func (c *rawClient) consume(n int) int {
	got := 0
	for got < n {
		typ, pk := c.read()
		switch typ {
		case 0:
			return got
		case packets.Publish:
			got++
			if pk.FixedHeader.Qos > 0 {
				c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
			}
		}
	}
	return got
}

// publishN publishes n QoS 1 messages to topic with at most window
// unacknowledged, and returns how many PUBACKs it got.
func (c *rawClient) publishN(topic string, n, window int) int {
	sem := make(chan struct{}, window)
	acked := make(chan int, 1)
	go func() {
		got := 0
		for got < n {
			typ, _ := c.read()
			if typ == 0 {
				break
			}
			if typ == packets.Puback {
				got++
				<-sem
			}
		}
		acked <- got
	}()
	for i := 0; i < n; i++ {
		select {
		case sem <- struct{}{}:
		case <-time.After(30 * time.Second):
			c.t.Errorf("no PUBACK for 30 s after %d messages", i)
			return <-acked
		}
		c.send(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:   topic,
			PacketID:    uint16(i%60000 + 1),
			Payload:     []byte("0123456789abcdef"),
		})
	}
	return <-acked
}

// TestFlowBurstIsPacedNotDropped (patch 20): 4 publishers × 500 QoS 1
// messages, 16 in flight each, into one subscriber that acknowledges at
// once, with sessions of 20 messages: every acknowledged message is
// delivered, none dropped. Without pacing the publishers fill the
// subscriber's session faster than its writer and its acks drain it, and
// messages are dropped after their PUBACK.
func TestFlowBurstIsPacedNotDropped(t *testing.T) {
	const pubs, per = 4, 500
	s, addr, dropped := flowServer(t, 20, 10*time.Second)
	sub := dialRaw(t, addr, "sub")
	sub.subscribe("burst")
	received := make(chan int, 1)
	go func() { received <- sub.consume(pubs * per) }()

	var wg sync.WaitGroup
	var acked atomic.Int64
	for p := 0; p < pubs; p++ {
		pub := dialRaw(t, addr, "pub"+string(rune('a'+p)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			acked.Add(int64(pub.publishN("burst", per, 16)))
		}()
	}
	wg.Wait()
	require.Equal(t, int64(pubs*per), acked.Load(), "PUBACKs")
	got := 0
	select {
	case got = <-received:
	case <-time.After(10 * time.Second):
		_ = sub.conn.Close()
		got = <-received
	}
	require.Zero(t, dropped.Load(), "messages dropped")
	require.Equal(t, pubs*per, got, "acknowledged messages delivered")
	require.Positive(t, s.Flow.Waits.Load(), "publishers waited")
	require.Zero(t, s.Flow.Stalls.Load(), "a subscriber that keeps up is not stalled")
}

// TestFlowStuckSubscriberPacesOnce (patch 21): a subscriber that never
// reads after its SUBACK shares a topic with a healthy one. The publisher
// waits for the stuck one once (MaxWait), not per message; then the stuck
// one is stalled and its messages beyond its session are dropped and
// reported, while the healthy one gets everything.
func TestFlowStuckSubscriberPacesOnce(t *testing.T) {
	const n = 200
	maxWait := 2 * time.Second // generous: the healthy subscriber must never go 2 s without progress
	s, addr, dropped := flowServer(t, 20, maxWait)
	stuck := dialRaw(t, addr, "stuck")
	stuck.subscribe("shared")
	healthy := dialRaw(t, addr, "healthy")
	healthy.subscribe("shared")
	received := make(chan int, 1)
	go func() { received <- healthy.consume(n) }()

	pub := dialRaw(t, addr, "pub")
	start := time.Now()
	require.Equal(t, n, pub.publishN("shared", n, 8), "PUBACKs")
	took := time.Since(start)
	require.Equal(t, n, <-received, "healthy subscriber's messages")
	// Paced per message, 200 messages would take 200 × 2 s.
	require.Less(t, took, 15*maxWait, "the publisher was paced more than once or twice")
	require.Equal(t, int64(1), s.Flow.Stalls.Load(), "stalls")
	require.Positive(t, s.Flow.StalledSkips.Load(), "messages to the stalled subscriber not waited for")
	// The stuck session holds 20 (its limit); the rest was dropped and reported.
	require.Equal(t, int64(n-20), dropped.Load(), "drops reported")
}

// congest fills cl's session to its high-water mark with unacknowledged
// QoS 1 messages, as a subscriber that does not acknowledge would.
func congest(t *testing.T, s *Server, cl *Client) {
	t.Helper()
	hi, _ := s.Options.flowMarks()
	for i := int32(0); i < hi; i++ {
		cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i + 1), TopicName: "x"})
	}
	require.True(t, cl.congested(s.Options.flowMarks()))
}

// pipeClient adds a connected v3.1.1 client whose other end is read and
// discarded, subscribed to filter at QoS 1.
func pipeClient(t *testing.T, s *Server, id, filter string) *Client {
	t.Helper()
	r, w := net.Pipe()
	t.Cleanup(func() { _ = r.Close(); _ = w.Close() })
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl := s.NewClient(w, "t", id, false)
	cl.Properties.ProtocolVersion = 4
	cl.State.Inflight.ResetReceiveQuota(100)
	s.Clients.Add(cl)
	if filter != "" {
		s.Topics.Subscribe(id, packets.Subscription{Filter: filter, Qos: 1})
		cl.State.Subscriptions.Add(filter, packets.Subscription{Filter: filter, Qos: 1})
	}
	return cl
}

func flowTestServer(maxWait time.Duration) *Server {
	s := newServer()
	s.Options.Capabilities.MaximumInflight = 10
	s.Options.Capabilities.MaximumClientWritesPending = 10
	s.Options.FlowControl.MaxWait = maxWait
	return s
}

func publishFrom(s *Server, pub *Client, topic string, id uint16) chan error {
	done := make(chan error, 1)
	go func() {
		done <- s.processPacket(pub, packets.Packet{
			FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:       topic,
			PacketID:        id,
			Payload:         []byte("x"),
			ProtocolVersion: 4,
		})
	}()
	return done
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestFlowAckWakesWaiter (patch 20): a publish to a congested subscriber
// waits, holding the PUBACK, and is released by the subscriber's
// acknowledgement (not by the bound), then delivered.
func TestFlowAckWakesWaiter(t *testing.T) {
	s := flowTestServer(time.Minute)
	sub := pipeClient(t, s, "sub", "a/b")
	congest(t, s, sub)
	pub := pipeClient(t, s, "pub", "")
	done := publishFrom(s, pub, "a/b", 1)
	waitFor(t, "the publisher to wait", func() bool { return sub.State.flow.nwait.Load() == 1 })
	select {
	case <-done:
		t.Fatal("publish to a congested subscriber did not wait")
	case <-time.After(50 * time.Millisecond):
	}
	require.NoError(t, s.processPacket(sub, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: 1}))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("acknowledgement did not wake the publisher")
	}
	require.Equal(t, 5, sub.State.Inflight.Len(), "delivered into the session after the wait")
	require.Equal(t, int64(1), s.Flow.Waits.Load())
}

// TestFlowWriterWakesWaiter (patch 20): a full write queue (QoS 0) paces
// too, and the writer draining it wakes the publisher.
func TestFlowWriterWakesWaiter(t *testing.T) {
	s := flowTestServer(time.Minute)
	sub := pipeClient(t, s, "sub", "a/b")
	for i := 0; i < 5; i++ { // fill to the mark without a writer running
		ok, _ := sub.State.outbound.push(&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b"})
		require.True(t, ok)
	}
	sub.State.outbound.writing = true // as if a writer ran; we start it below
	pub := pipeClient(t, s, "pub", "")
	done := publishFrom(s, pub, "a/b", 1)
	waitFor(t, "the publisher to wait", func() bool { return sub.State.flow.nwait.Load() == 1 })
	sub.State.outbound.mu.Lock()
	sub.State.outbound.writing = false
	sub.State.outbound.mu.Unlock()
	go sub.WriteLoop()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the writer draining the queue did not wake the publisher")
	}
}

// TestFlowSelfSubscriptionDoesNotWait (patch 22): a client publishing to a
// topic it subscribes to never waits for itself: its own read goroutine,
// which would process the acknowledgements draining it, is the one
// publishing.
func TestFlowSelfSubscriptionDoesNotWait(t *testing.T) {
	s := flowTestServer(time.Minute)
	self := pipeClient(t, s, "self", "a/b")
	congest(t, s, self)
	select {
	case err := <-publishFrom(s, self, "a/b", 99):
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("a client publishing to its own subscription waited for itself")
	}
	require.Zero(t, s.Flow.Waits.Load())
}

// TestFlowDisconnectWakesWaiter (patch 22): a publisher waiting for a
// subscriber is released when that subscriber disconnects, not after the
// bound; the message stays in the (now offline) session.
func TestFlowDisconnectWakesWaiter(t *testing.T) {
	s := flowTestServer(time.Minute)
	sub := pipeClient(t, s, "sub", "a/b")
	congest(t, s, sub)
	pub := pipeClient(t, s, "pub", "")
	done := publishFrom(s, pub, "a/b", 1)
	waitFor(t, "the publisher to wait", func() bool { return sub.State.flow.nwait.Load() == 1 })
	sub.Stop(errors.New("gone"))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the subscriber's disconnect did not wake the publisher")
	}
	require.Equal(t, 6, sub.State.Inflight.Len(), "kept in the offline session")
}

// TestFlowTakeoverInConnectOrder drives the takeover as a CONNECT does:
// inheritClientSession stops the old client (waking the publisher), copies
// and clears its session, and only then is the new client added. The
// woken publisher must deliver into the new session, not into the old one
// being copied and cleared (lost after its PUBACK). A clean start ends the
// old session: the message is owed to nobody and the new client gets
// nothing it did not subscribe to.
func TestFlowTakeoverInConnectOrder(t *testing.T) {
	for _, clean := range []bool{false, true} {
		s := flowTestServer(time.Minute)
		old := pipeClient(t, s, "sub", "a/b")
		congest(t, s, old)
		hi, _ := s.Options.flowMarks()
		pub := pipeClient(t, s, "pub", "")
		done := publishFrom(s, pub, "a/b", 1)
		waitFor(t, "the publisher to wait", func() bool { return old.State.flow.nwait.Load() == 1 })
		r, w := net.Pipe()
		t.Cleanup(func() { _ = r.Close(); _ = w.Close() })
		go func() { _, _ = io.Copy(io.Discard, r) }()
		nu := s.NewClient(w, "t", "sub", false)
		nu.Properties.ProtocolVersion = 4
		nu.State.Inflight.ResetReceiveQuota(100)
		s.inheritClientSession(packets.Packet{Connect: packets.ConnectParams{Clean: clean}}, nu)
		s.Clients.Add(nu)
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			t.Fatal("the takeover did not release the publisher")
		}
		require.Equal(t, 0, old.State.Inflight.Len(), "clean %v: nothing left in the old session", clean)
		if clean {
			require.Equal(t, 0, nu.State.Inflight.Len(), "clean start: nothing owed")
		} else {
			require.Equal(t, int(hi)+1, nu.State.Inflight.Len(), "the session and the new message moved")
		}
	}
}

// TestFlowServerCloseWakesWaiter (patch 22): Server.Close releases
// publishers waiting for a subscriber (here one that is not on a listener,
// so Close does not disconnect it).
func TestFlowServerCloseWakesWaiter(t *testing.T) {
	s := flowTestServer(time.Minute)
	sub := pipeClient(t, s, "sub", "a/b")
	congest(t, s, sub)
	pub := pipeClient(t, s, "pub", "")
	done := publishFrom(s, pub, "a/b", 1)
	waitFor(t, "the publisher to wait", func() bool { return sub.State.flow.nwait.Load() == 1 })
	closed := make(chan struct{})
	go func() { _ = s.Close(); close(closed) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Server.Close did not wake the publisher")
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Server.Close hung")
	}
}

// TestFlowOfflineAndInlineDoNotWait (patch 20): an offline session and an
// inline publish (Server.Publish) never wait.
func TestFlowOfflineAndInlineDoNotWait(t *testing.T) {
	s := newServerWithInlineClient()
	s.Options.Capabilities.MaximumInflight = 10
	s.Options.FlowControl.MaxWait = time.Minute
	off := s.NewClient(nil, "t", "offline", false)
	off.Properties.ProtocolVersion = 4
	s.Clients.Add(off)
	s.Topics.Subscribe(off.ID, packets.Subscription{Filter: "a/b", Qos: 1})
	congest(t, s, off)
	live := pipeClient(t, s, "live", "a/b")
	congest(t, s, live)
	pub := pipeClient(t, s, "pub", "")
	done := make(chan error, 2)
	go func() { done <- <-publishFrom(s, pub, "a/b", 1) }()
	go func() { done <- s.Publish("a/b", []byte("x"), false, 1) }()
	// The network publisher waits for "live" (connected); make it drain.
	waitFor(t, "the publisher to wait", func() bool { return live.State.flow.nwait.Load() == 1 })
	select {
	case err := <-done: // the inline publish
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("an inline publish waited")
	}
	live.State.Inflight.Delete(1) // the inline publish added one without waiting: two make room
	live.State.Inflight.Delete(2)
	live.flowDrained()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("publisher not woken")
	}
	require.Equal(t, int64(1), s.Flow.Waits.Load(), "only the live subscriber was waited for")
}

// TestFlowDeliverFromPeerWaits (patch 23): a message from a peer server
// waits for a congested subscriber like a local publish, bounded by
// PeerMaxWait (here below MaxWait) over all its subscribers, and marks a
// subscriber that stays congested stalled.
func TestFlowDeliverFromPeerWaits(t *testing.T) {
	s := flowTestServer(time.Minute)
	s.Options.FlowControl.PeerMaxWait = 200 * time.Millisecond
	a := pipeClient(t, s, "a", "a/b")
	b := pipeClient(t, s, "b", "a/b")
	congest(t, s, a)
	congest(t, s, b)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "a/b", Payload: []byte("x"), Origin: "elsewhere"}
	start := time.Now()
	s.DeliverFromPeer(pk, nil)
	took := time.Since(start)
	require.GreaterOrEqual(t, took, 200*time.Millisecond, "waited for the congested subscribers")
	require.Less(t, took, 5*time.Second, "bounded by PeerMaxWait for the message, not per subscriber")
	require.Equal(t, int64(2), s.Flow.Stalls.Load(), "both stayed congested: stalled")
	require.Equal(t, 6, a.State.Inflight.Len())
	require.Equal(t, 6, b.State.Inflight.Len())

	// Stalled: the next message does not wait at all.
	start = time.Now()
	s.DeliverFromPeer(pk, nil)
	require.Less(t, time.Since(start), 150*time.Millisecond, "a stalled subscriber is not waited for")

	// Drained below the low-water mark (a quarter of 10): no longer stalled.
	for id := uint16(1); id <= 6; id++ {
		a.State.Inflight.Delete(id)
		a.flowDrained()
	}
	waitFor(t, "a drained to end its stall", func() bool { return !a.State.flow.stalled.Load() })
	require.True(t, b.State.flow.stalled.Load())
}

// benchFanOut measures the fan-out of one QoS 0 message from a client to
// 10 subscribers (writes discarded), with flow control off or on; nobody
// is congested, so the difference is the cost of the checks on the common
// path (patch 20: two atomic loads per subscriber).
func benchFanOut(b *testing.B, maxWait time.Duration) {
	s := newServer()
	s.Options.FlowControl.MaxWait = maxWait
	var subs []*Client
	for i := 0; i < 10; i++ {
		cl := s.NewClient(newDiscardConn(), "bench", "sub"+string(rune('a'+i)), false)
		cl.Properties.ProtocolVersion = 4
		s.Clients.Add(cl)
		s.Topics.Subscribe(cl.ID, packets.Subscription{Filter: "a/b"})
		subs = append(subs, cl)
	}
	pub := s.NewClient(newDiscardConn(), "bench", "pub", false)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte("hello world"), Created: 1}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		s.publishToSubscribersFrom(pub, pk)
		if i%256 == 0 {
			for _, cl := range subs { // keep the queues short: measure the uncongested path
				for cl.State.outbound.len() > 64 {
					runtime.Gosched()
				}
			}
		}
	}
	b.StopTimer()
	for _, cl := range subs {
		waitOutboundDrained(cl)
	}
}

func BenchmarkFanOutFlowControlOff(b *testing.B) { benchFanOut(b, 0) }
func BenchmarkFanOutFlowControlOn(b *testing.B)  { benchFanOut(b, time.Second) }

// TestFlowQoS2PubcompWakesWaiter (patch 20): a QoS 2 publish to a
// congested subscriber waits (its PUBREC held) and the subscriber's
// PUBCOMP, which ends a QoS 2 flow, wakes it.
func TestFlowQoS2PubcompWakesWaiter(t *testing.T) {
	s := flowTestServer(time.Minute)
	sub := pipeClient(t, s, "sub", "a/b")
	congest(t, s, sub)
	pub := pipeClient(t, s, "pub", "")
	done := make(chan error, 1)
	go func() {
		done <- s.processPacket(pub, packets.Packet{
			FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: 2},
			TopicName:       "a/b",
			PacketID:        9,
			Payload:         []byte("x"),
			ProtocolVersion: 4,
		})
	}()
	waitFor(t, "the publisher to wait", func() bool { return sub.State.flow.nwait.Load() == 1 })
	_, held := pub.inboundQos().Get(9) // rtm patch 94
	require.True(t, held, "the publisher's PUBREC is pending while it waits")
	require.NoError(t, s.processPacket(sub, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: 3}))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("PUBCOMP did not wake the publisher")
	}
}

// TestFlowWillDoesNotWait (patch 20): a will is published without waiting
// for a congested subscriber (it may be sent from the event loop).
func TestFlowWillDoesNotWait(t *testing.T) {
	s := flowTestServer(time.Minute)
	sub := pipeClient(t, s, "sub", "will/t")
	congest(t, s, sub)
	gone := pipeClient(t, s, "gone", "")
	gone.Properties.Will = Will{Flag: 1, TopicName: "will/t", Payload: []byte("bye"), Qos: 1}
	done := make(chan struct{})
	go func() { s.sendLWT(gone); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a will waited for a congested subscriber")
	}
	require.Equal(t, 6, sub.State.Inflight.Len(), "the will is in the subscriber's session")
	require.Zero(t, s.Flow.Waits.Load())
}

// TestFlowByteDrainWakesOne (patch 20 with 40): when bytes, not messages,
// are what a congested subscriber is short of, a drain wakes one waiting
// publisher, not as many as there are free places in messages: woken
// together, large messages would overshoot the byte mark and be dropped
// after their PUBACKs.
func TestFlowByteDrainWakesOne(t *testing.T) {
	s := flowTestServer(time.Minute)
	s.Options.Capabilities.MaximumInflight = 1000
	s.Options.Memory.MaxClientBytes = 100 << 10 // high-water 50 KiB, low 25 KiB
	cl := pipeClient(t, s, "sub", "a/b")
	cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		PacketID: 1, TopicName: "a/b", Payload: make([]byte, 30<<10)}) // between the marks
	g := &cl.State.flow
	var chs []chan struct{}
	for i := 0; i < 5; i++ {
		chs = append(chs, g.add())
	}
	cl.flowDrained()
	woken := 0
	for _, ch := range chs {
		select {
		case <-ch:
			woken++
		default:
		}
	}
	require.Equal(t, 1, woken, "one waiter woken while bytes are above the low-water mark")
}
