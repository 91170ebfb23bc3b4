package broker_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestReadoptedKeepsEarlierMark: n0 dies, n1 adopts its session svc, and
// n1 dies too while n2 still holds its link for n0 (another session of
// n0 is still being adopted there) with m1 and m2 in it (m1 published
// before svc was adopted, m2's direct copy skipped by svc on n1). n3
// adopts svc again, from n1. When n2 hands what it held for n0 over, svc
// on n3 must take it, once, in order with m3 (published while n2 holds
// both links) and m4 (after). Before, n3 marked svc adopted from n1
// alone: it skipped n0's held copies of m1, m2 and m3, lost and not
// counted. n2 hands its held link for n1 (m3 again) over only once n3 is
// done with n0 (n2's adoption of own, a session of n1, pauses until
// then): svc keeps its mark of n0 for n1's (done), or it would take m3
// twice.
func TestReadoptedKeepsEarlierMark(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n3 := testcluster.Broker(t, "n3", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2, n3}
	waitMesh(t, nodes...)
	// svc goes to n1 when n0 dies, and to n3 when n1 dies too (n2's
	// watcher is paused in its adoption of other meanwhile).
	a := pauseAdoptionsPick(t, st, nodes, func(id string) bool { return broker.Adopter(id, "n2", "n3") == "n3" })
	p := a.p

	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	waitHeld(t, n2, "n0") // n2's own verdict on n0 may come after n1's adoption: m2 must be marked held
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")
	// own: a session of n1, adopted by n2 when n1 dies.
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
	defer letOwnGo()
	n2.SetTestAfterClaim(func(id string) {
		switch id {
		case a.other:
			<-a.hold
		case own:
			<-ownGo
		}
	})

	n1.KillCluster() // its MQTT side is not used again
	waitStoredOwner(t, st, a.svc, "n3")
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n3"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n3, want 1 (the session adopted again)", got)
		}
		return nil
	})
	waitHeld(t, n2, "n0")
	waitHeld(t, n2, "n1") // m3 is marked held for both
	// Its PUBACK waits for the hand-overs.
	pubQueued(t, n2, p, "n0", "t/0", "m3")
	a.letOtherGo() // n2 adopts other, then hands what it held for n0 over
	waitNotHeld(t, 2*waitCond, n2, "n0")
	testutil.WaitFor(t, waitCond, func() error {
		if n3.AdoptedMarkActive(a.svc, "n0") {
			return fmt.Errorf("n3 is not done with n0 yet")
		}
		return nil
	})
	letOwnGo() // n2 adopts own, then hands what it held for n1 over
	waitNotHeld(t, 2*waitCond, n2, "n1")
	p.Pub(t, "t/0", 1, false, "m4")

	s, ca := dialV5(t, n3, &paho.Connect{ClientID: a.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 after the second adoption")
	}
	for _, want := range []string{"m1", "m2", "m3", "m4"} {
		if m := s.Next(t, waitMsg); string(m.Payload) != want {
			t.Fatalf("session adopted again got %q, want %s (m1 to m4 in order)", m.Payload, want)
		}
	}
	// Once: n1's held link on n2 (m3 was queued there too) and the direct
	// copies must not bring them again.
	select {
	case m := <-s.Messages:
		t.Fatalf("session adopted again got %q after m4: a duplicate", m.Payload)
	case <-time.After(time.Second):
	}
	// Every live broker is done with both held links: the marks go.
	testutil.WaitFor(t, waitCond, func() error {
		if n := n3.AdoptedMarks(); n != 0 {
			return fmt.Errorf("n3 has %d sessions marked adopted, want 0", n)
		}
		return nil
	})
}

// TestReadoptedGetsHeldCopiesInTransit: n0 dies, n1 adopts its session
// svc, and n2 hands what its held link kept for n0 (m1, m2) over to n1,
// which dies before it took those copies (they stay in n2's link to n1).
// n3, which is not done with n0's held link yet (n2's route of the other
// session is held back from it), adopts svc again from n1, marked adopted
// from n0 and from n1. When n2 hands over its held link for n1, svc on
// n3 must get n0's held copies it kept, once, before m3. Given as n1's own
// held copies, they were skipped: n0's held link had taken m1 and m2, and
// svc, marked from n0 too, takes such a message through n0's copy alone.
func TestReadoptedGetsHeldCopiesInTransit(t *testing.T) {
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

	// n3 does not learn the route of other (adopted by n2) yet: it cannot
	// release its own held link for n0, so it is not done with it.
	routes := make(chan struct{})
	var rOnce sync.Once
	releaseRoutes := func() { rOnce.Do(func() { close(routes) }) }
	defer releaseRoutes()
	n3.HoldRouteDeltas("n2", routes)
	// n1 takes nothing n2 sends it from now on.
	taken := make(chan struct{})
	var tOnce sync.Once
	defer tOnce.Do(func() { close(taken) })
	n1.HoldPublishesFrom("n2", taken)
	a.letOtherGo() // n2 adopts other, then hands m1 and m2 to n1
	waitNotHeld(t, 2*waitCond, n2, "n0")

	killed := make(chan struct{})
	go func() { defer close(killed); n1.KillCluster() }()
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n1"); st == "up" {
			return fmt.Errorf("n2's link to n1 still up")
		}
		return nil
	})
	tOnce.Do(func() { close(taken) }) // its connections are closed: nothing is acknowledged
	<-killed
	waitStoredOwner(t, st, a.svc, "n3")
	// n2's own verdict on n1 may come after n3's adoption: until then its
	// link to n1 is only down, not held, and m3 would overtake m1 and m2.
	waitHeldSeen(t, n2, "n1")
	waitNotHeld(t, 2*waitCond, n2, "n1") // n2 handed m1 and m2 over again, for n1 now
	releaseRoutes()
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n3"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n3, want 1 (the session adopted again)", got)
		}
		return nil
	})
	p.Pub(t, "t/0", 1, false, "m3")

	s, ca := dialV5(t, n3, &paho.Connect{ClientID: a.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 after the second adoption")
	}
	for _, want := range []string{"m1", "m2", "m3"} {
		if m := s.Next(t, waitMsg); string(m.Payload) != want {
			t.Fatalf("session adopted again got %q, want %s (m1 to m3 in order)", m.Payload, want)
		}
	}
	select {
	case m := <-s.Messages:
		t.Fatalf("session adopted again got %q after m3: a duplicate", m.Payload)
	case <-time.After(time.Second):
	}
}
