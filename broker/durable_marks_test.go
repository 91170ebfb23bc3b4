package broker_test

import (
	"context"
	"errors"
	"fmt"
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

// TestAdopterRestartKeepsAdoptedMark: a node dies, n1 adopts one of its
// sessions, and n1 restarts (kill, same name and addresses, back before
// gossip's verdict) before n2 released its held link for the dead node
// (another session is still being adopted). The restored session must
// still skip the direct copies of what n2's held link takes, and get the
// held copies when n2 releases it, in order. Before, n1 restored the
// session without its "adopted from n0" mark (it was in memory only): it
// took m3's direct copy first, then skipped the held copies of m1, m2 and
// m3: m1 and m2 were lost, not counted.
func TestAdopterRestartKeepsAdoptedMark(t *testing.T) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	px.setTarget(n1.Stats().Cluster.Link)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p

	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	// m2's direct copy is skipped by the adopted session: the held link
	// has it.
	waitHeld(t, n2, "n0") // n2's own verdict on n0 may come after n1's adoption: m2 must be marked held
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")

	// n1 restarts within failure detection: n2 keeps it alive (a real
	// restart of a process is that fast; in process here, gossip might
	// declare it failed first, and n2 would adopt its sessions).
	n2.SetTestMembers(func(ms []cluster.Member) []cluster.Member {
		for i := range ms {
			if ms[i].Name == "n1" && ms[i].Status == cluster.StatusFailed {
				ms[i].Status = cluster.StatusAlive
			}
		}
		return ms
	})
	defer n2.SetTestMembers(nil)
	inc := func() uint64 {
		for _, l := range n2.Stats().Cluster.Links {
			if l.Peer == "n1" {
				return l.PeerIncarnation
			}
		}
		return 0
	}
	before := inc()
	// m2's direct copy taken (and skipped) by n1 before the kill. A copy
	// still on its way when the cluster part is killed in process (its
	// MQTT side and store writer go on) is the case of
	// TestKilledAdopterKeepsMarkForCopyInFlight.
	testutil.WaitFor(t, waitCond, func() error {
		if st, q := linkState(n2, "n1"); q != 0 {
			return fmt.Errorf("n2's link to n1 %q holds %d", st, q)
		}
		return nil
	})
	gossip := n1.GossipAddr()
	n1.KillCluster() // its MQTT side is not used again
	px.cut()
	n1b := testcluster.Broker(t, "n1", n2.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	px.setTarget(n1b.Stats().Cluster.Link)
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n1"); st != "up" || inc() == before {
			return fmt.Errorf("n2's link to n1 %q, want up with the new n1", st)
		}
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of the new n1, want 1 (the restored session's)", got)
		}
		return nil
	})
	waitHeld(t, n2, "n0")
	// Marked held for n0, as m2: the restored session must skip its
	// direct copy and take the held one, after m1 and m2. Its PUBACK
	// waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m3")
	a.letOtherGo() // the other adoption, then n2's release
	waitNotHeld(t, 2*waitCond, n2, "n0")

	a.wantAdopted(t, n1b, "m1", "m2", "m3")
}

