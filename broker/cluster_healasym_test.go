package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// healPair starts n0 and n1 (a failed peer's link closes at once, as
// after a long partition) and a persistent session of client x on n1.
func healPair(t *testing.T) (n0, n1 *broker.Broker, old *testutil.V5) {
	t.Helper()
	var nodes []*broker.Broker
	for i, seed := 0, ""; i < 2; i++ {
		b := startClusterNode(t, fmt.Sprintf("n%d", i), seed, func(_ *config.Broker, cc *config.Cluster) {
			cc.FailedPeerHold = 0
		})
		seed = nodes0(nodes, b).GossipAddr()
		nodes = append(nodes, b)
	}
	waitMesh(t, nodes...)
	old, _ = dialV5(t, nodes[1], &paho.Connect{ClientID: "x", CleanStart: true, Properties: healExpiry()})
	subscribe(t, old, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})
	return nodes[0], nodes[1], old
}

func healExpiry() *paho.ConnectProperties {
	return &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}
}

func waitNoLinks(t *testing.T, nodes ...*broker.Broker) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		for _, b := range nodes {
			if l := b.Stats().Cluster.Links; len(l) != 0 {
				return fmt.Errorf("%s still has links %+v", b.Name(), l)
			}
		}
		return nil
	})
}

// waitOneOwner waits for the heal to end the stale connection (0x8E) on
// older and keep the newer one on cur.
func waitOneOwner(t *testing.T, older, cur *broker.Broker, old, newer *testutil.V5) {
	t.Helper()
	select {
	case d := <-old.Disconnects:
		if d.ReasonCode != 0x8E {
			t.Errorf("stale connection: DISCONNECT 0x%02X, want 0x8E", d.ReasonCode)
		}
	case d := <-newer.Disconnects:
		t.Fatalf("the newer connection was ended (0x%02X)", d.ReasonCode)
	case <-time.After(waitCond):
		t.Fatalf("two owners of x after the heal: the stale connection was not ended (sessions: %s %d, %s %d)",
			older.Name(), older.Stats().Sessions, cur.Name(), cur.Stats().Sessions)
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
}

// TestHealDecidesWhenPeerNoLongerListed: the node that decides (n0, its
// name sorts first) no longer lists n1 in gossip (reaped during a long
// partition: it knows no protocol version for it), while n1 still lists
// n0 as failed. On the heal n1's link reaches n0 first, with n1's list
// and its ages. n0 must decide by the ages (the list says n1 speaks
// protocol 3), whatever the wall clocks say (n0's runs 30 s behind), and
// end the stale session on n1 once it can reach it. Before, n0 took n1
// for a version 1 broker and judged by the wall clocks, for its own
// session only: with clocks in step it kept its own, and n1, leaving the
// decision to n0, ignored n0's list: the stale session on n1 stayed for
// good (two owners); with n0's clock behind it ended its own, newer one.
func TestHealDecidesWhenPeerNoLongerListed(t *testing.T) {
	n0, n1, old := healPair(t)
	n0.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		out := ms[:0]
		for _, m := range ms {
			if m.Name != "n1" {
				out = append(out, m)
			}
		}
		return out
	})
	markFailed(n1, "n0")
	waitNoLinks(t, n0, n1)
	testutil.WaitFor(t, waitCond, func() error {
		if v := n0.PeerProtocol("n1"); v != 1 {
			return fmt.Errorf("n0 speaks version %d to the unlisted n1", v)
		}
		return nil
	})
	n0.SetTestWallClockSkew(-30 * time.Second)
	newer, _ := dialV5(t, n0, &paho.Connect{ClientID: "x", CleanStart: false, Properties: healExpiry()})
	subscribe(t, newer, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})

	judged := make(chan struct{}, 16)
	n0.SetTestOwnersHandled(func(from string) {
		if from == "n1" {
			judged <- struct{}{}
		}
	})
	defer n0.SetTestOwnersHandled(nil)
	n1.SetTestMembers(nil) // n1's link reaches n0, which does not list n1 yet
	select {
	case <-judged:
	case <-time.After(waitCond):
		t.Fatal("n0 got no owners list from n1")
	}
	n0.SetTestMembers(nil)
	waitOneOwner(t, n1, n0, old, newer)
}

// TestHealDecidesAfterItsAnswerWasGivenUp: n1's link opens first and the
// deciding node n0 finds n1's session stale, but it has no link to n1
// (its gossip still has n1 failed) for longer than it waits to tell n1
// (a minute; a second here), so it gives up. When n0's link opens later,
// its list reaches n1, which must answer it with its own sessions, so n0
// judges again and ends the stale session on n1. Before, n1 ignored
// n0's list (n0 decides) and the stale session stayed for good.
func TestHealDecidesAfterItsAnswerWasGivenUp(t *testing.T) {
	n0, n1, old := healPair(t)
	n0.SetOwnersSendWait(time.Second)
	markFailed(n0, "n1")
	markFailed(n1, "n0")
	waitNoLinks(t, n0, n1)
	newer, _ := dialV5(t, n0, &paho.Connect{ClientID: "x", CleanStart: false, Properties: healExpiry()})
	subscribe(t, newer, 0, paho.SubscribeOptions{Topic: "inbox/x", QoS: 1})

	n1.SetTestMembers(nil) // n1's link reaches n0; n0 still has n1 failed
	testutil.WaitFor(t, waitCond, func() error {
		if n := n0.OwnersNotSent(); n < 1 {
			return fmt.Errorf("n0 has not given up telling n1 (%d)", n)
		}
		return nil
	})
	n0.SetTestMembers(nil)
	waitOneOwner(t, n1, n0, old, newer)
}
