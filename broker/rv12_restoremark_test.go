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

// TestRv12RestoredMarkEndsBeforeLaterHeldCopy (review rv12): review
// rv13l11 F-C (TestMovedInStaleMarkEndsBeforeLaterHeldCopy) for a mark a
// node's start restores (restoreMark; also adoptAgain's carried marks):
// its timer is not tied to the failure it is of, so when its node fails
// again before it runs out, it ends the mark in the middle of the later
// failure: m's direct copy was skipped for the mark, its held copy (after
// dsess's adoption) once the timer ended it. Lost, not counted. Here n2's
// restart is stood in for by the restoreMark call itself, on own.
func TestRv12RestoredMarkEndsBeforeLaterHeldCopy(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	// Before the nodes stop: n0's hand-over at its stop needs peers that
	// see it alive.
	t.Cleanup(func() {
		n1.SetTestMembers(nil)
		n2.SetTestMembers(nil)
		waitMesh(t, nodes...)
	})

	// Failure 1 of n0: both survivors hold nothing for it and say so.
	markFailed(n1, "n0")
	markFailed(n2, "n0")
	testutil.WaitFor(t, waitCond, func() error {
		if !n2.BrokersDone("n0") {
			return fmt.Errorf("n2 has not heard every broker done with n0 yet")
		}
		return nil
	})
	n1.SetTestMembers(nil)
	n2.SetTestMembers(nil)
	waitMesh(t, nodes...)

	// own on n2, and n0's persistent session dsess (n1 adopts it), both
	// on t/x.
	own, letAdopt := ownAndPausedAdoption(t, st, nodes)

	// own's mark of failure 1 as n2's start restores it (n2 adopted own
	// from n0 and restarted within cluster.failed_peer_hold): its timer
	// has a few seconds left.
	hold := n2.FailedPeerHold()
	expires := time.Now().Add(6 * time.Second)
	n2.RestoreMark("own", "n0", expires.Add(-hold))

	// Failure 2 of n0, within that time.
	markFailed(n1, "n0")
	markFailed(n2, "n0")
	waitHeld(t, n1, "n0")
	waitHeld(t, n2, "n0")
	p, _ := dialV5(t, n1, &paho.Connect{ClientID: "p", CleanStart: true})
	// Its PUBACK waits for the hand-over of n1's held link (below).
	acked := pubQueued(t, n1, p, "n0", "t/x", "m")
	// The mark's timer runs out while n1 still holds m for n0 (a fixed
	// node may keep the mark for the later failure: then past its time).
	testutil.WaitFor(t, waitCond, func() error {
		if n2.AdoptedMarkActive("own", "n0") && time.Now().Before(expires.Add(500*time.Millisecond)) {
			return fmt.Errorf("own's restored mark still active, its time not over")
		}
		return nil
	})
	letAdopt()
	waitNotHeld(t, waitCond, n1, "n0")
	wantAcked(t, acked, "m")
	select {
	case got := <-own.Messages:
		if string(got.Payload) != "m" {
			t.Fatalf("own got %q, want m", got.Payload)
		}
	case <-time.After(waitMsg):
		t.Fatal("own never got m (acknowledged): its direct copy was skipped for a stale mark, its held copy once the mark's timer ended it: lost, not counted")
	}
}
