package broker

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rtm-dev/rtm/broker/link"
)

// A publisher's acknowledgement across a held link (docs/clustering.md,
// "A PUBACK means durable").
//
// With durability, a QoS 1/2 message forwarded to a peer is acknowledged
// to its publisher once the peer acknowledged it on the link (settledWait).
// A message on the link of a peer gossip declared failed (held: queued
// before or during the hold, and not acknowledged) is not safe anywhere
// yet: it sits in this node's memory until the failover hands the held
// queue on to the nodes that adopted the peer's sessions (resendHeld:
// the release, or a hand-over when the peer comes back). So the
// acknowledgement follows it there: each hand-over records, for every
// message of the held link it sent on, the copies it queued on other links
// and whether it delivered it to sessions adopted here (handOvers); the
// wait goes on with those copies (which may in turn be held, should their
// node fail too) and, for a local delivery, with the store barrier of its
// writes. A hand-over that could not queue a copy fails the wait (the
// publisher's connection is closed without the acknowledgement, and it
// publishes again); so does this node stopping before it handed the
// message over, or the bound (ackWait).

// handOvers records where hand-overs of held links sent the messages they
// held, by the held link's mark of each (linkMark, follow unset), for the
// acknowledgements that wait on them. An entry lasts handOverKeep: a
// waiter older than that has given up. The mutex is a leaf.
type handOvers struct {
	n       atomic.Int32 // len(by): waiters skip the lock at 0
	mu      sync.Mutex
	batch   uint64
	by      map[linkMark]handedTo
	changed chan struct{} // closed and cleared at each add; made only while someone waits
}

// handedTo is where a hand-over sent one held message.
type handedTo struct {
	copies []linkMark  // queued on these links (each followed)
	local  func() bool // delivered here: the store barrier of its writes (nil: no adopted session here)
	lost   bool        // a copy could not be queued, or the hold expired (counted as dropped)
	// always: the copies stand for the message whatever its fate on the
	// held link (re-sent by its own forward: the link may deliver it to
	// the peer as well, no longer held); else they count only for a
	// message held there (a discard of a live peer's restart re-sends
	// what it held nothing of: lost).
	always bool
	batch  uint64 // the add that recorded it
}

// merge returns the record of a message handed over as t and then as u:
// every copy of both, each local delivery's writes, lost if either lost
// one, always if either stands for the message whatever its fate. The
// batch is u's.
func (t handedTo) merge(u handedTo) handedTo {
	u.copies = append(slices.Clip(t.copies), u.copies...)
	switch tl, ul := t.local, u.local; {
	case tl != nil && ul != nil:
		u.local = func() bool { return tl() && ul() }
	case tl != nil:
		u.local = tl
	}
	u.lost = u.lost || t.lost
	u.always = u.always || t.always
	return u
}

// handOverRecord is one message's hand-over, for add.
type handOverRecord struct {
	src linkMark // the held link and the message's seq on it
	to  handedTo
}

// add records a hand-over's messages and wakes the waiters. keep is how
// long the records last.
func (h *handOvers) add(recs []handOverRecord, keep time.Duration) {
	if len(recs) == 0 {
		return
	}
	h.mu.Lock()
	if h.by == nil {
		h.by = map[linkMark]handedTo{}
	}
	h.batch++
	batch := h.batch
	for _, r := range recs {
		r.to.batch = batch
		if old, ok := h.by[r.src]; ok {
			// Handed over twice (a hand-over, then the message's own
			// forward re-sending it): the wait follows every copy, or
			// one hand-over's copy for the adopter would be left out
			// (review rv12a).
			r.to = old.merge(r.to)
		}
		h.by[r.src] = r.to
	}
	h.n.Store(int32(len(h.by)))
	if h.changed != nil {
		close(h.changed)
		h.changed = nil
	}
	h.mu.Unlock()
	time.AfterFunc(keep, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, r := range recs {
			if to, ok := h.by[r.src]; ok && to.batch == batch {
				delete(h.by, r.src)
			}
		}
		h.n.Store(int32(len(h.by)))
	})
}

// get returns where the held message m was handed to. If it was not (yet),
// it returns a channel closed at the next add.
func (h *handOvers) get(m linkMark) (handedTo, bool, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if to, ok := h.by[linkMark{l: m.l, seq: m.seq}]; ok {
		return to, true, nil
	}
	if h.changed == nil {
		h.changed = make(chan struct{})
	}
	return handedTo{}, false, h.changed
}

// handOverKeep is how long a hand-over's records last: past the longest
// wait of an acknowledgement (ackWait: two bounds).
func (c *clusterNode) handOverKeep() time.Duration {
	return 2*time.Duration(c.peerAckWait.Load()) + time.Second
}

