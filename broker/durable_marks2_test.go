package broker_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestHandOverSharedOnlyToAdoptedMember: m1 is selected for share group
// g's only member, n0's persistent session sh (n1 adopts it), and queued
// on n2's link to n0, which is down, then held. An ordinary member x of g
// on n3 joins afterwards. n0 comes back (partition heals) before n1's
// routes reach n2: n2 hands its held queue over to every live peer
// (handOverTo) with the share-group selection. x must not get m1: it was
// the group's copy for sh, which gets it at n1.
func TestHandOverSharedOnlyToAdoptedMember(t *testing.T) {
	q := newHeldQuad(t, "$share/g/s")
	st, px, n1, n2, n3, n0link, sh, exp, p := q.st, q.px, q.n1, q.n2, q.n3, q.n0link, q.sh, q.exp, q.p

	px.cut()
	defer px.setTarget(n0link)
	routes := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(routes) }) }
	defer release()
	n2.HoldRouteDeltas("n1", routes)
	// g's only member is n0's: queued on the link to n0, down. Its
	// PUBACK waits for n2's hand-over of the held link.
	acked := pubQueued(t, n2, p, "n0", "s", "m1")
	for _, b := range []*broker.Broker{n1, n2, n3} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	waitStoredOwner(t, st, sh, "n1")
	testutil.WaitFor(t, waitCond, func() error {
		if got := n1.Stats().Cluster.LocalRoutes; got != 1 {
			return fmt.Errorf("n1 has %d local routes, want 1", got)
		}
		return nil
	})
	waitHeld(t, n2, "n0")
	x := testutil.MustV5(t, n3.Addr(broker.ListenerTCP), "x")
	x.Sub(t, "$share/g/s", 1)
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n3"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n3, want 1", got)
		}
		return nil
	})
	for _, b := range []*broker.Broker{n1, n2, n3} {
		b.SetTestMembers(nil)
	}
	waitNotHeld(t, waitCond, n2, "n0")
	release()
	select {
	case m := <-x.Messages:
		t.Errorf("x (n3, ordinary member of g) got %q: the held copy selected for n0's member", m.Payload)
	case <-time.After(2 * time.Second):
	}
	s, ca := dialV5(t, n1, &paho.Connect{ClientID: sh, CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session")
	}
	if m := s.Next(t, waitMsg); string(m.Payload) != "m1" {
		t.Fatalf("sh (adopted at n1) got %q, want m1", m.Payload)
	}
	wantAcked(t, acked, "m1") // once the hand-over's copies are acknowledged
}

