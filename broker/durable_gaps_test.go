package broker_test

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// storedFilters reads the filters of client id's stored session; ok is
// false when there is no session document.
func storedFilters(t *testing.T, st *store.Store, id string) (filters []string, ok bool) {
	t.Helper()
	var doc struct {
		Subs []struct {
			Filter string `bson:"f"`
		} `bson:"subs"`
	}
	err := st.DB().Collection(store.CollSessions).FindOne(testutil.Context(t, waitCond), bson.D{{Key: "_id", Value: id}}).Decode(&doc)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range doc.Subs {
		filters = append(filters, s.Filter)
	}
	slices.Sort(filters)
	return filters, true
}

// TestDurableSubackAfterSessionStored: the SUBACK (and UNSUBACK) of a
// persistent session comes only once the session document holding the
// change is committed, so a node that dies right after the SUBACK cannot
// take the subscription with it (an adopter or a restart reads the store).
// Checked for an MQTT 5 and an MQTT 3.1.1 client, read from the store the
// moment the acknowledgement arrives.
func TestDurableSubackAfterSessionStored(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-suback", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	expiry := uint32(3600)
	c5, _ := dialV5(t, b, &paho.Connect{ClientID: "v5", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	subscribe(t, c5, 0, paho.SubscribeOptions{Topic: "a/#", QoS: 1}, paho.SubscribeOptions{Topic: "b/+", QoS: 2})
	if got, ok := storedFilters(t, o.st, "v5"); !ok || !slices.Equal(got, []string{"a/#", "b/+"}) {
		t.Fatalf("at the SUBACK the stored session has filters %q (stored: %v), want [a/# b/+]", got, ok)
	}
	if _, err := c5.Unsubscribe(testutil.Context(t, waitMsg), &paho.Unsubscribe{Topics: []string{"a/#"}}); err != nil {
		t.Fatal(err)
	}
	if got, _ := storedFilters(t, o.st, "v5"); !slices.Equal(got, []string{"b/+"}) {
		t.Fatalf("at the UNSUBACK the stored session has filters %q, want [b/+]", got)
	}

	c3, err := testutil.DialV3(t, b.Addr(broker.ListenerTCP), "v3", func(o *mqtt3.ClientOptions) { o.SetCleanSession(false) })
	if err != nil {
		t.Fatal(err)
	}
	tok := c3.Subscribe("c/1", 1, nil)
	testutil.Wait(t, tok)
	if got, ok := storedFilters(t, o.st, "v3"); !ok || !slices.Equal(got, []string{"c/1"}) {
		t.Fatalf("at the v3.1.1 SUBACK the stored session has filters %q (stored: %v), want [c/1]", got, ok)
	}
}

// TestDurableSubscribeRefusedWhileStoreDown: with the store down, a
// persistent session's SUBSCRIBE is answered within the bound with 0x80
// (the subscription cannot be promised), and is not in effect: it is not
// in the node's subscriptions, and the session stored once the store is
// back does not hold it. A non-persistent client subscribes as usual.
func TestDurableSubscribeRefusedWhileStoreDown(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-subdown", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	b.SetTestSubscribeWait(time.Second)
	expiry := uint32(3600)
	c, _ := dialV5(t, b, &paho.Connect{ClientID: "p", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "kept", QoS: 1})
	before := b.Stats().Subscriptions

	o.stop()
	// paho reports a refusal as an error, with the SUBACK.
	sa, err := c.Subscribe(testutil.Context(t, waitMsg), &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "new/#", QoS: 1}}})
	if sa == nil {
		t.Fatalf("no SUBACK: %v", err)
	}
	if len(sa.Reasons) != 1 || sa.Reasons[0] != 0x80 {
		t.Fatalf("SUBSCRIBE of a persistent session with the store down: reasons %v, want [0x80]", sa.Reasons)
	}
	if n := b.Stats().Subscriptions; n != before {
		t.Fatalf("%d subscriptions after the refused SUBSCRIBE, want %d", n, before)
	}
	if n := b.Stats().Durability.SubscribeRefused; n != 1 {
		t.Fatalf("durability.subscribe_refused %d, want 1", n)
	}

	// A SUBSCRIBE naming a filter the session holds already (acknowledged,
	// stored), with other options, beside a new one: both are refused, the
	// new one is removed, and the one it held stays as it was - refusing
	// it must not lose what its SUBACK promised. Before, it was removed
	// too, here and then in the store.
	sa, err = c.Subscribe(testutil.Context(t, waitMsg), &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "kept", QoS: 0}, {Topic: "new2", QoS: 1}}})
	if sa == nil {
		t.Fatalf("no SUBACK: %v", err)
	}
	if !slices.Equal(sa.Reasons, []byte{0x80, 0x80}) {
		t.Fatalf("SUBSCRIBE of a held and a new filter with the store down: reasons %v, want [0x80 0x80]", sa.Reasons)
	}
	if n := b.Stats().Subscriptions; n != before {
		t.Fatalf("%d subscriptions after the refused SUBSCRIBE of a held filter, want %d", n, before)
	}
	clean, _ := dialV5(t, b, &paho.Connect{ClientID: "clean", CleanStart: true})
	clean.Pub(t, "kept", 1, false, "still-subscribed")
	if m := c.Next(t, waitMsg); m.Topic != "kept" || m.QoS != 1 {
		t.Fatalf("the held filter delivered %q at QoS %d, want kept at QoS 1 (the options it had)", m.Topic, m.QoS)
	}
	subscribe(t, clean, 0, paho.SubscribeOptions{Topic: "new/#", QoS: 1})

	o.start()
	testutil.WaitFor(t, waitCond, func() error {
		if q := b.Stats().Durability.Queued; q > 0 {
			return fmt.Errorf("%d writes queued", q)
		}
		if got, _ := storedFilters(t, o.st, "p"); !slices.Equal(got, []string{"kept"}) {
			return fmt.Errorf("the stored session holds %q, want only the filter acknowledged, [kept]", got)
		}
		return nil
	})
}

