package broker_test

import (
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestRv12TakeoverGetsNoPubackBeforePeerAck (review rv12): with
// durability, m1's PUBACK waits for n1's link acknowledgement (n1's link is
// down, gossip sees n1 alive). The publisher, whose session persists,
// connects again (its old connection still open, as after a silent network
// change): the takeover copies the session's inbound QoS state, where
// m1's PUBACK waits, and the new connection is sent it at once. The
// publisher is told m1 is safe while it sits in n0's memory-only link
// queue: a kill -9 of n0 now loses it, or n1 restarting (peer_restarted).
func TestRv12TakeoverGetsNoPubackBeforePeerAck(t *testing.T) {
	nodes, _ := durableCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	px := newLinkProxy(t)
	px.setTarget(n1.Stats().Cluster.Link)
	n0.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if ms[i].Name == "n1" {
				ms[i].Status, ms[i].Tags.Link = cluster.StatusAlive, px.addr()
			}
		}
		return ms
	})
	defer n0.SetTestMembers(nil)
	n0.SetPeerAckWait(time.Minute)
	testutil.WaitFor(t, waitCond, func() error { // n0's link now goes through px
		for _, l := range n0.Stats().Cluster.Links {
			if l.Peer == "n1" && (l.State != "up" || l.Addr != px.addr()) {
				return fmt.Errorf("n0's link to n1: %s at %s", l.State, l.Addr)
			}
		}
		return nil
	})
	sub := testutil.MustV5(t, n1.Addr(broker.ListenerTCP), "tsub")
	sub.Sub(t, "tk/#", 1)
	testutil.WaitFor(t, waitCond, func() error {
		if got := n0.Stats().Cluster.RemoteRoutes["n1"]; got < 1 {
			return fmt.Errorf("n0 holds %d routes of n1", got)
		}
		return nil
	})
	px.cut()

	sessProps := func() *packets.Properties { return &packets.Properties{SessionExpiryInterval: ptr(uint32(600))} }
	pub := dialRaw(t, n0.Addr(broker.ListenerTCP))
	pub.connect(t, &packets.Connect{ClientID: "tpub", CleanStart: true, Properties: sessProps()})
	before := linkQueuedTotal(n0, "n1")
	pub.send(t, &packets.Publish{PacketID: 1, QoS: 1, Topic: "tk/x", Payload: []byte("m1"), Properties: &packets.Properties{}})
	testutil.WaitFor(t, waitCond, func() error {
		if linkQueuedTotal(n0, "n1") <= before {
			return fmt.Errorf("m1 not queued on n0's link to n1")
		}
		return nil
	})

	pub2 := dialRaw(t, n0.Addr(broker.ListenerTCP))
	if ca := pub2.connect(t, &packets.Connect{ClientID: "tpub", CleanStart: false, Properties: sessProps()}); !ca.SessionPresent {
		t.Fatal("publisher's session not present")
	}
	for {
		p, err := pub2.read(time.Second)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return // no PUBACK while n1 has not acknowledged m1
		}
		if err != nil {
			t.Fatalf("new connection: %v", err)
		}
		if ack, ok := p.Content.(*packets.Puback); ok && ack.PacketID == 1 {
			t.Fatalf("the new connection got m1's PUBACK while n1 has not acknowledged it (n0's link queue: %d)", linkQueuedTotal(n0, "n1")-before)
		}
	}
}
