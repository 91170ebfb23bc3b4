package broker_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestHandOverWordWaitsOnlyForEarlierForwards (review rv12, note F-B): a
// node's word that it is done with a failed node's held link
// (heldHandedOver) waits for the forwards that marked a message held and
// began before the hand-over, not for those begun after it. n2 sees n0
// and n3 failed; a forward of a (t/0, marked held for n0) is under way when
// n2 sees n0 alive again and hands its held link over; a forward of b
// (t/3, marked held for n3, still failed) begins after the hand-over and
// stays under way, as under sustained load during a failover. The word
// must wait for a's forward and go once it ends. Before, it waited for a
// global count of such forwards to reach 0: b's kept it above, and the
// word went only at the 6 s bound (with other forwards of the same age it
// could go ahead of a's: a loss, not counted).
func TestHandOverWordWaitsOnlyForEarlierForwards(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n3 := testcluster.Broker(t, "n3", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2, n3}
	waitMesh(t, nodes...)
	t.Cleanup(func() {
		n2.SetTestMembers(nil)
		waitMesh(t, nodes...)
	})

	// blk, n0's persistent session on t/0 (n2 adopts it: its adoption,
	// paused, keeps n2's watcher from releasing held links); s3 on n3.
	blk := ""
	for i := 0; blk == ""; i++ {
		if id := fmt.Sprintf("blk-%d", i); broker.Adopter(id, "n1", "n2", "n3") == "n2" {
			blk = id
		}
	}
	exp := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
	d, _ := dialV5(t, n0, &paho.Connect{ClientID: blk, CleanStart: true, Properties: exp})
	subscribe(t, d, 0, paho.SubscribeOptions{Topic: "t/0", QoS: 1})
	_ = d.Disconnect(&paho.Disconnect{})
	waitStoredOwner(t, st, blk, "n0")
	s3, _ := dialV5(t, n3, &paho.Connect{ClientID: "s3", CleanStart: true})
	subscribe(t, s3, 0, paho.SubscribeOptions{Topic: "t/3", QoS: 1})
	waitRoutes(t, nodes, n0, 1)
	waitRoutes(t, nodes, n3, 1)
	claimed := make(chan struct{})
	var cOnce sync.Once
	n2.SetTestAfterClaim(func(id string) {
		if id == blk {
			cOnce.Do(func() { close(claimed) })
			<-t.Context().Done()
		}
	})
	t.Cleanup(func() { n2.SetTestAfterClaim(nil) })

	failed := func(names ...string) func([]cluster.Member) []cluster.Member {
		return func(ms []cluster.Member) []cluster.Member {
			for i := range ms {
				for _, n := range names {
					if ms[i].Name == n {
						ms[i].Status = cluster.StatusFailed
					}
				}
			}
			return ms
		}
	}
	n2.SetTestMembers(failed("n0"))
	select {
	case <-claimed: // n2's watcher is in its round for n0
	case <-time.After(waitCond):
		t.Fatal("n2 did not begin adopting blk")
	}
	waitHeld(t, n2, "n0")
	n2.SetTestMembers(failed("n0", "n3"))
	waitHeld(t, n2, "n3")

	// Forwards of a (for n0's held link) and b (for n3's), each paused
	// once queued.
	aQueued, bQueued := make(chan struct{}), make(chan struct{})
	resumeA, resumeB := make(chan struct{}), make(chan struct{})
	var aOnce, bOnce, raOnce, rbOnce sync.Once
	n2.SetTestForwardQueued(func(topic, peer string) {
		switch {
		case topic == "t/0" && peer == "n0":
			aOnce.Do(func() { close(aQueued); <-resumeA })
		case topic == "t/3" && peer == "n3":
			bOnce.Do(func() { close(bQueued); <-resumeB })
		}
	})
	letA := func() { raOnce.Do(func() { close(resumeA) }) }
	letB := func() { rbOnce.Do(func() { close(resumeB) }) }
	t.Cleanup(func() { n2.SetTestForwardQueued(nil) })
	t.Cleanup(letB)
	pub := func(c *testutil.V5, topic, payload string) <-chan struct{} {
		done := make(chan struct{})
		go func() {
			defer close(done)
			ctx, cancel := context.WithTimeout(context.Background(), waitCond)
			defer cancel()
			_, _ = c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)})
		}()
		return done
	}
	pa, _ := dialV5(t, n2, &paho.Connect{ClientID: "pa", CleanStart: true})
	pb, _ := dialV5(t, n2, &paho.Connect{ClientID: "pb", CleanStart: true})
	aDone := pub(pa, "t/0", "a")
	t.Cleanup(func() { <-aDone })
	t.Cleanup(letA)
	<-aQueued

	// n2 sees n0 alive again: it hands its held link over. n0 receiving
	// a (the link resumed after the hand-over) says the hand-over is done.
	before := n0.Stats().Cluster.Received
	n2.SetTestMembers(failed("n3"))
	testutil.WaitFor(t, waitCond, func() error {
		if got := n0.Stats().Cluster.Received; got == before {
			return fmt.Errorf("n0 received nothing from n2's link yet")
		}
		return nil
	})
	bDone := pub(pb, "t/3", "b")
	t.Cleanup(func() { <-bDone })
	t.Cleanup(letB)
	<-bQueued

	// The word waits for a's forward.
	time.Sleep(500 * time.Millisecond)
	if n1.HeardHeldDone("n0", "n2") {
		t.Fatal("n2 said it is done with n0 while a forward begun before its hand-over is under way")
	}
	resumed := time.Now()
	letA()
	// ... and for it alone: b's forward, begun after, is under way still.
	testutil.WaitFor(t, 3*time.Second, func() error {
		if !n1.HeardHeldDone("n0", "n2") {
			return fmt.Errorf("n1 has not heard n2 done with n0 %v after the earlier forward ended", time.Since(resumed).Round(time.Millisecond))
		}
		return nil
	})
	t.Logf("word heard %v after the earlier forward ended", time.Since(resumed).Round(time.Millisecond))
}
