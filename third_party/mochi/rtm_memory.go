// SPDX-License-Identifier: MIT
// rtm patches 40-44: what a client, or a stranger, can make the server hold
// in memory is bounded in bytes. See PATCHES.md.

package mqtt

import (
	"errors"
	"io"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

var (
	// ErrClientBytesExceeded: the message would take the bytes a client
	// holds above MemoryLimits.MaxClientBytes (rtm patch 40).
	ErrClientBytesExceeded = errors.New("client queue bytes exceeded")
	// ErrMemoryBudgetExceeded: the message would take the bytes all clients
	// hold above MemoryLimits.MaxTotalBytes (rtm patch 41).
	ErrMemoryBudgetExceeded = errors.New("server queue memory budget exceeded")
)

// MemoryLimits bounds, in bytes and time, what clients can make the server
// hold (rtm patches 40-44). The zero value is v2.7.9's behaviour: no bound.
//
// Messages held for a client (its write queue and its session: QoS 1/2 sent
// and not acknowledged, or kept while it is offline) are counted by their
// payload and topic bytes, per client, when they are queued, and released
// when they are written (QoS 0), acknowledged, expired, dropped or cleared.
// A message fanned out to N subscribers shares its payload in memory while
// queued, but it is counted N times: each subscriber's writer encodes its
// own copy of the packet (payload included) to write it, and a subscriber
// whose socket is full keeps that copy until the write completes, so N
// stuck subscribers really can hold N copies. Counting per subscriber is
// therefore the bound that holds, and it is simple.
type MemoryLimits struct {
	// MaxClientBytes bounds the message bytes held for one client (write
	// queue plus session). A message beyond it is dropped for that client
	// and reported (OnPublishDroppedBytes, ErrClientBytesExceeded), except
	// that a client holding nothing always takes one message, so a message
	// larger than the bound can still be delivered to a client that keeps
	// up. Flow control's high-water mark (FlowControl) is half of it.
	MaxClientBytes int64 `yaml:"max_client_bytes" json:"max_client_bytes"`
	// MaxTotalBytes bounds the message bytes held for all clients together.
	// A client that already holds something may fill it to half only; the
	// other half is kept for clients holding nothing (subscribers that keep
	// up), so stuck clients that used up their share do not stop delivery
	// to healthy ones. Beyond it: dropped, ErrMemoryBudgetExceeded.
	MaxTotalBytes int64 `yaml:"max_total_bytes" json:"max_total_bytes"`
	// MaxReadingBytes bounds the bytes of packets being read (received in
	// part) on all connections together; each packet body larger than
	// readInitial is counted while it is read, by the buffer it has grown
	// to (at most twice the bytes received, see readBody). A packet that
	// would exceed it ends its connection (v5: DISCONNECT 0x97). CONNECT
	// bodies (clients not yet authenticated) may use a quarter of it only,
	// so strangers cannot use it all up and close the connections of
	// authenticated clients sending large packets.
	MaxReadingBytes int64 `yaml:"max_reading_bytes" json:"max_reading_bytes"`
	// MaxConnectSize bounds the remaining length of a CONNECT, the only
	// packet a client that has not authenticated can send; a larger one
	// closes the connection. 0: only Capabilities.MaximumPacketSize.
	MaxConnectSize uint32 `yaml:"max_connect_size" json:"max_connect_size"`
	// ConnectTimeout bounds the time from accepting a connection to having
	// read its whole CONNECT; 0: none (v2.7.9 waited forever).
	ConnectTimeout time.Duration `yaml:"connect_timeout" json:"connect_timeout"`
	// ReadTimeout bounds the time a packet's body takes to arrive once its
	// fixed header has (also with keepalive 0, which sets no deadline on an
	// idle connection); 0: only the keepalive deadline.
	ReadTimeout time.Duration `yaml:"read_timeout" json:"read_timeout"`
}

// MemoryStats reports what MemoryLimits counts; updated atomically.
type MemoryStats struct {
	// Queued is the message bytes held for all clients (MaxTotalBytes).
	Queued atomic.Int64
	// Reading is the bytes of packet bodies being read (MaxReadingBytes).
	Reading atomic.Int64
	// ReadingConnect is the part of Reading that is CONNECT bodies
	// (at most a quarter of MaxReadingBytes).
	ReadingConnect atomic.Int64
	// ReadRefused counts connections ended because a packet body would
	// have exceeded MaxReadingBytes.
	ReadRefused atomic.Int64
	// ConnectTooLarge counts connections ended because their CONNECT
	// exceeded MaxConnectSize.
	ConnectTooLarge atomic.Int64
}

// heldBytes is what a message costs a client that holds it: its payload
// and topic. Only PUBLISH packets are counted (the acks a session keeps for
// QoS 2 are a few bytes, bounded by the message count).
func heldBytes(pk *packets.Packet) int64 {
	if pk.FixedHeader.Type != packets.Publish {
		return 0
	}
	return int64(len(pk.Payload) + len(pk.TopicName))
}

// HeldBytes returns the message bytes cl holds: its session plus the QoS 0
// messages in its write queue (QoS 1/2 ones are in its session).
func (cl *Client) HeldBytes() int64 {
	return cl.State.Inflight.bytes.Load() + cl.State.outbound.bytes.Load()
}

// admitBytes decides whether cl may hold pk under MemoryLimits; it returns
// the reason if not. Concurrent publishers to one client can each pass the
// check at the same moment, so the bounds can be overshot by one message per
// concurrent publisher; nothing is reserved, to keep the publish path to a
// few atomic loads.
// rtm patches 40, 41.
func (s *Server) admitBytes(cl *Client, pk *packets.Packet) error {
	lim := &s.Options.Memory
	if lim.MaxClientBytes <= 0 && lim.MaxTotalBytes <= 0 {
		return nil
	}
	n := heldBytes(pk)
	held := cl.HeldBytes()
	if lim.MaxClientBytes > 0 && held > 0 && held+n > lim.MaxClientBytes {
		return ErrClientBytesExceeded
	}
	if lim.MaxTotalBytes > 0 {
		limit := lim.MaxTotalBytes
		if held > 0 {
			limit /= 2 // the other half is for clients that keep up
		}
		if s.Mem.Queued.Load()+n > limit {
			return ErrMemoryBudgetExceeded
		}
	}
	return nil
}

// dropBytes reports pk, not delivered to cl for reason (admitBytes).
func (s *Server) dropBytes(cl *Client, pk packets.Packet, reason error) {
	atomic.AddInt64(&s.Info.MessagesDropped, 1)
	s.Log.Debug("message dropped: byte bound", "client", cl.ID, "reason", reason, "held", cl.HeldBytes())
	s.hooks.OnPublishDroppedBytes(cl, pk, reason)
}

// readInitial is the largest packet body read into a buffer of its
// declared size at once; a larger body starts with a buffer of this size
// that grows as its bytes arrive, counted against MaxReadingBytes. Most
// packets (acks, pings, subscriptions, typical telemetry) fit; a
// connection that declares a large body and stalls holds no more than this
// uncounted.
const readInitial = 4 << 10

// ErrReadBudgetExceeded is the reason a connection whose packet body would
// exceed MemoryLimits.MaxReadingBytes is ended (v5: DISCONNECT 0x97).
var ErrReadBudgetExceeded = packets.ErrQuotaExceeded

// readBody reads a packet body of n bytes.
//
// rtm patch 42: v2.7.9 allocated n bytes (up to 256 MiB, as declared by the
// client) before reading any, and then a second copy: a client could make
// the server hold the declared size by sending a fixed header and
// stalling. Now a body larger than readInitial is read into a buffer that
// doubles when full and more bytes have arrived (so it holds at most twice
// what was received) and
// is counted against MaxReadingBytes while it is read, and (patch 43) the
// body must arrive within ReadTimeout, or before the CONNECT deadline for
// the first packet.
func (cl *Client) readBody(n int) ([]byte, error) {
	r := cl.Net.bconn
	if n > r.Buffered() && cl.Net.Conn != nil {
		cl.setBodyDeadline()
	}
	if n <= readInitial {
		p := make([]byte, n)
		_, err := io.ReadFull(r, p)
		return p, err
	}

	var mem *MemoryStats
	var limit int64
	if cl.ops != nil {
		mem, limit = cl.ops.mem, cl.ops.options.Memory.MaxReadingBytes
	}
	var sub *atomic.Int64 // a CONNECT's bytes also count here, bounded by limit/4
	if mem != nil && cl.State.rtm.connecting {
		sub = &mem.ReadingConnect
	}
	var counted int64 // bytes of buf counted in mem.Reading (and sub)
	defer func() {
		if counted > 0 {
			mem.Reading.Add(-counted)
			if sub != nil {
				sub.Add(-counted)
			}
		}
	}()

	p := make([]byte, 0, readInitial)
	for len(p) < n {
		if len(p) == cap(p) {
			// Grow only once more bytes have arrived: a client that
			// stalls exactly at a power of two holds what it sent.
			if _, err := r.Peek(1); err != nil {
				if errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return nil, err
			}
			size := min(2*cap(p), n)
			if mem != nil {
				grow := int64(size) - counted
				total := mem.Reading.Add(grow)
				part := int64(0)
				if sub != nil {
					part = sub.Add(grow)
				}
				if limit > 0 && (total > limit || part > limit/4) {
					mem.Reading.Add(-grow)
					if sub != nil {
						sub.Add(-grow)
					}
					mem.ReadRefused.Add(1)
					return nil, ErrReadBudgetExceeded
				}
				counted += grow
			}
			q := make([]byte, len(p), size)
			copy(q, p)
			p = q
		}
		m, err := r.Read(p[len(p):cap(p)])
		p = p[:len(p)+m]
		if err != nil {
			if errors.Is(err, io.EOF) && len(p) < n {
				err = io.ErrUnexpectedEOF
			}
			if len(p) < n {
				return nil, err
			}
		}
	}
	return p, nil
}

// rtmClientState is rtm's per-connection read state (patches 42-44).
type rtmClientState struct {
	// connecting is true while the CONNECT is read (MaxReadingBytes).
	connecting bool
	// connectDeadline is when the CONNECT must have been read
	// (MemoryLimits.ConnectTimeout); zero once connected, or without one.
	connectDeadline time.Time
	// refused is the CONNACK code an OnSessionEstablish hook refused the
	// session with (rtm patch 47); nil to establish it.
	refused *packets.Code

	// rtm patch 86 (rtm_park.go): parkID is the id of the client's epoll
	// registration while it is parked (0 otherwise) and parkTimer wakes it
	// at its keepalive deadline, both guarded by the parker's lock;
	// parkDeadline (that deadline, unix ns, 0 for none), parkedAt (when the
	// wait began, unix ns) and parkCounted (Info.ClientsConnected counts it)
	// are left by the goroutine that parked it for the one that continues.
	parkID       uint64
	parkTimer    *time.Timer
	parkDeadline int64
	parkedAt     int64
	parkCounted  bool
}

// setBodyDeadline bounds the time the rest of a packet may take
// (MemoryLimits.ReadTimeout), never beyond the keepalive bound nor, for the
// CONNECT, the connect deadline. The next packet's refreshDeadline replaces
// it. rtm patch 43.
func (cl *Client) setBodyDeadline() {
	if cl.ops == nil {
		return
	}
	if d := cl.State.rtm.connectDeadline; !d.IsZero() {
		return // set by startConnectDeadline, which covers the whole CONNECT
	}
	t := cl.ops.options.Memory.ReadTimeout
	if t <= 0 {
		return
	}
	if ka := cl.State.Keepalive; ka > 0 {
		t = min(t, time.Duration(ka+ka/2)*time.Second)
	}
	_ = cl.Net.Conn.SetReadDeadline(time.Now().Add(t))
}

// startConnectDeadline bounds the time until the CONNECT has been read
// (MemoryLimits.ConnectTimeout). rtm patch 44: v2.7.9 set no deadline before
// the CONNECT, so a connection that never sent one was held forever.
func (cl *Client) startConnectDeadline() {
	cl.State.rtm.connecting = true
	t := cl.ops.options.Memory.ConnectTimeout
	if t <= 0 || cl.Net.Conn == nil {
		return
	}
	cl.State.rtm.connectDeadline = time.Now().Add(t)
	_ = cl.Net.Conn.SetReadDeadline(cl.State.rtm.connectDeadline)
}

// endConnectDeadline is called once the CONNECT is read: later packets have
// the keepalive and ReadTimeout bounds (refreshDeadline, setBodyDeadline).
func (cl *Client) endConnectDeadline() {
	cl.State.rtm.connecting = false
	if cl.State.rtm.connectDeadline.IsZero() {
		return
	}
	cl.State.rtm.connectDeadline = time.Time{} // refreshDeadline sets the next one
}

// connectTooLarge reports whether a CONNECT body of remaining bytes is
// beyond MemoryLimits.MaxConnectSize, and counts it. rtm patch 44.
func (s *Server) connectTooLarge(remaining int) bool {
	max := s.Options.Memory.MaxConnectSize
	if max == 0 || remaining <= int(max) {
		return false
	}
	s.Mem.ConnectTooLarge.Add(1)
	return true
}
