package broker_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestHeldLinkToSameProcessReachesAdopted: a node is cut off (a partition,
// a process stopped with SIGSTOP) and declared failed, one of its
// sessions is adopted (its direct copies are skipped there: the held link
// has them), and the same process comes back before the held link is
// released (another of its sessions is still being adopted). The held
// link then delivers what it kept to the node that came back, whose copy
// of the session is stale; the adopted session must get it too, in order,
// and what is published after. Before, it lost every message published
// between the failure and the heal (counted as stale_session on the node
// that came back, when the heal ended its copy), and those published
// after the heal while gossip still reported the node failed.
//
// Two orders: the held link reaches the node while gossip still reports
// it failed, or gossip reports it alive first (the link reaches it later).
func TestHeldLinkToSameProcessReachesAdopted(t *testing.T) {
	for _, linkFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("link_first=%v", linkFirst), func(t *testing.T) {
			heldLinkToSameProcess(t, linkFirst)
		})
	}
}

func heldLinkToSameProcess(t *testing.T, linkFirst bool) {
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

	// n0 is cut off: n1 and n2 cannot reach its link and see it failed
	// (n0 itself runs on, with its sessions).
	px.cut()
	for _, b := range []*broker.Broker{n1, n2} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	testutil.WaitFor(t, waitCond, func() error {
		for _, b := range []*broker.Broker{n1, n2} {
			if st, _ := linkState(b, "n0"); st != "held" {
				return fmt.Errorf("%s's link to n0 %q, want held", b.Name(), st)
			}
		}
		return nil
	})
	a.publishDuringAdoption(t, st, n2, "m1")
	// m2's direct copy is skipped by the adopted session: the held link
	// has it. Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want held", st)
	}

	connects := func() int64 {
		for _, l := range n2.Stats().Cluster.Links {
			if l.Peer == "n0" {
				return l.Connects
			}
		}
		return 0
	}
	before := connects()
	if !linkFirst {
		for _, b := range []*broker.Broker{n1, n2} {
			b.SetTestMembers(nil)
		}
		testutil.WaitFor(t, waitCond, func() error {
			if st, _ := linkState(n2, "n0"); st == "held" {
				return fmt.Errorf("n2's link to n0 still held")
			}
			return nil
		})
	}
	// The partition heals: n2's link reaches the same n0, which takes what
	// it held (for its stale copy of svc).
	px.setTarget(n0link)
	testutil.WaitFor(t, waitCond, func() error {
		st, queued := linkState(n2, "n0")
		if connects() == before || queued > 0 {
			return fmt.Errorf("n2's link to n0 %q with %d queued, want reconnected and delivered", st, queued)
		}
		return nil
	})
	p.Pub(t, "t/0", 1, false, "m3")
	a.letOtherGo()

	a.wantAdopted(t, n1, "m1", "m2", "m3")
}

// TestHeldLinkToNodeAtNewAddressReachesAdopted: as
// TestHeldLinkToRestartedNodeReachesAdopted, but the node comes back at
// another link address (a new port, a new container): the held link is
// closed when gossip reports the node alive again. What it held still
// reaches the adopted session, in order. Before, it was thrown away and
// counted link_closed (the node was no longer failed), and the adopted
// session, which skipped the direct copies, lost it.
func TestHeldLinkToNodeAtNewAddressReachesAdopted(t *testing.T) {
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
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want held", st)
	}
	// n0 restarts: same name and gossip address, another link address.
	n0b := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr = st, gossip
	})
	if n0b.Stats().Cluster.Link == oldLink {
		t.Fatalf("n0 came back at the same link address %s", oldLink)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n0"); st != "up" {
			return fmt.Errorf("n2's link to n0 %q, want up", st)
		}
		return nil
	})
	// Until the new process's routes reach n2, a publish by the old
	// process's routes is refused (peer_restarted, never acknowledged:
	// docs/clustering.md (g)); the client publishes again, as a device
	// does.
	testutil.WaitFor(t, waitCond, func() error {
		if ok, why := publishOutcome(p, "t/0", "m3"); !ok {
			return fmt.Errorf("m3 refused: %s", why)
		}
		return nil
	})
	a.letOtherGo()

	a.wantAdopted(t, n1, "m1", "m2", "m3")
}

// TestHeldLinkOfReapedNodeReachesAdopted: a dead node is removed from
// gossip (reaped, or it left) while a survivor still holds its link (one
// of its sessions is still being adopted): the link closes, and what it
// held still reaches the session adopted so far, in order. Before, it was
// thrown away and counted link_closed (the node was no longer failed),
// and the adopted session, which skipped the direct copies, lost it.
func TestHeldLinkOfReapedNodeReachesAdopted(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p

	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want held", st)
	}
	// n2 no longer sees n0 at all.
	n2.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		return slices.DeleteFunc(ms, func(m cluster.Member) bool { return m.Name == "n0" })
	})
	defer n2.SetTestMembers(nil)
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n0"); st != "" {
			return fmt.Errorf("n2's link to n0 %q, want none", st)
		}
		return nil
	})
	p.Pub(t, "t/0", 1, false, "m3")
	a.letOtherGo()

	a.wantAdopted(t, n1, "m1", "m2", "m3")
}
