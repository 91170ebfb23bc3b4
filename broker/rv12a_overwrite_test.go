package broker_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestRv12aPerMessageResendKeepsHandOverCopies (review rv12a): n0 dies,
// its session svc is adopted by n1, whose route for it has not reached
// n2 yet (dropped here), n2 holds its link to n0. A forward of m on n2
// queues it on the held link (marked held: svc skips direct copies), then
// n0 restarts at the same address: the link throws its queue away and
// resendRestarted hands m to every live peer (handOverTo: n1 too, routes
// or not), recording the copy. The forward then sees handOver false and
// re-sends m itself (forwardPublish, follow: always) with no adopters: to
// the peers whose routes match, not n1 (its route is not here), so its
// record has no copy, and it replaces resendRestarted's record (same key).
// The acknowledgement then follows the empty record: the PUBACK goes while
// the only copy for svc sits in n2's link queue to n1, unacknowledged (n1
// holds it here): a kill -9 of n2 then loses an acknowledged message, not
// counted. Before the PUBACK, n1 must have acknowledged the copy.
func TestRv12aPerMessageResendKeepsHandOverCopies(t *testing.T) {
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
	routesBack := make(chan struct{})
	t.Cleanup(func() { close(routesBack) }) // before the nodes stop
	n2.DropRoutesFrom("n1", routesBack)

	gossip := n0.GossipAddr()
	n0.KillCluster()
	px.cut()
	select {
	case <-a.blocked:
	case <-time.After(waitCond):
		t.Fatal("no adoption of the session")
	}
	close(a.release)
	waitStoredOwner(t, st, a.svc, "n1")
	markFailed(n2, "n0")
	defer n2.SetTestMembers(nil)
	waitHeld(t, n2, "n0")
	if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 0 {
		t.Fatalf("n2 holds %d routes of n1, want none", got)
	}
	n1Acks := make(chan struct{})
	n1.HoldPublishes("n2", n1Acks) // n1 does not acknowledge n2's copies yet
	acksFreed := false
	defer func() {
		if !acksFreed {
			close(n1Acks)
		}
	}()

	var once sync.Once
	paused := make(chan struct{})
	gate := make(chan struct{})
	n2.SetTestForwardQueued(func(topic, peer string) {
		if topic == "t/0" && peer == "n0" {
			once.Do(func() {
				close(paused)
				<-gate
			})
		}
	})
	t.Cleanup(func() { n2.SetTestForwardQueued(nil) })
	gated := false
	defer func() {
		if !gated {
			close(gate)
		}
	}()
	acked := publishAsync(p, "t/0", "m")
	select {
	case <-paused:
	case <-time.After(waitCond):
		t.Fatal("m not forwarded to n0")
	}
	before := n2.HeldLinkIncarnation("n0")
	n0b := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	px.setTarget(n0b.Stats().Cluster.Link)
	testutil.WaitFor(t, waitCond, func() error {
		if inc := n2.HeldLinkIncarnation("n0"); inc == before || inc == 0 {
			return fmt.Errorf("n2's held link to n0 has not reached the new process (incarnation %d)", inc)
		}
		if n2.HandOverRecords() == 0 {
			return fmt.Errorf("resendRestarted has not recorded its hand-over")
		}
		return nil
	})
	close(gate) // the forward sees handOver false: its own re-send
	gated = true
	select {
	case err := <-acked:
		t.Fatalf("PUBACK (err %v) while the only copy for svc sits unacknowledged in n2's link queue to n1", err)
	case <-time.After(2 * time.Second):
	}
	close(n1Acks)
	acksFreed = true
	wantAcked(t, acked, "m")
	a.letOtherGo()
	a.wantAdopted(t, n1, "m")
}
