// SPDX-License-Identifier: MIT
// rtm patch: on-demand outbound queue, see PATCHES.md.

package mqtt

import (
	"bytes"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

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
	ring    *ringBuf          // rtm patch 99: buf's pool box (nil: buf is not pooled)
	head    int               // index of the oldest packet in buf
	n       atomic.Int32      // number of queued packets; written under mu
	limit   int32             // maximum number of queued packets
	writing bool              // a writer is draining the queue
	bytes   atomic.Int64      // rtm patch 40: heldBytes of the queued QoS 0 packets (QoS 1/2 count in the session)
	budget  *atomic.Int64     // rtm patch 41: the server's total of held bytes, or nil
	writer  func()            // rtm patch 96: the client's writeQueued, made once (see startWriter)

	// rtm patch 98: write coalescing (see pushAt and startWriter).
	coalesce     time.Duration // Options.WriteCoalesce; 0: off
	lastPush     time.Duration // monoNow at the last push
	gap          time.Duration // moving average of the time between pushes
	coalesceNext bool          // the writer the caller must start waits coalesce first
	waiting      bool          // a writer waits for timer (started at waitFrom)
	waitFrom     time.Duration // monoNow when the waiting writer was started
	timer        *time.Timer   // runs a waiting writer; made at the first wait

	// rtm patch 101: the packet writeFirst encoded but could not write
	// because another write held cl.Lock; written by resumeWriter. Owned
	// by the writer claim's holder.
	resume *bytes.Buffer
}

func newOutboundQueue(limit int32) outboundQueue {
	return outboundQueue{limit: limit}
}

// coalesceGapMax caps a single gap between pushes in the moving average
// (rtm patch 98), and is the average a queue starts with: a client's
// first packets count as a low rate.
const coalesceGapMax = time.Second

// coalesceMaxBatch ends a coalescing wait when this many packets are
// queued (rtm patch 98): a larger batch saves no more system calls worth
// the wait, and a publisher paced by the queue's fill (patch 20) must not
// wait for a timer.
const coalesceMaxBatch = 64

// maxBatch is the number of queued packets that ends a coalescing wait:
// coalesceMaxBatch, or half the queue's limit if that is less, so a burst
// within one window does not fill a small queue (packets beyond its limit
// are dropped) while the writer waits. rtm patch 103.
func (q *outboundQueue) maxBatch() int {
	return max(min(coalesceMaxBatch, int(q.limit)/2), 1)
}

// monoStart and monoNow give a monotonic clock reading that costs one
// vDSO call (time.Since with a monotonic start), for the rate of pushes.
var monoStart = time.Now()

func monoNow() time.Duration { return time.Since(monoStart) }

// push appends pk. It returns ok false, queueing nothing, if limit packets
// are already pending. It returns start true if no writer is running: one is
// then counted as running, and the caller must start it (startWriter).
func (q *outboundQueue) push(pk *packets.Packet) (ok, start bool) {
	ok, start, _ = q.pushTimed(pk)
	return ok, start
}

// pushTimed is push, and returns kick true if the caller must end a
// coalescing writer's wait (Client.kickWriter). rtm patch 98.
func (q *outboundQueue) pushTimed(pk *packets.Packet) (ok, start, kick bool) {
	if q.coalesce <= 0 {
		return q.pushAt(pk, 0)
	}
	return q.pushAt(pk, monoNow())
}

