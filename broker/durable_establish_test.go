package broker_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// storedEnd is what a test of a connection's end reads of its stored
// session document.
type storedEnd struct {
	Owner     string `bson:"owner"`
	Connected bool   `bson:"connected"`
	WillOnly  bool   `bson:"will_only"`
	Will      *struct {
		Topic string `bson:"topic"`
	} `bson:"will"`
}

// waitStoredEnd waits until the stored session of id is as ok wants it
// (doc nil: no document).
func waitStoredEnd(t *testing.T, st *store.Store, id string, ok func(doc *storedEnd) error) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var doc storedEnd
		err := st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&doc)
		if err != nil {
			return ok(nil)
		}
		return ok(&doc)
	})
}

// A persistent client disconnects normally while a newer CONNECT of its
// ID is establishing here; a hook then refuses that CONNECT (as the
// cluster hook does). The disconnect, which OnDisconnect left to the newer
// connection, must be stored after all: otherwise the store keeps
// connected=true and the will the client cancelled, which a survivor
// publishes should this node die.
func TestDurableDisconnectStoredWhenNewerConnectRefused(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "est-ref", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	c, _ := dialV5(t, b, &paho.Connect{ClientID: "ref-dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))},
		WillMessage: &paho.WillMessage{Topic: "est/old", QoS: 1, Payload: []byte("gone")}})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "est/a", QoS: 1})
	refuse := b.BeginRefusedConnect("ref-dev")
	_ = c.Disconnect(&paho.Disconnect{}) // normal: no will
	waitConnections(t, b, 0)
	refuse()
	waitStoredEnd(t, o.st, "ref-dev", func(doc *storedEnd) error {
		if doc == nil {
			return fmt.Errorf("no stored session: the persistent session was lost")
		}
		if doc.Connected || doc.Will != nil {
			return fmt.Errorf("normal DISCONNECT not stored: connected=%v, will %+v (a node death would publish a will the client cancelled)", doc.Connected, doc.Will)
		}
		return nil
	})
}

// The same with an unclean end: the will is published at once; that it
// was, must be stored (will cleared), or a node death publishes it again.
func TestDurableWillClearedWhenNewerConnectRefused(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "est-will", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	w, _ := dialV5(t, b, &paho.Connect{ClientID: "est-watch", CleanStart: true})
	w.Sub(t, "est/old", 1)
	c, _ := dialV5(t, b, &paho.Connect{ClientID: "ref-unclean", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))},
		WillMessage: &paho.WillMessage{Topic: "est/old", QoS: 1, Payload: []byte("gone")}})
	waitStoredEnd(t, o.st, "ref-unclean", func(doc *storedEnd) error {
		if doc == nil || doc.Will == nil {
			return fmt.Errorf("will not stored yet: %+v", doc)
		}
		return nil
	})
	refuse := b.BeginRefusedConnect("ref-unclean")
	_ = c.Conn.Close() // unclean: the will is published
	if m := w.Next(t, waitMsg); string(m.Payload) != "gone" {
		t.Fatalf("will payload %q", m.Payload)
	}
	waitConnections(t, b, 1)
	refuse()
	waitStoredEnd(t, o.st, "ref-unclean", func(doc *storedEnd) error {
		if doc == nil {
			return fmt.Errorf("no stored session: the persistent session was lost")
		}
		if doc.Connected || doc.Will != nil {
			return fmt.Errorf("end not stored: connected=%v, will %+v (published already: a node death would publish it again)", doc.Connected, doc.Will)
		}
		return nil
	})
}

// A will-only client disconnects normally from n0 while a newer CONNECT of
// its ID is establishing there, which is then refused. Its will-only
// record (n0's) must go: left, it makes n1 refuse (0x80) every SUBSCRIBE
// of the client's persistent session there as n0's (claimOnConnect
// ignores will-only records, and n0 has no session to hand over).
func TestDurableWillOnlyRecordDeletedWhenNewerConnectRefused(t *testing.T) {
	nodes, st := durableCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	c, _ := dialV5(t, n0, &paho.Connect{ClientID: "orph", CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "est/old", QoS: 1, Payload: []byte("gone")}})
	refuse := n0.BeginRefusedConnect("orph")
	_ = c.Disconnect(&paho.Disconnect{}) // normal: no will
	waitConnections(t, n0, 0)
	refuse()
	waitStoredEnd(t, st, "orph", func(doc *storedEnd) error {
		if doc != nil {
			return fmt.Errorf("will-only record left after the DISCONNECT: owner=%s will_only=%v will=%+v", doc.Owner, doc.WillOnly, doc.Will)
		}
		return nil
	})
	d, _ := dialV5(t, n1, &paho.Connect{ClientID: "orph", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	sa, err := d.Subscribe(testutil.Context(t, waitMsg), &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "est/t", QoS: 1}}})
	if err != nil || len(sa.Reasons) != 1 || sa.Reasons[0] != 1 {
		t.Fatalf("n1 cannot store the client's persistent session: SUBSCRIBE answered %+v, %v", sa, err)
	}
}

