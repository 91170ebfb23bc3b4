package broker

import (
	"context"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker/link"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestFlushGateWaitsOnlyForAdopters: while a held link's release re-sends
// its messages, a publish waits for it only if its message goes to one of
// that release's adopters (review finding: every publisher on the node
// waited, its PUBACK held, also for messages that cannot meet a re-sent
// one), for as long as some release to that adopter is under way; a wait
// ends when the releases do.
func TestFlushGateWaitsOnlyForAdopters(t *testing.T) {
	var g flushGate
	if g.needed("n1") {
		t.Fatal("needed with no release under way")
	}
	g.begin([]string{"n1", "n2"})
	g.begin([]string{"n1"}) // a second failed node's release, adopted by n1 alone
	if g.needed("n3") {
		t.Error("a message for n3 alone waits for releases to n1 and n2")
	}
	if !g.needed("n3", "n2") {
		t.Error("a message for n2 does not wait for the release re-sending to n2")
	}
	g.end([]string{"n1", "n2"})
	if g.needed("n2") {
		t.Error("a message for n2 waits once the release to n2 ended")
	}
	if !g.needed("n1") {
		t.Error("a message for n1 does not wait for the release still re-sending to n1")
	}
	done := make(chan struct{})
	go func() {
		g.wait(nil)
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("the wait returned with a release under way")
	case <-time.After(100 * time.Millisecond):
	}
	g.end([]string{"n1"})
	select {
	case <-done:
	case <-time.After(flushWaitMax):
		t.Fatal("the wait did not end with the last release")
	}
	if g.needed("n1") {
		t.Error("needed after every release ended")
	}
}

// TestUnholdReachedKeepsNewerHold: the release of a held link after its
// queue was handed over (linkReached, resendRestarted) runs after the
// routes' lock was let go; gossip may meanwhile have seen the peer alive
// and failed again, and syncPeers held the link anew. That late release
// must not undo the newer hold (the link would write what is forwarded
// for the sessions adopted this time, which skip their direct copies),
// and must release the link when no newer hold was set.
func TestUnholdReachedKeepsNewerHold(t *testing.T) {
	log, buf := testutil.Logger(t)
	t.Cleanup(buf.Stop)
	got := make(chan link.Message, 4)
	srv, err := link.Listen("127.0.0.1:0", link.Config{NodeName: "peer", Logger: log}, link.HandlerFunc(func(_ string, m link.Message) { got <- m }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	l := link.Dial("peer", srv.Addr(), link.Config{NodeName: "me", Logger: log}, nil)
	t.Cleanup(l.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.WaitUp(ctx); err != nil { // so a release would deliver at once
		t.Fatal(err)
	}
	c := &clusterNode{routes: newRouteTable(log), peers: newPeerSet(log, time.Minute, nil)}
	p := &peer{name: "peer", linkAddr: srv.Addr(), link: l}
	// Failed again: held anew by syncPeers (reached reset), after the
	// earlier episode's hand-over decided to release the link.
	c.peers.held["peer"] = p
	p.reached.Store(false)
	l.Hold(true)
	if err := l.Queue(link.Message{Type: link.MinMessageType, Body: []byte("held")}, true); err != nil {
		t.Fatal(err)
	}
	c.unholdReached(p)
	// A negative assertion: nothing may arrive; the window is bounded.
	select {
	case m := <-got:
		t.Fatalf("a late release undid the newer hold: the link delivered %q", m.Body)
	case <-time.After(time.Second):
	}
	// Reached in the current episode: released, and the queue goes.
	p.reached.Store(true)
	c.unholdReached(p)
	select {
	case m := <-got:
		if string(m.Body) != "held" {
			t.Fatalf("delivered %q", m.Body)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the release of the current episode did not resume the link")
	}
}
