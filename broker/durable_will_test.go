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

// sessionRecord is what a test reads of a stored session document.
type sessionRecord struct {
	WillOnly bool `bson:"will_only"`
	Will     *struct {
		Topic string `bson:"topic"`
	} `bson:"will"`
	Subs []struct {
		Filter string `bson:"f"`
	} `bson:"subs"`
}

func readStoredSession(t *testing.T, st *store.Store, id string) *sessionRecord {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var doc sessionRecord
	err := st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&doc)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return &doc
}

// checkStoredWill fails unless client id's stored session holds a will on
// topic and exactly the subscriptions subs.
func checkStoredWill(t *testing.T, st *store.Store, id, topic string, subs ...string) {
	t.Helper()
	doc := readStoredSession(t, st, id)
	switch {
	case doc == nil:
		t.Fatalf("%s: no stored session at its CONNACK", id)
	case doc.WillOnly:
		t.Fatalf("%s: stored will-only, want its persistent session", id)
	case doc.Will == nil || doc.Will.Topic != topic:
		t.Fatalf("%s: stored will %+v, want %s", id, doc.Will, topic)
	}
	var got []string
	for _, s := range doc.Subs {
		got = append(got, s.Filter)
	}
	if fmt.Sprint(got) != fmt.Sprint(subs) {
		t.Fatalf("%s: stored subscriptions %v at its CONNACK, want %v (a node death now would lose them)", id, got, subs)
	}
}

// TestPersistentWillStoredBeforeConnack: the will of a client with a
// persistent session (MQTT 5 and 3.1.1, new and resumed) is in the store,
// in its session document, when its CONNACK arrives; a resumed session's
// document keeps its subscriptions (mochi inherits them only after the
// hook that writes it). Before, the document was queued after the CONNACK
// and written 50-100 ms later: a node killed in between lost the will (and
// the whole session of a new client).
func TestPersistentWillStoredBeforeConnack(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-pwill", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	expiry := ptr(uint32(600))
	dialV5(t, b, &paho.Connect{ClientID: "pw-new", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry},
		WillMessage: &paho.WillMessage{Topic: "pw/new", QoS: 1, Payload: []byte("gone")}})
	checkStoredWill(t, o.st, "pw-new", "pw/new")

	c, _ := dialV5(t, b, &paho.Connect{ClientID: "pw-old", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "pw/a/#", QoS: 1})
	_ = c.Disconnect(&paho.Disconnect{})
	waitConnections(t, b, 1)
	_, ca := dialV5(t, b, &paho.Connect{ClientID: "pw-old", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry},
		WillMessage: &paho.WillMessage{Topic: "pw/old", QoS: 1, Payload: []byte("gone")}})
	if !ca.SessionPresent {
		t.Fatal("pw-old: session not present")
	}
	checkStoredWill(t, o.st, "pw-old", "pw/old", "pw/a/#")

	if _, err := testutil.DialV3(t, b.Addr(broker.ListenerTCP), "pw-v3", func(o *mqtt3.ClientOptions) {
		o.SetCleanSession(false)
		o.SetWill("pw/v3", "gone", 1, false)
	}); err != nil {
		t.Fatal(err)
	}
	checkStoredWill(t, o.st, "pw-v3", "pw/v3")
	if n := b.Stats().Durability.WillUnstored; n != 0 {
		t.Fatalf("durability.will_unstored %d with the store up, want 0", n)
	}
}

// TestTakeoverKeepsNewWillStored: a device with a persistent session and
// a will reconnects to the same node, with another will, while its old
// connection is still open (a network blip the node has not noticed). The
// old connection's will is published (MQTT 5: taken over), and the stored
// session keeps the new connection's will. Before, the old will's
// publication cleared the will of the stored document after the new
// connection had written it: a node death then lost the new will.
func TestTakeoverKeepsNewWillStored(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-twill", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	expiry := ptr(uint32(600))
	for i := range 3 {
		dialV5(t, b, &paho.Connect{ClientID: "tw-dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry},
			WillMessage: &paho.WillMessage{Topic: fmt.Sprintf("tw/%d", i), QoS: 1, Payload: []byte("gone")}})
	}
	testutil.WaitFor(t, waitCond, func() error {
		if q := b.Stats().Durability.Queued; q != 0 {
			return fmt.Errorf("%d writes queued", q)
		}
		return nil
	})
	checkStoredWill(t, o.st, "tw-dev", "tw/2")
}
