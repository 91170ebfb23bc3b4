// SPDX-License-Identifier: MIT
// rtm patch: on-demand outbound queue, see PATCHES.md.

package mqtt

import (
	"sync"
	"sync/atomic"

	"github.com/mochi-mqtt/server/v2/packets"
)

// outboundQueueKeep is the largest backing array (in packets) an outbound
// queue keeps once drained; larger ones are released, so a client that had a
// burst goes back to costing (almost) nothing, while a client that receives a
// message now and then does not allocate a new array per message.
const outboundQueueKeep = 16

// outboundQueue is the FIFO of packets waiting for a client's writer.
//
// rtm patch: it replaces `make(chan *packets.Packet, MaximumClientWritesPending)`,
// which cost 8 bytes per slot (64 KiB per connection with the default 8192)
// even when idle. The queue holds no array until a packet is queued, grows by
// doubling up to limit, and releases its array when drained. push fails when
// limit packets are pending, exactly when the channel send used to fail.
//
// It also decides when a writer goroutine runs: v2.7.9 kept one per
// connection (WriteLoop) waiting on the channel, a 4 KiB stack (and a
// goroutine) per idle connection. Now the push that finds no writer running
// asks its caller to start one (Client.writeQueued), which writes until it
// finds the queue empty and exits. Both decisions are taken under mu, so
// there is at most one writer, packets are written in FIFO order, and no
// queued packet is left without a writer.
type outboundQueue struct {
	mu      sync.Mutex
	buf     []*packets.Packet // ring buffer, nil until needed
	head    int               // index of the oldest packet in buf
	n       atomic.Int32      // number of queued packets; written under mu
	limit   int32             // maximum number of queued packets
	writing bool              // a writer is draining the queue
	bytes   atomic.Int64      // rtm patch 40: heldBytes of the queued QoS 0 packets (QoS 1/2 count in the session)
	budget  *atomic.Int64     // rtm patch 41: the server's total of held bytes, or nil
	writer  func()            // rtm patch 96: the client's writeQueued, made once (see startWriter)
}

func newOutboundQueue(limit int32) outboundQueue {
	return outboundQueue{limit: limit}
}

// push appends pk. It returns ok false, queueing nothing, if limit packets
// are already pending. It returns start true if no writer is running: one is
// then counted as running, and the caller must start it.
func (q *outboundQueue) push(pk *packets.Packet) (ok, start bool) {
	q.mu.Lock()
	n := int(q.n.Load())
	if n >= int(q.limit) {
		q.mu.Unlock()
		return false, false
	}
	if n == len(q.buf) {
		q.grow()
	}
	i := q.head + n
	if i >= len(q.buf) {
		i -= len(q.buf)
	}
	q.buf[i] = pk
	q.n.Store(int32(n + 1))
	q.addBytes(pk, 1) // rtm patch 40
	start = !q.writing
	q.writing = true
	q.mu.Unlock()
	return true, start
}

// claim counts a writer as running, unless one is; it reports whether the
// caller is now the writer.
func (q *outboundQueue) claim() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.writing {
		return false
	}
	q.writing = true
	return true
}

// release ends a claim that wrote nothing: it returns start true if
// packets were queued meanwhile, and the caller must then run the writer.
// rtm patch 95.
func (q *outboundQueue) release() (start bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n.Load() == 0 {
		q.writing = false
		return false
	}
	return true
}

// grow doubles the ring (at least 4, at most limit), keeping the order.
func (q *outboundQueue) grow() {
	size := 2 * len(q.buf)
	if size < 4 {
		size = 4
	}
	if size > int(q.limit) {
		size = int(q.limit)
	}
	buf := make([]*packets.Packet, size)
	n := copy(buf, q.buf[q.head:])
	copy(buf[n:], q.buf[:q.head])
	q.buf = buf
	q.head = 0
}

// pop removes and returns the oldest packet. If the queue is empty it
// returns false and counts the writer as stopped: the caller, the writer,
// must exit (the next push starts a new one).
func (q *outboundQueue) pop() (*packets.Packet, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()

	n := int(q.n.Load())
	if n == 0 {
		q.writing = false
		return nil, false
	}
	pk := q.buf[q.head]
	q.buf[q.head] = nil // let the packet be collected once written
	q.head++
	if q.head == len(q.buf) {
		q.head = 0
	}
	n--
	q.n.Store(int32(n))
	if n == 0 {
		q.head = 0
		if len(q.buf) > outboundQueueKeep {
			q.buf = nil // drained after a burst: release the array
		}
	}
	return pk, true
}

// len returns the number of queued packets.
func (q *outboundQueue) len() int {
	return int(q.n.Load())
}

// queuedBytes returns the bytes addBytes counted for pk when it was queued,
// for releaseBytes once it is written (writePacket may change pk meanwhile:
// an OnPacketEncode hook can rewrite it). rtm patch 83.
func (q *outboundQueue) queuedBytes(pk *packets.Packet) int64 {
	if pk.FixedHeader.Qos != 0 {
		return 0
	}
	return heldBytes(pk)
}

// releaseBytes releases n bytes counted by addBytes. rtm patch 83.
func (q *outboundQueue) releaseBytes(n int64) {
	if n != 0 {
		q.bytes.Add(-n)
		if q.budget != nil {
			q.budget.Add(-n)
		}
	}
}

// addBytes counts (sign 1) or releases (sign -1) a QoS 0 packet's bytes: the
// writer releases them once the packet is written. rtm patches 40, 41.
func (q *outboundQueue) addBytes(pk *packets.Packet, sign int64) {
	if pk.FixedHeader.Qos != 0 {
		return
	}
	if d := sign * heldBytes(pk); d != 0 {
		q.bytes.Add(d)
		if q.budget != nil {
			q.budget.Add(d)
		}
	}
}

// queuedPacketPool holds the packets publishToClient queues for a client's
// writer (rtm patch 72): the writer returns each one once it is written.
var queuedPacketPool = sync.Pool{New: func() any { return new(packets.Packet) }}

// releaseQueuedPacket clears pk (so the pool holds no payload) and returns
// it to queuedPacketPool. The caller must hold the only reference to it.
func releaseQueuedPacket(pk *packets.Packet) {
	*pk = packets.Packet{}
	queuedPacketPool.Put(pk)
}

// startWriter starts the client's writer; the caller got start (push) or
// true (release).
//
// rtm patch 96: `go cl.writeQueued()` allocated a closure for the method
// value at every start, that is for every burst a client receives (about
// one per message at a fixed rate below saturation). The method value is
// made once and kept: the starts of a queue are ordered by its mutex (a
// start follows the previous writer's last pop), so the field needs no
// lock of its own.
func (cl *Client) startWriter() {
	fn := cl.State.outbound.writer
	if fn == nil {
		fn = cl.writeQueued
		cl.State.outbound.writer = fn
	}
	go fn()
}
