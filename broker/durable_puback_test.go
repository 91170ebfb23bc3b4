package broker_test

import (
	"context"
	"fmt"
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

// linkQueuedTotal counts the messages b ever queued on its link to peer
// (acknowledged, discarded or still queued).
func linkQueuedTotal(b *broker.Broker, peer string) int64 {
	for _, l := range b.Stats().Cluster.Links {
		if l.Peer == peer {
			return l.Acked + l.Discarded + int64(l.QueueLen)
		}
	}
	return 0
}

// pubQueued publishes a QoS 1 message from c, a client of b, without
// waiting for its PUBACK, and returns once b queued it on its link to peer
// (or it was acknowledged): with durability, the PUBACK of a message queued
// for a peer waits until that peer acknowledges it on the link or, its link
// held (the peer failed), until the copies the failover hands on are
// acknowledged where they went. The channel gets the PUBACK's outcome.
func pubQueued(t *testing.T, b *broker.Broker, c *testutil.V5, peer, topic, payload string) <-chan error {
	t.Helper()
	before := linkQueuedTotal(b, peer)
	acked := publishAsync(c, topic, payload)
	out := make(chan error, 1)
	testutil.WaitFor(t, waitCond, func() error {
		select {
		case err := <-acked:
			out <- err
			return nil
		default:
		}
		if linkQueuedTotal(b, peer) > before {
			go func() { out <- <-acked }()
			return nil
		}
		return fmt.Errorf("%s not queued on %s's link to %s", payload, b.Name(), peer)
	})
	return out
}

// wantAcked waits for the PUBACK reported on acked.
func wantAcked(t *testing.T, acked <-chan error, what string) {
	t.Helper()
	select {
	case err := <-acked:
		if err != nil {
			t.Fatalf("publish %s: %v", what, err)
		}
	case <-time.After(waitCond):
		t.Fatalf("publish %s: no PUBACK", what)
	}
}

// TestPubackWaitCostsNothingLocal: with durability on, the cluster hook
// allocates nothing for a QoS 1 PUBLISH that no peer subscribes to (a peer
// that subscribes to something else is there), nor for a QoS 0 one, even
// from a publisher whose earlier messages crossed a link (its marks slot
// exists).
func TestPubackWaitCostsNothingLocal(t *testing.T) {
	nodes, _ := durableCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	sub := testutil.MustV5(t, n1.Addr(broker.ListenerTCP), "sub")
	sub.Sub(t, "remote/#", 1)
	waitRoutes(t, nodes, n1, 1)
	pub := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "pub")
	pub.Pub(t, "remote/x", 1, false, "crossed") // makes pub's slot
	for _, qos := range []byte{0, 1} {
		if n := n0.ClusterPublishAllocs("pub", "local/x", qos); n != 0 {
			t.Errorf("QoS %d publish with no remote subscriber: %v allocations in the cluster hook, want 0", qos, n)
		}
	}
}