// TestHandOverLocalDirectCopyAfterMarksGo: n2 adopted other (t/1) from
// n0 and is the publisher's node. m2 is forwarded on n2 while n0's held
// link is still held (marked held for n0, queued on it); before mochi's
// local delivery of m2 (the testAfterForward hook widens that gap), n2
// sees n0 alive, hands the queue (m2 included) to other, and, its
// heldForwards at 0 (the forward's defer ran), tells the cluster it is
// done: every broker is, n2 drops the marks, and the local direct copy,
// carrying Exclude(held=[n0]), no longer skips other: m2 twice.
func TestHandOverLocalDirectCopyAfterMarksGo(t *testing.T) {
	h := newHeldTrio(t, "svc", "other")
	st, n1, n2, svc, other, exp, p := h.st, h.n1, h.n2, h.onN1, h.onN2, h.exp, h.p
	routes := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(routes) }) }
	defer release()
	blocked := make(chan struct{})
	var bOnce sync.Once
	// svc's adoption pauses on n1: n2 does not release its held link (a
	// session of n0 is still n0's), it hands it over.
	n1.SetTestAfterClaim(func(id string) {
		if id == svc {
			bOnce.Do(func() { close(blocked) })
			<-routes
		}
	})
	defer n1.SetTestAfterClaim(nil)
	for _, b := range []*broker.Broker{n1, n2} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	<-blocked
	waitStoredOwner(t, st, other, "n2")
	testutil.WaitFor(t, waitCond, func() error {
		if n := n2.AdoptedMarks(); n != 1 {
			return fmt.Errorf("n2 has %d marks, want 1", n)
		}
		return nil
	})
	// n1 sees n0 alive first: it is done (nothing held), and says so.
	// Only once its links held n0's: n1's word comes from that hand-over
	// (its adoption watcher, which would say so too, is paused in svc's
	// claim). Before this wait, n1's watch loop could miss the failure
	// under load, and n2 waited for that word beyond the test's 5 s.
	waitHeld(t, n1, "n0")
	n1.SetTestMembers(nil)
	waitNotHeld(t, waitCond, n1, "n0")
	waitHeld(t, n2, "n0")

	forwarded, deliver := make(chan struct{}), make(chan struct{})
	var fOnce sync.Once
	n2.SetTestAfterForward(func(topic string) {
		if topic == "t/1" {
			fOnce.Do(func() {
				close(forwarded)
				<-deliver
			})
		}
	})
	defer n2.SetTestAfterForward(nil)
	done := make(chan struct{})
	go func() { defer close(done); p.Pub(t, "t/1", 1, false, "m2") }()
	<-forwarded            // m2 marked held for n0 and queued; its local delivery waits
	n2.SetTestMembers(nil) // n2 sees n0 alive: hands m2 over, then says done
	waitNotHeld(t, waitCond, n2, "n0")
	t.Logf("n2 link to n0 no longer held; marks n1=%d n2=%d", n1.AdoptedMarks(), n2.AdoptedMarks())
	testutil.WaitFor(t, 5*time.Second, func() error {
		if n := n2.AdoptedMarks(); n != 0 {
			return fmt.Errorf("n2 has %d marks, want 0", n)
		}
		return nil
	})
	close(deliver)
	<-done
	release()

	s, ca := dialV5(t, n2, &paho.Connect{ClientID: other, CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session")
	}
	if m := s.Next(t, waitMsg); string(m.Payload) != "m2" {
		t.Fatalf("got %q, want m2", m.Payload)
	}
	select {
	case m := <-s.Messages:
		t.Fatalf("other got %q again: duplicate", m.Payload)
	case <-time.After(2 * time.Second):
	}
}

// TestHandOverWaitsForMarkedForward: m is forwarded on n2 while n0's held
// link is held: queued for n1, where svc (adopted from n0) skips it by its
// mark, then, after n2 handed the held link over because n0 is alive
// again, for n0: the forward re-sends it to the adopted sessions itself
// (HeldOf n0). n2's word that it is done with n0 must wait for that
// re-send (heldForwards): sent before, n1 drops svc's mark and the re-sent
// copy skips svc too.
func TestHandOverWaitsForMarkedForward(t *testing.T) {
	h := newHeldTrio(t, "svc", "blocker")
	st, n1, n2, svc, blocker, exp, p := h.st, h.n1, h.n2, h.onN1, h.onN2, h.exp, h.p
	claimed := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(claimed) }) }
	defer release()
	blocked := make(chan struct{})
	var bOnce sync.Once
	// blocker's adoption pauses on n2: n2 does not release its held link
	// (a session of n0 is still n0's), it hands it over.
	n2.SetTestAfterClaim(func(id string) {
		if id == blocker {
			bOnce.Do(func() { close(blocked) })
			<-claimed
		}
	})
	defer n2.SetTestAfterClaim(nil)
	for _, b := range []*broker.Broker{n1, n2} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	<-blocked
	waitStoredOwner(t, st, svc, "n1")
	testutil.WaitFor(t, waitCond, func() error {
		if n := n1.AdoptedMarks(); n != 1 {
			return fmt.Errorf("n1 has %d marks, want 1", n)
		}
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n1, want 1", got)
		}
		return nil
	})
	// n1 sees n0 alive first: it holds nothing for n0, and says so (its
	// links' own verdict on n0 may come after its adoption).
	waitHeld(t, n1, "n0")
	n1.SetTestMembers(nil)
	waitNotHeld(t, waitCond, n1, "n0")
	waitHeld(t, n2, "n0")

	// A forward that queues for n1 before n0 pauses there (the order of
	// its targets is the route map's: a few publishes find it).
	queued, resume := make(chan struct{}), make(chan struct{})
	forwarded := make(chan struct{}, 1) // a message queued for n0, then n1
	var qOnce sync.Once
	var mu sync.Mutex
	n0first := false
	n2.SetTestForwardQueued(func(topic, peer string) {
		if topic != "t/0" {
			return
		}
		mu.Lock()
		first := n0first
		n0first = peer == "n0"
		mu.Unlock()
		if peer == "n1" && !first {
			qOnce.Do(func() {
				close(queued)
				<-resume
			})
		}
		if peer == "n1" && first {
			select {
			case forwarded <- struct{}{}:
			default:
			}
		}
	})
	defer n2.SetTestForwardQueued(nil)
	var want []string
	pubDone := make(chan struct{})
	for i := 0; ; i++ {
		if i == 40 {
			t.Fatal("no forward queued for n1 before n0 in 40 publishes")
		}
		m := fmt.Sprintf("m%d", i)
		want = append(want, m)
		// Its PUBACK waits for n2's hand-over of the held link (later):
		// the next one is published once it was forwarded.
		acked := publishAsync(p, "t/0", m)
		select {
		case <-forwarded:
			continue
		case err := <-acked:
			t.Fatalf("%s: PUBACK (err %v) before the hand-over of its held copy", m, err)
		case <-queued:
		}
		go func() {
			if err := <-acked; err != nil {
				t.Errorf("%s not acknowledged: %v", m, err)
			}
			close(pubDone)
		}()
		break
	}
	n2.SetTestMembers(nil) // n2 sees n0 alive: hands its held link over
	waitNotHeld(t, waitCond, n2, "n0")
	// svc's mark must stay while the forward is under way; without the
	// wait it goes at once. Either way the forward then goes on.
	end := time.Now().Add(3 * time.Second)
	for n1.AdoptedMarks() != 0 && time.Now().Before(end) {
		time.Sleep(20 * time.Millisecond)
	}
	close(resume)
	<-pubDone
	release()

	s, ca := dialV5(t, n1, &paho.Connect{ClientID: svc, CleanStart: false, Properties: exp})
	if !ca.SessionPresent {
		t.Fatal("no session")
	}
	got := map[string]int{}
	deadline := time.After(waitMsg)
