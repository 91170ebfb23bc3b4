package broker_test

import (
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestPubackWaitForPeerBounded (review rvp11 of h13p11):
// a peer that stays alive in gossip and connected on the link, but does
// not acknowledge what n0 forwards (its store is down and durableBarrier
// keeps answering false, or its delivery is stuck: here a held Deliver),
// is neither acked nor held nor closed, so the publisher on n0 never gets
// its PUBACK, nor is its connection failed: the acknowledgement, and every
// one behind it (patch 54 keeps them in order), waits with no bound.
// docs/clustering.md bounds the wait by the failure-detection time only
// for a peer gossip can declare failed. The user expects either a PUBACK
// or a closed connection (then it publishes again) within a bound: the
// wait now ends after peerAckWaitDefault (shortened here) with the
// connection closed and no PUBACK, since n1 never acknowledged.
func TestPubackWaitForPeerBounded(t *testing.T) {
	nodes, _ := durableCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	sub := testutil.MustV5(t, n1.Addr(broker.ListenerTCP), "sub")
	sub.Sub(t, "st/#", 1)
	waitRoutes(t, nodes, n1, 1)
	pub := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "pub")

	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	n1.HoldPublishes("n0", release)
	n0.SetPeerAckWait(2 * time.Second)
	acked := publishAsync(pub, "st/x", "m1")
	bound := 15 * time.Second * raceScale
	select {
	case err := <-acked:
		if err == nil {
			t.Fatal("PUBACK for a message n1 never acknowledged")
		}
	case <-pub.Client.Done(): // the connection closed without the PUBACK: the client publishes again
	case <-time.After(bound):
		t.Fatalf("no PUBACK and no disconnect after %v while n1 is alive and never acknowledges", bound)
	}
}
