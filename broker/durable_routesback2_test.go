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

// TestRoutesBackAfterFailedNodeWithAdoptedSessions (review rv13l11 of
// 2cb82ae, which closes the inbound link only for a node without
// persistent sessions): gossip alone declares n0 failed on n1; n1 adopts
// n0's persistent session and releases its held link, dropping n0's
// routes, including those of a route snapshot n0 sent on its redial after
// the verdict (syncPeers closed its link). n0 is alive after all, and
// back in n1's gossip: its routes must be back on n1, or what n1's clients
// publish for n0's other subscribers is lost, not counted.
func TestRoutesBackAfterFailedNodeWithAdoptedSessions(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1}
	waitMesh(t, nodes...)
	ps, _ := dialV5(t, n0, &paho.Connect{ClientID: "ps", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	subscribe(t, ps, 0, paho.SubscribeOptions{Topic: "q/1", QoS: 1})
	_ = ps.Disconnect(&paho.Disconnect{})
	waitStoredOwner(t, st, "ps", "n0")
	c, _ := dialV5(t, n0, &paho.Connect{ClientID: "sub", CleanStart: true})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "r/1", QoS: 1})
	waitRoutes(t, nodes, n0, 2)
	markFailed(n1, "n0")
	waitStoredOwner(t, st, "ps", "n1")
	waitNotHeld(t, waitCond, n1, "n0") // released: its routes dropped
	n1.SetTestMembers(nil)
	waitMesh(t, nodes...)
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "r/2", QoS: 1})
	p, _ := dialV5(t, n1, &paho.Connect{ClientID: "p", CleanStart: true})
	testutil.WaitFor(t, waitCond, func() error {
		p.Pub(t, "r/2", 1, false, "x")
		select {
		case <-c.Messages:
			return nil
		case <-time.After(200 * time.Millisecond):
			return fmt.Errorf("sub on n0 got nothing published on n1 for r/2 (n1 holds %d routes of n0)", n1.Stats().Cluster.RemoteRoutes["n0"])
		}
	})
}
