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

// TestRestoredMarkOutlivesItsTimeInFailureSeenAfter: the other side of
// TestRv12RestoredMarkEndsBeforeLaterHeldCopy (review rv12 finding 4). A
// node that restarts while n0's failure still goes on restores own's mark
// (restoreMark) before its new process sees n0 fail: the generation it
// sees moves from 0 to 1 for the same failure. The survivor n1 holds m for
// n0 past the mark's time (an adoption slow to finish): the mark must stay
// until n1's held copy of m reached own (its direct copy skipped own),
// and then go with that failure's words, not last for good. Before the
// fix the timer ended it at its time: m's held copy skipped own, lost, not
// counted. n2's restart is stood in for by the restoreMark call, on a
// process that has seen no failure of n0 yet.
func TestRestoredMarkOutlivesItsTimeInFailureSeenAfter(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	t.Cleanup(func() {
		n1.SetTestMembers(nil)
		n2.SetTestMembers(nil)
		waitMesh(t, nodes...)
	})

	own, letAdopt := ownAndPausedAdoption(t, st, nodes)

	// own's mark as n2's start restores it, a few seconds left.
	hold := n2.FailedPeerHold()
	expires := time.Now().Add(4 * time.Second)
	n2.RestoreMark("own", "n0", expires.Add(-hold))

	// n2 then sees n0 failed (its first failure of n0), n1 too.
	markFailed(n1, "n0")
	markFailed(n2, "n0")
	waitHeld(t, n1, "n0")
	waitHeld(t, n2, "n0")
	p, _ := dialV5(t, n1, &paho.Connect{ClientID: "p", CleanStart: true})
	// Its PUBACK waits for the hand-over of n1's held link (below).
	acked := pubQueued(t, n1, p, "n0", "t/x", "m")
	// The mark's time runs out while n1 still holds m for n0: the mark
	// stays.
	time.Sleep(time.Until(expires.Add(500 * time.Millisecond)))
	if !n2.AdoptedMarkActive("own", "n0") {
		t.Error("own's restored mark ended at its time while n1 still holds m for n0")
	}
	letAdopt()
	waitNotHeld(t, waitCond, n1, "n0")
	wantAcked(t, acked, "m")
	select {
	case got := <-own.Messages:
		if string(got.Payload) != "m" {
			t.Fatalf("own got %q, want m", got.Payload)
		}
	case <-time.After(waitMsg):
		t.Fatal("own never got m (acknowledged): its direct copy was skipped for the mark, its held copy once the mark's timer ended it: lost, not counted")
	}
	select {
	case got := <-own.Messages:
		t.Fatalf("own got %q again", got.Payload)
	case <-time.After(time.Second):
	}
	// The mark goes with the failure's words (every broker done with n0).
	testutil.WaitFor(t, waitCond, func() error {
		if n2.AdoptedMarkActive("own", "n0") {
			return fmt.Errorf("own's mark still active after every broker is done with n0")
		}
		return nil
	})
}