// TestMovedOnRestartKeepsAdoptedMark: a node dies, n1 adopts one of its
// sessions, and its device reconnects to n3 before n2 released its held
// link for the dead node (another session is still being adopted): the
// session moves on from n1 to n3 (after the 1.5 s wait for the held
// copies) with its mark "adopted from n0", and n3 restarts (kill, same name
// and addresses, back before gossip's verdict). The session n3 restores
// must still skip the direct copies of what n2's held link takes, and get
// the held copies when n2 releases it, in order. Before, the mark moved in
// memory only (n3's writes of the stored session left it out): the
// restored session took m3's direct copy first, then skipped the held
// copies of m1, m2 and m3: m1 and m2 were lost, not counted.
//
// Open: once in 305 runs under load (session 12, 30038c7 reverted), the
// restored session got m1 twice ("adopted session got m1, want m2"); not
// explained yet.
func TestMovedOnRestartKeepsAdoptedMark(t *testing.T) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n3 := testcluster.Broker(t, "n3", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	px.setTarget(n3.Stats().Cluster.Link)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2, n3}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p
	// Only n0 fails here. On a busy machine the test's fast gossip timers
	// can declare a live node failed for a moment, and n3 then adopted
	// other from n2 (paused in the middle of its own adoption): n2 held
	// two routes of the new n3 (1 of 150 runs under load).
	for _, n := range []*broker.Broker{n1, n2, n3} {
		keepAliveBut(n, "n0")
		defer n.SetTestMembers(nil)
	}

	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	// m2's direct copy is skipped by the adopted session: the held link
	// has it.
	waitHeld(t, n2, "n0") // n2's own verdict on n0 may come after n1's adoption: m2 must be marked held
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")

	// The device reconnects to n3: the session moves from n1 with its mark
	// (n2 has not sent what it held for n0: n1 waits 1.5 s for it first).
	d, ca := dialV5Retry(t, n3, &paho.Connect{ClientID: a.svc, CleanStart: false, Properties: &paho.ConnectProperties{SessionExpiryInterval: ptr(uint32(600))}})
	if !ca.SessionPresent {
		t.Fatal("session present = 0 after the move to n3")
	}
	_ = d.Disconnect(&paho.Disconnect{})
	waitConnections(t, n3, 0)
	waitStoredOwner(t, st, a.svc, "n3")
	// n3's own writes of the session (at the CONNECT and the DISCONNECT)
	// are in the store before it restarts. The owner above is n3's already
	// once n3 took n1's document over, ahead of them. In process, n3's
	// store writer outlives KillCluster (a killed process writes nothing
	// more) and wrote them while n3b read the store: a session document is
	// rewritten as a delete, then an insert, and n3b restored 0 sessions
	// between the two (n2 never held a route of the new n3: 5 of 150 runs
	// under load failed so).
	ctx, cancel := context.WithTimeout(context.Background(), waitCond)
	defer cancel()
	if err := n3.FlushStore(ctx); err != nil {
		t.Fatalf("n3's store writes: %v", err)
	}

	// n3 restarts within failure detection: n1 and n2 keep it alive (a
	// real restart of a process is that fast; in process here, gossip
	// might declare it failed first, and they would adopt its session);
	// keepAliveBut above does.
	inc := func(n *broker.Broker) uint64 {
		for _, l := range n.Stats().Cluster.Links {
			if l.Peer == "n3" {
				return l.PeerIncarnation
			}
		}
		return 0
	}
	before := inc(n2)
	gossip := n3.GossipAddr()
	n3.KillCluster() // its MQTT side is not used again
	px.cut()
	n3b := testcluster.Broker(t, "n3", n2.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr, o.Cluster.LinkAdvertise = st, gossip, px.addr()
	})
	keepAliveBut(n3b, "n0")
	defer n3b.SetTestMembers(nil)
	px.setTarget(n3b.Stats().Cluster.Link)
	testutil.WaitFor(t, waitCond, func() error {
		// n1's too: the device's CONNECT on n3 below claims its client ID
		// from every node (a claim on a link that breaks for the new
		// incarnation is refused, and the device would retry).
		for _, n := range []*broker.Broker{n1, n2} {
			if st, _ := linkState(n, "n3"); st != "up" || inc(n) == before {
				return fmt.Errorf("%s's link to n3 %q, want up with the new n3", n.Name(), st)
			}
		}
		if got := n2.Stats().Cluster.RemoteRoutes["n3"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of the new n3, want 1 (the restored session's)", got)
		}
		return nil
	})
	waitHeld(t, n2, "n0")
	// Marked held for n0, as m2: the restored session must skip its
	// direct copy and take the held one, after m1 and m2. Its PUBACK
	// waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m3")
	a.letOtherGo() // the other adoption, then n2's release
	waitNotHeld(t, 2*waitCond, n2, "n0")

	a.wantAdopted(t, n3b, "m1", "m2", "m3")
}