collect:
	for n := 0; n < len(want); n++ {
		select {
		case m := <-s.Messages:
			got[string(m.Payload)]++
		case <-deadline:
			break collect
		}
	}
	for _, m := range want {
		if got[m] != 1 {
			t.Errorf("svc got %s %d times, want once (got %v)", m, got[m], got)
		}
	}
	select {
	case m := <-s.Messages:
		t.Errorf("svc got %q again", m.Payload)
	case <-time.After(time.Second):
	}
}

// heldTrio is n0, n1 and n2 sharing one store, with n0's node link
// reached through a proxy that is cut (n0 is cut off from the others),
// two persistent sessions of n0 subscribed to t/0 and t/1 whose adopters
// are n1 and n2 (onN1, onN2), offline, and a publisher p on n2.
type heldTrio struct {
	st         *store.Store
	n0, n1, n2 *broker.Broker
	onN1, onN2 string
	exp        *paho.ConnectProperties
	p          *testutil.V5
}

func newHeldTrio(t *testing.T, prefix1, prefix2 string) *heldTrio {
	t.Helper()
	h := &heldTrio{st: storetest.Open(t), exp: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}}
	px := newLinkProxy(t)
	withStore := func(o *broker.Options) { o.Store = h.st }
	h.n1 = testcluster.Broker(t, "n1", "", withStore)
	h.n2 = testcluster.Broker(t, "n2", h.n1.GossipAddr(), withStore)
	h.n0 = testcluster.Broker(t, "n0", h.n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = h.st, px.addr()
	})
	n0link := h.n0.Stats().Cluster.Link
	px.setTarget(n0link)
	nodes := []*broker.Broker{h.n0, h.n1, h.n2}
	waitMesh(t, nodes...)
	pick := func(prefix, adopter string) string {
		for i := 0; ; i++ {
			if id := fmt.Sprintf("%s-%d", prefix, i); broker.Adopter(id, "n1", "n2") == adopter {
				return id
			}
		}
	}
	h.onN1, h.onN2 = pick(prefix1, "n1"), pick(prefix2, "n2")
	for i, id := range []string{h.onN1, h.onN2} {
		c, _ := dialV5(t, h.n0, &paho.Connect{ClientID: id, CleanStart: true, Properties: h.exp})
		subscribe(t, c, 0, paho.SubscribeOptions{Topic: fmt.Sprintf("t/%d", i), QoS: 1})
		_ = c.Disconnect(&paho.Disconnect{})
	}
	waitConnections(t, h.n0, 0)
	waitStoredOwner(t, h.st, h.onN1, "n0")
	waitStoredOwner(t, h.st, h.onN2, "n0")
	waitRoutes(t, nodes, h.n0, 2)
	h.p, _ = dialV5(t, h.n2, &paho.Connect{ClientID: "p", CleanStart: true})
	px.cut()
	t.Cleanup(func() { px.setTarget(n0link) })
	return h
}

