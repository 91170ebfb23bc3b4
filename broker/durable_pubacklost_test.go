package broker_test

import (
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestPubackNotForMessageLostToPeerRestart (review rvp11 of h13p11): with
// durability, m1 is published on n0 for a persistent session on n1 while
// n0's link to n1 is down, so its PUBACK waits for n1. n1 then restarts
// (same name, addresses and store) faster than n0's failure detection:
// n0's link reaches the new process, which has the session back from the
// store but never had m1, and throws its queue away (peer_restarted).
// Settled treats that discard as settled, so the publisher gets a PUBACK
// for a message n0 knows it dropped, and the session never gets it. Either
// the PUBACK must not be a success (the publisher publishes again), or the
// session must get m1.
func TestPubackNotForMessageLostToPeerRestart(t *testing.T) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	n0 := testcluster.Broker(t, "n0", "", func(o *broker.Options) { o.Store = st })
	n1 := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	px.setTarget(n1.Stats().Cluster.Link)
	waitMesh(t, n0, n1)

	exp := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
	dev, _ := dialV5(t, n1, &paho.Connect{ClientID: "rdev", CleanStart: true, Properties: exp})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "rr/#", QoS: 1})
	waitRoutes(t, []*broker.Broker{n0, n1}, n1, 1)
	_ = dev.Disconnect(&paho.Disconnect{})
	waitStoredOwner(t, st, "rdev", "n1")
	pub := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "rpub")

	// n0 keeps seeing n1 alive through the restart.
	n0.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if ms[i].Name == "n1" {
				ms[i].Status, ms[i].Tags.Link = cluster.StatusAlive, px.addr()
			}
		}
		return ms
	})
	defer n0.SetTestMembers(nil)
	px.cut()
	acked := pubQueued(t, n0, pub, "n1", "rr/x", "m1")

	gossip := n1.GossipAddr()
	n1.KillCluster() // as a kill -9 would, for the cluster
	n1b := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	px.setTarget(n1b.Stats().Cluster.Link)

	var err error
	select {
	case err = <-acked:
	case <-time.After(waitCond):
		t.Fatal("no answer to the publisher")
	}
	if err != nil {
		return // not acknowledged: the publisher publishes again
	}
	waitStoredOwner(t, st, "rdev", "n1")
	c, ca := dialV5(t, n1b, &paho.Connect{ClientID: "rdev", CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session on the restarted n1")
	}
	if m := c.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("got %q, want m1", m.Payload)
	}
}
