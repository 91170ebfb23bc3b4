package broker

import (
	"testing"
	"time"
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
