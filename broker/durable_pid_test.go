package broker_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestAdoptedSessionGoesOnPastPacketIDs: a session adopted after its node
// died assigns packet IDs past those its node used, as a live move does
// (TestSessionMoveCarriesPacketIDs). Before, the adopter began again at 1:
// a QoS 2 message the dead node delivered within the write-behind window,
// never stored, leaves its ID held by the client until a PUBREL nobody
// sends, and the client discards a new message under that ID as its
// duplicate [MQTT-4.3.3-9].
func TestAdoptedSessionGoesOnPastPacketIDs(t *testing.T) {
	nodes, st := durableCluster(t, 2)
	n0, n1 := nodes[0], nodes[1]
	expiry := ptr(uint32(600))
	dev, _ := dialV5(t, n0, &paho.Connect{ClientID: "pid-dev", CleanStart: true, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	subscribe(t, dev, 0, paho.SubscribeOptions{Topic: "pid/dev", QoS: 1})
	pub, _ := dialV5(t, n0, &paho.Connect{ClientID: "pid-pub", CleanStart: true})
	var last uint16
	for i := range 3 {
		pub.Pub(t, "pid/dev", 1, false, fmt.Sprint(i))
		last = dev.Next(t, waitMsg).PacketID
	}
	_ = dev.Disconnect(&paho.Disconnect{})
	// The record of the packet IDs is written behind, like the session: a
	// node killed within the commit window leaves the previous record.
	testutil.WaitFor(t, waitCond, func() error {
		var doc struct {
			PID int `bson:"pid"`
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := st.DB().Collection(store.CollSessions).FindOne(ctx, bson.D{{Key: "_id", Value: "pid-dev"}}).Decode(&doc); err != nil {
			return err
		}
		if doc.PID == 0 {
			return fmt.Errorf("no packet ID recorded in the stored session")
		}
		return nil
	})
	waitStoredOwner(t, st, "pid-dev", "n0")

	n0.KillCluster()
	waitStoredOwner(t, st, "pid-dev", "n1")
	dev, ca := dialV5(t, n1, &paho.Connect{ClientID: "pid-dev", CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: expiry}})
	if !ca.SessionPresent {
		t.Fatal("session not present after the adoption")
	}
	pub1, _ := dialV5(t, n1, &paho.Connect{ClientID: "pid-pub1", CleanStart: true})
	pub1.Pub(t, "pid/dev", 1, false, "after")
	m := dev.Next(t, waitMsg)
	if string(m.Payload) != "after" {
		t.Fatalf("got %q, want after", m.Payload)
	}
	if m.PacketID <= last {
		t.Fatalf("first message after the adoption has packet ID %d; the dead node used up to %d", m.PacketID, last)
	}
}
