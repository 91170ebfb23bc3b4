package broker_test

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestQos2DupWaitsForPeerAfterTakeover (mochi patch 123): with
// durability, a QoS 2 message m1 published on n0 for a subscriber on n1
// waits in n0's link queue for its PUBREC (the link is down, n1 alive).
// The publisher reconnects (its session taken over on n0) and sends m1
// again with DUP. No PUBREC may come while m1 is only in n0's memory
// (before the patch, the new connection was sent one right after its
// CONNACK, and the DUP got another at once), and m1 may not be published
// twice: the DUP's PUBREC comes once n1 has acknowledged the first copy
// (the link is back), and the subscriber gets m1 once. Before, the first
// PUBLISH's wait also failed when its connection was taken over
// (errPublisherGone), which made the DUP either fail too or be published
// again.
func TestQos2DupWaitsForPeerAfterTakeover(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("mqtt-v%d", v), func(t *testing.T) { testQos2DupWaitsForPeer(t, v) })
	}
}

func testQos2DupWaitsForPeer(t *testing.T, v byte) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	n0 := testcluster.Broker(t, "n0", "", func(o *broker.Options) { o.Store = st })
	n1 := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	px.setTarget(n1.Stats().Cluster.Link)
	waitMesh(t, n0, n1)

	sub, _ := dialV5(t, n1, &paho.Connect{ClientID: "tsub", CleanStart: true})
	subscribe(t, sub, 0, paho.SubscribeOptions{Topic: "tq/#", QoS: 2})
	waitRoutes(t, []*broker.Broker{n0, n1}, n1, 1)

	old, _ := dialQos2(t, n0.Addr(broker.ListenerTCP), "tpub", v)
	px.cut()
	before := linkQueuedTotal(n0, "n1")
	old.publish(t, 1, "tq/x", "m1", false)
	testutil.WaitFor(t, waitCond, func() error {
		if linkQueuedTotal(n0, "n1") == before {
			return fmt.Errorf("m1 not queued on n0's link to n1")
		}
		return nil
	})

	pub, present := dialQos2(t, n0.Addr(broker.ListenerTCP), "tpub", v)
	if !present {
		t.Fatal("the publisher's session is gone")
	}
	pub.publish(t, 1, "tq/x", "m1", true)
	if pk, err := pub.next(500 * time.Millisecond); err == nil {
		t.Fatalf("got %s id %d reason 0x%02x while m1 is only in n0's link queue",
			packets.PacketNames[pk.FixedHeader.Type], pk.PacketID, pk.ReasonCode)
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("the publisher's connection ended while m1 waits for n1: %v", err)
	}

	px.setTarget(n1.Stats().Cluster.Link) // the link comes back; n1 gets m1 and acknowledges it
	pk, err := pub.next(waitCond)
	if err != nil {
		t.Fatalf("no PUBREC for m1 once n1 has it: %v", err)
	}
	if pk.FixedHeader.Type != packets.Pubrec || pk.PacketID != 1 || pk.ReasonCode >= 0x80 {
		t.Fatalf("got %s id %d reason 0x%02x, want PUBREC 1 success", packets.PacketNames[pk.FixedHeader.Type], pk.PacketID, pk.ReasonCode)
	}
	pub.write(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: 1})
	if pk, err := pub.next(waitCond); err != nil || pk.FixedHeader.Type != packets.Pubcomp {
		t.Fatalf("no PUBCOMP: %v %s", err, packets.PacketNames[pk.FixedHeader.Type])
	}
	if m := sub.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("got %q, want m1", m.Payload)
	}
	sub.None(t, 500*time.Millisecond) // not twice
}
