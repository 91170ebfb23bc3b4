package broker_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestHeldLinkToRestartedNodeReachesAdopted: a node dies, one of its
// sessions is adopted (its direct copies are skipped there: the held link
// has them), and the node restarts at the same address before the held
// link is released (another of its sessions is still being adopted). The
// held link then finds a new process and throws its queue away; what it
// held still reaches the adopted session, in order, and so does what is
// published after. Before, the adopted session lost every message
// published between the death and the restart (counted as peer_restarted,
// not against it), and those published until gossip saw the node alive
// again without a count.
//
// Two orders: gossip reports the node alive again before the held link
// reaches the new process (the link is no longer held then, and the
// adopter keeps its marks until n2 says it re-sent its copies), or after (the
// publisher's node is made to see it failed until the end: it forwards
// meanwhile on the reconnected link, unmarked).
func TestHeldLinkToRestartedNodeReachesAdopted(t *testing.T) {
	for _, stillFailed := range []bool{false, true} {
		t.Run(fmt.Sprintf("still_failed=%v", stillFailed), func(t *testing.T) {
			heldLinkToRestartedNode(t, stillFailed)
		})
	}
}

func heldLinkToRestartedNode(t *testing.T, stillFailed bool) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	px.setTarget(n0.Stats().Cluster.Link)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p

	gossip := n0.GossipAddr()
	n0.KillCluster()
	px.cut()
	a.publishDuringAdoption(t, st, n2, "m1")
	// m2's direct copy is skipped by the adopted session: the held link
	// has it. Its PUBACK waits for the hand-over.
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want held", st)
	}

	inc := func() uint64 {
		for _, l := range n2.Stats().Cluster.Links {
			if l.Peer == "n0" {
				return l.PeerIncarnation
			}
		}
		return 0
	}
	before := inc()
	if stillFailed {
		markFailed(n2, "n0")
		defer n2.SetTestMembers(nil)
	}
	// n0 restarts: same name, same addresses.
	n0b := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	px.setTarget(n0b.Stats().Cluster.Link)
	testutil.WaitFor(t, waitCond, func() error {
		want := "up"
		if stillFailed {
			want = "held"
		}
		if st, _ := linkState(n2, "n0"); st != want || inc() == before {
			return fmt.Errorf("n2's link to n0 %q, want %s with the new n0", st, want)
		}
		return nil
	})
	p.Pub(t, "t/0", 1, false, "m3")
	a.letOtherGo()

	a.wantAdopted(t, n1, "m1", "m2", "m3")
}

// TestExpiredHeldLinkBeforeLaterForward: a held link given up at
// cluster.failed_peer_hold (a session of the dead node still not adopted)
// hands its messages to the sessions adopted so far; a message published
// while it closes reaches such a session after them. Before, its routes
// went before the link closed, so a message forwarded in between reached
// the adopted session directly, ahead of the older held one.
func TestExpiredHeldLinkBeforeLaterForward(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.FailedPeerHold = st, 3*time.Second
	})
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	svc := a.svc
	// m2's publisher: a.p's acknowledgement of m1 fails when the expired
	// link hands it over (counted link_closed for the sessions not yet
	// adopted), which closes a.p's connection.
	p, _ := dialV5(t, n2, &paho.Connect{ClientID: "p2", CleanStart: true})
	closing, closeNow := make(chan struct{}), make(chan struct{})
	var closeOnce sync.Once
	n2.SetTestBeforeClose(func(peer string) {
		if peer == "n0" {
			closeOnce.Do(func() {
				close(closing)
				<-closeNow
			})
		}
	})
	defer n2.SetTestBeforeClose(nil)

	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	select {
	case <-closing: // n0's routes are gone on n2, its held link not closed yet
	case <-time.After(waitCond):
		t.Fatal("n2 did not give up its held link for n0")
	}
	acked := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err := p.Client.Publish(ctx, &paho.Publish{Topic: "t/0", QoS: 1, Payload: []byte("m2")})
		acked <- err
	}()
	// m2 is acknowledged at once if nothing keeps it behind the held
	// link's messages; the link closes after that, or after 2 s.
	select {
	case err := <-acked:
		acked <- err
	case <-time.After(2 * time.Second):
	}
	close(closeNow)
	if err := <-acked; err != nil {
		t.Fatalf("m2 not acknowledged: %v", err)
	}
	s, ca := dialV5(t, n1, &paho.Connect{ClientID: svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 after the adoption")
	}
	for _, want := range []string{"m1", "m2"} {
		if m := s.Next(t, waitMsg); string(m.Payload) != want {
			t.Fatalf("adopted session got %q, want %s (m1 then m2)", m.Payload, want)
		}
	}
}

