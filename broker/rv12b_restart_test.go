package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestRv12bRestartedPeerRoutesNotRefusedWhileLinkRedials (review rv12b of
// 2bf9deb, h13f12): n1 restarts faster than n0's failure detection (n0
// keeps it alive). The new process dials n0 at once and sends its routes
// on n0's inbound link, so n0's route table holds n1's routes tagged with
// the NEW incarnation (link.Server.Incarnation). n0's own outbound link to
// n1 is still redialling (its backoff, up to link.DefaultRedialMax = 2 s
// in production; here a cut proxy), so its PeerIncarnation is still the
// OLD process's (the last handshake). routesOfGoneLocked compares the two
// and refuses every publish that matches n1's routes (0x80, counted
// peer_restarted; an MQTT 3.1.1 publisher is disconnected), although the
// routes are exactly those of the process the link will reach next: a
// refusal storm after every quick restart, for as long as the redial
// takes, and for as long as n0→n1 stays unreachable while n1→n0 works.
// Expected: m1 is not refused on routes of the process the link is about
// to reach; it reaches the subscriber of the new process once the link
// is up. (Not refused at the forward, m1 would today still be thrown away
// when the link's handshake finds the new incarnation, DiscardRestarted,
// and its PUBACK refused: the link must learn the new incarnation from
// the inbound link too; see the report.)
func TestRv12bRestartedPeerRoutesNotRefusedWhileLinkRedials(t *testing.T) {
	st := storetest.Open(t)
	px1 := newLinkProxy(t)
	n0 := testcluster.Broker(t, "n0", "", func(o *broker.Options) { o.Store = st })
	n1 := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px1.addr()
	})
	px1.setTarget(n1.Stats().Cluster.Link)
	waitMesh(t, n0, n1)
	old := testutil.MustV5(t, n1.Addr(broker.ListenerTCP), "oldsub")
	old.Sub(t, "rr/#", 1)
	waitRoutes(t, []*broker.Broker{n0, n1}, n1, 1)
	pub := testutil.MustV5(t, n0.Addr(broker.ListenerTCP), "rpub")

	// n0 keeps seeing n1 alive throughout (a restart faster than failure
	// detection).
	n0.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if ms[i].Name == "n1" {
				ms[i].Status, ms[i].Tags.Link = cluster.StatusAlive, px1.addr()
			}
		}
		return ms
	})
	defer n0.SetTestMembers(nil)

	px1.cut() // n0's outbound link to n1 redials, not there yet
	gossip := n1.GossipAddr()
	n1.KillCluster()
	n1b := testcluster.Broker(t, "n1", n0.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px1.addr()
	})
	sub := testutil.MustV5(t, n1b.Addr(broker.ListenerTCP), "newsub")
	sub.Sub(t, "rr/#", 1)
	sub.Sub(t, "qq/#", 1)
	// The new process's routes (two filters; the old one had one) reached
	// n0 on its inbound link.
	waitRoutes(t, []*broker.Broker{n0}, n1b, 2)
	if st, _ := linkState(n0, "n1"); st == "up" {
		t.Fatalf("n0's link to n1 is %s, want down (the proxy is cut)", st)
	}

	before := dropped(n0, "peer_restarted", 1)
	res := make(chan string, 1)
	go func() { _, why := publishOutcome(pub, "rr/x", "m1"); res <- why }()
	// The publish was forwarded: queued on the link, or refused.
	testutil.WaitFor(t, waitCond, func() error {
		if _, q := linkState(n0, "n1"); q > 0 || dropped(n0, "peer_restarted", 1) > before {
			return nil
		}
		return fmt.Errorf("m1 not forwarded yet")
	})
	if n := dropped(n0, "peer_restarted", 1); n > before {
		t.Logf("m1 refused at the forward (peer_restarted +%d): routesOfGoneLocked", n-before)
	}
	px1.setTarget(n1b.Stats().Cluster.Link)
	select {
	case why := <-res:
		if why != "" {
			t.Fatalf("m1, published on the routes of n1's new process while n0's link to it redialled, refused: %s", why)
		}
	case <-time.After(waitCond):
		t.Fatal("no answer for m1")
	}
	if m := sub.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("new subscriber got %q, want m1", m.Payload)
	}
}
