package broker_test

import (
	"slices"
	"testing"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestSessionRewriteKilledKeepsSession: a node is killed (kill -9) while
// its store writer rewrites a persistent session's document (the client
// disconnected), right after the rewrite's first command. The node
// restarts on the same store: the session is there, with its subscription
// and the messages it held. Before, the rewrite was a delete, then an
// insert: killed between them, the node left no document, and its restart
// (or an adopter) lost the session without a count (session present 0).
//
// The kill: the old node's writer blocks in the test hook for good (it
// writes nothing more while the new node runs), the new node is another
// broker of the same name on the same store.
func TestSessionRewriteKilledKeepsSession(t *testing.T) {
	st := storetest.Open(t)
	start := func() *broker.Broker {
		return testcluster.Broker(t, "rw1", "", func(o *broker.Options) { o.Cluster.GossipAddr, o.Store = "", st })
	}
	b := start()
	expiry := uint32(3600)
	s := dialRaw(t, b.Addr(broker.ListenerTCP))
	s.connect(t, &packets.Connect{ClientID: "s", CleanStart: true, Properties: &packets.Properties{SessionExpiryInterval: &expiry}})
	s.send(t, &packets.Subscribe{PacketID: 1, Subscriptions: []packets.SubOptions{{Topic: "rw/t", QoS: 1}}, Properties: &packets.Properties{}})
	if p, err := s.read(waitMsg); err != nil || p.Type != packets.SUBACK {
		t.Fatalf("s: SUBACK not read: %v %v", p, err)
	}
	pub, _ := dialV5(t, b, &paho.Connect{ClientID: "pub", CleanStart: true})
	// Not acknowledged by s: each PUBACK waits for its message's write.
	for _, m := range []string{"m1", "m2"} {
		pub.Pub(t, "rw/t", 1, false, m)
		p, err := s.read(waitMsg)
		if err != nil || p.Type != packets.PUBLISH || string(p.Content.(*packets.Publish).Payload) != m {
			t.Fatalf("s: PUBLISH %s not read: %v %v", m, p, err)
		}
	}

	killed, release := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() { close(release) }) // before b's shutdown
	b.SetTestSessionRewrite(func(ids []string) {
		if slices.Contains(ids, "s") {
			close(killed)
			<-release
		}
	})
	_ = s.Close() // the session's document is rewritten: disconnected
	select {
	case <-killed:
	case <-testutil.Context(t, waitCond).Done():
		t.Fatal("s's document not rewritten")
	}

	b2 := start()
	back, ca := dialV5(t, b2, &paho.Connect{ClientID: "s", Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	if !ca.SessionPresent {
		t.Fatal("s: session not present after the restart")
	}
	for _, want := range []string{"m1", "m2"} {
		if m := back.Next(t, waitMsg); string(m.Payload) != want {
			t.Fatalf("s got %q after the restart, want %s (held)", m.Payload, want)
		}
	}
	pub2, _ := dialV5(t, b2, &paho.Connect{ClientID: "pub2", CleanStart: true})
	pub2.Pub(t, "rw/t", 1, false, "m3")
	if m := back.Next(t, waitMsg); string(m.Payload) != "m3" {
		t.Fatalf("s got %q after the restart, want m3 (its subscription)", m.Payload)
	}
}

// TestSessionRewriteKeepsStoredEpoch: a session moved to another node is
// taken over there (owner and epoch raised in the store), and that node's
// rewrites of the document keep the raised epoch. Before, each rewrite set
// it back to 1 (the node's own record, which knows no take-over): an
// adopter checks a session is unchanged since it read it by its owner and
// epoch.
func TestSessionRewriteKeepsStoredEpoch(t *testing.T) {
	nodes, st := durableCluster(t, 2)
	expiry := uint32(600)
	c, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "ep", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "ep/a", QoS: 1}) // stored at the SUBACK
	_ = c.Disconnect(&paho.Disconnect{})
	c, ca := dialV5Retry(t, nodes[1], &paho.Connect{ClientID: "ep", Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	if !ca.SessionPresent {
		t.Fatal("ep: session not present on n1")
	}
	subscribe(t, c, 0, paho.SubscribeOptions{Topic: "ep/b", QoS: 1}) // a rewrite on n1, stored at the SUBACK
	var doc struct {
		Owner string `bson:"owner"`
		Epoch int64  `bson:"epoch"`
		Subs  []struct {
			Filter string `bson:"f"`
		} `bson:"subs"`
	}
	if err := st.DB().Collection(store.CollSessions).FindOne(testutil.Context(t, waitCond), bson.D{{Key: "_id", Value: "ep"}}).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	if doc.Owner != "n1" || len(doc.Subs) != 2 || doc.Epoch < 2 {
		t.Fatalf("ep stored with owner %q, %d subscriptions, epoch %d; want n1, 2, at least 2 (taken over)", doc.Owner, len(doc.Subs), doc.Epoch)
	}
}
