package main

import (
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
	"github.com/rtm-dev/rtm/broker"
)

// roundStat is what -round-stats logs of one capture round: what history's
// writer did (inserts, their batches and latency, from the broker's
// metrics), the garbage collector's work, and the peaks of the heap and of
// the queue, sampled every 50 ms. A nil *roundStat does nothing.
type roundStat struct {
	b                   *broker.Broker
	reg                 *prometheus.Registry
	t0, tPub            time.Time
	ms0                 runtime.MemStats
	gc0                 float64
	cores0              []coreTime
	cpu0                time.Duration
	ins0, sum0, wr0     float64
	stop                chan struct{}
	wg                  sync.WaitGroup
	mu                  sync.Mutex
	heapPeak, queuePeak uint64
}

func startRoundStat(b *broker.Broker, reg *prometheus.Registry) *roundStat {
	rs := &roundStat{b: b, reg: reg, stop: make(chan struct{})}
	rs.ins0, rs.sum0, rs.wr0 = rs.writes()
	runtime.ReadMemStats(&rs.ms0)
	rs.gc0 = gcCPU()
	rs.cores0, rs.cpu0 = coreTimes(), cpuTime()
	rs.t0 = time.Now()
	rs.wg.Add(1)
	go func() {
		defer rs.wg.Done()
		sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-rs.stop:
				return
			case <-t.C:
			}
			metrics.Read(sample)
			var q uint64
			if h := b.Stats().History; h != nil {
				q = uint64(h.Queued)
			}
			rs.mu.Lock()
			rs.heapPeak = max(rs.heapPeak, sample[0].Value.Uint64())
			rs.queuePeak = max(rs.queuePeak, q)
			rs.mu.Unlock()
		}
	}()
	return rs
}

// writes returns the history inserts so far, their total seconds, and the
// messages written.
func (rs *roundStat) writes() (inserts, secs, written float64) {
	mfs, err := rs.reg.Gather()
	if err != nil {
		return
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "rtm_history_write_seconds":
				h := m.GetHistogram()
				inserts, secs = float64(h.GetSampleCount()), h.GetSampleSum()
			case "rtm_history_written_total":
				written = m.GetCounter().GetValue()
			}
		}
	}
	return
}

// published marks the end of the publishing (the writer may still be
// catching up).
func (rs *roundStat) published() {
	if rs != nil {
		rs.tPub = time.Now()
	}
}

func (rs *roundStat) report(name string, n int) {
	if rs == nil {
		return
	}
	close(rs.stop)
	rs.wg.Wait()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	ins, secs, wr := rs.writes()
	ins, secs, wr = ins-rs.ins0, secs-rs.sum0, wr-rs.wr0
	batch, lat := 0.0, 0.0
	if ins > 0 {
		batch, lat = wr/ins, secs/ins*1e3
	}
	cpu := cpuTime() - rs.cpu0
	cores := coreTimes()
	var busy []string
	for i := range min(len(cores), len(rs.cores0)) {
		b := cores[i].busy - rs.cores0[i].busy
		all := b + cores[i].idle - rs.cores0[i].idle
		if all > 0 {
			busy = append(busy, strconv.Itoa(int(100*b/all))+"%")
		}
	}
	benchkit.Logf("  %s: this process %v of CPU in %v; each core busy (all processes) %s",
		name, cpu.Round(time.Millisecond), time.Since(rs.t0).Round(time.Millisecond), strings.Join(busy, ", "))
	benchkit.Logf("  %s: publish %v, drain %v; inserts %.0f, batch %.0f, insert %.2f ms mean (%.0f%% of the round); GC %d cycles, pauses %v, GC CPU %.2f µs a message, heap peak %.1f MiB, queue peak %d; allocs %.0f (%.0f B) a message",
		name, rs.tPub.Sub(rs.t0).Round(time.Millisecond), time.Since(rs.tPub).Round(time.Millisecond),
		ins, batch, lat, secs/time.Since(rs.t0).Seconds()*100,
		ms.NumGC-rs.ms0.NumGC, time.Duration(ms.PauseTotalNs-rs.ms0.PauseTotalNs).Round(time.Microsecond),
		(gcCPU()-rs.gc0)*1e6/float64(n), float64(rs.heapPeak)/(1<<20), rs.queuePeak,
		float64(ms.Mallocs-rs.ms0.Mallocs)/float64(n), float64(ms.TotalAlloc-rs.ms0.TotalAlloc)/float64(n))
}

// gcCPU is the CPU seconds the garbage collector has used (estimated by
// the runtime: mark workers, assists, pauses).
func gcCPU() float64 {
	s := []metrics.Sample{{Name: "/cpu/classes/gc/total:cpu-seconds"}}
	metrics.Read(s)
	return s[0].Value.Float64()
}

// coreTime is a core's time, from /proc/stat (Linux; nil elsewhere), in
// clock ticks: busy (user, nice, system, irq, softirq, steal) and idle
// (idle, iowait).
type coreTime struct{ busy, idle int64 }

func coreTimes() []coreTime {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil
	}
	var out []coreTime
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		var v [8]int64
		for i := range v {
			v[i], _ = strconv.ParseInt(f[i+1], 10, 64)
		}
		out = append(out, coreTime{busy: v[0] + v[1] + v[2] + v[5] + v[6] + v[7], idle: v[3] + v[4]})
	}
	return out
}
