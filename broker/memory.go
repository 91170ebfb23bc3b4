package broker

import (
	"context"
	"runtime/debug"
	"sync/atomic"
	"time"
)

// Returning memory to the OS after a connection storm.
//
// While thousands of devices connect at once, the heap grows with the
// garbage of their CONNECTs (decoding, hooks, presence records) up to the
// GC's goal, twice the live heap, and the runtime keeps those pages: its
// background scavenger only returns what lies beyond the goal, so the
// process's RSS stays at the storm's high-water mark for as long as the
// connections stay idle (measured: 13 KiB per idle connection where the live
// heap and stacks are 7). Once the connects have stopped for a while (long
// enough for the connections to have parked, see idlePark; and for the
// store to have written their device records, up to a minute), the broker
// runs debug.FreeOSMemory once: a GC and a scavenge of every free page. It
// costs one collection (186 ms of wall time at 10,000 connections on a
// loaded 2-core machine), once per storm, never on a broker whose connect
// rate is steady.
//
// Connections that park count as connects do (rtm's mochi patch 86: a
// connection idle for 5 s gives up its goroutine and stack). So the release
// comes after the storm's connections have parked, not while they still
// hold their stacks; and a wave of parked connections woken at once (a
// fleet's keep-alive pings, when it connected in a storm: each wakes a
// goroutine that handles the PINGREQ and parks again 5 s later) is
// returned too. Measured at 10,000 idle connections pinging together:
// 10.7 KiB of RSS per connection after the wave without this, against 6.2
// before it.

const (
	releaseTick           = 5 * time.Second // how often the connect count is looked at
	releaseQuietTicks     = 2               // ticks in a row with few connects: the storm is over
	releaseQuietMax       = 50              // at most this many connects in a quiet tick (10/s)
	releaseStoreWaitTicks = 12              // quiet ticks to wait at most for the store to write the device records
	releaseStormMinimum   = 1000            // connects since the last release that make a storm
)

// stormRelease decides, from the count of CONNECTs seen, when a storm of
// connects is over and the memory it left should be returned.
type stormRelease struct {
	// reconciles: the device records' reconciliations seen; one that
	// ended since the last tick releases too (see reconciled).
	reconciles int64
	reconDue   bool
	parks      int64 // increases of the parked count, summed
	prevParked int64
	prev       int64 // connects and parks at the previous tick
	quiet      int   // ticks in a row with at most releaseQuietMax connects
	storm      int64 // connects in the other ticks since the last release
}

// tick takes the connects counted so far and whether the store still has
// device records to write; true: release now. A steady trickle of connects
// never releases, however many add up. While the store writes the storm's
// presence records (work that allocates, in the process with the embedded
// store) the release waits for it, up to releaseStoreWaitTicks.
func (r *stormRelease) tick(connects int64, storeBusy bool) bool {
	connects += r.parks
	if d := connects - r.prev; d <= releaseQuietMax {
		r.quiet++
	} else {
		r.quiet = 0
		r.storm += d
	}
	r.prev = connects
	if r.storm < releaseStormMinimum || r.quiet < releaseQuietTicks ||
		(storeBusy && r.quiet < releaseStoreWaitTicks) {
		return false
	}
	r.storm = 0
	return true
}

// observe takes the connections parked now (a gauge) before tick: its
// increases count as connects.
func (r *stormRelease) observe(parked int64) {
	if parked > r.prevParked {
		r.parks += parked - r.prevParked
	}
	r.prevParked = parked
}

// reconciled takes the count of reconciliations of the device records
// done so far and whether the store is still busy with records; true:
// release now. A reconciliation (after a storm overflowed the device
// record queue) reads and writes every connected device's record, and its
// garbage (hundreds of MB at 19,000 devices) comes after the storm's
// release: it is returned once the reconciliation is over and the store
// idle.
func (r *stormRelease) reconciled(n int64, storeBusy bool) bool {
	if n != r.reconciles {
		r.reconciles, r.reconDue = n, true
	}
	if !r.reconDue || storeBusy {
		return false
	}
	r.reconDue = false
	return true
}

// releaseAfterStorms runs until ctx ends.
func (b *Broker) releaseAfterStorms(ctx context.Context) {
	t := time.NewTicker(releaseTick)
	defer t.Stop()
	var r stormRelease
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			n := b.connects.Load()
			r.observe(int64(b.mq.ParkedClients()))
			busy := b.devices != nil && b.devices.pending() > 0
			storm := r.tick(n, busy)
			recon := b.devices != nil && r.reconciled(b.devices.reconciles.Load(), busy)
			if !storm && !recon {
				continue
			}
			start := time.Now()
			debug.FreeOSMemory()
			b.log.Info("returned free memory to the OS after a connection storm",
				"reconciliation", recon && !storm, "connects", n, "connections", atomic.LoadInt64(&b.mq.Info.ClientsConnected), "took", time.Since(start).String())
		}
	}
}
