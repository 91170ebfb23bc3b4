package broker_test

import (
	"fmt"
	"testing"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestRv12Qos2PubrecNotForLostMessage (review rv12 of e32e63e): as
// TestPubackNotForMessageLostToPeerRestart, at QoS 2, with a publisher
// whose session persists. n1 restarts faster than n0's failure detection,
// n0's link throws m1 away (peer_restarted) and the PUBREC's wait fails:
// n0 closes the publisher's connection without the PUBREC, so that it
// publishes again. But the PUBREC stays in the session's inbound QoS 2
// state: the publisher's next connection is sent it, and its resend of m1
// (DUP, as MQTT requires) is answered from it, not published again. The
// publisher completes the flow (PUBREL, PUBCOMP) for a message the session
// on n1 never gets.
func TestRv12Qos2PubrecNotForLostMessage(t *testing.T) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	n0 := testcluster.Broker(t, "n0", "", func(o *broker.Options) { o.Store = st })
	n1 := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	px.setTarget(n1.Stats().Cluster.Link)
	waitMesh(t, n0, n1)

	exp := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
	dev, _ := dialV5(t, n1, &paho.Connect{ClientID: "qdev", CleanStart: true, Properties: exp})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "qq/#", QoS: 2})
	waitRoutes(t, []*broker.Broker{n0, n1}, n1, 1)
	_ = dev.Disconnect(&paho.Disconnect{})
	waitStoredOwner(t, st, "qdev", "n1")

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

	sessProps := func() *packets.Properties { return &packets.Properties{SessionExpiryInterval: ptr(uint32(600))} }
	pub := dialRaw(t, n0.Addr(broker.ListenerTCP))
	pub.connect(t, &packets.Connect{ClientID: "qpub", CleanStart: true, Properties: sessProps()})
	before := linkQueuedTotal(n0, "n1")
	m1 := &packets.Publish{PacketID: 1, QoS: 2, Topic: "qq/x", Payload: []byte("m1"), Properties: &packets.Properties{}}
	pub.send(t, m1)
	testutil.WaitFor(t, waitCond, func() error {
		if linkQueuedTotal(n0, "n1") <= before {
			return fmt.Errorf("m1 not queued on n0's link to n1")
		}
		return nil
	})

	gossip := n1.GossipAddr()
	n1.KillCluster()
	n1b := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	px.setTarget(n1b.Stats().Cluster.Link)
	for _, p := range pub.expectClosed(t) {
		if p.PacketType() == "PUBREC" {
			t.Fatal("PUBREC for m1, which n0's link threw away")
		}
	}
	waitStoredOwner(t, st, "qdev", "n1")

	// The publisher reconnects and sends m1 again, DUP set.
	pub2 := dialRaw(t, n0.Addr(broker.ListenerTCP))
	if ca := pub2.connect(t, &packets.Connect{ClientID: "qpub", CleanStart: false, Properties: sessProps()}); !ca.SessionPresent {
		t.Fatal("publisher's session not present")
	}
	m1.Duplicate = true
	pub2.send(t, m1)
	for {
		p, err := pub2.read(waitCond)
		if err != nil {
			t.Fatalf("no PUBREC for m1: %v", err)
		}
		if rec, ok := p.Content.(*packets.Pubrec); ok && rec.PacketID == 1 {
			break
		}
	}
	pub2.send(t, &packets.Pubrel{PacketID: 1, Properties: &packets.Properties{}})
	for {
		p, err := pub2.read(waitCond)
		if err != nil {
			t.Fatalf("no PUBCOMP for m1: %v", err)
		}
		if c, ok := p.Content.(*packets.Pubcomp); ok && c.PacketID == 1 {
			break
		}
	}
	// The publisher is done with m1: the session must get it (Next fails
	// "no message" when m1 is lost).
	c, ca := dialV5(t, n1b, &paho.Connect{ClientID: "qdev", CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session on the restarted n1")
	}
	if m := c.Next(t, waitMsg); m == nil || string(m.Payload) != "m1" {
		t.Fatalf("got %v, want m1: the publisher completed m1's QoS 2 flow, and it is lost", m)
	}
}
