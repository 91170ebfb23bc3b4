package broker_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// Sizes of the large-session move tests: 1,000 × 8 KiB is eight times the
// 1 MiB link frame of the default broker.max_packet_size (the issue's
// case: a session larger than one frame was lost).
const (
	bigQueued  = 1000
	bigPayload = 8 << 10
)

// bigSessionCluster starts nodes whose clients may hold the big session
// (broker.max_queued_bytes above 1,000 × 8 KiB), with a short claim timeout
// so a stalled move is given up quickly.
func bigSessionCluster(t *testing.T, n int) []*broker.Broker {
	t.Helper()
	var nodes []*broker.Broker
	seed := ""
	for i := range n {
		b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, func(bc *config.Broker, cc *config.Cluster) {
			bc.MaxQueuedBytes = 16 << 20
			cc.ClaimTimeout = 2 * time.Second
		})
		if seed == "" {
			seed = b.GossipAddr()
		}
		nodes = append(nodes, b)
	}
	waitMesh(t, nodes...)
	return nodes
}

// queueBigSession leaves client "dev" offline on b with bigQueued QoS 1
// messages of bigPayload bytes queued, numbered in their first 4 bytes.
func queueBigSession(t *testing.T, nodes []*broker.Broker, b *broker.Broker) {
	t.Helper()
	expiry := ptr(uint32(600))
	dev, _ := dialV5(t, b, &paho.Connect{ClientID: "dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "inbox/dev", QoS: 1})
	waitRoutes(t, nodes, b, 1)
	_ = dev.Disconnect(&paho.Disconnect{})
	waitConnections(t, b, 0)
	pub, _ := dialV5(t, b, &paho.Connect{ClientID: "pub", CleanStart: true})
	payload := make([]byte, bigPayload)
	for i := range bigQueued {
		binary.BigEndian.PutUint32(payload, uint32(i))
		if _, err := pub.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: "inbox/dev", QoS: 1, Payload: payload}); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := b.Stats().Inflight; n != bigQueued {
			return fmt.Errorf("%s holds %d messages for the offline session, want %d", b.Name(), n, bigQueued)
		}
		return nil
	})
}

// expectBigSession reads the whole big session from c, in order.
func expectBigSession(t *testing.T, c *testutil.V5) {
	t.Helper()
	for i := range bigQueued {
		m := c.Next(t, waitMsg)
		if len(m.Payload) != bigPayload {
			t.Fatalf("message %d: %d bytes", i, len(m.Payload))
		}
		if got := binary.BigEndian.Uint32(m.Payload); got != uint32(i) {
			t.Fatalf("message %d: got number %d (out of order or missing)", i, got)
		}
	}
}

// TestSessionMoveLarge: a session holding 1,000 × 8 KiB queued QoS 1
// messages (8 MiB, eight link frames) moves whole to the node its client
// reconnects to, in order, and leaves the old node. Before chunked moves
// the session did not fit one link frame: SessionPresent=false, nothing
// delivered, only the link's oversize counter moved.
func TestSessionMoveLarge(t *testing.T) {
	nodes := bigSessionCluster(t, 2)
	queueBigSession(t, nodes, nodes[0])

	began := time.Now()
	dev, ca := dialV5(t, nodes[1], &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session not present after moving from n0 to n1")
	}
	t.Logf("CONNECT with the move of %d × %d bytes took %v", bigQueued, bigPayload, time.Since(began).Round(time.Millisecond))
	expectBigSession(t, dev)
	testutil.WaitFor(t, waitCond, func() error {
		if st := nodes[0].Stats(); st.Sessions != 1 || st.Inflight != 0 { // pub's
			return fmt.Errorf("n0 still holds %d sessions, %d messages", st.Sessions, st.Inflight)
		}
		return nil
	})
	if st := nodes[0].Stats().Cluster; st.SessionsMovedOut != 1 {
		t.Errorf("n0: sessions_moved_out %d, want 1", st.SessionsMovedOut)
	}
	for _, l := range nodes[0].Stats().Cluster.Links {
		if l.Oversize != 0 {
			t.Errorf("link %s: %d oversize messages", l.Peer, l.Oversize)
		}
	}
}

