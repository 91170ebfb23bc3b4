// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: 2023 mochi-mqtt, mochi-co
// SPDX-FileContributor: mochi-co

package mqtt

import (
	"sort"
	"sync"
	"sync/atomic"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Inflight is a map of InflightMessage keyed on packet id.
type Inflight struct {
	sync.RWMutex
	internal            map[uint16]*packets.Packet // internal contains the inflight packets; rtm patch 80: pooled copies, see inflightPacketPool
	seq                 map[uint16]uint64          // rtm patch: arrival order of each packet in internal (nil until the first Set)
	lastSeq             uint64                     // rtm patch: the last sequence number given
	immediate           []inflightRef              // rtm patch: packets waiting for send quota (Expiry < 0), oldest first
	size                atomic.Int32               // rtm patch 20: len(internal), read without the lock by flow control
	bytes               atomic.Int64               // rtm patch 40: heldBytes of the packets in internal
	budget              *atomic.Int64              // rtm patch 41: the server's total of held bytes, or nil
	receiveQuota        int32                      // remaining inbound qos quota for flow control
	sendQuota           int32                      // remaining outbound qos quota for flow control
	maximumReceiveQuota int32                      // maximum allowed receive quota
	maximumSendQuota    int32                      // maximum allowed send quota
}

// inflightRef names one inflight packet: its id and its arrival sequence
// number, so a reused packet id is not mistaken for the packet it replaced.
// rtm patch.
type inflightRef struct {
	id  uint16
	seq uint64
}

// NewInflights returns a new instance of an Inflight packets map.
// rtm patch 107: its map is made by the first Set; most connections never
// have a QoS 1/2 message in flight, and an empty map costs 48 bytes each.
func NewInflights() *Inflight {
	return &Inflight{}
}

// Set adds or updates an inflight packet by packet id.
func (i *Inflight) Set(m packets.Packet) bool {
	i.Lock()
	defer i.Unlock()

	// rtm patch 80: the map holds pointers to pooled copies, updated in
	// place. v2.7.9 stored the ~800-byte Packet as the map's value, which a
	// Go map keeps out of line (values over 128 bytes): a heap allocation
	// for every QoS 1/2 message sent, and for every one received (the
	// PUBACK/PUBREC held while the message is delivered).
	slot, ok := i.internal[m.PacketID]
	d := heldBytes(&m) // rtm patch 40: an update (PUBLISH to PUBREL) replaces the bytes
	var prevExpiry int64
	if ok {
		d -= heldBytes(slot)
		prevExpiry = slot.Expiry
	} else {
		slot = inflightPacketPool.Get().(*packets.Packet)
		if i.internal == nil { // rtm patch 107
			i.internal = make(map[uint16]*packets.Packet)
		}
		i.internal[m.PacketID] = slot
	}
	*slot = m
	i.size.Store(int32(len(i.internal))) // rtm patch 20
	i.addBytes(d)

	// rtm patch: number packets in arrival order (an update keeps its
	// place), so GetAll, and with it the resend of a session's messages on
	// reconnect, keeps the order they were queued in [MQTT-4.6.0-1]; v2.7.9
	// sorted by Created, whole seconds, and returned packets of the same
	// second in map order. No upstream issue found.
	if !ok {
		if i.seq == nil {
			i.seq = map[uint16]uint64{}
		}
		i.lastSeq++
		i.seq[m.PacketID] = i.lastSeq
	}

	// rtm patch: remember packets waiting for send quota in arrival order, so
	// NextImmediate neither copies nor sorts the whole inflight map (which made
	// draining a backlog quadratic) and releases them in FIFO order.
	if m.Expiry < 0 && (!ok || prevExpiry >= 0) {
		i.immediate = append(i.immediate, inflightRef{id: m.PacketID, seq: i.seq[m.PacketID]})
	}

	return !ok
}

// Get returns an inflight packet by packet id.
func (i *Inflight) Get(id uint16) (packets.Packet, bool) {
	i.RLock()
	defer i.RUnlock()

	if m, ok := i.internal[id]; ok {
		return *m, true
	}

	return packets.Packet{}, false
}

// Len returns the size of the inflight messages map.
func (i *Inflight) Len() int {
	i.RLock()
	defer i.RUnlock()
	return len(i.internal)
}

// hasExpired reports whether any inflight message has expired (see
// Client.ClearExpiredInflights), without copying them.
// rtm patch: the event loop calls it every second for every client; see
// PATCHES.md, patch 13.
func (i *Inflight) hasExpired(now, maximumExpiry int64) bool {
	i.RLock()
	defer i.RUnlock()
	for _, tk := range i.internal {
		if inflightExpired(tk, now, maximumExpiry) {
			return true
		}
	}
	return false
}

// Clone returns a new instance of Inflight with the same message data.
// This is used when transferring inflights from a taken-over session.
func (i *Inflight) Clone() *Inflight {
	c := NewInflights()
	i.RLock()
	defer i.RUnlock()
	if len(i.internal) > 0 { // rtm patch 107
		c.internal = make(map[uint16]*packets.Packet, len(i.internal))
	}
	for k, v := range i.internal {
		cp := inflightPacketPool.Get().(*packets.Packet) // rtm patch 80: never share a pooled slot
		*cp = *v
		c.internal[k] = cp
	}
	// rtm patch: the clone keeps the arrival order.
	if i.seq != nil {
		c.seq = make(map[uint16]uint64, len(i.seq))
		for k, v := range i.seq {
			c.seq[k] = v
		}
	}
	c.lastSeq = i.lastSeq
	c.size.Store(int32(len(c.internal))) // rtm patch 20
	// rtm patch 41: the clone holds the bytes too (counted in the total
	// until the original is cleared, as inheritClientSession does next).
	c.budget = i.budget
	c.addBytes(i.bytes.Load())
	c.immediate = append([]inflightRef(nil), i.immediate...)
	return c
}

// GetAll returns all the inflight messages.
// rtm patch: oldest first, in the order they were added (see Set); v2.7.9
// sorted by uint16(Created), which left packets of the same second in random
// map order (and wrapped every 18 hours).
func (i *Inflight) GetAll(immediate bool) []packets.Packet {
	i.RLock()
	defer i.RUnlock()

	m := []packets.Packet{}
	for _, v := range i.internal {
		if !immediate || (immediate && v.Expiry < 0) {
			m = append(m, *v)
		}
	}

	sort.Slice(m, func(a, b int) bool {
		return i.seq[m[a].PacketID] < i.seq[m[b].PacketID]
	})

	return m
}

// NextImmediate returns the next inflight packet which is indicated to be sent immediately.
// This typically occurs when the quota has been exhausted, and we need to wait until new quota
// is free to continue sending.
//
// rtm patch: it takes the oldest packet waiting for quota and marks it as sent
// (Expiry 0): the packet stays inflight until its PUBACK/PUBCOMP, which returns
// the send quota. Two goroutines never get the same packet. It takes the lock
// once: v2.7.9 read-locked here and again in GetAll, which deadlocks as soon as
// a writer (Set/Delete) waits in between. The returned packet is the one that
// was queued (Expiry -1).
// https://github.com/mochi-mqtt/server/issues/488 (same bug class)
func (i *Inflight) NextImmediate() (packets.Packet, bool) {
	i.Lock()
	defer i.Unlock()

	for len(i.immediate) > 0 {
		ref := i.immediate[0]
		i.immediate = i.immediate[1:]
		if slot, ok := i.internal[ref.id]; ok && slot.Expiry < 0 && i.seq[ref.id] == ref.seq {
			m := *slot
			slot.Expiry = 0
			if len(i.immediate) == 0 {
				i.immediate = nil // release the backing array
			}
			return m, true
		}
	}
	i.immediate = nil

	return packets.Packet{}, false
}

// Delete removes an in-flight message from the map. Returns true if the message existed.
func (i *Inflight) Delete(id uint16) bool {
	i.Lock()
	defer i.Unlock()

	prev, ok := i.internal[id]
	delete(i.internal, id)
	delete(i.seq, id)                    // rtm patch
	i.size.Store(int32(len(i.internal))) // rtm patch 20
	if ok {
		i.addBytes(-heldBytes(prev)) // rtm patch 40
		*prev = packets.Packet{}     // rtm patch 80: drop its references, then reuse it
		inflightPacketPool.Put(prev)
	}

	return ok
}

// TakeRecieveQuota reduces the receive quota by 1.
func (i *Inflight) DecreaseReceiveQuota() {
	if atomic.LoadInt32(&i.receiveQuota) > 0 {
		atomic.AddInt32(&i.receiveQuota, -1)
	}
}

// TakeRecieveQuota increases the receive quota by 1.
func (i *Inflight) IncreaseReceiveQuota() {
	if atomic.LoadInt32(&i.receiveQuota) < atomic.LoadInt32(&i.maximumReceiveQuota) {
		atomic.AddInt32(&i.receiveQuota, 1)
	}
}

// ResetReceiveQuota resets the receive quota to the maximum allowed value.
func (i *Inflight) ResetReceiveQuota(n int32) {
	atomic.StoreInt32(&i.receiveQuota, n)
	atomic.StoreInt32(&i.maximumReceiveQuota, n)
}

// DecreaseSendQuota reduces the send quota by 1.
func (i *Inflight) DecreaseSendQuota() {
	_ = i.TakeSendQuota()
}

// TakeSendQuota takes one unit of send quota and reports whether there was any.
// rtm patch: check-and-decrement is one atomic step; v2.7.9's load-then-add let
// concurrent publishers and acks drive the quota below zero or lose a unit,
// which stalls a Receive Maximum client for good.
func (i *Inflight) TakeSendQuota() bool {
	for {
		q := atomic.LoadInt32(&i.sendQuota)
		if q <= 0 {
			return false
		}
		if atomic.CompareAndSwapInt32(&i.sendQuota, q, q-1) {
			return true
		}
	}
}

// IncreaseSendQuota increases the send quota by 1.
func (i *Inflight) IncreaseSendQuota() {
	for { // rtm patch: atomic check-and-increment, see TakeSendQuota
		q := atomic.LoadInt32(&i.sendQuota)
		if q >= atomic.LoadInt32(&i.maximumSendQuota) {
			return
		}
		if atomic.CompareAndSwapInt32(&i.sendQuota, q, q+1) {
			return
		}
	}
}

// ResetSendQuota resets the send quota to the maximum allowed value.
func (i *Inflight) ResetSendQuota(n int32) {
	atomic.StoreInt32(&i.sendQuota, n)
	atomic.StoreInt32(&i.maximumSendQuota, n)
}

// addBytes changes the bytes held by i, and the server's total with them.
// rtm patches 40, 41.
func (i *Inflight) addBytes(d int64) {
	if d == 0 {
		return
	}
	i.bytes.Add(d)
	if i.budget != nil {
		i.budget.Add(d)
	}
}

// inflightPacketPool holds the packets an Inflight map points to, cleared;
// a packet goes back once deleted from the map, which held the only
// pointer to it (Get, GetAll and NextImmediate return copies).
// rtm patch 80.
var inflightPacketPool = sync.Pool{New: func() any { return new(packets.Packet) }}