// CONNECTs whose CONNACK cannot be written (the client is gone): mochi
// calls neither OnSessionEstablished nor OnDisconnect, and the durable
// hook's maps of connections establishing must not keep them.
func TestDurableEstablishingForgetsFailedConnack(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "est-leak", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	b.SweepEstablishingAlways()
	for i := range 3 {
		srv, cli := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- b.ServeTCPConn(srv) }()
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: fmt.Sprintf("leak-%d", i), Keepalive: 30,
				WillFlag: true, WillTopic: "leak/w", WillPayload: []byte("x"), WillQos: 1},
			Properties: packets.Properties{SessionExpiryInterval: 600, SessionExpiryIntervalFlag: true}}
		var buf bytes.Buffer
		if err := pk.ConnectEncode(&buf); err != nil {
			t.Fatal(err)
		}
		if _, err := cli.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
		_ = cli.Close() // gone before the CONNACK
		select {
		case err := <-done:
			t.Logf("connection %d ended: %v", i, err)
		case <-time.After(waitCond):
			t.Fatal("connection did not end")
		}
	}
	// The next CONNECT here sweeps them.
	dialV5(t, b, &paho.Connect{ClientID: "est-next", CleanStart: true})
	testutil.WaitFor(t, waitCond, func() error {
		if e, p, s := b.EstablishingEntries(); e != 0 || p != 0 || s != 0 {
			return fmt.Errorf("establishing %d, preWritten %d, skipped %d entries for connections that ended", e, p, s)
		}
		return nil
	})
}

// A persistent client with a will connects with a clean start while its
// old session is still here (disconnected, not expired): its new session
// document is written once, before the CONNACK (as a new session's), not
// again after it.
func TestDurableCleanStartWillSessionWrittenOnce(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "est-clean", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	cp := func() *paho.Connect {
		return &paho.Connect{ClientID: "clean-dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))},
			WillMessage: &paho.WillMessage{Topic: "est/w", QoS: 1, Payload: []byte("gone")}}
	}
	c, _ := dialV5(t, b, cp())
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "est/a", QoS: 1})
	_ = c.Disconnect(&paho.Disconnect{})
	waitConnections(t, b, 0)
	settled := func() int64 {
		var n int64
		testutil.WaitFor(t, waitCond, func() error {
			s := b.Stats().Durability
			if s.Queued != 0 {
				return fmt.Errorf("%d writes queued", s.Queued)
			}
			n = s.Written
			return nil
		})
		return n
	}
	before := settled()
	d, _ := dialV5(t, b, cp())
	// A round trip: the read loop starts after OnSessionEstablished, so
	// a write it makes is queued by the PUBACK.
	d.Pub(t, "est/none", 1, false, "x")
	waitStoredEnd(t, o.st, "clean-dev", func(doc *storedEnd) error {
		if doc == nil || !doc.Connected || doc.Will == nil {
			return fmt.Errorf("new session not stored: %+v", doc)
		}
		return nil
	})
	// The old session's delete (a clean start) and the new document.
	if n := settled() - before; n != 2 {
		t.Fatalf("%d writes for a clean-start CONNECT, want 2 (the old session's delete and the new document once)", n)
	}
}

// failConnack sends the CONNECT of a v5 client id (clean start false,
// session expiry 600, a will on topic will) over a connection closed
// before its CONNACK: mochi runs the CONNECT's hooks and the session
// takeover, then cannot write the CONNACK.
func failConnack(t *testing.T, b *broker.Broker, id, will string) {
	t.Helper()
	srv, cli := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- b.ServeTCPConn(srv) }()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: false, ClientIdentifier: id, Keepalive: 30,
			WillFlag: true, WillTopic: will, WillPayload: []byte("x"), WillQos: 1},
		Properties: packets.Properties{SessionExpiryInterval: 600, SessionExpiryIntervalFlag: true}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	_ = cli.Close() // gone before the CONNACK
	select {
	case err := <-done:
		t.Logf("connection ended: %v", err)
	case <-time.After(waitCond):
		t.Fatal("connection did not end")
	}
}

// A persistent client with a will is taken over by a newer CONNECT of
// its ID whose CONNACK cannot be written: the new connection inherited
// the session (the old one is taken over, and its OnDisconnect writes
// nothing), and mochi calls neither OnSessionEstablished nor OnDisconnect
// for it. Its end must still be stored once swept (here by the next
// CONNECT): connected=false, and no will (the connection was never
// established, its will must not fire on a node death).
func TestDurableEndStoredWhenTakeoverConnackFails(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "est-tkf", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	b.SweepEstablishingAlways()
	dialV5(t, b, &paho.Connect{ClientID: "tkf-dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))},
		WillMessage: &paho.WillMessage{Topic: "tkf/old", QoS: 1, Payload: []byte("gone")}})
	waitStoredEnd(t, o.st, "tkf-dev", func(doc *storedEnd) error {
		if doc == nil || !doc.Connected || doc.Will == nil {
			return fmt.Errorf("session not stored yet: %+v", doc)
		}
		return nil
	})
	failConnack(t, b, "tkf-dev", "tkf/new")
	dialV5(t, b, &paho.Connect{ClientID: "tkf-next", CleanStart: true}) // sweeps
	waitStoredEnd(t, o.st, "tkf-dev", func(doc *storedEnd) error {
		if doc == nil {
			return fmt.Errorf("no stored session: the persistent session was lost")
		}
		if doc.Connected || doc.Will != nil {
			return fmt.Errorf("end of the connection whose CONNACK failed not stored: connected=%v, will %+v (a node death would publish it)", doc.Connected, doc.Will)
		}
		return nil
	})
}

