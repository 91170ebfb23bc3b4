package plugins

import (
	"testing"
	"time"
)

// The log limiter is tested with a synthetic clock here; the external tests
// drive it through real refusals.
func TestLogLimiter(t *testing.T) {
	var l logLimiter
	t0 := time.Unix(1_700_000_000, 0)
	for i := range authLogPerSecond {
		if ok, left := l.allow(t0.Add(time.Duration(i) * time.Millisecond)); !ok || left != 0 {
			t.Fatalf("line %d: allow = %v, %d", i, ok, left)
		}
	}
	for i := range 25 {
		if ok, _ := l.allow(t0.Add(500 * time.Millisecond)); ok {
			t.Fatalf("line %d over the limit allowed", authLogPerSecond+i)
		}
	}
	if ok, left := l.allow(t0.Add(time.Second)); !ok || left != 25 {
		t.Fatalf("next second: allow = %v, left out %d, want true, 25", ok, left)
	}
	if ok, left := l.allow(t0.Add(time.Second + time.Millisecond)); !ok || left != 0 {
		t.Fatalf("after the count was reported: allow = %v, %d", ok, left)
	}
}
