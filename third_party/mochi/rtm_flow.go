// SPDX-License-Identifier: MIT
// rtm patches 20-23: bounded flow control from subscribers back to the
// publishers feeding them. See PATCHES.md.

package mqtt

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// FlowControl configures how a publisher is paced by a subscriber that
// does not keep up (rtm patch 20).
//
// v2.7.9 fans a PUBLISH out on the publisher's read goroutine into each
// subscriber's session and write queue and drops the message for a
// subscriber whose session (Capabilities.MaximumInflight) or write queue
// (Capabilities.MaximumClientWritesPending) is full. The PUBACK does not wait
// for the subscriber, so a few publishers fill a healthy subscriber's
// session in milliseconds and lose messages they were told were accepted.
//
// With MaxWait > 0, a fan-out that finds a connected subscriber congested
// (its session or its write queue at or above half its limit, the high-water
// mark) waits until the subscriber drains below the mark: the publisher's
// read goroutine is blocked, so its socket is not read and its PUBACK or
// PUBREC is held. The wait for one message is bounded by MaxWait, over all
// of its subscribers together. A subscriber still congested after a whole
// MaxWait is marked stalled: later messages to it are not waited for (they
// are queued while there is room and dropped and reported through
// OnPublishDropped beyond the limits, as in v2.7.9) until it drains below a
// quarter of its limits (the low-water mark). So a subscriber that stops
// reading its socket costs each publisher feeding it at most one MaxWait,
// not one per message.
//
// No wait happens for: a client publishing to its own subscription (it
// could never drain while its own read goroutine waits), an offline session
// (nothing drains it until it reconnects; the limits apply as before),
// inline publishes (Server.Publish), $SYS updates, wills and retained
// messages sent on subscribe. Waiters are woken when the subscriber
// acknowledges or its writer writes (no polling), when it disconnects or is
// taken over, and when the server closes.
type FlowControl struct {
	// MaxWait bounds how long one publish may wait for its congested
	// subscribers; 0 disables pacing (v2.7.9 behaviour: drop at the limits).
	MaxWait time.Duration `yaml:"max_wait" json:"max_wait"`
	// PeerMaxWait, if positive and below MaxWait, bounds the wait of a
	// message delivered by DeliverFromPeer instead: the caller's goroutine
	// (a node link's receiver) may have its own silence limit.
	PeerMaxWait time.Duration `yaml:"peer_max_wait" json:"peer_max_wait"`
}

// FlowStats counts pacing (rtm patch 20); the fields are updated atomically.
type FlowStats struct {
	// Waits counts (publish, congested subscriber) pairs that waited.
	Waits atomic.Int64
	// WaitNanos sums the time those waits took.
	WaitNanos atomic.Int64
	// Stalls counts subscribers marked stalled: congested for a whole
	// MaxWait.
	Stalls atomic.Int64
	// StalledSkips counts messages to a stalled subscriber that were not
	// waited for.
	StalledSkips atomic.Int64
	// QuotaWaits counts the waits of MQTT 3.1.1 publishers at receive
	// quota 0 for a held acknowledgement (rtm patch 131).
	QuotaWaits atomic.Int64
}

// flowGate is a client's side of flow control: the publishers waiting for
// it to drain, and whether it is stalled.
type flowGate struct {
	nwait   atomic.Int32 // len(waiters), readable without mu
	stalled atomic.Bool
	mu      sync.Mutex
	waiters []chan struct{} // oldest first; closed to wake
}

// add queues a waiter and returns the channel that wakes it.
func (g *flowGate) add() chan struct{} {
	ch := make(chan struct{})
	g.mu.Lock()
	g.waiters = append(g.waiters, ch)
	g.nwait.Store(int32(len(g.waiters)))
	g.mu.Unlock()
	return ch
}

// remove takes ch out of the queue if it is still there (a waiter leaving
// without being woken).
func (g *flowGate) remove(ch chan struct{}) {
	g.mu.Lock()
	for i, w := range g.waiters {
		if w == ch {
			g.waiters = append(g.waiters[:i], g.waiters[i+1:]...)
			break
		}
	}
	g.nwait.Store(int32(len(g.waiters)))
	if len(g.waiters) == 0 {
		g.waiters = nil
	}
	g.mu.Unlock()
}

// wake wakes the n oldest waiters (all of them if n < 0).
func (g *flowGate) wake(n int) {
	g.mu.Lock()
	if n < 0 || n > len(g.waiters) {
		n = len(g.waiters)
	}
	for _, ch := range g.waiters[:n] {
		close(ch)
	}
	clear(g.waiters[:n])
	g.waiters = g.waiters[n:]
	if len(g.waiters) == 0 {
		g.waiters = nil
	}
	g.nwait.Store(int32(len(g.waiters)))
	g.mu.Unlock()
}

// flowMarks returns the high-water marks of a client's session and write
// queue: half of their limits (at least 1). The other half is headroom for
// publishers that pass the check at the same moment, and for the waiters
// woken together.
func (o *Options) flowMarks() (inflight, writes int32) {
	inflight = max(int32(o.Capabilities.MaximumInflight)/2, 1)
	writes = max(o.Capabilities.MaximumClientWritesPending/2, 1)
	return inflight, writes
}

// congested reports whether cl's session or write queue is at or above its
// high-water mark, in messages or (rtm patch 40) in bytes. A few atomic
// loads: this is the cost of flow control on the publish path when nobody
// is congested.
func (cl *Client) congested(hiInflight, hiWrites int32) bool {
	return cl.State.Inflight.size.Load() >= hiInflight || cl.State.outbound.n.Load() >= hiWrites ||
		cl.overBytes(1)
}