// pausedAdoptions is what pauseAdoptions set up.
type pausedAdoptions struct {
	svc, other string        // persistent sessions on n0 (t/0, t/1), adopted by n1 and n2
	p          *testutil.V5  // a publisher on n2
	blocked    chan struct{} // closed when n1 has claimed svc and pauses
	release    chan struct{} // close to let n1's adoption of svc go on
	hold       chan struct{} // closed by letOtherGo: n2's adoption of other goes on
	holdOnce   *sync.Once
}

// letOtherGo lets n2's adoption of other go on (and so, once svc's is
// done, the release of n2's held link for n0). It is safe to call more
// than once; pauseAdoptions also calls it at the test's cleanup, before
// the nodes stop, so a test that fails first does not leave n2 blocked.
func (a pausedAdoptions) letOtherGo() { a.holdOnce.Do(func() { close(a.hold) }) }

// wantAdopted connects to n (the adopter) as svc and asserts its session
// is there and delivers msgs, in order.
func (a pausedAdoptions) wantAdopted(t *testing.T, n *broker.Broker, msgs ...string) {
	t.Helper()
	s, ca := dialV5Retry(t, n, &paho.Connect{ClientID: a.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 after the adoption")
	}
	for _, want := range msgs {
		if m := s.Next(t, waitMsg); string(m.Payload) != want {
			t.Fatalf("adopted session got %q, want %s (%s in order)", m.Payload, want, strings.Join(msgs, ", "))
		}
	}
}

// pauseAdoptions gives n0 of nodes (n0, n1, n2, and any further
// survivors, which adopt nothing) two persistent sessions, svc adopted by
// n1 and other by n2 when n0 dies, and pauses both adoptions after their
// claims: svc's until release, other's (so n2's held link for n0 is not
// released) until hold.
func pauseAdoptions(t *testing.T, st *store.Store, nodes []*broker.Broker) pausedAdoptions {
	t.Helper()
	return pauseAdoptionsPick(t, st, nodes, nil)
}

// pauseAdoptionsPick is pauseAdoptions with svc also chosen by ok (nil:
// any).
func pauseAdoptionsPick(t *testing.T, st *store.Store, nodes []*broker.Broker, ok func(svc string) bool) pausedAdoptions {
	t.Helper()
	n0, n1, n2 := nodes[0], nodes[1], nodes[2]
	var live []string
	for _, n := range nodes[1:] {
		live = append(live, n.Name())
	}
	pick := func(prefix, adopter string) string {
		for i := 0; ; i++ {
			if id := fmt.Sprintf("%s-%d", prefix, i); broker.Adopter(id, live...) == adopter && (ok == nil || prefix != "svc" || ok(id)) {
				return id
			}
		}
	}
	a := pausedAdoptions{svc: pick("svc", "n1"), other: pick("other", "n2"),
		blocked: make(chan struct{}), release: make(chan struct{}), hold: make(chan struct{}), holdOnce: new(sync.Once)}
	for i, id := range []string{a.svc, a.other} {
		c, _ := dialV5(t, n0, &paho.Connect{ClientID: id, CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
		subscribe(t, c, 0, paho.SubscribeOptions{Topic: fmt.Sprintf("t/%d", i), QoS: 1})
		_ = c.Disconnect(&paho.Disconnect{})
	}
	waitConnections(t, n0, 0)
	waitStoredOwner(t, st, a.svc, "n0")
	waitStoredOwner(t, st, a.other, "n0")
	waitRoutes(t, nodes, n0, 2)
	a.p, _ = dialV5(t, n2, &paho.Connect{ClientID: "p", CleanStart: true})
	var once sync.Once
	n1.SetTestAfterClaim(func(id string) {
		if id == a.svc {
			once.Do(func() { close(a.blocked) })
			<-a.release
		}
	})
	t.Cleanup(func() { n1.SetTestAfterClaim(nil) })
	n2.SetTestAfterClaim(func(id string) {
		if id == a.other {
			<-a.hold
		}
	})
	t.Cleanup(func() { n2.SetTestAfterClaim(nil) })
	t.Cleanup(a.letOtherGo) // runs first
	return a
}

// publishDuringAdoption publishes msg on t/0 while n1's adoption of svc is
// paused (so only n0's held link on n2 takes it), lets the adoption go on,
// and waits until n1 owns svc and n2 holds its route.
func (a pausedAdoptions) publishDuringAdoption(t *testing.T, st *store.Store, n2 *broker.Broker, msg string) {
	t.Helper()
	select {
	case <-a.blocked:
	case <-time.After(waitCond):
		t.Fatal("no adoption of the session")
	}
	// Its PUBACK may wait for n2's links to hold the one to n0 (the
	// verdict may not have reached them yet): not waited for here.
	pubQueued(t, n2, a.p, "n0", "t/0", msg)
	close(a.release)
	waitStoredOwner(t, st, a.svc, "n1")
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n1, want 1 (the adopted session's)", got)
		}
		return nil
	})
}
