package broker

import (
	"fmt"
	"testing"
	"time"
)

// TestOwnersForgetsEndedSessions: every CONNECT here records when its
// session was established, for the partition heal; a session that ends
// (a clean client leaves) must not stay recorded, or the map grows with
// every client ID the node has ever seen. A session still held, and one
// established again since the sweep looked, stay.
func TestOwnersForgetsEndedSessions(t *testing.T) {
	live := map[string]bool{"kept": true}
	o := newOwners(func(id string) bool { return live[id] })
	o.sweepGrace = 0
	start := time.Now()
	o.set("kept", start)
	for i := range 10_000 {
		o.set(fmt.Sprint("gone-", i), time.Now())
	}
	o.mu.Lock()
	n := len(o.since)
	o.mu.Unlock()
	if n > 2*o.sweepMin {
		t.Errorf("owners holds %d entries after 10,000 sessions came and went, want at most %d", n, 2*o.sweepMin)
	}
	if got := o.at("kept"); !got.Equal(start) {
		t.Errorf("the session still held lost its record: %v, want %v", got, start)
	}

	// A young entry (its CONNECT may not be in the client list yet) stays.
	y := newOwners(func(string) bool { return false })
	y.sweepMin, y.sweepAt = 2, 2
	y.set("young", time.Now())
	y.set("young2", time.Now())
	if y.at("young").IsZero() || y.at("young2").IsZero() {
		t.Error("an entry within the grace was forgotten")
	}
}
