package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestMovedInMarkOfLaterFailureStaysActive (review rv13c10; failed before
// the fix): n0 fails once
// (every broker says it is done with n0's held link) and is back; within
// cluster.failed_peer_hold it fails again and a session adopted from it in
// that second failure moves to n2 before n2's own links hold n0 (n2's
// gossip a little behind). Before, moveInMarks checked the mark against the
// words n2 heard of the FIRST failure and dropped it: held copies of the
// second failure then skipped the session (lost, not counted).
func TestMovedInMarkOfLaterFailureStaysActive(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	waitMesh(t, n0, n1, n2)

	// Failure 1 of n0: both survivors hold nothing for it and say so.
	markFailed(n1, "n0")
	markFailed(n2, "n0")
	testutil.WaitFor(t, waitCond, func() error {
		if !n2.BrokersDone("n0") {
			return fmt.Errorf("n2 has not heard every broker done with n0 yet")
		}
		return nil
	})
	// n0 is back.
	n1.SetTestMembers(nil)
	n2.SetTestMembers(nil)
	waitMesh(t, n0, n1, n2)

	// Failure 2: the session was adopted from n0 again just now and moves
	// in to n2 (its mark active at the source), n2 not holding n0 yet.
	n2.MoveInMarks("svc", broker.MovedMark{From: "n0", At: time.Now()})
	if !n2.AdoptedMarkActive("svc", "n0") {
		t.Fatal("n2 dropped the moved-in mark of n0's second failure on arrival: the brokers' words it checked were of the first failure")
	}
}