// waitHeld waits for from's link to peer to be held: from's own verdict
// that peer failed can come after other nodes acted on theirs, or after
// its own adoption began.
func waitHeld(t *testing.T, from *broker.Broker, peer string) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(from, peer); st != "held" {
			return fmt.Errorf("%s's link to %s %q, want held", from.Stats().Node, peer, st)
		}
		return nil
	})
}

// waitHeldSeen waits until from's link to peer is held or, held already
// and handed over, gone: until from's own verdict that peer failed, which
// waitNotHeld alone does not wait for (a link only down is not held).
// For a hold that may end before waitHeld sees it.
func waitHeldSeen(t *testing.T, from *broker.Broker, peer string) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(from, peer); st != "held" && st != "" {
			return fmt.Errorf("%s's link to %s %q, want held (or handed over)", from.Stats().Node, peer, st)
		}
		return nil
	})
}

// waitNotHeld waits, at most d, until from's link to peer is no longer
// held (released, handed over, or closed).
func waitNotHeld(t *testing.T, d time.Duration, from *broker.Broker, peer string) {
	t.Helper()
	testutil.WaitFor(t, d, func() error {
		if st, _ := linkState(from, peer); st == "held" {
			return fmt.Errorf("%s's link to %s still held", from.Stats().Node, peer)
		}
		return nil
	})
}

// heldQuad is the cluster of the tests of a held link's copies with four
// nodes: n0 (its link behind px), n1, n2, n3; sh, n0's persistent session
// (n1 adopts it), subscribed to topics; p, a publisher on n2.
type heldQuad struct {
	st             *store.Store
	px             *linkProxy
	n0, n1, n2, n3 *broker.Broker
	nodes          []*broker.Broker
	n0link, sh     string
	exp            *paho.ConnectProperties
	p              *testutil.V5
}

func newHeldQuad(t *testing.T, topics ...string) *heldQuad {
	t.Helper()
	q := &heldQuad{st: storetest.Open(t), px: newLinkProxy(t), exp: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}}
	withStore := func(o *broker.Options) { o.Store = q.st }
	q.n1 = testcluster.Broker(t, "n1", "", withStore)
	q.n2 = testcluster.Broker(t, "n2", q.n1.GossipAddr(), withStore)
	q.n3 = testcluster.Broker(t, "n3", q.n1.GossipAddr(), withStore)
	q.n0 = testcluster.Broker(t, "n0", q.n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = q.st, q.px.addr()
	})
	q.n0link = q.n0.Stats().Cluster.Link
	q.px.setTarget(q.n0link)
	q.nodes = []*broker.Broker{q.n0, q.n1, q.n2, q.n3}
	waitMesh(t, q.nodes...)
	for i := 0; ; i++ {
		if id := fmt.Sprintf("sh-%d", i); broker.Adopter(id, "n1", "n2", "n3") == "n1" {
			q.sh = id
			break
		}
	}
	c, _ := dialV5(t, q.n0, &paho.Connect{ClientID: q.sh, CleanStart: true, Properties: q.exp})
	for _, topic := range topics {
		subscribe(t, c, 0, paho.SubscribeOptions{Topic: topic, QoS: 1})
	}
	_ = c.Disconnect(&paho.Disconnect{})
	waitConnections(t, q.n0, 0)
	waitStoredOwner(t, q.st, q.sh, "n0")
	waitRoutes(t, q.nodes, q.n0, len(topics))
	q.p, _ = dialV5(t, q.n2, &paho.Connect{ClientID: "p", CleanStart: true})
	return q
}
