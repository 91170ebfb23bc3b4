package broker_test

import (
	"fmt"
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

// movedReadopted is the cluster of moveReadopted: svc, adopted from n0 by
// n1, then again from n1 by n3, moved on to n2 (s, its client there).
type movedReadopted struct {
	st        *store.Store
	withStore func(*broker.Options)
	n2, n3    *broker.Broker
	svc       string
	s         *testutil.V5
}

// moveReadopted: as TestReadoptedKeepsEarlierMark up to where svc on n3
// is marked [n0 done, n1 active]; then svc's client reconnects on n2,
// whose held link for n1 is not released yet (n2's adoption of own, a
// session of n1, pauses): the move waits heldWaitMax and goes, carrying
// both marks. svc must get m1 to m4 once, in order.
func moveReadopted(t *testing.T) movedReadopted {
	t.Helper()
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n3 := testcluster.Broker(t, "n3", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2, n3}
	waitMesh(t, nodes...)
	a := pauseAdoptionsPick(t, st, nodes, func(id string) bool { return broker.Adopter(id, "n2", "n3") == "n3" })
	p := a.p

	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	waitHeld(t, n2, "n0")
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")
	var own string
	for i := 0; ; i++ {
		if own = fmt.Sprintf("own-%d", i); broker.Adopter(own, "n2", "n3") == "n2" {
			break
		}
	}
	c, _ := dialV5(t, n1, &paho.Connect{ClientID: own, CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "t/9", QoS: 1})
	_ = c.Disconnect(&paho.Disconnect{})
	waitStoredOwner(t, st, own, "n1")
	ownGo := make(chan struct{})
	var ownOnce sync.Once
	letOwnGo := func() { ownOnce.Do(func() { close(ownGo) }) }
	t.Cleanup(letOwnGo)
	n2.SetTestAfterClaim(func(id string) {
		switch id {
		case a.other:
			<-a.hold
		case own:
			<-ownGo
		}
	})

	n1.KillCluster()
	waitStoredOwner(t, st, a.svc, "n3")
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n3"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n3, want 1 (the session adopted again)", got)
		}
		return nil
	})
	waitHeld(t, n2, "n0")
	waitHeld(t, n2, "n1")
	// Its PUBACK waits for the hand-overs.
	pubQueued(t, n2, p, "n0", "t/0", "m3")
	a.letOtherGo()
	waitNotHeld(t, 2*waitCond, n2, "n0")
	testutil.WaitFor(t, waitCond, func() error {
		if n3.AdoptedMarkActive(a.svc, "n0") {
			return fmt.Errorf("n3 is not done with n0 yet")
		}
		return nil
	})

	// The device reconnects on n2: svc moves n3 -> n2.
	s, ca := dialV5(t, n2, &paho.Connect{ClientID: a.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 after the move")
	}
	if n2.AdoptedMarkActive(a.svc, "n0") {
		t.Error("n2 took svc's done mark of n0 as active")
	}
	letOwnGo()
	waitNotHeld(t, 2*waitCond, n2, "n1")
	p.Pub(t, "t/0", 1, false, "m4")
	for _, want := range []string{"m1", "m2", "m3", "m4"} {
		if m := s.Next(t, waitMsg); string(m.Payload) != want {
			t.Fatalf("moved session got %q, want %s (m1 to m4 in order)", m.Payload, want)
		}
	}
	// The move went after its 1.5 s wait for the held copies: a held
	// message may come twice (docs/clustering.md; review rv13c10: the old
	// adopter sends its held copy on as well), never m4, which nothing held.
	select {
	case m := <-s.Messages:
		if string(m.Payload) == "m4" {
			t.Fatal("moved session got m4 twice")
		}
		t.Logf("moved session got held %q twice: the documented duplicate of a move after its wait", m.Payload)
	case <-time.After(time.Second):
	}
	return movedReadopted{st: st, withStore: withStore, n2: n2, n3: n3, svc: a.svc, s: s}
}