// TestSessionMoveDestinationStopsMidway: the destination of a move dies
// (its cluster part stopped abruptly, as kill -9 looks to its peers) after
// taking three chunks: the session is still whole on the source, and the
// client reconnecting there gets all of it, in order.
func TestSessionMoveDestinationStopsMidway(t *testing.T) {
	nodes := bigSessionCluster(t, 2)
	queueBigSession(t, nodes, nodes[0])

	var once sync.Once
	dead := make(chan struct{})
	t.Cleanup(func() { close(dead) }) // before the nodes' shutdown (cleanups run last first)
	nodes[1].SetTestMoveChunk(func(side string, seq uint64) {
		if side == "destination" && seq == 3 {
			once.Do(func() { go nodes[1].KillCluster() })
			<-dead // this chunk is never taken in
		}
	})
	// The CONNECT on n1 fails one way or another (refused, or its node
	// gone); what matters is where the session is.
	_, _, _ = testutil.DialV5(t, nodes[1].Addr(broker.ListenerTCP), &paho.Connect{ClientID: "dev", CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})

	testutil.WaitFor(t, waitCond, func() error {
		st := nodes[0].Stats()
		if st.Cluster.SessionMovesFailed != 1 {
			return fmt.Errorf("n0: %d failed moves, want 1", st.Cluster.SessionMovesFailed)
		}
		if st.Sessions != 2 || st.Inflight != bigQueued { // dev's and pub's
			return fmt.Errorf("n0 holds %d sessions and %d messages, want 2 and %d", st.Sessions, st.Inflight, bigQueued)
		}
		return nil
	})
	dev, ca := dialV5(t, nodes[0], &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session not present on the source after the failed move")
	}
	expectBigSession(t, dev)
}

// TestSessionMoveStalledSourceRefusesConnect: a source that stops sending
// in the middle of a move (stalled) makes the destination give the move
// up after cluster.claim_timeout and refuse the CONNECT with 0x88 Server
// unavailable, not hand the client an empty session; the session stays on
// the source, and the client's retry, once the source sends again, gets it
// whole.
func TestSessionMoveStalledSourceRefusesConnect(t *testing.T) {
	nodes := bigSessionCluster(t, 2)
	queueBigSession(t, nodes, nodes[0])

	release := make(chan struct{})
	var once sync.Once
	nodes[0].SetTestMoveChunk(func(side string, seq uint64) {
		if side == "source" && seq == 2 {
			once.Do(func() { <-release })
		}
	})
	_, ca, err := testutil.DialV5(t, nodes[1].Addr(broker.ListenerTCP), &paho.Connect{ClientID: "dev", CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if err == nil || ca == nil || ca.ReasonCode != 0x88 {
		t.Fatalf("CONNECT during a stalled move: err %v, CONNACK %+v; want refused with 0x88", err, ca)
	}
	close(release)
	testutil.WaitFor(t, waitCond, func() error {
		st := nodes[0].Stats()
		if st.Cluster.SessionMovesFailed != 1 || st.Sessions != 2 || st.Inflight != bigQueued { // dev's and pub's
			return fmt.Errorf("n0: %d failed moves, %d sessions, %d messages; want 1, 2, %d",
				st.Cluster.SessionMovesFailed, st.Sessions, st.Inflight, bigQueued)
		}
		if n := nodes[1].Stats().Sessions; n != 0 {
			return fmt.Errorf("n1 holds %d sessions", n)
		}
		return nil
	})
	dev, ca := dialV5(t, nodes[1], &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session not present on retry")
	}
	expectBigSession(t, dev)
	if st := nodes[1].Stats().Cluster; st.ClaimsRefused != 1 {
		t.Errorf("n1: client_id_claims_refused %d, want 1", st.ClaimsRefused)
	}
}

// TestClusterStopHandsSessionsOver: a node stopped gracefully hands its
// persistent sessions (offline ones with queued messages, and those of the
// clients it disconnects) to a live peer before it leaves, so the clients
// reconnecting anywhere find them whole. Before, the sessions were lost
// with the node (SessionPresent=false).
func TestClusterStopHandsSessionsOver(t *testing.T) {
	nodes := startCluster(t, 3)
	expiry := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
	const devices, queued = 6, 20
	for i := range devices {
		id := fmt.Sprintf("dev%d", i)
		c, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: id, CleanStart: true, Properties: expiry})
		subscribe(t, c, 0, paho.SubscribeOptions{Topic: "inbox/" + id, QoS: 1})
		if i%2 == 0 { // half offline with messages queued, half connected
			_ = c.Disconnect(&paho.Disconnect{})
		}
	}
	waitConnections(t, nodes[0], devices/2)
	waitRoutes(t, nodes, nodes[0], devices)
	pub, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "pub", CleanStart: true})
	for i := range devices {
		for j := range queued {
			if _, err := pub.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: fmt.Sprintf("inbox/dev%d", i), QoS: 1,
				Payload: []byte(fmt.Sprintf("dev%d-%d", i, j))}); err != nil {
				t.Fatal(err)
			}
		}
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[0].Stats().Inflight; n < devices/2*queued {
			return fmt.Errorf("n0 holds %d messages, want at least %d", n, devices/2*queued)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := nodes[0].Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	for qos, n := range nodes[0].Stats().DroppedByReason["session_not_moved"] {
		if n != 0 {
			t.Errorf("n0 dropped %d QoS %s messages of sessions it did not hand over", n, qos)
		}
	}
	for i := range devices {
		id := fmt.Sprintf("dev%d", i)
		// Alternate nodes: some reconnect where the session was pushed,
		// some elsewhere (it moves again on the claim).
		c, ca := dialV5(t, nodes[1+i%2], &paho.Connect{ClientID: id, CleanStart: false, Properties: expiry})
		if !ca.SessionPresent {
			t.Fatalf("%s: session not present after its node stopped", id)
		}
		// Offline ones get all that was queued; connected ones were
		// sent them before the stop (acknowledged by paho) and get none
		// again unless unacknowledged: either way the last is there.
		seen := map[string]bool{}
		if i%2 == 0 {
			for range queued {
				seen[string(c.Next(t, waitMsg).Payload)] = true
			}
			if len(seen) != queued {
				t.Fatalf("%s: %d distinct queued messages, want %d", id, len(seen), queued)
			}
		}
		pub.Pub(t, "inbox/"+id, 1, false, "after")
		for {
			if m := c.Next(t, waitMsg); string(m.Payload) == "after" {
				break
			}
		}
	}
}

