package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestClusterStalledSubscriberKeepsLinkUp: messages from another node wait
// for a congested subscriber on the node link's receive goroutine, which
// meanwhile neither reads the sender's pings nor acknowledges. The wait is
// bounded below the link's silence limit (three heartbeats), so a
// subscriber that never reads stalls without the link dropping: the link
// is never redialled, a healthy subscriber on the same topic gets every
// message, and the stuck one's excess is dropped and counted.
func TestClusterStalledSubscriberKeepsLinkUp(t *testing.T) {
	const n = 200
	const maxQueued = 20
	n0 := startClusterNode(t, "n0", "", nil)
	n1 := startClusterNode(t, "n1", n0.GossipAddr(), func(b *config.Broker, _ *config.Cluster) {
		b.MaxQueued, b.MaxInflight = maxQueued, maxQueued
		b.BackpressureMaxWait = 5 * time.Second // above the link's silence limit: the peer bound must apply
	})
	nodes := []*broker.Broker{n0, n1}
	waitMesh(t, nodes...)

	stuck := dialRaw(t, n1.Addr(broker.ListenerTCP))
	if ca := stuck.connect(t, &packets.Connect{ClientID: "stuck", CleanStart: true, KeepAlive: 120}); ca.ReasonCode != 0 {
		t.Fatalf("stuck subscriber: CONNACK 0x%02X", ca.ReasonCode)
	}
	stuck.send(t, &packets.Subscribe{PacketID: 1, Subscriptions: []packets.SubOptions{{Topic: "x/t", QoS: 1}}, Properties: &packets.Properties{}})
	if p, err := stuck.read(waitMsg); err != nil || p.Type != packets.SUBACK {
		t.Fatalf("stuck subscriber: no SUBACK: %v", err)
	}
	// From here on nothing reads the stuck subscriber's socket.
	healthy, _ := dialV5(t, n1, &paho.Connect{ClientID: "healthy", CleanStart: true})
	subscribe(t, healthy, 0, paho.SubscribeOptions{Topic: "x/t", QoS: 1})
	waitRoutes(t, nodes, n1, 1)
	connects := linkConnects(t, n0, "n1")

	pub, _ := dialV5(t, n0, &paho.Connect{ClientID: "pub", CleanStart: true})
	for i := range n {
		if _, err := pub.Publish(testutil.Context(t, waitMsg), &paho.Publish{Topic: "x/t", QoS: 1, Payload: []byte{byte(i)}}); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	for i := range n {
		m := healthy.Next(t, waitCond)
		if m.Payload[0] != byte(i) {
			t.Fatalf("healthy subscriber: message %d is %d", i, m.Payload[0])
		}
	}
	st := n1.Stats()
	if st.Backpressure.Stalls < 1 || st.Backpressure.Waits < 1 {
		t.Errorf("backpressure on n1 = %+v, want the stuck subscriber waited for and stalled", st.Backpressure)
	}
	// The peer bound (two heartbeats) applies, not broker.backpressure_max_wait.
	if st.Backpressure.WaitSeconds > 5 {
		t.Errorf("n1's link receiver waited %.1f s in all", st.Backpressure.WaitSeconds)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if d := n1.Stats().DroppedByReason["session_full"]["1"]; d != n-maxQueued {
			return fmt.Errorf("n1 dropped %d QoS 1 messages at session_full, want %d", d, n-maxQueued)
		}
		return nil
	})
	if got := linkConnects(t, n0, "n1"); got != connects {
		t.Errorf("n0's link to n1 reconnected (%d connects, was %d): the receiver was silent too long", got, connects)
	}
}

func linkConnects(t *testing.T, b *broker.Broker, peer string) int64 {
	t.Helper()
	for _, l := range b.Stats().Cluster.Links {
		if l.Peer == peer {
			return l.Connects
		}
	}
	t.Fatalf("%s has no link to %s", b.Name(), peer)
	return 0
}