// TestMovedReadoptedMarksClear: a session adopted again (marked [n0 done,
// n1 active]) that moves on before every broker is done with n1 carries
// n0's mark done, and once every broker is done with n1's held link no
// mark is left, as without the move. Before, the move made n0's mark
// active again, with nothing to clear it: it stayed for good, stored and
// carried on every later move.
func TestMovedReadoptedMarksClear(t *testing.T) {
	m := moveReadopted(t)
	testutil.WaitFor(t, waitCond, func() error {
		if n := m.n2.AdoptedMarks(); n != 0 {
			return fmt.Errorf("n2 has %d sessions marked adopted, want 0 (n0 active=%v n1 active=%v)", n,
				m.n2.AdoptedMarkActive(m.svc, "n0"), m.n2.AdoptedMarkActive(m.svc, "n1"))
		}
		return nil
	})
}

// TestMovedReadoptedNoMarkOnLaterNode: the session of
// TestMovedReadoptedMarksClear moves on to n4, a node that joined after
// n0's failover (it never hears a broker done with n0's held link), and
// back to n3: no mark may follow it, or it stays on n4 and every move out
// of it waits heldWaitMax.
func TestMovedReadoptedNoMarkOnLaterNode(t *testing.T) {
	m := moveReadopted(t)
	n4 := testcluster.Broker(t, "n4", m.n2.GossipAddr(), m.withStore)
	waitMesh(t, m.n2, m.n3, n4)
	_ = m.s.Disconnect(&paho.Disconnect{})
	s4, ca4 := dialV5(t, n4, &paho.Connect{ClientID: m.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca4.SessionPresent {
		t.Fatal("session present = 0 after the move to n4")
	}
	if n4.AdoptedMarkActive(m.svc, "n0") {
		t.Error("n4 marks svc adopted from n0 (active)")
	}
	_ = s4.Disconnect(&paho.Disconnect{})
	// A refused CONNECT (a move under way) is retried, as a device does.
	start := time.Now()
	for {
		_, ca, err := testutil.DialV5(t, m.n3.Addr(broker.ListenerTCP), &paho.Connect{ClientID: m.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
		if err == nil {
			if !ca.SessionPresent {
				t.Fatal("session present = 0 after the move to n3")
			}
			break
		}
		if time.Since(start) > waitCond {
			t.Fatalf("svc never reconnected on n3: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := m.n3.AdoptedMarks(); n != 0 {
			return fmt.Errorf("n3 has %d sessions marked adopted, want 0 (n0 active=%v)", n, m.n3.AdoptedMarkActive(m.svc, "n0"))
		}
		return nil
	})
}

// TestMovedInMarksEnd: a mark a session brings in a move goes at the
// latest cluster.failed_peer_hold after the session was adopted from its
// node, as a restored one does, and one the source flags done stays done:
// the destination may have joined after that node's failover and never
// hear a broker done with its held link. Before, a moved-in mark was
// active, with no end but that word: kept for good on such a node, every
// move out of it waited heldWaitMax.
func TestMovedInMarksEnd(t *testing.T) {
	n := testcluster.Broker(t, "n1", "", nil)
	hold := n.FailedPeerHold()
	if hold <= 2*time.Second {
		t.Fatalf("cluster.failed_peer_hold %v: the test needs more", hold)
	}
	// Adopted from n7 a little less than the hold ago: the mark goes soon.
	n.MoveInMarks("s", broker.MovedMark{From: "n7", At: time.Now().Add(-hold + time.Second)})
	if !n.AdoptedMarkActive("s", "n7") {
		t.Fatal("moved-in mark of n7 not set")
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n.AdoptedMarks() != 0 {
			return fmt.Errorf("mark of n7 still there past cluster.failed_peer_hold from its time")
		}
		return nil
	})
	// Past the hold already: no held copy of n7 can come, no mark.
	n.MoveInMarks("s", broker.MovedMark{From: "n7", At: time.Now().Add(-hold - time.Second)})
	if n.AdoptedMarks() != 0 {
		t.Fatal("a mark older than cluster.failed_peer_hold was set")
	}
	// Done at the source: done here, kept for the later mark alone.
	n.MoveInMarks("s", broker.MovedMark{From: "n7", At: time.Now(), Done: true}, broker.MovedMark{From: "n8", At: time.Now()})
	if n.AdoptedMarks() != 1 || n.AdoptedMarkActive("s", "n7") || !n.AdoptedMarkActive("s", "n8") {
		t.Fatalf("marks after a move with n7 done: %d sessions, n7 active %v, n8 active %v; want 1, false, true",
			n.AdoptedMarks(), n.AdoptedMarkActive("s", "n7"), n.AdoptedMarkActive("s", "n8"))
	}
}