// The same on a quiet node: no later CONNECT sweeps; the durable hook's
// own periodic sweep stores the end within seconds.
func TestDurableEndStoredWhenConnackFailsOnQuietNode(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "est-quiet", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	failConnack(t, b, "quiet-dev", "quiet/w")
	waitStoredEnd(t, o.st, "quiet-dev", func(doc *storedEnd) error {
		if doc == nil {
			return fmt.Errorf("no stored session")
		}
		if doc.Connected || doc.Will != nil {
			return fmt.Errorf("end not stored without a later CONNECT: connected=%v, will %+v", doc.Connected, doc.Will)
		}
		return nil
	})
	if e, p, s := b.EstablishingEntries(); e != 0 || p != 0 || s != 0 {
		t.Fatalf("establishing %d, preWritten %d, skipped %d entries after the sweep", e, p, s)
	}
}

// A client whose CONNACK cannot be written is ended through the hooks
// (mochi patch 115 calls OnDisconnect for it), not by the durable hook's
// sweep, which is off here: its end is stored (connected=false, no will:
// it never learned it was connected) and nothing of its establishment is
// left behind, for a persistent session taken over from a live
// connection and for one started anew. Before, the entries waited for
// the sweep (and without mochi patch 115 so did the end).
func TestDurableConnackFailureEndedByHook(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "est-hook", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	b.NoEstablishSweep()
	dialV5(t, b, &paho.Connect{ClientID: "hook-dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))},
		WillMessage: &paho.WillMessage{Topic: "hook/old", QoS: 1, Payload: []byte("gone")}})
	waitStoredEnd(t, o.st, "hook-dev", func(doc *storedEnd) error {
		if doc == nil || !doc.Connected || doc.Will == nil {
			return fmt.Errorf("session not stored yet: %+v", doc)
		}
		return nil
	})
	failConnack(t, b, "hook-dev", "hook/new")
	failConnack(t, b, "hook-new", "hook/new")
	for _, id := range []string{"hook-dev", "hook-new"} {
		waitStoredEnd(t, o.st, id, func(doc *storedEnd) error {
			if doc == nil {
				return fmt.Errorf("no stored session: the persistent session was lost")
			}
			if doc.Connected || doc.Will != nil {
				return fmt.Errorf("end of the connection whose CONNACK failed not stored: connected=%v, will %+v (a node death would publish it)", doc.Connected, doc.Will)
			}
			return nil
		})
	}
	testutil.WaitFor(t, waitCond, func() error {
		if e, p, s := b.EstablishingEntries(); e != 0 || p != 0 || s != 0 {
			return fmt.Errorf("establishing %d, preWritten %d, skipped %d entries for connections whose CONNACK failed", e, p, s)
		}
		return nil
	})
}

// A connection whose CONNACK cannot be written (its will stored ahead of
// the CONNACK) is taken over by a newer CONNECT of its client ID before
// its OnDisconnect: the durable hook leaves the writes to the newer
// connection and must forget what it held for the failed one at once,
// not keep it until its periodic sweep (off here). Before, its
// pre-written subscriptions stayed in preWritten until the sweep.
func TestDurableConnackFailureTakenOverLeavesNothing(t *testing.T) {
	o := newOutageStore(t)
	b := testcluster.Broker(t, "est-tko", "", func(opts *broker.Options) {
		opts.Cluster.GossipAddr, opts.Store = "", o.st
	})
	b.NoEstablishSweep()
	var once sync.Once
	b.SetTestOnDisconnect(func(cl *mqtt.Client) {
		if cl.ID != "tko-dev" {
			return
		}
		once.Do(func() {
			// The newer CONNECT takes the session over here.
			c, _, err := testutil.DialV5(t, b.Addr(broker.ListenerTCP), &paho.Connect{ClientID: "tko-dev", CleanStart: false,
				Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
			if err != nil {
				t.Errorf("newer CONNECT: %v", err)
				return
			}
			t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
			if !cl.IsTakenOver() {
				t.Error("the newer CONNECT did not take the failed connection over")
			}
		})
	})
	defer b.SetTestOnDisconnect(nil)
	failConnack(t, b, "tko-dev", "tko/w")
	testutil.WaitFor(t, waitCond, func() error {
		if e, p, s := b.EstablishingEntries(); e != 0 || p != 0 || s != 0 {
			return fmt.Errorf("establishing %d, preWritten %d, skipped %d entries once the newer connection is established", e, p, s)
		}
		return nil
	})
}
