package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestHealIgnoresClockSkew: after a partition heals, the newer of two
// sessions of one client ID stays, whatever the nodes' wall clocks say.
// The client connects to one node, the nodes lose each other, it
// connects to the other (whose wall clock runs 30 s behind), and the
// heal must end the older connection (0x8E), not the newer one: both
// when the node whose name sorts first (which decides for the pair) holds
// the older session, and when it holds the newer one (it tells the other
// to end its own). Before, the heal compared the establishment times by
// each node's wall clock, and the clock 30 s behind made the newer
// session look older: it was ended, and the stale one kept.
func TestHealIgnoresClockSkew(t *testing.T) {
	for _, c := range []struct {
		name       string
		older, cur int           // node indexes
		skew       time.Duration // of cur's wall clock
		v2         bool          // n1 speaks cluster protocol version 2
	}{
		{"deciding node holds the older session", 0, 1, -30 * time.Second, false},
		{"deciding node holds the newer session", 1, 0, -30 * time.Second, false},
		// A version 2 peer: both judge by the wall clocks, as that
		// release did, and still agree (clocks in step).
		{"peer of version 2", 1, 0, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			var nodes []*broker.Broker
			for i, seed := 0, ""; i < 2; i++ {
				b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, func(_ *config.Broker, cc *config.Cluster) {
					cc.FailedPeerHold = 0 // a failed peer's link closes, as after a long partition
				})
				seed = nodes0(nodes, b).GossipAddr()
				nodes = append(nodes, b)
			}
			if c.v2 {
				nodes[1].SpeakProtocolV2()
				testutil.WaitFor(t, waitCond, func() error {
					if v := nodes[0].PeerProtocol("n1"); v != 2 {
						return fmt.Errorf("n0 speaks version %d to n1, want 2", v)
					}
					return nil
				})
			}
			waitMesh(t, nodes...)
			older, cur := nodes[c.older], nodes[c.cur]
			cur.SetTestWallClockSkew(c.skew)
			expiry := &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
			old, _ := dialV5(t, older, &paho.Connect{ClientID: "x", CleanStart: true, Properties: expiry})
			subscribe(t, old, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})

			markFailed(nodes[0], "n1")
			markFailed(nodes[1], "n0")
			testutil.WaitFor(t, waitCond, func() error {
				for _, b := range nodes {
					if l := b.Stats().Cluster.Links; len(l) != 0 {
						return fmt.Errorf("%s still has links %+v", b.Name(), l)
					}
				}
				return nil
			})
			newer, _ := dialV5(t, cur, &paho.Connect{ClientID: "x", CleanStart: false, Properties: expiry})
			subscribe(t, newer, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})

			nodes[0].SetTestMembers(nil)
			nodes[1].SetTestMembers(nil)
			select {
			case d := <-old.Disconnects:
				if d.ReasonCode != 0x8E {
					t.Errorf("stale connection: DISCONNECT 0x%02X, want 0x8E", d.ReasonCode)
				}
			case d := <-newer.Disconnects:
				t.Fatalf("the newer connection was ended (0x%02X): the wall clock 30 s behind made it look older", d.ReasonCode)
			case <-time.After(waitCond):
				t.Fatal("the stale connection was not ended after the heal")
			}
			testutil.WaitFor(t, waitCond, func() error {
				if n := older.Stats().Sessions; n != 0 {
					return fmt.Errorf("%s still holds %d sessions", older.Name(), n)
				}
				if n := cur.Stats().Sessions; n != 1 {
					return fmt.Errorf("%s holds %d sessions, want the newer one", cur.Name(), n)
				}
				return nil
			})
			waitMesh(t, nodes...)
			waitRoutes(t, nodes, cur, 1)
			waitRoutes(t, nodes, older, 0)
			pub, _ := dialV5(t, older, &paho.Connect{ClientID: "pub", CleanStart: true})
			pub.Pub(t, "inbox/x", 1, false, "one")
			if m := newer.Next(t, waitMsg); string(m.Payload) != "one" {
				t.Fatalf("newer connection got %q", m.Payload)
			}
		})
	}
}
