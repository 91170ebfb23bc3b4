package broker_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// failedView makes b see the peers named failed in gossip (none: as it is).
func failedView(b *broker.Broker, failed ...string) {
	if len(failed) == 0 {
		b.SetTestMembers(nil)
		return
	}
	b.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if slices.Contains(failed, ms[i].Name) {
				ms[i].Status = cluster.StatusFailed
			}
		}
		return ms
	})
}

// TestRefailedNodeDoneMarkKeepsHeldCopies is bench/chaos's stopkill loss
// (finding B, h13b11). Nodes: d (n0) fails twice, a (n2) adopts svc from
// d the first time and fails, c (n1) survives. svc, adopted by a from d
// in an earlier failover (over: every broker done with d), is adopted by
// c from a and carries d's mark, done, before a's. d then fails again on
// c while a is still failed, so m, published on c, is held by both links
// (d has a subscriber of its own). a comes back as the same process: c
// hands its held link over, and svc must take m from it. Before, svc took
// a message held for d and a through d's link (its first mark, of the
// earlier failure) and skipped a's copy; by the time d's held link gave
// its copy (here: c's adoption of d's session stuck is paused; in the
// chaos run d was dead and restarted later), svc's marks were gone and it
// skipped that one too: lost, not counted.
func TestRefailedNodeDoneMarkKeepsHeldCopies(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	nd := testcluster.Broker(t, "n0", "", withStore)
	nc := testcluster.Broker(t, "n1", nd.GossipAddr(), withStore)
	na := testcluster.Broker(t, "n2", nd.GossipAddr(), withStore)
	waitMesh(t, nd, nc, na)
	// svc and other go to a at d's first failure; at a's, svc goes to c
	// and other to d, which sees a alive: it stays a's, so c's held link
	// for a stays held, as in the chaos run.
	pick := func(prefix, second string) string {
		for i := 0; ; i++ {
			id := fmt.Sprintf("%s-%d", prefix, i)
			if broker.Adopter(id, "n2", "n1") == "n2" && broker.Adopter(id, "n0", "n1") == second {
				return id
			}
		}
	}
	svc, other := pick("svc", "n1"), pick("other", "n0")
	var cl *testutil.V5
	for _, id := range []string{svc, other} {
		cl, _ = dialV5(t, nd, &paho.Connect{ClientID: id, CleanStart: true, Properties: healExpiry()})
		subscribe(t, cl, 0, paho.SubscribeOptions{Topic: "t/0", QoS: 1})
		_ = cl.Disconnect(&paho.Disconnect{})
	}
	waitConnections(t, nd, 0)
	waitStoredOwner(t, st, svc, "n0")
	waitStoredOwner(t, st, other, "n0")
	// d's own subscriber: d's held link takes what is published on t/0.
	own, _ := dialV5(t, nd, &paho.Connect{ClientID: "own", CleanStart: true})
	subscribe(t, own, 0, paho.SubscribeOptions{Topic: "t/0", QoS: 1})

	// The earlier failover of d: a adopts svc, and every broker is done
	// with d once it is back.
	failedView(na, "n0")
	failedView(nc, "n0")
	waitStoredOwner(t, st, svc, "n2")
	waitStoredOwner(t, st, other, "n2")
	// Each held its link for d before d is back: a node that never did
	// says "done" only after a later sync.
	waitHeldSeen(t, na, "n0")
	waitHeldSeen(t, nc, "n0")
	failedView(na)
	failedView(nc)
	testutil.WaitFor(t, waitCond, func() error {
		if !nc.BrokersDone("n0") {
			return fmt.Errorf("c: not every broker is done with d")
		}
		if na.AdoptedMarkActive(svc, "n0") {
			return fmt.Errorf("a: svc still marked adopted from d")
		}
		if got := nc.Stats().Cluster.RemoteRoutes["n0"]; got != 1 {
			return fmt.Errorf("c holds %d routes of d, want 1 (own's)", got)
		}
		return nil
	})
	p, _ := dialV5(t, nc, &paho.Connect{ClientID: "p", CleanStart: true})
	// stuck, a session of d now: c's adoption of it (and of other, once
	// d fails again), paused, keeps c's held links for d and a.
	const stuck = "stuck"
	cl, _ = dialV5(t, nd, &paho.Connect{ClientID: stuck, CleanStart: true, Properties: healExpiry()})
	subscribe(t, cl, 0, paho.SubscribeOptions{Topic: "t/1", QoS: 1})
	_ = cl.Disconnect(&paho.Disconnect{})
	waitStoredOwner(t, st, stuck, "n0")
	unstick := make(chan struct{})
	var unstickOnce sync.Once
	letStuckGo := func() { unstickOnce.Do(func() { close(unstick) }) }
	t.Cleanup(letStuckGo)
	nc.SetTestAfterClaim(func(id string) {
		if id == stuck || id == other {
			<-unstick
		}
	})
	t.Cleanup(func() { nc.SetTestAfterClaim(nil) })

	// a fails on c: c adopts svc, marked [d done, a]. Then d fails again
	// on c.
	failedView(nc, "n2")
	waitStoredOwner(t, st, svc, "n1")
	failedView(nc, "n2", "n0")
	waitHeld(t, nc, "n2")
	waitHeld(t, nc, "n0")
	if ms := nc.AdoptedMarksOf(svc); !slices.Equal(ms, []string{"n0 done", "n2"}) {
		t.Fatalf("svc's marks on c: %q, want [n0 done, n2]", ms)
	}
	// Its PUBACK waits for the hand-overs.
	pubQueued(t, nc, p, "n0", "t/0", "m")

	// a is back, the same process: c hands its held link over, and is
	// done with a: svc's marks go. Then c adopts stuck and releases its
	// held link for d.
	failedView(nc, "n0")
	waitNotHeld(t, waitCond, nc, "n2")
	testutil.WaitFor(t, waitCond, func() error {
		if ms := nc.AdoptedMarksOf(svc); len(ms) > 0 {
			return fmt.Errorf("svc still marked on c: %q", ms)
		}
		return nil
	})
	letStuckGo()
	waitStoredOwner(t, st, stuck, "n1")
	s, ca := dialV5(t, nc, &paho.Connect{ClientID: svc, CleanStart: false, Properties: healExpiry()})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 on its adopter")
	}
	if m := s.Next(t, waitMsg); string(m.Payload) != "m" {
		t.Fatalf("adopted session got %q, want m", m.Payload)
	}
	s.None(t, time.Second) // once
}
