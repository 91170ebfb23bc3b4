package broker_test

import (
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
)

// TestPubackWaitsForHandOverOfHeldLink: with durability, m1 is published on
// n2 for a persistent session of n0 (n1 adopts it) while n2's link to n0 is
// down, then held once gossip declares n0 failed. The held queue is in
// n2's memory alone until n2 hands it to n1 (the release) and n1
// acknowledges the copy (stored): the publisher's PUBACK must wait for
// that. Before, the hold settled the message at once: the PUBACK went while
// m1 sat in n2's held queue, and a death of n2 before the hand-over lost an
// acknowledged message (docs/clustering.md, "Not covered: a survivor dies
// with its own held link for D", now closed).
func TestPubackWaitsForHandOverOfHeldLink(t *testing.T) {
	h := newHeldTrio(t, "a", "b")
	defer h.n0.KillCluster() // n0 stays dead
	release := make(chan struct{})
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	h.n1.HoldPublishes("n2", release) // n1 does not acknowledge the handed-over copy yet
	acked := pubQueued(t, h.n2, h.p, "n0", "t/0", "m1")
	for _, b := range []*broker.Broker{h.n1, h.n2} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	waitStoredOwner(t, h.st, h.onN1, "n1")
	waitHeldSeen(t, h.n2, "n0")
	waitNotHeld(t, waitCond, h.n2, "n0") // released: m1 handed to n1, not acknowledged
	select {
	case err := <-acked:
		t.Fatalf("PUBACK (err %v) before n1 acknowledged the copy n2's held link handed over", err)
	case <-time.After(time.Second):
	}
	close(release)
	released = true
	wantAcked(t, acked, "m1")
	a, ca := dialV5(t, h.n1, &paho.Connect{ClientID: h.onN1, CleanStart: false, Properties: h.exp})
	if !ca.SessionPresent {
		t.Fatal("no session on n1")
	}
	if m := a.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("got %q, want m1", m.Payload)
	}
}

// TestNoPubackWhenHoldingNodeDiesBeforeHandOver: as above, but n2, the
// publisher's node, holds its link to n0 (only n2 sees n0 failed, so the
// adoption of n0's session a by n1 does not come and n2 does not release
// the link), and its cluster is killed (as a kill -9 would) before any
// hand-over. m1 was in n2's held queue alone: the publisher must have no
// PUBACK for it (it publishes it again). Before, it had one from the hold
// on, for a message lost with n2, not counted.
func TestNoPubackWhenHoldingNodeDiesBeforeHandOver(t *testing.T) {
	h := newHeldTrio(t, "a", "b")
	defer h.n0.KillCluster()
	acked := pubQueued(t, h.n2, h.p, "n0", "t/0", "m1")
	markFailed(h.n2, "n0")
	defer h.n2.SetTestMembers(nil)
	waitHeld(t, h.n2, "n0")
	select {
	case err := <-acked:
		t.Fatalf("PUBACK (err %v) while m1 sat in n2's held queue alone", err)
	case <-time.After(time.Second):
	}
	h.n2.KillCluster()
	select {
	case err := <-acked:
		if err == nil {
			t.Fatal("PUBACK for m1, lost with n2's held queue")
		}
	case <-time.After(waitCond):
		t.Fatal("the publisher's PUBLISH neither acknowledged nor failed after n2's death")
	}
}