// ackWait is one publisher acknowledgement's wait for its marks.
//
// Its bound is peerAckWait from the first mark not settled at once (a peer
// alive in gossip that neither acknowledges nor fails), extended once by as
// much when a mark turns out held: the first part covers failure detection
// (about 6 s by default) for a message queued before the verdict, the
// second the adoption of the failed node's sessions, the hand-over and the
// adopters' acknowledgements of the copies. Past it the publisher gets no
// acknowledgement (its connection is closed) and publishes again.
//
// The bound counts from the PUBLISH (start), not from when the wait runs:
// a client's waits run one at a time, in order (mochi patch 54), so one
// may start late, behind slow earlier ones; counted from the PUBLISH, no
// wait outlives the hand-over records it may need (handOverKeep, counted
// from a hand-over, which comes after the PUBLISH), where a late wait
// found none and took a peer's acknowledgement after the hold for the
// message's safety (review rv12a). A zero start counts from the wait.
type ackWait struct {
	c        *clusterNode
	done     <-chan struct{} // the publisher's connection ended
	start    time.Time       // the PUBLISH
	timer    *time.Timer
	extended bool
}

// boundTimer returns a timer for n bounds from start.
func (w *ackWait) boundTimer(n int) *time.Timer {
	d := time.Duration(n) * time.Duration(w.c.peerAckWait.Load())
	if !w.start.IsZero() {
		d -= time.Since(w.start)
	}
	return time.NewTimer(max(d, 0))
}

func (w *ackWait) stop() {
	if w.timer != nil {
		w.timer.Stop()
	}
}

// arm starts the bound, if not yet.
func (w *ackWait) arm() {
	if w.timer == nil {
		w.timer = w.boundTimer(1)
	}
}

// extend restarts the bound, once: a mark turned out held.
func (w *ackWait) extend() {
	if w.extended {
		return
	}
	w.extended = true
	if w.timer != nil {
		w.timer.Stop()
	}
	n := 1
	if !w.start.IsZero() {
		n = 2 // the first bound counts from the PUBLISH too
	}
	w.timer = w.boundTimer(n)
}

// block waits for ch (nil: never ready) or ends the wait with an error: the
// publisher gone, the node stopping, the bound.
func (w *ackWait) block(ch, ch2 <-chan struct{}) error {
	select {
	case <-ch:
	case <-ch2:
	case <-w.done:
		return errPublisherGone
	case <-w.c.stop:
		return errNodeStopping
	case <-w.timer.C:
		return errPeerAckSlow
	}
	return nil
}

// await waits until the message m is safe: acknowledged by its peer, or,
// held, safe wherever the hand-over sent it (handed). A message m of a
// relay (follow unset) counts as settled once held, as the failover hands
// on only publishes.
func (w *ackWait) await(m linkMark) error {
	c := w.c
	for {
		if m.follow && c.handOvers.n.Load() > 0 {
			if to, ok, _ := c.handOvers.get(m); ok && to.always {
				return w.handed(to)
			}
		}
		f, held, ch := m.l.Fate(m.seq)
		switch f {
		case link.FateAcked:
			if held && m.follow && !w.start.IsZero() &&
				time.Since(w.start) >= 2*time.Duration(c.peerAckWait.Load()) {
				// Past its bound, and a hand-over's record of it may be
				// gone (they last handOverKeep from the hand-over, which
				// came after the PUBLISH): the acknowledgement after the
				// hold cannot be told safe (review rv12a).
				return errPeerAckSlow
			}
			if held && m.follow && c.handOvers.n.Load() > 0 {
				// Acknowledged after the hold began (written to the
				// same process once the hand-over gave the adopters
				// their copies, which are what counts): the record,
				// made before the link wrote it, says.
				if to, ok, _ := c.handOvers.get(m); ok {
					return w.handed(to)
				}
			}
			return nil
		case link.FateLost:
			// Counted as dropped by the link's discard; the publisher,
			// told nothing, publishes it again.
			return errForwardLost
		case link.FateHeld:
			if !m.follow {
				return nil
			}
			w.extend()
			to, ok, added := c.handOvers.get(m)
			if ok {
				return w.handed(to)
			}
			if err := w.block(ch, added); err != nil {
				return err
			}
		default:
			w.arm()
			if err := w.block(ch, nil); err != nil {
				return err
			}
		}
	}
}

// handed waits until the copies a hand-over made of a held message are
// safe: each acknowledged by its peer (or, held in turn, handed on), and
// the local delivery's writes committed.
func (w *ackWait) handed(to handedTo) error {
	if to.lost {
		return errForwardLost
	}
	for _, m := range to.copies {
		if err := w.await(m); err != nil {
			return err
		}
	}
	if to.local == nil {
		return nil
	}
	w.arm()
	for !to.local() { // each call waits at most durableBarrierMax
		select {
		case <-w.done:
			return errPublisherGone
		case <-w.c.stop:
			return errNodeStopping
		case <-w.timer.C:
			return errPeerAckSlow
		default:
		}
	}
	return nil
}
