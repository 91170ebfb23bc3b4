// SPDX-License-Identifier: MIT
// rtm patch 94: the client's inbound QoS state apart from its outbound
// messages. See PATCHES.md.

package mqtt

import (
	"sync/atomic"

	"github.com/mochi-mqtt/server/v2/packets"
)

// inboundQos returns the client's inbound QoS state, creating it on first
// use: the acknowledgements of the client's own QoS 1/2 PUBLISHes (a PUBACK
// not yet written, a PUBREC awaiting the client's PUBREL), keyed by the
// client's packet identifiers.
//
// rtm patch 94: v2.7.9 kept them in State.Inflight, keyed by packet id like
// the server's outbound messages, though packet identifiers are separate
// per direction: a client's PUBLISH with the id of an outbound message the
// client had not acknowledged yet deleted that message ([MQTT-4.3.2-5]
// applied to the wrong direction) or overwrote it with its PUBACK/PUBREC,
// and a device that both publishes and subscribes at QoS 1 (both sides
// count from 1) lost the message: never resent, no hook told. Only the
// quotas stay on State.Inflight (they were shared in v2.7.9 too).
func (cl *Client) inboundQos() *Inflight {
	if in := cl.State.inbound.Load(); in != nil {
		return in
	}
	in := NewInflights()
	if cl.State.inbound.CompareAndSwap(nil, in) {
		return in
	}
	return cl.State.inbound.Load()
}

// inboundLen returns the number of inbound QoS flows in progress.
// rtm patch 94.
func (cl *Client) inboundLen() int {
	if in := cl.State.inbound.Load(); in != nil {
		return in.Len()
	}
	return 0
}

// clearInbound forgets the inbound QoS flows (the client's session ends or
// moves). No hook is told: they hold no message of a subscriber's, the
// message was delivered when its PUBLISH arrived. rtm patch 94.
func (cl *Client) clearInbound() {
	in := cl.State.inbound.Load()
	if in == nil {
		return
	}
	for _, tk := range in.GetAll(false) {
		if in.Delete(tk.PacketID) {
			atomic.AddInt64(&cl.ops.info.Inflight, -1)
		}
	}
}

// inboundPending returns the inbound flows resent on a reconnect (as
// v2.7.9 resent them from State.Inflight). rtm patch 94.
func (cl *Client) inboundPending() []packets.Packet {
	if in := cl.State.inbound.Load(); in != nil && in.Len() > 0 {
		return in.GetAll(false)
	}
	return nil
}

// inboundHas reports whether the client has a flow in progress with
// packet id id (without creating the state). rtm patch 94.
func (cl *Client) inboundHas(id uint16) bool {
	if in := cl.State.inbound.Load(); in != nil {
		_, ok := in.Get(id)
		return ok
	}
	return false
}

// inheritInbound gives cl, which takes a session over, the session's
// inbound QoS flows in (its previous connection's) but no PUBACK: a QoS 1
// PUBACK still in the flows was not written yet, maybe held by an
// OnPublishHold hook (patch 54) until the message is safe (rtm: stored,
// acknowledged by the peers), and cl's resend would send it at once, the
// client told its message is safe before the hold said so. Without its
// flow, the client sends the PUBLISH again (it was never acknowledged on
// this connection [MQTT-4.4.0-1]) and it is handled, and held, as a new
// one: a duplicate, which QoS 1 allows. The flows kept count in
// Info.Inflight for cl (the previous connection's ClearInflights takes
// them off). rtm patch 125.
func (cl *Client) inheritInbound(in *Inflight) {
	c := in.Clone()
	for _, pk := range c.GetAll(false) {
		if pk.FixedHeader.Type == packets.Puback {
			c.Delete(pk.PacketID)
		}
	}
	if n := c.Len(); n > 0 {
		cl.State.inbound.Store(c)
		atomic.AddInt64(&cl.ops.info.Inflight, int64(n))
	}
}