// TestDurableSubackRefusedWhileSessionNotOwned: while the stored session
// of a client here names another node as its owner (a move's source whose
// late write landed after the take-over found no document), the session
// writes here are refused, so its SUBSCRIBE is refused with 0x80, not
// acknowledged for a subscription that is not stored. Once the node takes
// the stored session over (movedIn), it writes the session as it holds it:
// an UNSUBSCRIBE made meanwhile is not undone by the document taken over.
func TestDurableSubackRefusedWhileSessionNotOwned(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-notowned", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	expiry := uint32(3600)
	c, _ := dialV5(t, b, &paho.Connect{ClientID: "p", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "a", QoS: 1}, paho.SubscribeOptions{Topic: "kept", QoS: 1})
	sessions := o.st.DB().Collection(store.CollSessions)
	// A session write replaces the document by a delete and an insert: it
	// may be missing for a moment.
	owner := func() (string, error) {
		var doc struct {
			Owner string `bson:"owner"`
		}
		err := sessions.FindOne(testutil.Context(t, waitCond), bson.D{{Key: "_id", Value: "p"}}).Decode(&doc)
		return doc.Owner, err
	}
	here, err := owner()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sessions.UpdateOne(testutil.Context(t, waitCond), bson.D{{Key: "_id", Value: "p"}},
		bson.D{{Key: "$set", Value: bson.D{{Key: "owner", Value: "source"}}}}); err != nil {
		t.Fatal(err)
	}

	sa, err := c.Subscribe(testutil.Context(t, waitMsg), &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "b", QoS: 1}}})
	if sa == nil {
		t.Fatalf("no SUBACK: %v", err)
	}
	if len(sa.Reasons) != 1 || sa.Reasons[0] != 0x80 {
		t.Fatalf("SUBSCRIBE while the stored session is another node's: reasons %v, want [0x80]", sa.Reasons)
	}
	if _, err := c.Unsubscribe(testutil.Context(t, waitMsg), &paho.Unsubscribe{Topics: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	if got, _ := storedFilters(t, o.st, "p"); !slices.Equal(got, []string{"a", "kept"}) {
		t.Fatalf("the source's document holds %q, want [a kept]", got)
	}

	b.MovedIn("p", "source")
	testutil.WaitFor(t, waitCond, func() error {
		if o, err := owner(); err != nil || o != here {
			return fmt.Errorf("stored owner %q (%v), want %q", o, err, here)
		}
		if got, _ := storedFilters(t, o.st, "p"); !slices.Equal(got, []string{"kept"}) {
			return fmt.Errorf("the stored session holds %q, want the node's, [kept]", got)
		}
		return nil
	})
}

// TestDurableMovedInStaleDocumentDeleted: a session document written late
// by the node a client moved from, found by the take-over after the client
// here started clean without a persistent session (its clean start's
// delete found nothing yet), is deleted, not taken over: taken over, this
// node's restart would bring back its old subscriptions and this node's
// death would fire its old will. The document of a persistent client here
// is taken over as before.
func TestDurableMovedInStaleDocumentDeleted(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-stalemove", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	expiry := uint32(3600)
	p, _ := dialV5(t, b, &paho.Connect{ClientID: "p", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	subscribe(t, p, 0, paho.SubscribeOptions{Topic: "kept", QoS: 1})
	dialV5(t, b, &paho.Connect{ClientID: "c", CleanStart: true})

	sessions := o.st.DB().Collection(store.CollSessions)
	ctx := testutil.Context(t, waitCond)
	var here struct {
		Owner string `bson:"owner"`
	}
	if err := sessions.FindOne(ctx, bson.D{{Key: "_id", Value: "p"}}).Decode(&here); err != nil {
		t.Fatal(err)
	}
	if _, err := sessions.UpdateOne(ctx, bson.D{{Key: "_id", Value: "p"}}, bson.D{{Key: "$set", Value: bson.D{{Key: "owner", Value: "source"}}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := sessions.InsertOne(ctx, bson.D{{Key: "_id", Value: "c"}, {Key: "owner", Value: "source"}, {Key: "proto", Value: 5},
		{Key: "expiry", Value: 3600}, {Key: "expiry_set", Value: true}, {Key: "subs", Value: bson.A{bson.D{{Key: "f", Value: "old"}, {Key: "q", Value: 1}}}},
		{Key: "will", Value: bson.D{{Key: "topic", Value: "old-will"}, {Key: "payload", Value: []byte("x")}}}, {Key: "epoch", Value: 1}}); err != nil {
		t.Fatal(err)
	}

	b.MovedIn("c", "source")
	b.MovedIn("p", "source")
	testutil.WaitFor(t, waitCond, func() error {
		if got, ok := storedFilters(t, o.st, "c"); ok {
			return fmt.Errorf("the stale document of c (clean, not persistent) is still stored, with filters %q", got)
		}
		var doc struct {
			Owner string `bson:"owner"`
		}
		if err := sessions.FindOne(testutil.Context(t, waitCond), bson.D{{Key: "_id", Value: "p"}}).Decode(&doc); err != nil {
			return err
		}
		if doc.Owner != here.Owner {
			return fmt.Errorf("the document of persistent p is owned by %q, want %q", doc.Owner, here.Owner)
		}
		return nil
	})
	if n := b.Stats().Durability.MovedInStaleDeleted; n != 1 {
		t.Fatalf("durability.moved_in_stale_deleted %d, want 1", n)
	}
}

// TestDurableMessageReplacesStaleDocument: a message held for a persistent
// session whose client and packet ID key is taken in the store by an older
// document (a delete that never landed: its node died first) is stored in
// its place. Before, the insert's duplicate key was taken for this batch
// written twice, and the publisher was told the message was stored while
// the store kept the older one.
func TestDurableMessageReplacesStaleDocument(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-stale", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	expiry := uint32(3600)
	offline := func(id string) {
		c, _ := dialV5(t, b, &paho.Connect{ClientID: id, CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
		subscribe(t, c, 0, paho.SubscribeOptions{Topic: id, QoS: 1})
		if err := c.Disconnect(&paho.Disconnect{}); err != nil {
			t.Fatal(err)
		}
	}
	offline("x")
	offline("s")
	pub, _ := dialV5(t, b, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.Pub(t, "x", 1, false, "stale-payload")

	// The stale document: x's message, under s's first packet ID.
	msgs := o.st.DB().Collection(store.CollSessionMessages)
	ctx := testutil.Context(t, waitCond)
	var stale bson.M
	if err := msgs.FindOne(ctx, bson.D{{Key: "c", Value: "x"}}).Decode(&stale); err != nil {
		t.Fatal(err)
	}
	stale["_id"], stale["c"] = "s\x001", "s"
	if _, err := msgs.InsertOne(ctx, stale); err != nil {
		t.Fatal(err)
	}

	pub.Pub(t, "s", 1, false, "fresh-payload") // PUBACK: committed
	var got struct {
		PID    int32  `bson:"pid"`
		Packet []byte `bson:"pk"`
	}
	if err := msgs.FindOne(ctx, bson.D{{Key: "_id", Value: "s\x001"}}).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(got.Packet, []byte("fresh-payload")) {
		t.Fatalf("after the PUBACK the store holds for s packet ID %d %q, want the acknowledged message", got.PID, got.Packet)
	}
	back, ca := dialV5(t, b, &paho.Connect{ClientID: "s", Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	if !ca.SessionPresent {
		t.Fatal("s: session not present")
	}
	if m := back.Next(t, waitMsg); string(m.Payload) != "fresh-payload" {
		t.Fatalf("s got %q, want fresh-payload", m.Payload)
	}
}

// TestDurableQos2PubrelSurvivesRestart: a QoS 2 message a persistent
// session received (PUBREC read, PUBREL sent, no PUBCOMP yet) is restored
// after the node restarts at its PUBREL step: the reconnecting client is
// sent the PUBREL again, not the PUBLISH [MQTT-4.3.3-6], and its PUBCOMP
// ends the message (not restored by a second restart). Before, the PUBREL
// step was not stored and the PUBLISH came again.
func TestDurableQos2PubrelSurvivesRestart(t *testing.T) {
	o := newOutageStore(t)
	start := func() *broker.Broker {
		return testcluster.Broker(t, "durable-q2", "", func(opts *broker.Options) {
			opts.Cluster.GossipAddr, opts.Store = "", o.st
		})
	}
	stop := func(b *broker.Broker) {
		if err := b.Shutdown(testutil.Context(t, waitCond)); err != nil {
			t.Fatal(err)
		}
	}
	expiry := uint32(3600)
	connect := func(b *broker.Broker, clean bool) (*raw, *packets.Connack) {
		c := dialRaw(t, b.Addr(broker.ListenerTCP))
		ca := c.connect(t, &packets.Connect{ClientID: "q2", CleanStart: clean, Properties: &packets.Properties{SessionExpiryInterval: &expiry}})
		return c, ca
	}
	next := func(c *raw, want byte) *packets.ControlPacket {
		t.Helper()
		p, err := c.read(waitMsg)
		if err != nil {
			t.Fatalf("reading packet type %d: %v", want, err)
		}
		if p.Type != want {
			t.Fatalf("got %s, want packet type %d", p.PacketType(), want)
		}
		return p
	}

	b := start()
	c, _ := connect(b, true)
	c.send(t, &packets.Subscribe{PacketID: 1, Subscriptions: []packets.SubOptions{{Topic: "q2/t", QoS: 2}}, Properties: &packets.Properties{}})
	next(c, packets.SUBACK)
	pub, _ := dialV5(t, b, &paho.Connect{ClientID: "pub", CleanStart: true})
	pub.Pub(t, "q2/t", 2, false, "once")
	pid := next(c, packets.PUBLISH).PacketID()
	c.send(t, &packets.Pubrec{PacketID: pid, Properties: &packets.Properties{}})
	if got := next(c, packets.PUBREL).PacketID(); got != pid {
		t.Fatalf("PUBREL for packet ID %d, want %d", got, pid)
	}
	_ = c.Close()
	stop(b)

	b = start()
	c, ca := connect(b, false)
	if !ca.SessionPresent {
		t.Fatal("session not present after the restart")
	}
	if got := next(c, packets.PUBREL).PacketID(); got != pid {
		t.Fatalf("PUBREL for packet ID %d after the restart, want %d", got, pid)
	}
	c.send(t, &packets.Pubcomp{PacketID: pid, Properties: &packets.Properties{}})
	// A round trip: the PUBCOMP was read before the PINGRESP.
	c.send(t, &packets.Pingreq{})
	next(c, packets.PINGRESP)
	_ = c.Close()
	stop(b)

	b = start()
	c, ca = connect(b, false)
	if !ca.SessionPresent {
		t.Fatal("session not present after the second restart")
	}
	c.send(t, &packets.Pingreq{})
	next(c, packets.PINGRESP) // nothing resent before it
}

// storedSession reads the owner and will topic of client id's stored
// session; ok is false when there is none.
func storedSession(t *testing.T, st *store.Store, id string) (owner, will string, ok bool) {
	t.Helper()
	var doc struct {
		Owner string `bson:"owner"`
		Will  *struct {
			Topic string `bson:"topic"`
		} `bson:"will"`
	}
	err := st.DB().Collection(store.CollSessions).FindOne(testutil.Context(t, waitCond), bson.D{{Key: "_id", Value: id}}).Decode(&doc)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return "", "", false
	}
	if err != nil {
		t.Fatal(err)
	}
	if doc.Will != nil {
		will = doc.Will.Topic
	}
	return doc.Owner, will, true
}

// TestTakeoverTakesStoredSessionOver: a client whose session lived on n0
// reconnects to n1 with a clean start, or with an empty session (no
// subscriptions, nothing queued): the stored document, with the old
// connection's will, does not stay behind under n0's name (n0's death
// would have its adopter fire that will and restore the old session).
// The clean, non-persistent client's is deleted; the empty persistent
// one's is n1's, without the old will. Before, both stayed n0's, and n1's
// own write of the empty one was refused as another node's.
func TestTakeoverTakesStoredSessionOver(t *testing.T) {
	nodes, st := durableCluster(t, 2)
	expiry := uint32(600)
	withWill := func(id string) *paho.Connect {
		return &paho.Connect{ClientID: id, CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry},
			WillMessage: &paho.WillMessage{Topic: "will/" + id, Payload: []byte("gone"), QoS: 1}}
	}
	clean, _ := dialV5(t, nodes[0], withWill("tc"))
	subscribe(t, clean, 0, paho.SubscribeOptions{Topic: "tc/in", QoS: 1}) // stored at the SUBACK
	dialV5(t, nodes[0], withWill("te"))
	testutil.WaitFor(t, waitCond, func() error {
		if owner, will, _ := storedSession(t, st, "te"); owner != "n0" || will != "will/te" {
			return fmt.Errorf("te stored with owner %q, will %q; want n0, will/te", owner, will)
		}
		return nil
	})

	dialV5(t, nodes[1], &paho.Connect{ClientID: "tc", CleanStart: true})
	dialV5(t, nodes[1], &paho.Connect{ClientID: "te", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	testutil.WaitFor(t, waitCond, func() error {
		if owner, will, ok := storedSession(t, st, "tc"); ok {
			return fmt.Errorf("tc (now clean, not persistent, on n1) still stored: owner %q, will %q", owner, will)
		}
		if owner, will, _ := storedSession(t, st, "te"); owner != "n1" || will != "" {
			return fmt.Errorf("te stored with owner %q, will %q; want n1, no will", owner, will)
		}
		return nil
	})
}

// TestDurableExpiredSessionStaysDeleted: a persistent session that expires
// is deleted from the store and stays deleted. Before, mochi's removal of
// its subscriptions after the expiry (UnsubscribeClient) wrote the session
// back, empty, behind the delete.
func TestDurableExpiredSessionStaysDeleted(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "durable-expiry", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	expiry := uint32(1)
	c, _ := dialV5(t, b, &paho.Connect{ClientID: "brief", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "brief/in", QoS: 1})
	if _, ok := storedFilters(t, o.st, "brief"); !ok {
		t.Fatal("session not stored at the SUBACK")
	}
	if err := c.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if n := b.Stats().Sessions; n != 0 {
			return fmt.Errorf("%d sessions on the node, want the expired one gone", n)
		}
		return nil
	})
	testutil.WaitFor(t, waitCond, func() error {
		if q := b.Stats().Durability.Queued; q > 0 {
			return fmt.Errorf("%d writes queued", q)
		}
		if filters, ok := storedFilters(t, o.st, "brief"); ok {
			return fmt.Errorf("the expired session is stored (filters %q)", filters)
		}
		return nil
	})
}
