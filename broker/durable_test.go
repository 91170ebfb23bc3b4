package broker_test

import (
	"context"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestDurablePubackOnceEveryRecipientAcknowledged: a QoS 1/2 PUBLISH that
// reached persistent sessions is acknowledged to its publisher as soon as
// every one of them has acknowledged it, with no store write (the store is
// down), for a QoS 1 and a QoS 2 publisher and a QoS 2 subscription. A
// message that one persistent session acknowledged while another is
// offline is acknowledged only once it is committed to the store for the
// offline one (and not written for the other).
func TestDurablePubackOnceEveryRecipientAcknowledged(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-ack", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	expiry := uint32(3600)
	persistent := func(id string) *paho.Connect {
		return &paho.Connect{ClientID: id, CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}}
	}
	online, _ := dialV5(t, b, persistent("online"))
	subscribe(t, online, 0, paho.SubscribeOptions{Topic: "d/#", QoS: 2})
	offline, _ := dialV5(t, b, persistent("offline"))
	subscribe(t, offline, 0, paho.SubscribeOptions{Topic: "d/both", QoS: 1})
	if err := offline.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}
	pub, _ := dialV5(t, b, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub2, _ := dialV5(t, b, &paho.Connect{ClientID: "pub2", CleanStart: true})

	o.stop()
	// Only the online session is a recipient: its acknowledgement suffices.
	for _, qos := range []byte{1, 2} {
		ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
		_, err := pub.Publish(ctx, &paho.Publish{Topic: "d/one", QoS: qos, Payload: []byte{'0' + qos}})
		cancel()
		if err != nil {
			t.Fatalf("QoS %d publish to an online persistent session with the store down: %v (its acknowledgement waited for the store)", qos, err)
		}
		if m := online.Next(t, waitMsg); string(m.Payload) != string([]byte{'0' + qos}) {
			t.Fatalf("online got %q, want %q", m.Payload, []byte{'0' + qos})
		}
	}

	// The offline session is a recipient too: the message must be stored
	// for it before the publisher is told.
	acked := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 6*waitCond)
		defer cancel()
		_, err := pub2.Publish(ctx, &paho.Publish{Topic: "d/both", QoS: 1, Payload: []byte("both")})
		acked <- err
	}()
	if m := online.Next(t, waitMsg); string(m.Payload) != "both" {
		t.Fatalf("online got %q, want both", m.Payload)
	}
	// A round trip after the online session's acknowledgement was read.
	pub.Pub(t, "d/one", 1, false, "sync")
	if m := online.Next(t, waitMsg); string(m.Payload) != "sync" {
		t.Fatalf("online got %q, want sync", m.Payload)
	}
	select {
	case err := <-acked:
		t.Fatalf("PUBACK (err %v) for a message held for an offline persistent session while the store is down", err)
	default:
	}

	o.start()
	select {
	case err := <-acked:
		if err != nil {
			t.Fatalf("publish to an offline persistent session after the store returned: %v", err)
		}
	case <-time.After(6 * waitCond):
		t.Fatal("no PUBACK after the store returned")
	}
	// Committed for the offline session, and for it only.
	msgs := o.st.DB().Collection(store.CollSessionMessages)
	ctx := testutil.Context(t, waitCond)
	for _, c := range []struct {
		client string
		want   int64
	}{{"offline", 1}, {"online", 0}} {
		n, err := msgs.CountDocuments(ctx, bson.D{{Key: "c", Value: c.client}})
		if err != nil {
			t.Fatal(err)
		}
		if n != c.want {
			t.Errorf("%d stored messages for %s, want %d", n, c.client, c.want)
		}
	}
	back, ca := dialV5(t, b, &paho.Connect{ClientID: "offline", Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	if !ca.SessionPresent {
		t.Fatal("offline: session not present")
	}
	if m := back.Next(t, waitMsg); string(m.Payload) != "both" {
		t.Fatalf("offline got %q, want both", m.Payload)
	}
}
