package broker_test

import (
	"testing"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
)

// TestRoutesBackAfterFailedNodeWithoutSessions (found by review rv13c10;
// it failed on every commit back to session 9's): gossip alone declares n0 failed on n1
// (n0 owns no persistent session: n1 drops its routes and keeps the link
// held) and then alive again. n0's routes must be back on n1, and a
// subscription made on n0 after that must reach them, or what n1's
// clients publish for n0's subscribers is lost, not counted.
func TestRoutesBackAfterFailedNodeWithoutSessions(t *testing.T) {
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
	n1.SetTestMembers(nil)
	waitMesh(t, nodes...)
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "r/2", QoS: 1})
	waitRoutes(t, nodes, n0, 2)
	p, _ := dialV5(t, n1, &paho.Connect{ClientID: "p", CleanStart: true})
	p.Pub(t, "r/2", 1, false, "x")
	expectPayloads(t, c, "x")
}
