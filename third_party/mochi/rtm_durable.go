// rtm patches 53 and 54: entry points for durable sessions (rtm writes
// sessions to a store and restores them after a restart or on another
// server). No upstream issue: mochi's storage hooks write synchronously
// from the hooks and acknowledge a PUBLISH before anything is stored.

package mqtt

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// ScheduleWill arranges for the will of client id, as AdoptSession restores
// it, to be published once the Unix time at has passed (at most one event
// loop tick late), unless a client with that ID connects first, exactly as
// a will delayed by its Will Delay Interval [MQTT-3.1.3-9]. at in the past
// publishes it at the next tick. The will is reported to OnWillSent like any
// other, and retained if it says so.
// rtm patch 53.
func (s *Server) ScheduleWill(id string, will Will, at int64) {
	if will.Flag == 0 {
		return
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: will.Retain, Qos: will.Qos},
		TopicName:   will.TopicName,
		Payload:     will.Payload,
		Properties:  packets.Properties{User: will.User},
		Origin:      id,
		Created:     time.Now().Unix(),
		Expiry:      at - 1, // sendDelayedLWT sends once now > Expiry
	}
	pk.Connect.WillProperties.WillDelayInterval = will.WillDelayInterval
	s.loop.willDelayed.Add(id, pk)
}

// SetStopTime sets the time an offline session's client disconnected (Unix
// seconds), from which its session expiry counts: a session restored from a
// store keeps the time it went offline instead of starting anew.
// rtm patch 53.
func (cl *Client) SetStopTime(t int64) {
	if t > 0 && cl.StopTime() != 0 {
		atomic.StoreInt64(&cl.State.disconnected, t)
	}
}

// heldAcks are the PUBACKs/PUBRECs of a client's PUBLISHes that wait for an
// OnPublishHold hook (e.g. until the message is written to a store), and
// those behind them: acknowledgements go out in the order the PUBLISHes
// arrived [MQTT-4.6.0-2] [MQTT-4.6.0-3], from one goroutine per client
// while any are held, so the client's read loop goes on meanwhile.
// rtm patch 54.
type heldAcks struct {
	mu      sync.Mutex
	q       []heldAck
	running bool
	qos2    atomic.Pointer[qos2Acks] // rtm patch 123: the session's QoS 2 PUBRECs not known to be owed

	// rtm patch 131: held QoS 1 acknowledgements whose unit of receive
	// quota is not given back yet, and the channel that wakes the read
	// loop waiting for one (awaitReceiveQuota; under mu).
	qos1      atomic.Int32
	quotaWake chan struct{}
}

type heldAck struct {
	ack  packets.Packet
	qos  byte
	wait func() error
	out  *ackOutcome // rtm patch 123: a QoS 2 PUBREC's outcome (qos2Begin)
}

// holdAck answers a QoS 1/2 PUBLISH whose acknowledgement ack must wait for
// wait (nil: only for those before it). It reports false when nothing is
// held and wait is nil: the caller acknowledges at once as before.
// out (QoS 2) is settled when the acknowledgement is released or fails.
// rtm patch 54.
func (s *Server) holdAck(cl *Client, ack packets.Packet, qos byte, wait func() error, out *ackOutcome) bool {
	h := &cl.State.acks
	h.mu.Lock()
	if wait == nil && len(h.q) == 0 && !h.running {
		h.mu.Unlock()
		return false
	}
	if qos == 1 {
		h.qos1.Add(1) // rtm patch 131
	}
	h.q = append(h.q, heldAck{ack: ack, qos: qos, wait: wait, out: out})
	start := !h.running
	h.running = true
	h.mu.Unlock()
	if start {
		go s.releaseAcks(cl)
	}
	return true
}

// releaseAcks writes cl's held acknowledgements in order, each once its wait
// returns. A wait that fails (the write will not happen, e.g. the server is
// stopping) closes the connection without that acknowledgement or any
// after it: the client sends those PUBLISHes again (QoS 1/2 allow the
// duplicate a subscriber may then get) instead of being told they are safe.
func (s *Server) releaseAcks(cl *Client) {
	h := &cl.State.acks
	failed := false
	for {
		h.mu.Lock()
		if len(h.q) == 0 {
			h.running = false
			h.mu.Unlock()
			return
		}
		a := h.q[0]
		h.q[0] = heldAck{}
		h.q = h.q[1:]
		h.mu.Unlock()

		if !failed && a.wait != nil {
			if err := a.wait(); err != nil {
				failed = true
				s.Log.Warn("publish not acknowledged: not made durable", "client", cl.ID, "error", err)
				cl.Stop(err)
			}
		}
		// rtm patch 54: the QoS 1 completion goes before the PUBACK is
		// written: a client that reads it may send its next PUBLISH at
		// once, and that one must find the receive quota released, or it
		// is refused "receive maximum exceeded" (0x93).
		if a.qos == 1 {
			if ok := cl.inboundQos().Delete(a.ack.PacketID); ok { // rtm patch 94
				atomic.AddInt64(&s.Info.Inflight, -1)
			}
			cl.State.Inflight.IncreaseReceiveQuota()
			h.quotaReturned() // rtm patch 131: after the unit is back
		}
		// rtm patch 123: a QoS 2 PUBREC not sent leaves no flow behind:
		// the client's PUBLISH was never acknowledged, so when it is sent
		// again (DUP, after a reconnect) it is published and held anew,
		// not answered from the session as if it had been. Before, the
		// flow stayed, and the reconnect resent the PUBREC, or the resent
		// PUBLISH got one at once, for a message a peer may never get.
		// A success is settled before the PUBREC is written, so the
		// session answers a resend from then on.
		if a.qos == 2 {
			if failed {
				if ok := cl.inboundQos().Delete(a.ack.PacketID); ok {
					atomic.AddInt64(&s.Info.Inflight, -1)
				}
			}
			qos2Settle(a.ack.PacketID, a.out, !failed)
		}
		if !failed {
			_ = cl.WritePacket(a.ack)
			if a.qos == 1 {
				s.hooks.OnQosComplete(cl, a.ack)
			}
		}
	}
}