// TestClusterHealEndsStaleSession: while two nodes cannot see each other
// (each believes the other failed), a client connected to n0 connects to
// n1 too, and its claim cannot reach n0. When they see each other again,
// the link's opening lists each node's client IDs, and n0 ends its older
// connection (0x8E) and session: one connection per client ID, and
// messages reach the new one only. Before, both connections stayed and
// both received every message.
func TestClusterHealEndsStaleSession(t *testing.T) {
	var nodes []*broker.Broker
	for i, seed := 0, ""; i < 2; i++ {
		b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, func(_ *config.Broker, cc *config.Cluster) {
			cc.FailedPeerHold = 0 // a failed peer's link closes, as after a long partition
		})
		seed = nodes0(nodes, b).GossipAddr()
		nodes = append(nodes, b)
	}
	waitMesh(t, nodes...)
	expiry := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
	old, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "x", CleanStart: true, Properties: expiry})
	subscribe(t, old, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})

	markFailed(nodes[0], "n1")
	markFailed(nodes[1], "n0")
	testutil.WaitFor(t, waitCond, func() error {
		for _, b := range nodes {
			if l := b.Stats().Cluster.Links; len(l) != 0 {
				return fmt.Errorf("%s still has links %+v", b.Name(), l)
			}
		}
		return nil
	})
	cur, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "x", CleanStart: false, Properties: expiry})
	subscribe(t, cur, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})

	nodes[0].SetTestMembers(nil)
	nodes[1].SetTestMembers(nil)
	select {
	case d := <-old.Disconnects:
		if d.ReasonCode != 0x8E {
			t.Errorf("stale connection: DISCONNECT 0x%02X, want 0x8E", d.ReasonCode)
		}
	case <-time.After(waitCond):
		t.Fatal("the stale connection on n0 was not ended after the heal")
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[0].Stats().Sessions; n != 0 {
			return fmt.Errorf("n0 still holds %d sessions", n)
		}
		if n := nodes[1].Stats().Cluster.StaleSessions + nodes[0].Stats().Cluster.StaleSessions; n != 1 {
			return fmt.Errorf("%d stale sessions ended, want 1", n)
		}
		return nil
	})
	waitMesh(t, nodes...)
	waitRoutes(t, nodes, nodes[1], 1)
	waitRoutes(t, nodes, nodes[0], 0)
	pub, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.Pub(t, "inbox/x", 1, false, "one")
	if m := cur.Next(t, waitMsg); string(m.Payload) != "one" {
		t.Fatalf("current connection got %q", m.Payload)
	}
	select {
	case m := <-old.Messages:
		t.Fatalf("the stale connection got %q", m.Payload)
	default:
	}
}

