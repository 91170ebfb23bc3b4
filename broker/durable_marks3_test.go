package broker_test

import (
	"fmt"
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
// counted.
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
	p.Pub(t, "t/0", 1, false, "m2")

	n1.KillCluster() // its MQTT side is not used again
	waitStoredOwner(t, st, a.svc, "n3")
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n3"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n3, want 1 (the session adopted again)", got)
		}
		return nil
	})
	waitHeld(t, n2, "n0")
	p.Pub(t, "t/0", 1, false, "m3")
	a.letOtherGo() // n2 adopts other, then hands what it held for n0 over
	waitNotHeld(t, 2*waitCond, n2, "n0")
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