// pushAt is push at time now (monoNow; unused when coalescing is off).
//
// rtm patch 98: with Options.WriteCoalesce set, it keeps a moving average
// of the time between the packets queued for the client (1/8 weight to the
// latest gap, each gap capped at coalesceGapMax, from which the average
// starts). When it must start a writer and that average is below the
// window, so at least one more packet is expected within it, the writer
// waits the window before its first pop (coalesceNext, startWriter): the
// packets that arrive meanwhile go out with the first in one write(2),
// where each would otherwise be written alone by a writer of its own. A
// client receiving at a lower rate (say 100 packets a second against a
// 200 µs window) never waits.
//
// The timer is a backstop: Go's poller sleeps in whole milliseconds, so
// when the process is otherwise idle a shorter timer fires after about
// 1 ms. A push that finds the writer waiting longer than the window
// returns kick: its caller starts the writer at once. At a steady high
// rate the window is then kept to within one packet's gap; the timer ends
// only a wait no later packet ended (the stream stopped). So does the push
// that makes coalesceMaxBatch packets queued.
func (q *outboundQueue) pushAt(pk *packets.Packet, now time.Duration) (ok, start, kick bool) {
	q.mu.Lock()
	if q.coalesce > 0 { // rtm patch 98
		g := max(now-q.lastPush, 0) // pushers read the clock before the lock
		if g > coalesceGapMax || q.lastPush == 0 {
			g = coalesceGapMax
		}
		if q.gap == 0 {
			q.gap = coalesceGapMax
		}
		q.gap += (g - q.gap) / 8
		q.lastPush = now
	}
	n := int(q.n.Load())
	if n >= int(q.limit) {
		q.mu.Unlock()
		return false, false, false
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
	if start {
		q.coalesceNext = q.coalesce > 0 && q.gap < q.coalesce // rtm patch 98
		if q.coalesceNext {
			q.waiting, q.waitFrom = true, now
		}
	} else if q.waiting && (now-q.waitFrom >= q.coalesce || n+1 >= q.maxBatch()) {
		q.waiting, kick = false, true // rtm patch 98: the window is over, or the batch full
	}
	q.mu.Unlock()
	return true, start, kick
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
	q.coalesceNext = false // rtm patch 98: a claim writes at once
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
	q.coalesceNext = false // rtm patch 98: released packets go out at once
	return true
}

// grow doubles the ring (at least 4, at most limit), keeping the order.
//
// rtm patch 99: the arrays come from ringPools and go back to them (here,
// and when a queue drains after a burst, see pop). A subscriber of a
// high-rate stream drains and refills its queue many times a second, and
// each refill grew a new array from 4 packets up: 47 % of the bytes the
// broker allocated under QoS 0 fan-out 1→10 (session 6's profile).
func (q *outboundQueue) grow() {
	size := 2 * len(q.buf)
	if size < 4 {
		size = 4
	}
	if size > int(q.limit) {
		size = int(q.limit)
	}
	r := getRing(size)
	buf := r.s
	n := copy(buf, q.buf[q.head:])
	copy(buf[n:], q.buf[:q.head])
	if q.ring != nil {
		clear(q.buf) // the old array's copies: the pool holds no packets
		putRing(q.ring)
	}
	q.ring, q.buf = r, buf
	q.head = 0
}

// ringBuf boxes a ring array for ringPools, so that a Put allocates
// nothing. rtm patch 99.
type ringBuf struct{ s []*packets.Packet }

// ringPools holds empty ring arrays: class k those of 4<<k packets. An
// array of another length (a queue's limit when not a power of two) is
// not pooled. rtm patch 99.
var ringPools [ringClasses]sync.Pool

const ringClasses = 15 // 4 to 65,536 packets

// ringClass returns the pool class of an array of size packets.
func ringClass(size int) (int, bool) {
	if size < 4 || size&(size-1) != 0 {
		return 0, false
	}
	k := bits.TrailingZeros(uint(size)) - 2
	return k, k < ringClasses
}

// getRing returns an empty array of size packets, from its pool if it
// has one.
func getRing(size int) *ringBuf {
	if k, ok := ringClass(size); ok {
		if r, _ := ringPools[k].Get().(*ringBuf); r != nil {
			return r
		}
	}
	return &ringBuf{s: make([]*packets.Packet, size)}
}

// putRing returns r, whose slots must all be nil, to its pool.
func putRing(r *ringBuf) {
	if k, ok := ringClass(len(r.s)); ok {
		ringPools[k].Put(r)
	}
}

// pop removes and returns the oldest packet. If the queue is empty it
// returns false and counts the writer as stopped: the caller, the writer,
// must exit (the next push starts a new one).
func (q *outboundQueue) pop() (*packets.Packet, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()

	q.waiting = false // rtm patch 98: the writer runs
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
			// drained after a burst: release the array (rtm patch 99: to
			// its pool; pop cleared every slot it took)
			if q.ring != nil {
				putRing(q.ring)
			}
			q.ring, q.buf = nil, nil
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
//
// It reports whether the writer was started at once (false: it waits for
// its coalescing window).
func (cl *Client) startWriter() (started bool) {
	q := &cl.State.outbound
	fn := q.writer
	if fn == nil {
		fn = cl.writeQueued
		q.writer = fn
	}
	// rtm patch 98: a writer for a client receiving at a high rate starts
	// after the coalescing window (see pushAt), from a timer kept on the
	// queue: time.AfterFunc runs fn on a goroutine of its own, as `go`
	// would, so the wait costs a timer and no extra goroutine. coalesceNext
	// was set by the push that made the caller the writer; no other push
	// changes it until this writer's last pop.
	if q.coalesceNext {
		q.mu.Lock() // the timer is read by stop (flushCoalesced)
		if q.timer == nil {
			q.timer = time.AfterFunc(q.coalesce, fn)
		} else {
			q.timer.Reset(q.coalesce)
		}
		q.mu.Unlock()
		return false
	}
	go fn()
	return true
}

// writeFirst writes the oldest queued packet on the caller's goroutine,
// trying the write(2) once, and reports whether it did: false if the
// writer must start as before (startWriter), because it waits for its
// coalescing window (patch 98) or the connection is not written with raw
// system calls (TLS, WebSocket: a write there can block). The caller got
// start from push.
//
// rtm patch 101: patch 100 started a writer goroutine and yielded to it,
// so that a low-rate subscriber's PUBLISH left before the publisher went
// on to its PUBACK. Writing it here does the same without a goroutine
// start, the wake-up of an idle P that the start made (a futex and an
// inter-processor interrupt on a VM) and two context switches. A full
// socket never blocks the caller: the write(2) is tried once, the
// unwritten rest is kept at the head of outbuf (writePacketMode), and a
// writer goroutine started to write it (resumeWriter), then what was
// queued meanwhile. Nor does another write holding cl.Lock (a PINGRESP or
// a PUBACK from the client's read loop, held acknowledgements, any of them
// perhaps waiting for a full socket): writePacketMode only tries the lock,
// and if it is busy leaves the encoded packet to resumeWriter. The caller stays the queue's only writer until it
// hands over (release, or the goroutine): order is FIFO as before.
func (cl *Client) writeFirst() bool {
	q := &cl.State.outbound
	if q.coalesceNext || !cl.rawWritable() { // coalesceNext: set by the caller's push
		return false
	}
	defer func() {
		if r := recover(); r != nil { // as writeQueued's: this client only
			cl.Stop(cl.recoverPanic(r))
		}
	}()
	pk, ok := q.pop()
	if !ok {
		return true // cannot be: the caller pushed; pop ended the claim
	}
	held := q.queuedBytes(pk)
	err := cl.writePacketMode(pk, true)
	if err != nil && err != errWriteDeferred {
		cl.ops.log.Debug("failed publishing packet", "error", err, "client", cl.ID, "packet", pk)
	}
	q.releaseBytes(held)
	releaseQueuedPacket(pk)
	atomic.AddInt32(&cl.State.outboundQty, -1)
	cl.flowDrained()
	if err == errWriteDeferred {
		go cl.resumeWriter()
		return true
	}
	cl.releaseWriter() // packets queued meanwhile go to a writer goroutine
	return true
}

// resumeWriter is the writer writeFirst hands over to when the socket was
// full: it writes the rest of the packet that writeFirst began (at the
// head of outbuf, waiting for the socket as any writer does), then the
// queue; or, when writeFirst found cl.Lock held by another write, the
// whole packet, after what that write left. rtm patch 101.
func (cl *Client) resumeWriter() {
	defer func() {
		if r := recover(); r != nil {
			cl.Stop(cl.recoverPanic(r))
		}
	}()
	cl.Lock()
	if b := cl.State.outbound.resume; b != nil { // writeFirst found cl.Lock busy
		cl.State.outbound.resume = nil
		if cl.Net.outbuf == nil {
			cl.Net.outbuf = b
		} else { // written directly meanwhile, before this packet: as if it had waited for the lock
			cl.Net.outbuf.Write(b.Bytes())
			writeBufPool.Put(b)
		}
	}
	_ = cl.flushOutbuf() // an error is the connection's: the queue's writes fail too
	cl.Unlock()
	cl.drainOutbound()
}

// kickWriter starts a writer waiting for its coalescing window now (a push
// found the window over: pushTimed's kick), unless its timer fired already.
// rtm patch 98.
func (cl *Client) kickWriter() {
	q := &cl.State.outbound
	q.mu.Lock()
	t := q.timer
	q.mu.Unlock()
	if t != nil && t.Stop() {
		go q.writer()
	}
}

// closeFlushTimeout bounds the write of the packets a closing connection's
// coalescing writer was waiting to write (flushCoalesced): short, since a
// server shutting down stops its clients one after another, and a client
// whose socket is full does not read them anyway.
//
// rtm patch 103: and closeFlushTotal bounds them all together once the
// server closes (Server.Close): one after another, 10,000 clients with full
// sockets would have kept it 100 s. A variable for tests.
var closeFlushTimeout, closeFlushTotal = 10 * time.Millisecond, 100 * time.Millisecond

// setCloseWriteDeadline bounds the writes of a closing connection:
// closeFlushTimeout from now, or the server's shared deadline if that is
// sooner (rtm patch 103).
//
// rtm patch 102: stop calls it first, before FlushHeld: a write blocked on
// the client's full socket (a delivery, a PINGRESP, acknowledgements)
// holds cl.Lock, which FlushHeld waits for; the deadline ends that write,
// so stop reaches conn.Close (a take-over, Server.Close) instead of
// waiting for a client that does not read. The read loop's keepalive
// deadline (SetDeadline, read and write) would put it off: it keeps it
// (Net.closeBy).
func (cl *Client) setCloseWriteDeadline() {
	conn := cl.Net.Conn
	if conn == nil {
		return
	}
	by := time.Now().Add(closeFlushTimeout)
	if f := cl.ops.closing; f != nil { // rtm patch 103
		if end := f.Load(); end != 0 && end < by.UnixNano() {
			by = time.Unix(0, end)
		}
	}
	cl.Net.closeBy.Store(by.UnixNano()) // before the deadline: see refreshDeadlineFrom
	_ = conn.SetWriteDeadline(by)
}

// flushCoalesced writes at once the packets a writer waiting for its
// coalescing window would have written, if one is waiting; stop calls it
// before closing the connection, so a DISCONNECT (buffered behind queued
// packets, see writePacket) and the queued packets are not lost with the
// connection. The write waits at most closeFlushTimeout for a full socket.
// rtm patch 98.
func (cl *Client) flushCoalesced() {
	q := &cl.State.outbound
	q.mu.Lock()
	t := q.timer
	q.mu.Unlock()
	if t == nil || !t.Stop() {
		return // no writer waits: none, or it runs already
	}
	// The stopped timer's claim is ours: write as its writer would have.
	cl.setCloseWriteDeadline()
	defer func() {
		if r := recover(); r != nil {
			_ = cl.recoverPanic(r) // logs it; the connection is being closed already
		}
	}()
	// What was written directly while the packets waited (a DISCONNECT,
	// say) is in outbuf, where the queued packets would be appended after
	// it: it goes out last, after them, as it was written last.
	cl.Lock()
	direct := cl.Net.outbuf
	cl.Net.outbuf = nil
	cl.acksWritten() // rtm patch 102: held acknowledgements are in direct
	cl.Unlock()
	cl.drainOutbound()
	if direct != nil {
		cl.Lock()
		_, _ = cl.writeConn(direct) // rtm patch 97; an error is the closing connection's
		cl.Unlock()
		writeBufPool.Put(direct)
	}
}