// nodes0 is the first node started, or b if it is the first.
func nodes0(nodes []*broker.Broker, b *broker.Broker) *broker.Broker {
	if len(nodes) > 0 {
		return nodes[0]
	}
	return b
}

// TestEvacuationMovesOfflineSessions: evacuating a node (drain with
// evacuate) also moves the sessions of its offline clients, with their
// queued messages, to a live peer, so the node can be taken down without
// losing them. Before, they stayed on the drained node.
func TestEvacuationMovesOfflineSessions(t *testing.T) {
	nodes := startCluster(t, 2)
	expiry := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
	dev, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "sleeper", CleanStart: true, Properties: expiry})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "inbox/sleeper", QoS: 1})
	_ = dev.Disconnect(&paho.Disconnect{})
	waitConnections(t, nodes[0], 0)
	pub, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "pub", CleanStart: true})
	waitRoutes(t, nodes, nodes[0], 1)
	for i := range 5 {
		pub.Pub(t, "inbox/sleeper", 1, false, fmt.Sprint(i))
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[0].Stats().Inflight; n != 5 {
			return fmt.Errorf("n0 holds %d messages, want 5", n)
		}
		return nil
	})
	nodes[0].Drain(true)
	testutil.WaitFor(t, waitCond, func() error {
		if s := nodes[0].Stats(); s.Sessions != 0 {
			return fmt.Errorf("the drained node still holds %d sessions", s.Sessions)
		}
		if s := nodes[1].Stats(); s.Inflight != 5 {
			return fmt.Errorf("n1 holds %d messages, want 5", s.Inflight)
		}
		return nil
	})
	c, ca := dialV5(t, nodes[1], &paho.Connect{ClientID: "sleeper", CleanStart: false, Properties: expiry})
	if !ca.SessionPresent {
		t.Fatal("session not present on n1")
	}
	for i := range 5 {
		if m := c.Next(t, waitMsg); string(m.Payload) != fmt.Sprint(i) {
			t.Fatalf("message %d: got %q", i, m.Payload)
		}
	}
}

