// SPDX-License-Identifier: MIT
// rtm patch 123: a client's QoS 2 PUBLISH whose PUBREC an OnPublishHold
// hook holds is not answered from its session before the hold succeeded.
// See PATCHES.md.

package mqtt

import (
	"errors"
	"sync"
	"sync/atomic"

	"github.com/mochi-mqtt/server/v2/packets"
)

// errHeldAckFailed fails the PUBREC of a QoS 2 PUBLISH sent again (DUP)
// while the first one's acknowledgement was held, when that hold failed:
// the connection closes without it, and the client's next resend is
// handled as a new PUBLISH. rtm patch 123.
var errHeldAckFailed = errors.New("the held acknowledgement of the first PUBLISH with this packet ID failed")

// ackOutcome is what became of the acknowledgement of a client's QoS 2
// PUBLISH (its PUBREC): known once settled; ok says the PUBREC was
// released to be written (its hold, if any, succeeded). Its fields are
// guarded by its session's qos2Acks.mu (q). rtm patch 123.
type ackOutcome struct {
	q       *qos2Acks
	done    chan struct{} // made by a waiter (wait), closed when settled
	settled bool
	ok      bool
}

// state reports whether the outcome is known, and whether it was a
// success. q.mu is held.
func (o *ackOutcome) state() (known, ok bool) { return o.settled, o.ok }

// wait returns a channel closed once the outcome is known (made here: most
// outcomes settle with nobody waiting, and cost no channel).
func (o *ackOutcome) wait() <-chan struct{} {
	o.q.mu.Lock()
	defer o.q.mu.Unlock()
	if o.done == nil {
		o.done = make(chan struct{})
		if o.settled {
			close(o.done)
		}
	}
	return o.done
}

// succeeded reports whether the outcome, known, was a success.
func (o *ackOutcome) succeeded() bool {
	o.q.mu.Lock()
	defer o.q.mu.Unlock()
	return o.ok
}

// qos2Acks are the PUBRECs of a session's QoS 2 PUBLISHes that are not
// known to be owed: held (or about to be) by an OnPublishHold hook, or
// whose hold failed, keyed by the client's packet ID. A PUBREC released
// with success leaves the map (its inbound flow is then an ordinary one).
// The map belongs to the session: a connection that takes the session
// over shares it with the one it took over, whose held acknowledgements
// settle after the take-over. rtm patch 123.
type qos2Acks struct {
	mu sync.Mutex
	m  map[uint16]*ackOutcome
}

// qos2 returns cl's session's qos2Acks, making it at first use.
func (cl *Client) qos2() *qos2Acks {
	if q := cl.State.acks.qos2.Load(); q != nil {
		return q
	}
	q := &qos2Acks{}
	if cl.State.acks.qos2.CompareAndSwap(nil, q) {
		return q
	}
	return cl.State.acks.qos2.Load()
}

// qos2Begin records that the PUBREC of cl's QoS 2 PUBLISH id is not owed
// yet. Called before the inbound flow is set, so a connection that takes
// the session over and inherits the flow finds its outcome too.
func (cl *Client) qos2Begin(id uint16) *ackOutcome {
	q := cl.qos2()
	o := &ackOutcome{q: q}
	q.mu.Lock()
	if q.m == nil {
		q.m = make(map[uint16]*ackOutcome)
	}
	q.m[id] = o
	q.mu.Unlock()
	return o
}

// qos2Settle records o's outcome. A success forgets it (the PUBREC is
// owed from now on); a failure stays until the flow is found by a later
// PUBLISH or resend of the session (qos2Pending), which drops it.
func qos2Settle(id uint16, o *ackOutcome, ok bool) {
	if o == nil {
		return
	}
	q := o.q
	q.mu.Lock()
	o.settled, o.ok = true, ok
	if o.done != nil {
		close(o.done)
	}
	if ok && q.m[id] == o {
		delete(q.m, id)
	}
	q.mu.Unlock()
}

// qos2Pending returns the outcome of the PUBREC of cl's inbound QoS 2 flow
// id when it is not known to be owed (nil: owed, answer it as any). A
// failed one is forgotten here, and the inbound flow dropped: the PUBLISH
// was never acknowledged, so one sent again is a new one.
func (cl *Client) qos2Pending(in *Inflight, id uint16) (o *ackOutcome, failed bool) {
	q := cl.State.acks.qos2.Load()
	if q == nil {
		return nil, false
	}
	q.mu.Lock()
	o = q.m[id]
	if o == nil {
		q.mu.Unlock()
		return nil, false
	}
	known, ok := o.state()
	if known {
		delete(q.m, id)
	}
	q.mu.Unlock()
	if !known {
		return o, false
	}
	if ok {
		return nil, false
	}
	if in.Delete(id) {
		atomic.AddInt64(&cl.ops.info.Inflight, -1)
	}
	return nil, true
}

// inboundResend returns the inbound flows a reconnecting client is sent
// again: a PUBREC owed (released, or never held) and a PUBCOMP, but no
// PUBREC whose hold has not succeeded (the client sends its PUBLISH again
// and that is answered once the hold is known, answerWhenSettled; a failed
// one is dropped) and no PUBACK (a QoS 1 acknowledgement still held, or
// being written, when the session was taken over: the client sends the
// PUBLISH again, a duplicate QoS 1 allows). v2.7.9 resent them all, which
// was right while acknowledgements were written at once.
func (cl *Client) inboundResend() []packets.Packet {
	in := cl.State.inbound.Load()
	list := cl.inboundPending()
	out := list[:0]
	for _, pk := range list {
		switch pk.FixedHeader.Type {
		case packets.Puback:
			if in.Delete(pk.PacketID) {
				atomic.AddInt64(&cl.ops.info.Inflight, -1)
			}
			continue
		case packets.Pubrec:
			if o, failed := cl.qos2Pending(in, pk.PacketID); o != nil || failed {
				continue
			}
		}
		out = append(out, pk)
	}
	return out
}

// answerWhenSettled answers a QoS 2 PUBLISH sent again under the packet ID
// of one whose PUBREC is still held (by this connection, or by the one
// this connection took over): the PUBREC waits, in order with the others,
// for the first one's outcome, and is sent only if that succeeded; if it
// failed, this connection closes without it too (the flow is dropped, so
// the client's next resend is published as a new message).
func (s *Server) answerWhenSettled(cl *Client, pk *packets.Packet, o *ackOutcome) {
	ack := s.buildAck(pk.PacketID, packets.Pubrec, 0, pk.Properties, packets.CodeSuccess)
	done := o.wait()
	s.holdAck(cl, ack, 2, func() error {
		<-done
		if !o.succeeded() {
			return errHeldAckFailed
		}
		return nil
	}, cl.qos2Begin(pk.PacketID))
}
