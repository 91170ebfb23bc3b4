package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestHeldSharedCopyAfterAdoptedMemberLeftGroup: m1 is selected for
// share groups g's and h's only member, n0's persistent session sh, and
// queued on n2's link to n0 (dead), held once n2 sees n0 failed, after
// n1 adopted sh. Before that, sh's client comes back on n1 and unsubscribes
// from g and h, and y joins g on n3. The release sends m1 with the groups'
// selection to the adopter n1, which has no member of g left: g must still
// get m1, once, through y; h, with no member left anywhere, loses it,
// counted (held_shared_no_member). Before, n1 dropped both selections
// (adoptedShared: no member adopted from n0): g lost m1, not counted.
func TestHeldSharedCopyAfterAdoptedMemberLeftGroup(t *testing.T) {
	q := newHeldQuad(t, "$share/g/s", "$share/h/s")
	st, px, n0, n1, n2, n3, n0link, sh, exp, p := q.st, q.px, q.n0, q.n1, q.n2, q.n3, q.n0link, q.sh, q.exp, q.p

	px.cut()
	defer px.setTarget(n0link)
	// n0 stays dead: its stale copy of sh is not handed anywhere at the end.
	defer n0.KillCluster()
	// g's and h's only member is n0's: queued on the link to n0. Its
	// PUBACK waits for n2's hand-over of its held link.
	acked := pubQueued(t, n2, p, "n0", "s", "m1")
	// n2's gossip declares n0 failed last, after the adoption: its link
	// to n0 keeps m1 queued (not acknowledged) until then.
	for _, b := range []*broker.Broker{n1, n3} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	waitStoredOwner(t, st, sh, "n1")
	testutil.WaitFor(t, waitCond, func() error {
		if got := n1.AdoptedMarks(); got != 1 {
			return fmt.Errorf("n1 holds %d marks, want sh's", got)
		}
		return nil
	})

	// sh's client comes back on its adopter and leaves g; y joins g.
	s, ca := dialV5(t, n1, &paho.Connect{ClientID: sh, CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session on n1")
	}
	if _, err := s.Unsubscribe(testutil.Context(t, waitMsg), &paho.Unsubscribe{Topics: []string{"$share/g/s", "$share/h/s"}}); err != nil {
		t.Fatal(err)
	}
	y := testutil.MustV5(t, n3.Addr(broker.ListenerTCP), "y")
	y.Sub(t, "$share/g/s", 1)
	testutil.WaitFor(t, waitCond, func() error {
		if got := n1.Stats().Cluster.RemoteRoutes["n3"]; got != 1 {
			return fmt.Errorf("n1 holds %d routes of n3, want y's", got)
		}
		return nil
	})
	markFailed(n2, "n0")
	defer n2.SetTestMembers(nil)
	waitHeld(t, n2, "n0")
	waitNotHeld(t, waitCond, n2, "n0")
	wantAcked(t, acked, "m1")
	if m := y.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("y (g's member on n3) got %q, want m1", m.Payload)
	}
	select {
	case m := <-y.Messages:
		t.Fatalf("y got %q again: g took m1 twice", m.Payload)
	case m := <-s.Messages:
		t.Fatalf("sh, no longer in g, got %q", m.Payload)
	case <-time.After(time.Second):
	}
	// h, left with no member anywhere, lost m1: counted.
	testutil.WaitFor(t, waitCond, func() error {
		if n := n1.Stats().DroppedByReason["held_shared_no_member"]["1"]; n != 1 {
			return fmt.Errorf("n1 counted %d held_shared_no_member drops, want h's m1", n)
		}
		return nil
	})
}