// TestSessionMoveRouteWindow: a message published on a third node while a
// session moves, after the source detached it and before the third node
// learnt the destination's route, reaches the moved session. The third
// node's link from the destination is held back (a slow link), so it
// learns the destination's route late. Before, the source dropped its
// route when it detached the session: the third node then had no route
// for the topic, acknowledged the message and delivered it nowhere.
func TestSessionMoveRouteWindow(t *testing.T) {
	var nodes []*broker.Broker
	seed := ""
	for i := range 3 {
		b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, func(_ *config.Broker, cc *config.Cluster) {
			// Longer than the test holds the link back: the destination
			// confirms no sooner.
			cc.ClaimTimeout = 20 * time.Second
		})
		if seed == "" {
			seed = b.GossipAddr()
		}
		nodes = append(nodes, b)
	}
	waitMesh(t, nodes...)
	n0, n1, n2 := nodes[0], nodes[1], nodes[2]
	// sync, on n0, receives what syncer publishes on n1: once it has, n0
	// has applied every route change n1 queued for it before.
	sync0, _ := dialV5(t, n0, &paho.Connect{ClientID: "win-sync", CleanStart: true})
	subscribe(t, sync0, 0, paho.SubscribeOptions{Topic: "win/sync", QoS: 1})
	syncer, _ := dialV5(t, n1, &paho.Connect{ClientID: "win-syncer", CleanStart: true})
	expiry := ptr(uint32(600))
	dev, _ := dialV5(t, n1, &paho.Connect{ClientID: "win-dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "win/t", QoS: 1})
	waitRoutes(t, nodes, n1, 1)
	waitRoutes(t, nodes, n0, 1)
	pub, _ := dialV5(t, n0, &paho.Connect{ClientID: "win-pub", CleanStart: true})
	pub.Pub(t, "win/t", 1, false, "before")
	expectPayloads(t, dev, "before")
	// Its PUBACK read by n1: else "before" moves with the session and is
	// sent again (QoS 1 allows it), ahead of what the test waits for.
	testutil.WaitFor(t, waitCond, func() error {
		if n := n1.Stats().Inflight; n != 0 {
			return fmt.Errorf("n1 holds %d messages, want 0 (the device's PUBACK not read yet)", n)
		}
		return nil
	})

	release := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open)
	n0.HoldRouteDeltas("n2", release)

	// The device reconnects to n2: its session moves from n1.
	moved, ca := dialV5(t, n2, &paho.Connect{ClientID: "win-dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	if !ca.SessionPresent {
		t.Fatal("session not present on n2 after the move")
	}
	// n1 detached the session before the CONNACK: a removal of its route
	// then (before the fix) reached n0 ahead of this.
	syncer.Pub(t, "win/sync", 1, false, "sync")
	expectPayloads(t, sync0, "sync")
	if n := n0.Stats().Cluster.RemoteRoutes["n1"]; n != 1 {
		t.Fatalf("n0 holds %d routes of n1 while it does not know n2's yet, want 1", n)
	}
	pub.Pub(t, "win/t", 1, false, "in the window")
	open()
	expectPayloads(t, moved, "in the window")
	// Then the routes settle: n2's everywhere, n1's gone.
	waitRoutes(t, nodes, n2, 1)
	waitRoutes(t, nodes, n1, 0)
	pub.Pub(t, "win/t", 1, false, "after")
	expectPayloads(t, moved, "after")
	moved.None(t, 500*time.Millisecond)
}

// TestSessionMoveCarriesPacketIDs: a session moved to another node goes on
// assigning packet IDs after the last one its old node used (mochi patch
// 38), so the old node's late delete of a stored message it acknowledged
// cannot remove the new node's message stored under the same client and
// packet ID. Before, the new node began again at 1.
func TestSessionMoveCarriesPacketIDs(t *testing.T) {
	nodes := startCluster(t, 2)
	expiry := uint32(600)
	connect := func(b *broker.Broker) (*testutil.V5, *paho.Connack) {
		return dialV5(t, b, &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	}
	dev, _ := connect(nodes[0])
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "pid/t", QoS: 1})
	pub0, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "pub0", CleanStart: true})
	var last uint16
	for i := range 5 {
		pub0.Pub(t, "pid/t", 1, false, fmt.Sprint(i))
		last = dev.Next(t, waitMsg).PacketID
	}
	// Every PUBACK read by n0 (pub0's publishes are acknowledged, so only
	// dev's deliveries can be in flight): else the last message moves with
	// the session and comes again, before "after".
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[0].Stats().Inflight; n != 0 {
			return fmt.Errorf("n0 holds %d messages, want 0 (the device's PUBACK not read yet)", n)
		}
		return nil
	})
	if err := dev.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}

	dev, ca := connect(nodes[1])
	if !ca.SessionPresent {
		t.Fatal("session not present after the move to n1")
	}
	pub1, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "pub1", CleanStart: true})
	pub1.Pub(t, "pid/t", 1, false, "after")
	m := dev.Next(t, waitMsg)
	if string(m.Payload) != "after" {
		t.Fatalf("got %q, want after", m.Payload)
	}
	if m.PacketID <= last {
		t.Fatalf("first message after the move has packet ID %d; n0 used up to %d", m.PacketID, last)
	}
}