// TestLateGossipHandOverReachesAdopted: a dead node n0 comes back (at
// another link address), and n1, its adopter, sees it alive at once,
// while n2's gossip still reports it failed for 11 s more (gossip lag,
// a partition of gossip alone) and its held link, which cannot reach the
// new address, keeps what it held. When n2 finally sees n0 alive it hands
// that to the adopted session, which must still carry its mark and take
// it, in order. Before, n1 dropped the marks 10 s after its gossip saw
// n0 alive: the session skipped n2's held copies of m1 and m2, lost and
// not counted. The wait is the lag this test is about, not a
// synchronisation.
func TestLateGossipHandOverReachesAdopted(t *testing.T) {
	st := storetest.Open(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), withStore)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p

	gossip, oldLink := n0.GossipAddr(), n0.Stats().Cluster.Link
	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	waitHeld(t, n2, "n0") // n2's own verdict on n0 may come after n1's adoption: m2 must be marked held
	// Its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m2")
	markFailed(n2, "n0")
	defer n2.SetTestMembers(nil)
	// n0 restarts: same name and gossip address, another link address.
	n0b := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.GossipAddr = st, gossip
	})
	if n0b.Stats().Cluster.Link == oldLink {
		t.Fatalf("n0 came back at the same link address %s", oldLink)
	}
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n1, "n0"); st != "up" {
			return fmt.Errorf("n1's link to n0 %q, want up", st)
		}
		return nil
	})
	time.Sleep(11 * time.Second) // n2's gossip lags n1's by more than 10 s
	waitHeld(t, n2, "n0")
	n2.SetTestMembers(nil)
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n0"); st != "up" {
			return fmt.Errorf("n2's link to n0 %q, want up", st)
		}
		return nil
	})
	// Another publisher: p's acknowledgements of m1 and m2, held longer
	// than their bound (n2's verdict lagged 11 s), failed and closed its
	// connection (it would publish them again).
	p2, _ := dialV5(t, n2, &paho.Connect{ClientID: "p2", CleanStart: true})
	p2.Pub(t, "t/0", 1, false, "m3")
	a.letOtherGo()

	a.wantAdopted(t, n1, "m1", "m2", "m3")
	// Every live broker said it is done with n0's held link (n2 once it
	// handed it over): the marks go, not only cluster.failed_peer_hold
	// (2 min) later.
	testutil.WaitFor(t, waitCond, func() error {
		if n := n1.AdoptedMarks(); n != 0 {
			return fmt.Errorf("n1 has %d sessions marked adopted, want 0", n)
		}
		return nil
	})
}

// TestHandOverReachesAdopterWithoutRoutes: the dead node comes back (the
// same process, a partition healed) after its session was adopted by n1
// but before n1's route for it reached n2, which hands what its held link
// kept to the sessions adopted from n0. n1 must get those copies anyway
// (only sessions marked adopted from n0 take them), so the session gets
// m1, then m2 published after. Before, the hand-over went only to the
// nodes whose routes matched at n2: the adopted session skipped m1, lost
// (counted stale_session only when the heal ended n0's stale copy).
func TestHandOverReachesAdopterWithoutRoutes(t *testing.T) {
	st := storetest.Open(t)
	px := newLinkProxy(t)
	withStore := func(o *broker.Options) { o.Store = st }
	n1 := testcluster.Broker(t, "n1", "", withStore)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), withStore)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) {
		o.Store, o.Cluster.LinkAdvertise = st, px.addr()
	})
	n0link := n0.Stats().Cluster.Link
	px.setTarget(n0link)
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	p := a.p

	px.cut()
	defer px.setTarget(n0link) // the partition heals for n0's link too
	for _, b := range []*broker.Broker{n1, n2} {
		markFailed(b, "n0")
		defer b.SetTestMembers(nil)
	}
	// m1 must find n2's link held (n2's own sync of the failure, not only
	// n1's): published before, it is queued for n0 as for a live peer,
	// and goes to n0's stale session (window (a), counted stale_session).
	waitHeld(t, n2, "n0")
	routes := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(routes) }) }
	defer release()
	n2.HoldRouteDeltas("n1", routes)
	select {
	case <-a.blocked:
	case <-time.After(waitCond):
		t.Fatal("no adoption of the session")
	}
	// Only n0's held link on n2 takes it; its PUBACK waits for the hand-over.
	pubQueued(t, n2, p, "n0", "t/0", "m1")
	close(a.release)
	waitStoredOwner(t, st, a.svc, "n1")
	testutil.WaitFor(t, waitCond, func() error { // installed on n1
		if got := n1.Stats().Cluster.LocalRoutes; got != 1 {
			return fmt.Errorf("n1 has %d local routes, want 1 (the adopted session's)", got)
		}
		return nil
	})
	if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 0 {
		t.Fatalf("n2 holds %d routes of n1, want 0 (held back)", got)
	}
	// n0 is back for gossip: n2 hands its held link's queue over.
	for _, b := range []*broker.Broker{n1, n2} {
		b.SetTestMembers(nil)
	}
	waitNotHeld(t, waitCond, n2, "n0")
	release()
	testutil.WaitFor(t, waitCond, func() error {
		if got := n2.Stats().Cluster.RemoteRoutes["n1"]; got != 1 {
			return fmt.Errorf("n2 holds %d routes of n1, want 1 (the adopted session's)", got)
		}
		return nil
	})
	// Also queued on n2's link to n0 (alive for gossip again, its stale
	// session's route still there), which is cut until the test ends:
	// its PUBACK waits for n0's acknowledgement, not waited for here.
	publishAsync(p, "t/0", "m2")
	a.letOtherGo()

	a.wantAdopted(t, n1, "m1", "m2")
}

