// Package procs adapts GOMAXPROCS to the CPU the process uses, so that a
// broker under a moderate load runs on as few threads as its load needs.
//
// Why: with more Ps than work, every goroutine made runnable (a read
// goroutine woken by the network poller, a client's writer started for a
// message) wakes an idle thread to run it (the runtime's wakep: a futex
// wake, a spinning thread looking for work, a futex sleep again), and a
// message crosses threads several times. At a fixed rate below saturation
// (QoS 0 fan-in 10->1 at 20,000 msg/s on 2 cores) rtm with GOMAXPROCS=1
// delivered 1.22-1.46x the messages per CPU-second of GOMAXPROCS=2 (see
// BENCHMARKS.md). Under load the governor gives the runtime every P back
// within one tick, so throughput on many cores is unchanged.
package procs

import (
	"context"
	"log/slog"
	"math"
	"os"
	"runtime"
	"time"
)

const (
	// Tick is how often the process's CPU time is sampled.
	Tick = 200 * time.Millisecond
	// upShare: above this share of its Ps busy, the process gets all of
	// them back at once (a burst must not wait for several steps).
	upShare = 0.7
	// downShare: the process steps down to the fewest Ps it keeps below
	// this share busy...
	downShare = 0.5
	// downTicks: ...after this many ticks in a row would allow it (1 s), so
	// a pause in a steady load does not take Ps away.
	downTicks = 5
)

// Governor decides the number of Ps from the CPU the process used in each
// tick. Its zero value is not usable: see NewGovernor.
type Governor struct {
	max   int // the Ps the process started with: never more
	quiet int // ticks in a row that would allow fewer Ps
}

// NewGovernor returns a governor for a process that may use up to max Ps.
func NewGovernor(max int) *Governor {
	if max < 1 {
		max = 1
	}
	return &Governor{max: max}
}

// Next returns the Ps to run with, given the current number and the CPU the
// process used during the last tick, in cores (CPU seconds per second, user
// and system).
func (g *Governor) Next(procs int, busy float64) int {
	if procs < g.max && busy > upShare*float64(procs) {
		g.quiet = 0
		return g.max
	}
	want := int(math.Ceil(busy / downShare))
	want = max(1, min(want, g.max))
	if want >= procs {
		g.quiet = 0
		return procs
	}
	g.quiet++
	if g.quiet < downTicks {
		return procs
	}
	g.quiet = 0
	return want
}

// Run adapts GOMAXPROCS until ctx ends, then restores the number the
// process started with. It does nothing when GOMAXPROCS is set in the
// environment (the operator chose), when the process has one P, or where
// the process's CPU time cannot be read.
func Run(ctx context.Context, log *slog.Logger) {
	start := runtime.GOMAXPROCS(0)
	if os.Getenv("GOMAXPROCS") != "" || start < 2 {
		return
	}
	if _, ok := cpuTime(); !ok {
		return
	}
	defer runtime.GOMAXPROCS(start)
	g := NewGovernor(start)
	t := time.NewTicker(Tick)
	defer t.Stop()
	prevCPU, _ := cpuTime()
	prevAt := time.Now()
	procs := start
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			cpu, _ := cpuTime()
			wall := now.Sub(prevAt)
			if wall <= 0 {
				continue
			}
			busy := float64(cpu-prevCPU) / float64(wall)
			prevCPU, prevAt = cpu, now
			if n := g.Next(procs, busy); n != procs {
				runtime.GOMAXPROCS(n)
				log.Debug("GOMAXPROCS adapted to the load", "from", procs, "to", n, "cpu_cores", busy)
				procs = n
			}
		}
	}
}