// TestStaleMoveRelayNotDelivered: after a partition heals, the cut-off
// node may answer the client's old claim by moving its stale session here,
// and relay what reaches it for that session until it reads that this node
// answered "stale". Those relayed messages are not for the client's newer
// session here: it got what was published since it subscribed directly
// (a relayed copy is a duplicate), and the rest belonged to the stale
// session (a late message). They are dropped and counted (stale_session).
// Before, the newer session got them: the partition heal test's 1
// duplicate and 1 late message.
func TestStaleMoveRelayNotDelivered(t *testing.T) {
	nodes := startCluster(t, 2)
	cur, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "x", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	subscribe(t, cur, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})
	before := nodes[1].Stats().DroppedByReason["stale_session"]["1"]

	nodes[1].InjectStaleMove("n0", "x", "inbox/x", []byte("relayed"))
	pub, _ := dialV5(t, nodes[1], &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.Pub(t, "inbox/x", 1, false, "direct")
	if m := cur.Next(t, waitMsg); string(m.Payload) != "direct" {
		t.Fatalf("the newer session got %q first, want direct (not the stale move's relayed message)", m.Payload)
	}
	if got := nodes[1].Stats().DroppedByReason["stale_session"]["1"]; got != before+1 {
		t.Errorf("stale_session drops %d, want %d", got, before+1)
	}
}

// TestSessionMovesWithPreviousRelease: during a rolling restart a node of
// the previous release (cluster protocol 1: it advertises no version, and
// refuses a move's end carrying the packet ID added since) and a node of
// this one move a session both ways, with its queued messages, none lost.
// Each move has a tail: a message that reaches the session while its first
// chunk goes out, sent after the session is detached, which the move's end
// counts.
// Before versions, the new node always sent the packet ID: the old node
// refused the move's end, and the client's CONNECT there found no session.
func TestSessionMovesWithPreviousRelease(t *testing.T) {
	nodes := startCluster(t, 2)
	nodes[1].SpeakProtocolV1()
	testutil.WaitFor(t, waitCond, func() error {
		if v := nodes[0].PeerProtocol("n1"); v != 1 {
			return fmt.Errorf("n0 speaks version %d to n1, want 1", v)
		}
		return nil
	})
	expiry := uint32(600)
	connect := func(b *broker.Broker) (*testutil.V5, *paho.Connack) {
		return dialV5(t, b, &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	}
	// queue leaves dev offline on b with three messages queued there,
	// published once the move's route window has closed (a message
	// published on the destination within it comes back relayed by the
	// source: a duplicate QoS 1 allows, see cluster_relay.go).
	queue := func(b, from *broker.Broker, dev *testutil.V5, batch int) {
		t.Helper()
		if err := dev.Disconnect(&paho.Disconnect{}); err != nil {
			t.Fatal(err)
		}
		waitConnections(t, b, 0)
		waitRoutes(t, nodes, from, 0)
		pub, _ := dialV5(t, b, &paho.Connect{ClientID: "pub", CleanStart: true})
		for i := range 3 {
			pub.Pub(t, "up/dev", 1, false, fmt.Sprintf("%d.%d", batch, i))
		}
		_ = pub.Disconnect(&paho.Disconnect{})
		waitConnections(t, b, 0)
	}
	// tail publishes batch.3 on src while a move's first chunk goes out;
	// done disconnects its publisher.
	tail := func(src *broker.Broker, batch int) (done func()) {
		pub, _ := dialV5(t, src, &paho.Connect{ClientID: fmt.Sprintf("tail-%d", batch), CleanStart: true})
		var once sync.Once
		src.SetTestMoveChunk(func(side string, seq uint64) {
			if side == "source" && seq == 0 {
				once.Do(func() {
					ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
					defer cancel()
					if _, err := pub.Publish(ctx, &paho.Publish{Topic: "up/dev", QoS: 1, Payload: fmt.Appendf(nil, "%d.3", batch)}); err != nil {
						t.Errorf("tail publish: %v", err)
					}
				})
			}
		})
		return func() {
			src.SetTestMoveChunk(nil)
			_ = pub.Disconnect(&paho.Disconnect{})
			waitConnections(t, src, 0)
		}
	}
	expect := func(dev *testutil.V5, batch int) {
		t.Helper()
		for i := range 4 {
			if m := dev.Next(t, waitMsg); string(m.Payload) != fmt.Sprintf("%d.%d", batch, i) {
				t.Fatalf("got %q, want %d.%d", m.Payload, batch, i)
			}
		}
	}

	dev, _ := connect(nodes[0])
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "up/dev", QoS: 1})
	queue(nodes[0], nodes[1], dev, 0)
	for i, to := range []*broker.Broker{nodes[1], nodes[0]} { // new to old, then old to new
		done := tail(nodes[i], i)
		var ca *paho.Connack
		dev, ca = connect(to)
		done()
		if !ca.SessionPresent {
			t.Fatalf("move %d: session not present on %s", i, to.Name())
		}
		expect(dev, i)
		queue(to, nodes[i], dev, i+1)
	}
	done := tail(nodes[0], 2)
	dev, _ = connect(nodes[1])
	done()
	expect(dev, 2)
}

