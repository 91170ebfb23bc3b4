package broker_test

import (
	"context"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// publishAsync publishes one QoS 1 message from c and reports its PUBACK's
// error (nil: acknowledged) on the channel returned.
func publishAsync(c *testutil.V5, topic, payload string) <-chan error {
	acked := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)})
		acked <- err
	}()
	return acked
}

// TestPubackWaitsForPeerAck: with durability on, a QoS 1 message published
// on n0 for a subscriber on n1 is acknowledged to its publisher only once
// n1 has acknowledged it on the node link (it is safe there): before, the
// PUBACK went as soon as the message was queued on n0's link, which is
// memory only, so a kill -9 of n0 in between lost an acknowledged message.
func TestPubackWaitsForPeerAck(t *testing.T) {
	nodes, _ := durableCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	sub := testutil.MustV5(t, n1.Addr(broker.ListenerTCP), "sub")
	sub.Sub(t, "pa/#", 1)
	waitRoutes(t, nodes, n1, 1)
	pub := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "pub")

	release := make(chan struct{})
	n1.HoldPublishes("n0", release)
	acked := publishAsync(pub, "pa/x", "m1")
	select {
	case err := <-acked:
		close(release)
		t.Fatalf("PUBACK (err %v) while n1 had not acknowledged the message on the link", err)
	case <-time.After(time.Second):
	}
	close(release)
	select {
	case err := <-acked:
		if err != nil {
			t.Fatalf("publish: %v", err)
		}
	case <-time.After(waitMsg):
		t.Fatal("no PUBACK once n1 acknowledged the message")
	}
	if m := sub.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("got %q, want m1", m.Payload)
	}
	sub.None(t, 300*time.Millisecond)
}

// TestPubackNoWaitWithoutDurability: with durability off, the PUBACK does
// not wait for the peer (as before: nothing outlives the process anyway).
func TestPubackNoWaitWithoutDurability(t *testing.T) {
	nodes := testcluster.Brokers(t, "n", 2, nil)
	waitMesh(t, nodes...)
	n0, n1 := nodes[0], nodes[1]
	sub := testutil.MustV5(t, n1.Addr(broker.ListenerTCP), "sub")
	sub.Sub(t, "pa/#", 1)
	waitRoutes(t, nodes, n1, 1)
	pub := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "pub")

	release := make(chan struct{})
	defer close(release)
	n1.HoldPublishes("n0", release)
	select {
	case err := <-publishAsync(pub, "pa/x", "m1"):
		if err != nil {
			t.Fatalf("publish: %v", err)
		}
	case <-time.After(waitMsg):
		t.Fatal("PUBACK waited for the peer with durability off")
	}
}
