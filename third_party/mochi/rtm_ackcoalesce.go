// SPDX-License-Identifier: MIT
// rtm patch 102: the acknowledgements to a client publishing QoS 1/2
// messages at a high rate are written a few at a time, see PATCHES.md.

package mqtt

import (
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// ackCoalesce is a publishing client's state for Options.AckCoalesce.
//
// Patch 70 writes the acknowledgements of a burst of packets read at once
// in one write(2). A client publishing at a steady rate, say one QoS 1
// message a millisecond, sends no bursts: every PUBLISH was answered with
// a PUBACK write(2) of its own, which on loopback also runs the client's
// TCP input and wake-up in the broker's context: about a third of the
// broker's CPU under QoS 1 fan-in 10→1 at 10,000 msg/s. Mosquitto, with
// Nagle's algorithm on, has its kernel hold a PUBACK until the client
// acknowledges the previous segment, which it does with its next PUBLISH.
//
// Here, when a client's QoS 1/2 PUBLISHes arrive on average less than a
// window apart (at least one more is expected within it), the read loop keeps
// holding the acknowledgements (in outbuf) after the last packet it has:
// they go out with the acknowledgement of the packet after which the next
// one is not expected within the window (releaseAcks), or when any other
// write to the client flushes outbuf, or at the latest when the window
// ends (a timer, flushAcks). A client that waits for its acknowledgements
// before it publishes again (one at a time, or a full in-flight window)
// would wait for every window: when the timer finds that no packet came
// after the one that began the hold, ackStalls times in a row, delaying
// stops for ackStallOff, so such a client waits ackStalls windows a second
// at most.
type ackCoalesce struct {
	// read loop only
	gap  time.Duration // moving average of the time between the client's QoS 1/2 PUBLISHes
	last time.Duration // monoNow at the last one
	now  time.Duration // monoNow at the packet being handled

	since    atomic.Int64  // under cl.Lock (read without): monoNow when outbuf began to hold delayed acks; 0: none
	released time.Duration // under cl.Lock: now of the last packet releaseAcks released
	stalls   int           // under cl.Lock: holds in a row that no packet followed (flushAcks)
	off      atomic.Int64  // monoNow until which nothing is delayed (a stall, see flushAcks)
	timer    *time.Timer   // under cl.Lock: runs flushAcks(true); made at the first hold
	armed    bool          // under cl.Lock: timer is pending (set by armAcks, cleared when it runs)
}

// armAcks (re)arms the timer that ends a hold of acknowledgements, d from
// now. Under cl.Lock.
func (cl *Client) armAcks(a *ackCoalesce, d time.Duration) {
	a.armed = true
	if a.timer == nil {
		a.timer = time.AfterFunc(d, func() { cl.flushAcks(true) })
	} else {
		a.timer.Reset(d)
	}
}

// ackStallOff is how long a client that waited for its held
// acknowledgements gets them at once (rtm patch 102), once ackStalls holds
// in a row ended with no packet after the one that began them: one such
// hold is also what a late packet of a steady publisher looks like (a
// scheduling delay on either side).
const (
	ackStallOff = time.Second
	ackStalls   = 3
)

// ackDelaying reports whether the acknowledgement of the packet the read
// loop handles (of type typ and QoS qos) may be held past the packets it
// has read: the client publishes QoS 1/2 on average less than
// Options.AckCoalesce apart, and has not stalled lately. Read loop only.
func (cl *Client) ackDelaying(typ, qos byte) bool {
	w := cl.ops.options.AckCoalesce
	if w <= 0 || typ != packets.Publish || qos == 0 || cl.Net.bconn == nil {
		return false
	}
	a := cl.Net.acks.Load()
	if a == nil {
		a = &ackCoalesce{gap: coalesceGapMax}
		cl.Net.acks.Store(a)
	}
	now := monoNow()
	g := now - a.last
	if a.last == 0 || g > coalesceGapMax {
		g = coalesceGapMax
	}
	a.gap += (g - a.gap) / 8
	a.last, a.now = now, now
	return a.gap < w && now >= time.Duration(a.off.Load())
}

// releaseAcks ends the read loop's hold after a packet ackDelaying let it
// delay (in place of holdWrites(false)): it writes what outbuf holds if
// the hold began a window ago or the next packet is not expected before
// then; otherwise it leaves it there, with the timer armed at the end of
// the window (armed again if it ran meanwhile). Read loop only.
func (cl *Client) releaseAcks() {
	a := cl.Net.acks.Load()
	w := cl.ops.options.AckCoalesce
	cl.Lock()
	defer cl.Unlock()
	cl.Net.holding.Store(false)
	a.released = a.now
	if cl.Net.outbuf == nil || cl.State.outbound.len() > 0 {
		return // nothing held, or the writer writes it after its packets (as holdWrites)
	}
	since := time.Duration(a.since.Load())
	begin := since == 0
	if begin {
		since = a.now
		a.since.Store(int64(since))
	}
	if !begin {
		a.stalls = 0 // a packet followed the one that began the hold
	}
	rest := since + w - monoNow()
	if a.now-since+a.gap >= w || rest <= 0 {
		_ = cl.flushOutbuf() // an error is the connection's: the next read or write returns it
		return
	}
	// The acknowledgements stay: a timer must end the hold. Not only when
	// it begins: the timer may have run while this packet was handled
	// (flushAcks leaves them to the read loop then), and none is pending.
	if begin || !a.armed {
		cl.armAcks(a, rest)
	}
}

// acksWritten notes that outbuf was written: no acknowledgement is held.
// Under cl.Lock.
func (cl *Client) acksWritten() {
	if a := cl.Net.acks.Load(); a != nil {
		a.since.Store(0)
	}
}

// flushAcks writes the acknowledgements releaseAcks left in outbuf, unless
// the writer will (packets are queued). From the timer (timer true), it
// leaves them to the read loop if it is handling a packet (releaseAcks
// then flushes them or arms the timer again), and to the timer re-armed
// for the rest of the window if the hold began less than a window ago; and if no packet came
// after the one that began the hold, ackStalls times in a row, the client
// is waiting for them: nothing is delayed for ackStallOff.
func (cl *Client) flushAcks(timer bool) {
	a := cl.Net.acks.Load()
	cl.Lock()
	defer cl.Unlock()
	since := time.Duration(a.since.Load())
	if since == 0 || cl.Net.outbuf == nil || cl.State.outbound.len() > 0 {
		return
	}
	if timer {
		a.armed = false
		now := monoNow()
		if cl.Net.holding.Load() {
			return // releaseAcks, after the packet, flushes them or arms the timer again
		}
		if rest := since + cl.ops.options.AckCoalesce - now; rest > 0 {
			cl.armAcks(a, rest) // the hold began after the one this timer was armed for
			return
		}
		if a.released == since {
			if a.stalls++; a.stalls >= ackStalls {
				a.stalls = 0
				a.off.Store(int64(now + ackStallOff))
			}
		}
	}
	_ = cl.flushOutbuf()
}
