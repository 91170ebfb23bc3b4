package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestRv12PubackNotForLostMessageSeenLate (review rv12 of e32e63e): as
// TestPubackNotForMessageLostToPeerRestart, m1's copy for n1 is thrown
// away when n1 restarts faster than n0's failure detection, but the
// publisher's acknowledgements are in order: m1's waits behind m0's, which
// waits for n2 (its link down a while). Meanwhile n0's link to the new n1
// carries, and n1 acknowledges, m2 of another publisher. When m1's wait
// looks, Link.Lost compares m1's seq with the highest acknowledged one
// (m2's) and says "not lost": the publisher gets a PUBACK for m1, which
// the session on n1 never gets (counted peer_restarted, but acknowledged).
func TestRv12PubackNotForLostMessageSeenLate(t *testing.T) {
	st := storetest.Open(t)
	px1, px2 := newLinkProxy(t), newLinkProxy(t)
	n0 := testcluster.Broker(t, "n0", "", func(o *broker.Options) { o.Store = st })
	n1 := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px1.addr()
	})
	n2 := testcluster.Broker(t, "n2", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px2.addr()
	})
	px1.setTarget(n1.Stats().Cluster.Link)
	px2.setTarget(n2.Stats().Cluster.Link)
	waitMesh(t, n0, n1, n2)

	exp := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
	dev, _ := dialV5(t, n1, &paho.Connect{ClientID: "rdev", CleanStart: true, Properties: exp})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "rr/#", QoS: 1})
	other := testutil.MustV5(t, n2.Addr(broker.ListenerTCP), "other")
	other.Sub(t, "ss/#", 1)
	waitRoutes(t, []*broker.Broker{n0, n1, n2}, n1, 1)
	waitRoutes(t, []*broker.Broker{n0, n1, n2}, n2, 1)
	_ = dev.Disconnect(&paho.Disconnect{})
	waitStoredOwner(t, st, "rdev", "n1")
	pub := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "rpub")
	pub2 := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "rpub2")

	// n0 keeps seeing n1 and n2 alive throughout.
	links := map[string]string{"n1": px1.addr(), "n2": px2.addr()}
	n0.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if a, ok := links[ms[i].Name]; ok {
				ms[i].Status, ms[i].Tags.Link = cluster.StatusAlive, a
			}
		}
		return ms
	})
	defer n0.SetTestMembers(nil)
	n0.SetPeerAckWait(time.Minute)
	px2.cut()
	acked0 := pubQueued(t, n0, pub, "n2", "ss/x", "m0")
	px1.cut()
	acked1 := pubQueued(t, n0, pub, "n1", "rr/x", "m1")

	gossip := n1.GossipAddr()
	n1.KillCluster() // as a kill -9 would, for the cluster
	n1b := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px1.addr()
	})
	px1.setTarget(n1b.Stats().Cluster.Link)
	waitStoredOwner(t, st, "rdev", "n1")
	// n1b has rdev's routes back; m2 crosses the new connection, acknowledged.
	waitRoutes(t, []*broker.Broker{n0}, n1b, 1)
	testutil.WaitFor(t, waitCond, func() error {
		for _, l := range n0.Stats().Cluster.Links {
			if l.Peer == "n1" && (l.State != "up" || l.Discarded == 0) {
				return fmt.Errorf("n0's link to n1: %s, %d discarded; want up to the new process", l.State, l.Discarded)
			}
		}
		return nil
	})
	wantAcked(t, publishAsync(pub2, "rr/y", "m2"), "m2")

	px2.setTarget(n2.Stats().Cluster.Link) // m0's wait ends
	wantAcked(t, acked0, "m0")
	var err error
	select {
	case err = <-acked1:
	case <-time.After(waitCond):
		t.Fatal("no answer to the publisher for m1")
	}
	if err != nil {
		return // not acknowledged: the publisher publishes again
	}
	c, ca := dialV5(t, n1b, &paho.Connect{ClientID: "rdev", CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session on the restarted n1")
	}
	for _, want := range []string{"m1", "m2"} {
		if m := c.Next(t, waitMsg); string(m.Payload) != want {
			t.Fatalf("got %q, want %s: m1 was acknowledged to its publisher, and lost", m.Payload, want)
		}
	}
}
