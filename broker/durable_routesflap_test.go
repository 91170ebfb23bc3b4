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

// TestNoSessionNodeLinkNotCutAtEveryPoll (review rv13l11 of 2cb82ae):
// gossip alone declares n0 failed on n1 (n0 owns no persistent session,
// so n1 drops its routes). 2cb82ae closes n0's inbound link when those
// routes go so that n0 redials and sends them again; but
// releaseWhenAdopted runs at every adoption poll (250 ms) while n0 stays
// failed, and the branch drops the routes and closes n0's link again
// each time: n0's link to n1 reconnects four times a second for as long
// as gossip says failed (up to cluster.failed_peer_hold), each time
// with a full snapshot (routes, owners list, every retained message)
// and a heal pass on n1, and each time n0 sees n1 unreachable for a
// moment. syncPeers, the path it copies, closes the link once.
func TestNoSessionNodeLinkNotCutAtEveryPoll(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1}
	waitMesh(t, nodes...)
	c, _ := dialV5(t, n0, &paho.Connect{ClientID: "sub", CleanStart: true})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "r/1", QoS: 1})
	waitRoutes(t, nodes, n0, 1)
	markFailed(n1, "n0")
	waitRoutes(t, nodes, n0, 0) // released: n0 owned no persistent session
	// The verdict's own close (syncPeers) and the release's may each
	// cost n0 one redial; give them time to settle.
	testutil.WaitFor(t, waitCond, func() error {
		if n := n0.Stats().Cluster.Links; len(n) == 0 || n[0].State != "up" {
			return fmt.Errorf("n0's link to n1 not up again")
		}
		return nil
	})
	before := linkConnects(t, n0, "n1")
	// An absence over a window (3 s, 12 adoption polls): n0 stays failed
	// on n1 and nothing else happens; its link should stay as it is.
	start := time.Now()
	for time.Since(start) < 3*time.Second {
		if n := linkConnects(t, n0, "n1") - before; n > 2 {
			t.Fatalf("n0's link to n1 reconnected %d times in %v while n1's gossip held n0 failed: n1 closes it at every adoption poll",
				n, time.Since(start).Round(time.Millisecond))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
