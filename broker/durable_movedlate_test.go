package broker_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestHeldCopyAfterMovedOnReachesSession: m1 for sh (n0's persistent
// session, adopted by n1) is held on n2's link to n0 and released to n1,
// but n1 handles it late (its link from n2 congested). sh's client comes
// back on n3: the move waits 1.5 s for n2's held copies, then goes on,
// and its relay ends once every peer holds n3's routes. m1 reaching n1
// after that must still reach sh.
func TestHeldCopyAfterMovedOnReachesSession(t *testing.T) {
	q := newHeldQuad(t, "s")
	st, px, n0, n1, n2, n3, n0link, sh, exp, p := q.st, q.px, q.n0, q.n1, q.n2, q.n3, q.n0link, q.sh, q.exp, q.p

	px.cut()
	defer px.setTarget(n0link)
	defer n0.KillCluster()
	late := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(late) }) }
	defer release()
	n1.HoldPublishes("n2", late)
	// For sh, on n0: queued on n2's link to n0. Its PUBACK waits for
	// n2's hand-over of the held link, and n1's acknowledgement of it.
	acked := pubQueued(t, n2, p, "n0", "s", "m1")
	for _, b := range []*broker.Broker{n1, n2, n3} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	waitStoredOwner(t, st, sh, "n1")
	waitNotHeld(t, waitCond, n2, "n0") // released: m1 on its way to n1
	s, ca := dialV5(t, n3, &paho.Connect{ClientID: sh, CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session on n3")
	}
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 0 {
			return fmt.Errorf("n2 holds %d routes of n1: the move's relay still on", got)
		}
		return nil
	})
	release()
	if m := s.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("sh (moved on to n3) got %q, want m1", m.Payload)
	}
	wantAcked(t, acked, "m1") // once n1 acknowledged the hand-over's copy
}