// TestSessionMoveQueueBeforeDestinationPublishes: a session with 300
// queued messages moves to the node its client reconnects to, which is the
// node their publisher is connected to, while that publisher goes on
// publishing. The client gets the whole queue, in order, before anything
// published during the move; then every message. Before (mochi patch
// 121), the destination subscribed the session before it set the queue:
// its publisher's messages took their place among the queued ones, and
// the client got them before older ones (bench/chaos, finding D of
// session 11, suspected this; there it was a node cut off, see
// docs/clustering.md). What the destination publishes in the move's
// last link round trip can still come before what it published just
// before, which went to the source and is relayed back (logged here, not
// asserted: docs/clustering.md, "A session moved between live nodes").
func TestSessionMoveQueueBeforeDestinationPublishes(t *testing.T) {
	const queued, after = 300, 300
	nodes := bigSessionCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	expiry := ptr(uint32(600))
	dev, _ := dialV5(t, n0, &paho.Connect{ClientID: "dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "inbox/dev", QoS: 1})
	waitRoutes(t, nodes, n0, 1)
	_ = dev.Disconnect(&paho.Disconnect{})
	waitConnections(t, n0, 0)

	pub, _ := dialV5(t, n1, &paho.Connect{ClientID: "pub", CleanStart: true})
	publish := func(i int) error {
		payload := make([]byte, 4)
		binary.BigEndian.PutUint32(payload, uint32(i))
		_, err := pub.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: "inbox/dev", QoS: 1, Payload: payload})
		return err
	}
	for i := range queued {
		if err := publish(i); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := n0.Stats().Inflight; n != queued {
			return fmt.Errorf("n0 holds %d messages for the offline session, want %d", n, queued)
		}
		return nil
	})

	// The publisher goes on while the client reconnects to n1 (its
	// session moves from n0) and reads.
	pubErr := make(chan error, 1)
	go func() {
		for i := queued; i < queued+after; i++ {
			if err := publish(i); err != nil {
				pubErr <- fmt.Errorf("publish %d: %w", i, err)
				return
			}
		}
		pubErr <- nil
	}()
	dev2, ca := dialV5(t, n1, &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	if !ca.SessionPresent {
		t.Fatal("session not present after moving from n0 to n1")
	}
	seen := make(map[uint32]bool, queued+after)
	var last uint32
	late := 0
	for len(seen) < queued+after {
		m := dev2.Next(t, waitMsg)
		n := binary.BigEndian.Uint32(m.Payload)
		if seen[n] {
			continue // a QoS 1 duplicate (the move's route window)
		}
		switch {
		case len(seen) < queued && n != uint32(len(seen)):
			t.Fatalf("first delivery %d: message %d, want %d (the moved queue, in order, first)", len(seen), n, len(seen))
		case len(seen) > 0 && n < last:
			late++
		}
		seen[n], last = true, max(last, n)
	}
	if err := <-pubErr; err != nil {
		t.Fatal(err)
	}
	t.Logf("messages published during the move that came after a later one: %d", late)
	if st := n1.Stats().Cluster; st.SessionsMoved != 1 {
		t.Errorf("n1: sessions_moved_here %d, want 1", st.SessionsMoved)
	}
}
