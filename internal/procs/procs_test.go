package procs

import (
	"context"
	"io"
	"log/slog"
	"runtime"
	"testing"
	"time"
)

// TestGovernor follows a process on 4 cores through a quiet start, a burst,
// a steady moderate load and the end of it.
func TestGovernor(t *testing.T) {
	g := NewGovernor(4)
	procs := 4
	step := func(busy float64, want int, what string) {
		t.Helper()
		procs = g.Next(procs, busy)
		if procs != want {
			t.Fatalf("%s: busy %.2f cores: %d Ps, want %d", what, busy, procs, want)
		}
	}
	// Idle: the Ps go only after downTicks quiet ticks in a row.
	for i := 1; i < downTicks; i++ {
		step(0.1, 4, "idle, not yet long enough")
	}
	step(0.1, 1, "idle for downTicks ticks")
	// A light load stays on one P (below upShare of it).
	step(0.6, 1, "0.6 cores on 1 P")
	// A burst gets every P back at once, not one more.
	step(0.9, 4, "burst on 1 P")
	// A pause in the burst does not take them away...
	step(0.2, 4, "one quiet tick")
	step(2.5, 4, "busy again")
	// ...a steady 1.2 cores settles on the fewest Ps under downShare busy.
	for i := 1; i < downTicks; i++ {
		step(1.2, 4, "1.2 cores, not yet long enough")
	}
	step(1.2, 3, "1.2 cores for downTicks ticks")
	// Saturating 3 of 4 Ps: all back.
	step(2.4, 4, "2.4 cores on 3 Ps")
}

// TestGovernorNeverAboveMax: the process never gets more Ps than it started
// with, whatever it measures (CPU time counts threads in system calls and
// the runtime's own, so it can exceed the Ps).
func TestGovernorNeverAboveMax(t *testing.T) {
	g := NewGovernor(2)
	if n := g.Next(2, 7); n != 2 {
		t.Fatalf("busy 7 cores on max 2: %d Ps", n)
	}
	if n := g.Next(1, 7); n != 2 {
		t.Fatalf("busy 7 cores on 1 P of max 2: %d Ps", n)
	}
	if g := NewGovernor(0); g.Next(1, 5) != 1 {
		t.Fatal("max 0 is 1")
	}
}

// TestRunRestores: Run lowers GOMAXPROCS of an idle process and gives back
// the number it started with when its context ends.
func TestRunRestores(t *testing.T) {
	if runtime.GOMAXPROCS(0) < 2 {
		t.Skip("needs GOMAXPROCS >= 2")
	}
	t.Setenv("GOMAXPROCS", "") // Run leaves an explicit setting alone
	start := runtime.GOMAXPROCS(0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Run(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)))
	}()
	// An idle test process goes down to one P within downTicks ticks; a
	// loaded machine can make it look busy, so this only waits, bounded,
	// and checks the restore either way.
	deadline := time.Now().Add(30 * time.Second)
	for runtime.GOMAXPROCS(0) == start && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	<-done
	if n := runtime.GOMAXPROCS(0); n != start {
		t.Fatalf("GOMAXPROCS %d after Run ended, want %d", n, start)
	}
}
