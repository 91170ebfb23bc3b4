package writebehind

import "testing"

// The queue keeps its items in order through wraps and growth, and a
// steady load (a backlog written a batch at a time while more arrive)
// allocates nothing once its array fits the backlog.
func TestFifoOrderAndSteadyAllocations(t *testing.T) {
	q := fifo[int]{keep: 1024}
	next, want := 0, 0
	check := func(n int) {
		t.Helper()
		var got [256]int
		q.copyTo(got[:], min(n, len(got)))
		for i := range n {
			if v := q.at(i); v != want+i || i < len(got) && got[i] != v {
				t.Fatalf("item %d is %d (copied: %d), want %d", i, v, got[min(i, len(got)-1)], want+i)
			}
		}
		q.pop(n)
		want += n
	}
	for range 300 {
		q.push(next)
		next++
	}
	for range 50 { // wraps and growth, items checked in order
		for range 256 {
			q.push(next)
			next++
		}
		check(256)
	}
	allocs := testing.AllocsPerRun(200, func() {
		for range 256 {
			q.push(next)
			next++
		}
		check(256)
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations a batch in a steady state, want 0", allocs)
	}
	check(q.len())
	if q.len() != 0 || q.buf == nil {
		t.Fatalf("emptied: len %d, array kept %v; want 0 and kept (within keep)", q.len(), q.buf != nil)
	}
	for range 2 { // bursts past keep, alike: the array is kept for the next
		for range 5000 {
			q.push(next)
			next++
		}
		check(q.len())
		if q.buf == nil {
			t.Fatal("array let go after a burst that used it: the next allocates it again")
		}
	}
	q.push(next) // a small load again: the burst's array is let go
	next++
	check(1)
	if q.buf != nil {
		t.Fatalf("array of %d kept for a backlog of 1, want it let go (keep %d)", len(q.buf), q.keep)
	}
}
