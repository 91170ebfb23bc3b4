package broker_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// storedWill reads the will topic of client id's stored record ("" with
// no will), and whether the record exists.
func storedWill(t *testing.T, st *store.Store, id string) (string, bool) {
	t.Helper()
	topic, ok, err := readStoredWill(st, id)
	if err != nil {
		t.Fatal(err)
	}
	return topic, ok
}

func readStoredWill(st *store.Store, id string) (string, bool, error) {
	var doc struct {
		WillOnly bool `bson:"will_only"`
		Will     *struct {
			Topic string `bson:"topic"`
		} `bson:"will"`
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&doc)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	if !doc.WillOnly {
		return "", true, fmt.Errorf("record of %s not marked will-only", id)
	}
	if doc.Will == nil {
		return "", true, nil
	}
	return doc.Will.Topic, true, nil
}

// TestWillOnlyStoredBeforeConnack: the will of a client without a
// persistent session (MQTT 5 and 3.1.1) is in the store when its CONNACK
// arrives, so a node killed right after it leaves the will to a survivor
// (or to its own restart). Before, the record was queued after the
// CONNACK and written 50–100 ms later: a node killed in between lost the
// will. With the store down, the CONNECT still succeeds after the bound
// and is counted (will_unstored).
func TestWillOnlyStoredBeforeConnack(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-will", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	b.SetTestSubscribeWait(time.Second)

	dialV5(t, b, &paho.Connect{ClientID: "will-v5", CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "will/v5", QoS: 1, Payload: []byte("gone")}})
	if topic, ok := storedWill(t, o.st, "will-v5"); topic != "will/v5" {
		t.Fatalf("at the v5 CONNACK the stored will is %q (record stored: %v), want will/v5", topic, ok)
	}
	if _, err := testutil.DialV3(t, b.Addr(broker.ListenerTCP), "will-v3", func(o *mqtt3.ClientOptions) {
		o.SetWill("will/v3", "gone", 1, false)
	}); err != nil {
		t.Fatal(err)
	}
	if topic, ok := storedWill(t, o.st, "will-v3"); topic != "will/v3" {
		t.Fatalf("at the v3.1.1 CONNACK the stored will is %q (record stored: %v), want will/v3", topic, ok)
	}
	if n := b.Stats().Durability.WillUnstored; n != 0 {
		t.Fatalf("durability.will_unstored %d with the store up, want 0", n)
	}

	o.stop()
	start := time.Now()
	dialV5(t, b, &paho.Connect{ClientID: "will-down", CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "will/down", QoS: 1, Payload: []byte("gone")}})
	t.Logf("CONNECT with the store down answered after %v", time.Since(start).Round(time.Millisecond))
	if n := b.Stats().Durability.WillUnstored; n != 1 {
		t.Fatalf("durability.will_unstored %d after a CONNECT with the store down, want 1", n)
	}
	o.start()
	// The write stayed queued: it lands once the store is back.
	testutil.WaitFor(t, waitCond, func() error {
		if topic, _, err := readStoredWill(o.st, "will-down"); err != nil || topic != "will/down" {
			return fmt.Errorf("will of will-down not stored after the store came back (%q, %v)", topic, err)
		}
		return nil
	})
}
