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

// TestRv12aRestartedHeldLinkForwardInDiscardWindow (review rv12a): as in
// TestHeldLinkToRestartedNodeReachesAdopted (still failed), n0 dies, its
// session svc is adopted by n1 (which skips the direct copies marked held
// for n0), n2 holds its link to n0, and n0 restarts at the same address.
// A forward of m2 on n2 read the routes (n0 held, not reached) before the
// link reached the new process, and queues m2 on the held link after the
// link threw its queue away (resume) but before resendRestarted set
// handOver false under the routes' lock. m2 is in neither hand-over: not
// in the discarded queue resendRestarted re-sends, and not re-sent by the
// forward itself (it saw handOver still true). Once resendRestarted
// resumes the link, m2 is written to the new n0, which acknowledges it:
// Fate says acknowledged (held), no hand-over record, so the publisher's
// PUBACK goes; svc on n1 never gets m2 (its direct copy was marked held
// for n0). An acknowledged message lost, not counted.
//
// The window is widened here: n2's forward is paused after it queued m2
// for n1 (before n0), and n2's route table is locked while n0 restarts,
// so resendRestarted waits for it.
func TestRv12aRestartedHeldLinkForwardInDiscardWindow(t *testing.T) {
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
	markFailed(n2, "n0")
	defer n2.SetTestMembers(nil)
	if st, _ := linkState(n2, "n0"); st != "held" {
		t.Fatalf("n2's link to n0 %q, want held", st)
	}

	// Pause a forward of t/0 that queued for n1 first (map order: try
	// until one does), before it queues for n0.
	var mu sync.Mutex
	armed := false                // the current attempt's first call pauses if it is n1's
	calls := make(chan string, 4) // each call's peer
	paused := make(chan struct{})
	gate := make(chan struct{})
	n2.SetTestForwardQueued(func(topic, peer string) {
		if topic != "t/0" {
			return
		}
		mu.Lock()
		block := armed && peer == "n1"
		armed = false
		mu.Unlock()
		if block {
			close(paused)
			<-gate
		}
		calls <- peer
	})
	t.Cleanup(func() { n2.SetTestForwardQueued(nil) })
	next := func(what string) string {
		select {
		case peer := <-calls:
			return peer
		case <-time.After(waitCond):
			t.Fatalf("no forward of %s", what)
			return ""
		}
	}
	var earlier []string
	var acked <-chan error
	for i := 0; acked == nil; i++ {
		if i == 20 {
			t.Fatal("no forward of t/0 queued for n1 first in 20 tries")
		}
		msg := fmt.Sprintf("e%d", i)
		mu.Lock()
		armed = true
		mu.Unlock()
		ch := publishAsync(p, "t/0", msg)
		select {
		case <-paused:
			acked = ch
			continue
		case peer := <-calls:
			if peer != "n0" {
				t.Fatalf("%s forwarded first to %s, not paused", msg, peer)
			}
		case <-time.After(waitCond):
			t.Fatalf("no forward of %s", msg)
		}
		// Queued for n0 first: an ordinary held message (its PUBACK
		// waits for the hand-over).
		if peer := next(msg); peer != "n1" {
			t.Fatalf("%s forwarded to %s second, want n1", msg, peer)
		}
		earlier = append(earlier, msg)
	}
	unlock := n2.LockRoutesForTest()
	locked := true
	defer func() {
		if locked {
			unlock()
		}
	}()
	before := n2.HeldLinkIncarnation("n0")
	n0b := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	px.setTarget(n0b.Stats().Cluster.Link)
	testutil.WaitFor(t, waitCond, func() error {
		if inc := n2.HeldLinkIncarnation("n0"); inc == before || inc == 0 {
			return fmt.Errorf("n2's held link to n0 has not reached the new process (incarnation %d)", inc)
		}
		return nil
	})
	// The link threw its queue away (resume, before the incarnation is
	// seen); resendRestarted waits for the routes' lock. m2 goes on.
	close(gate)
	if peer := next("the paused message"); peer != "n1" {
		t.Fatalf("paused call %s", peer)
	}
	if peer := next("the paused message to n0"); peer != "n0" {
		t.Fatalf("the paused forward queued next for %s, want n0", peer)
	}
	unlock()
	locked = false

	var ackErr error
	select {
	case ackErr = <-acked:
	case <-time.After(waitCond):
		ackErr = fmt.Errorf("no PUBACK in %v", waitCond)
	}
	p.Pub(t, "t/0", 1, false, "m3")
	a.letOtherGo()
	want := append([]string{"m1"}, earlier...)
	want = append(want, fmt.Sprintf("e%d", len(earlier)), "m3")
	t.Logf("the paused message's PUBACK: err %v", ackErr)
	a.wantAdopted(t, n1, want...)
}
