package broker_test

import (
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

// TestNewerConnectOnSourceDuringMoveKeepsSession: a session is moving
// from n0 to n1 for a CONNECT on n1 (paused in its chunk transfer), and
// the client connects to n0 again (it gave up on the CONNECT on n1). The
// move yields to that newer connection: the session stays on n0, whole
// and in order, with the newer connection, which keeps receiving; the
// older CONNECT on n1 is refused (0x88, its client retries). Before, the
// newer CONNECT was refused (its claim found the session moving), and the
// session went to the older CONNECT, which its client had given up on.
func TestNewerConnectOnSourceDuringMoveKeepsSession(t *testing.T) {
	const queued = 100 // 8 KiB each: 4 chunks
	nodes := bigSessionCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	expiry := ptr(uint32(600))
	dev, _ := dialV5(t, n0, &paho.Connect{ClientID: "dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "inbox/dev", QoS: 1})
	waitRoutes(t, nodes, n0, 1)
	_ = dev.Disconnect(&paho.Disconnect{})
	waitConnections(t, n0, 0)
	pub, _ := dialV5(t, n0, &paho.Connect{ClientID: "pub", CleanStart: true})
	payload := make([]byte, bigPayload)
	for i := range queued {
		binary.BigEndian.PutUint32(payload, uint32(i))
		if _, err := pub.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: "inbox/dev", QoS: 1, Payload: payload}); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}

	paused, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	n0.SetTestMoveChunk(func(side string, seq uint64) {
		if side == "source" && seq == 1 {
			once.Do(func() {
				close(paused)
				<-release
			})
		}
	})
	defer once.Do(func() {}) // a failed test does not leave the hook waiting
	cp := func() *paho.Connect {
		return &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}}
	}
	older := dialAsync(t, n1, cp())
	select {
	case <-paused:
	case <-testutil.Context(t, waitCond).Done():
		close(release)
		t.Fatal("no move of the session to n1")
	}
	type conn struct {
		c   *testutil.V5
		ca  *paho.Connack
		err error
	}
	newer := make(chan conn, 1)
	go func() {
		c, ca, err := testutil.DialV5(t, n0.Addr("tcp"), cp())
		newer <- conn{c, ca, err}
	}()
	// The newer CONNECT asked the move to yield (or, before, was refused).
	var got *conn
	testutil.WaitFor(t, waitCond, func() error {
		select {
		case r := <-newer:
			got = &r
			return nil
		default:
		}
		if n0.MoveYieldsAsked() > 0 {
			return nil
		}
		return fmt.Errorf("the newer CONNECT on n0 neither asked the move to yield nor ended")
	})
	close(release)
	if got == nil {
		r := <-newer
		got = &r
	}
	if got.err != nil {
		t.Fatalf("newer CONNECT on the move's source: %v (CONNACK %+v); want it connected with its session", got.err, got.ca)
	}
	c := got.c
	defer c.Disconnect(&paho.Disconnect{})
	if !got.ca.SessionPresent {
		t.Fatal("newer CONNECT on n0: session present = 0")
	}
	wantRefused(t, <-older)
	for i := range queued {
		m := c.Next(t, waitMsg)
		if n := binary.BigEndian.Uint32(m.Payload); n != uint32(i) {
			t.Fatalf("message %d: got number %d (out of order or missing)", i, n)
		}
	}
	// It is the session's one owner, and keeps receiving.
	p1, _ := dialV5(t, n1, &paho.Connect{ClientID: "pub1", CleanStart: true})
	if _, err := p1.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: "inbox/dev", QoS: 1, Payload: []byte("after")}); err != nil {
		t.Fatal(err)
	}
	if m := c.Next(t, waitMsg); string(m.Payload) != "after" {
		t.Fatalf("got %q, want after", m.Payload)
	}
	if n := n1.Stats().Sessions; n != 1 { // pub1's
		t.Errorf("n1 holds %d sessions, want 1 (pub1's)", n)
	}
}

// TestConnectOnLeavingNodeDoesNotWaitForPush: a node that drains pushes
// its offline sessions to a live peer (paused here in its chunk
// transfer); a CONNECT of such a session's client on that node meanwhile
// goes on to its claims at once (a push does not give way to it, so it
// has nothing to wait for), is refused as the session is moving, and the
// session arrives whole on the live node, where the client's retry finds
// it. Before, it waited for the push to end, up to
// cluster.claim_timeout (2 min here), in the yield meant for moves that
// answer a claim.
func TestConnectOnLeavingNodeDoesNotWaitForPush(t *testing.T) {
	var nodes []*broker.Broker
	for i, seed := 0, ""; i < 2; i++ {
		b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, func(bc *config.Broker, cc *config.Cluster) {
			bc.MaxQueuedBytes = 16 << 20
			cc.ClaimTimeout = 2 * time.Minute
		})
		seed = nodes0(nodes, b).GossipAddr()
		nodes = append(nodes, b)
	}
	waitMesh(t, nodes...)
	n0 := nodes[0]
	queueBigSession(t, nodes, n0)

	paused, release := make(chan struct{}), make(chan struct{})
	var once, released sync.Once
	n0.SetTestMoveChunk(func(side string, seq uint64) {
		if side == "source" && seq == 1 {
			once.Do(func() {
				close(paused)
				<-release
			})
		}
	})
	unpause := func() { released.Do(func() { close(release) }) }
	defer unpause()
	n0.Drain(true)
	select {
	case <-paused:
	case <-time.After(waitCond):
		t.Fatal("no push of the session away from the draining n0")
	}
	claims := make(chan struct{})
	var claimsOnce sync.Once
	n0.SetTestBeforeClaims(func(id string) {
		if id == "dev" {
			claimsOnce.Do(func() { close(claims) })
		}
	})
	defer n0.SetTestBeforeClaims(nil)
	res := dialAsync(t, n0, &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	select {
	case <-claims:
	case <-time.After(waitCond):
		t.Fatal("the CONNECT on the draining node waits for the push of its session")
	}
	unpause()
	select {
	case r := <-res:
		// Its claim found the session moving: refused, the client
		// retries (through the router, on a live node).
		wantRefused(t, r)
	case <-time.After(waitCond):
		t.Fatal("the CONNECT did not end after the push went on")
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := nodes[1].Stats().Inflight; n != bigQueued {
			return fmt.Errorf("n1 holds %d messages of the pushed session, want %d", n, bigQueued)
		}
		return nil
	})
	c, ca := dialV5(t, nodes[1], &paho.Connect{ClientID: "dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("retry on n1: session present = 0")
	}
	expectBigSession(t, c)
}
