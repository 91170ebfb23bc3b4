package broker_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestAdopterRestartKeepsAdoptedMark: a node dies, n1 adopts one of its
// sessions, and n1 restarts (kill, same name and addresses, back before
// gossip's verdict) before n2 released its held link for the dead node
// (another session is still being adopted). The restored session must
// still skip the direct copies of what n2's held link takes, and get the
// held copies when n2 releases it, in order. Before, n1 restored the
// session without its "adopted from n0" mark (it was in memory only): it
// took m3's direct copy first, then skipped the held copies of m1, m2 and
// m3: m1 and m2 were lost, not counted.
func TestAdopterRestartKeepsAdoptedMark(t *testing.T) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	px.setTarget(n1.Stats().Cluster.Link)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p

	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	// m2's direct copy is skipped by the adopted session: the held link
	// has it.
	p.Pub(t, "t/0", 1, false, "m2")
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want held", st)
	}

	// n1 restarts within failure detection: n2 keeps it alive (a real
	// restart of a process is that fast; in process here, gossip might
	// declare it failed first, and n2 would adopt its sessions).
	n2.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if ms[i].Name == "n1" && ms[i].Status == cluster.StatusFailed {
				ms[i].Status = cluster.StatusAlive
			}
		}
		return ms
	})
	defer n2.SetTestMembers(nil)
	inc := func() uint64 {
		for _, l := range n2.Stats().Cluster.Links {
			if l.Peer == "n1" {
				return l.PeerIncarnation
			}
		}
		return 0
	}
	before := inc()
	gossip := n1.GossipAddr()
	n1.KillCluster() // its MQTT side is not used again
	px.cut()
	n1b := testcluster.Broker(t, "n1", n2.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	px.setTarget(n1b.Stats().Cluster.Link)
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n1"); st != "up" || inc() == before {
			return fmt.Errorf("n2's link to n1 %q, want up with the new n1", st)
		}
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of the new n1, want 1 (the restored session's)", got)
		}
		return nil
	})
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want still held", st)
	}
	// Marked held for n0, as m2: the restored session must skip its
	// direct copy and take the held one, after m1 and m2.
	p.Pub(t, "t/0", 1, false, "m3")
	a.letOtherGo() // the other adoption, then n2's release
	testutil.WaitFor(t, 2*waitCond, func() error {
		if st, _ := linkState(n2, "n0"); st == "held" {
			return fmt.Errorf("n2's link to n0 still held")
		}
		return nil
	})

	a.wantAdopted(t, n1b, "m1", "m2", "m3")
}

// TestLateGossipHandOverReachesAdopted: a dead node n0 comes back (at
// another link address), and n1, its adopter, sees it alive at once,
// while n2's gossip still reports it failed for 11 s more (gossip lag,
// a partition of gossip alone) and its held link, which cannot reach the
// new address, keeps what it held. When n2 finally sees n0 alive it hands
// that to the adopted session, which must still carry its mark and take
// it, in order. Before, n1 dropped the marks 10 s after its gossip saw
// n0 alive: the session skipped n2's held copies of m1 and m2, lost and
// not counted. The wait is the lag this test is about, not a
// synchronisation.
func TestLateGossipHandOverReachesAdopted(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p

	gossip, oldLink := n0.GossipAddr(), n0.Stats().Cluster.Link
	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	p.Pub(t, "t/0", 1, false, "m2")
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want held", st)
	}
	markFailed(n2, "n0")
	defer n2.SetTestMembers(nil)
	// n0 restarts: same name and gossip address, another link address.
	n0b := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr = st, gossip
	})
	if n0b.Stats().Cluster.Link == oldLink {
		t.Fatalf("n0 came back at the same link address %s", oldLink)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n1, "n0"); st != "up" {
			return fmt.Errorf("n1's link to n0 %q, want up", st)
		}
		return nil
	})
	time.Sleep(11 * time.Second) // n2's gossip lags n1's by more than 10 s
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want still held", st)
	}
	n2.SetTestMembers(nil)
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n0"); st != "up" {
			return fmt.Errorf("n2's link to n0 %q, want up", st)
		}
		return nil
	})
	p.Pub(t, "t/0", 1, false, "m3")
	a.letOtherGo()

	a.wantAdopted(t, n1, "m1", "m2", "m3")
	// Every live broker said it is done with n0's held link (n2 once it
	// handed it over): the marks go, not only cluster.failed_peer_hold
	// (2 min) later.
	testutil.WaitFor(t, waitCond, func() error {
		if n := n1.AdoptedMarks(); n != 0 {
			return fmt.Errorf("n1 has %d sessions marked adopted, want 0", n)
		}
		return nil
	})
}

// TestHandOverReachesAdopterWithoutRoutes: the dead node comes back (the
// same process, a partition healed) after its session was adopted by n1
// but before n1's route for it reached n2, which hands what its held link
// kept to the sessions adopted from n0. n1 must get those copies anyway
// (only sessions marked adopted from n0 take them), so the session gets
// m1, then m2 published after. Before, the hand-over went only to the
// nodes whose routes matched at n2: the adopted session skipped m1, lost
// (counted stale_session only when the heal ended n0's stale copy).
func TestHandOverReachesAdopterWithoutRoutes(t *testing.T) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	n0link := n0.Stats().Cluster.Link
	px.setTarget(n0link)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p

	px.cut()
	defer px.setTarget(n0link) // the partition heals for n0's link too
	for _, b := range []*broker.Broker{n1, n2} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	routes := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(routes) }) }
	defer release()
	n2.HoldRouteDeltas("n1", routes)
	select {
	case <-a.blocked:
	case <-time.After(waitCond):
		t.Fatal("no adoption of the session")
	}
	p.Pub(t, "t/0", 1, false, "m1") // only n0's held link on n2 takes it
	close(a.release)
	waitStoredOwner(t, st, a.svc, "n1")
	testutil.WaitFor(t, waitCond, func() error { // installed on n1
		if got := n1.Stats().Cluster.LocalRoutes; got != 1 {
			return fmt.Errorf("n1 has %d local routes, want 1 (the adopted session's)", got)
		}
		return nil
	})
	if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 0 {
		t.Fatalf("n2 holds %d routes of n1, want 0 (held back)", got)
	}
	// n0 is back for gossip: n2 hands its held link's queue over.
	for _, b := range []*broker.Broker{n1, n2} {
		b.SetTestMembers(nil)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n0"); st == "held" {
			return fmt.Errorf("n2's link to n0 still held")
		}
		return nil
	})
	release()
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n1, want 1 (the adopted session's)", got)
		}
		return nil
	})
	p.Pub(t, "t/0", 1, false, "m2")
	a.letOtherGo()

	a.wantAdopted(t, n1, "m1", "m2")
}