// overBytes reports whether the bytes cl holds are at or above the bytes
// high-water mark (half of MemoryLimits.MaxClientBytes) divided by div.
// rtm patch 40.
func (cl *Client) overBytes(div int64) bool {
	hi := cl.ops.options.Memory.MaxClientBytes / 2 / div
	return hi > 0 && cl.HeldBytes() >= hi
}

// flowDrained is called after cl's session or write queue shrank (an
// acknowledgement, a packet written, messages cleared): it wakes as many
// waiting publishers as there are free places below the high-water marks,
// and ends a stall once both are below the low-water marks (half the high
// ones). Without waiters or a stall it costs two atomic loads.
func (cl *Client) flowDrained() {
	g := &cl.State.flow
	if g.nwait.Load() == 0 && !g.stalled.Load() {
		return
	}
	hiIn, hiOut := cl.ops.options.flowMarks()
	in, out := cl.State.Inflight.size.Load(), cl.State.outbound.n.Load()
	if g.stalled.Load() && in < max(hiIn/2, 1) && out < max(hiOut/2, 1) && !cl.overBytes(2) {
		g.stalled.Store(false)
	}
	if g.nwait.Load() > 0 && !cl.overBytes(1) {
		free := min(hiIn-in, hiOut-out)
		if free > 1 && cl.overBytes(2) {
			// Bytes are what is short: the free places counted in messages
			// would let a crowd of (possibly large) messages past the byte
			// mark at once, to be dropped after their PUBACKs. Wake one;
			// the next drain wakes the next.
			free = 1
		}
		if free > 0 {
			g.wake(int(free))
		}
	}
}

// pace waits while the subscriber cl is congested, as FlowControl says.
// pub is the publishing client (nil for a message from a peer server);
// deadline is shared by all subscribers of one message: zero until the
// first wait sets it to now + MaxWait. It returns the client to deliver to:
// cl, the client that took over cl's session while waiting, or nil when
// the message is no longer owed to anyone (see takenOver).
func (s *Server) pace(pub, cl *Client, filter string, deadline *time.Time) *Client {
	maxWait := s.Options.FlowControl.MaxWait
	if maxWait <= 0 {
		return cl
	}
	if peer := s.Options.FlowControl.PeerMaxWait; pub == nil && peer > 0 && peer < maxWait {
		maxWait = peer
	}
	hiIn, hiOut := s.Options.flowMarks()
	if !cl.congested(hiIn, hiOut) || cl == pub || cl.Net.Inline || cl.Net.Conn == nil || cl.Closed() {
		return cl
	}
	g := &cl.State.flow
	if g.stalled.Load() {
		s.Flow.StalledSkips.Add(1)
		return cl
	}
	start := time.Now()
	if deadline.IsZero() {
		*deadline = start.Add(maxWait)
	}
	left := deadline.Sub(start)
	if left <= 0 {
		s.stall(cl) // this message's wait was used up by other subscribers
		return cl
	}

	s.Flow.Waits.Add(1)
	if pub != nil {
		pub.FlushHeld() // rtm patch 70: the acks of pub's earlier packets do not wait with this one
	}
	timer := time.NewTimer(left)
	ch := g.add()
	timedOut, closed := false, false
wait:
	// The check after add pairs with flowDrained's check after a shrink
	// (both sides atomic): one of them sees the other, so no wake-up is lost.
	for cl.congested(hiIn, hiOut) && !g.stalled.Load() {
		select {
		case <-ch:
			ch = g.add()
		case <-timer.C:
			timedOut = true
			break wait
		case <-cl.State.open.Done():
			closed = true
			break wait
		case <-s.done:
			break wait
		}
	}
	timer.Stop()
	g.remove(ch)
	s.Flow.WaitNanos.Add(int64(time.Since(start)))
	if timedOut && cl.congested(hiIn, hiOut) {
		s.stall(cl)
	}
	if closed && errors.Is(cl.StopCause(), packets.ErrSessionTakenOver) {
		return s.takenOver(cl, filter, *deadline)
	}
	return cl
}

// takenOver returns the client that took over cl's session, for a message
// cl was owed through filter, or nil if none is owed it (the new client
// started clean, or did not arrive by the deadline). The takeover stops cl
// (which woke the waiter) before it copies the session and before the new
// client is in s.Clients: delivering to cl in that window would put the
// message in a session that is being copied and then cleared, lost after
// the publisher's PUBACK. So wait, briefly and rarely, for the new client.
func (s *Server) takenOver(cl *Client, filter string, deadline time.Time) *Client {
	for {
		now, ok := s.Clients.Get(cl.ID)
		if !ok {
			return nil // the session left this server (moved to another node)
		}
		if now != cl {
			if _, subscribed := now.State.Subscriptions.Get(filter); !subscribed {
				return nil // clean start: the old session, and what it was owed, ended
			}
			return now
		}
		if !time.Now().Before(deadline) {
			s.Log.Warn("message for a session being taken over not delivered: the new client did not arrive in time",
				"client", cl.ID, "filter", filter)
			return nil
		}
		time.Sleep(time.Millisecond) // a takeover in progress: microseconds, and rare
	}
}

// stall marks cl stalled and releases everyone waiting for it.
func (s *Server) stall(cl *Client) {
	if cl.State.flow.stalled.CompareAndSwap(false, true) {
		s.Flow.Stalls.Add(1)
		s.Log.Debug("subscriber stalled: publishers no longer wait for it", "client", cl.ID,
			"inflight", cl.State.Inflight.size.Load(), "queued", cl.State.outbound.n.Load())
		cl.State.flow.wake(-1)
	}
}