// TestExpiredHoldTellsDoneAfterItsCopies: a held link given up at
// cluster.failed_peer_hold (a session of the dead node still not adopted)
// hands its queue to the sessions adopted so far as it closes; its node
// must not tell the cluster it is done with the link before that, or the
// adopter drops its marks (every broker done) and the session skips the
// copies. Before, n2's adoption watcher said so as soon as the link left
// the held set, while it was still closing: n1 dropped svc's mark and m1
// was lost, not counted (only the sessions not adopted at all are
// counted, link_closed).
func TestExpiredHoldTellsDoneAfterItsCopies(t *testing.T) {
	st := storetest.Open(t)
	hold := func(o *broker.Options) { o.Store, o.Cluster.FailedPeerHold = st, 3*time.Second }
	n1 := testcluster.Broker(t, "n1", "", hold)
	n2 := testcluster.Broker(t, "n2", n1.GossipAddr(), hold)
	n0 := testcluster.Broker(t, "n0", n1.GossipAddr(), func(o *broker.Options) { o.Store = st })
	nodes := []*broker.Broker{n0, n1, n2}
	waitMesh(t, nodes...)
	a := pauseAdoptions(t, st, nodes)
	// n2 cannot adopt other (its store claims fail), so its held link for
	// n0 is never released, and its adoption watcher runs on.
	a.letOtherGo()
	n2.SetTestAfterClaims(func() error { return errors.New("store unavailable (test)") })
	defer n2.SetTestAfterClaims(nil)
	closing, closeNow := make(chan struct{}), make(chan struct{})
	var closeOnce, nowOnce sync.Once
	n2.SetTestBeforeClose(func(peer string) {
		if peer == "n0" {
			closeOnce.Do(func() {
				close(closing)
				<-closeNow
			})
		}
	})
	defer n2.SetTestBeforeClose(nil)
	defer nowOnce.Do(func() { close(closeNow) })

	n0.KillCluster()
	a.publishDuringAdoption(t, st, n2, "m1")
	select {
	case <-closing: // n2's hold for n0 ran out; its link not closed yet
	case <-time.After(waitCond):
		t.Fatal("n2 did not give up its held link for n0")
	}
	// n1's own hold runs out too, so n2 is the last broker to be done.
	// Its mark must outlive this (before, it went within a poll).
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end) && n1.AdoptedMarks() > 0; {
		time.Sleep(20 * time.Millisecond)
	}
	nowOnce.Do(func() { close(closeNow) })
	testutil.WaitFor(t, waitCond, func() error {
		if st, _ := linkState(n2, "n0"); st != "" {
			return fmt.Errorf("n2's link to n0 %q, want none", st)
		}
		return nil
	})
	// Another publisher: a.p's acknowledgement of m1, handed over by the
	// expired link (counted link_closed), failed, and closed its connection.
	p2, _ := dialV5(t, n2, &paho.Connect{ClientID: "p2", CleanStart: true})
	p2.Pub(t, "t/0", 1, false, "m2")

	a.wantAdopted(t, n1, "m1", "m2")
}
