// SPDX-License-Identifier: MIT
// rtm patch 86: an idle plain-TCP connection is parked: no goroutine waits
// for it, a shared poller does. See PATCHES.md.

package mqtt

import (
	"errors"
	"log/slog"
	"os"
	"sync"
	"time"
)

// errParked is returned by the read loop when the connection is to be
// parked: the goroutine that read it hands it to the parker and exits.
var errParked = errors.New("connection parked")

// parker waits for the sockets of parked connections (rtm patch 86).
//
// Why: a goroutine per connection is one stack (4 KiB at least, with
// patches 69, 75) per idle device, more than the rest of what an idle
// connection holds. A connection whose read loop waited Options.IdlePark
// for a packet is registered with an epoll instance of its own (the Go
// runtime's poller keeps its registration; a socket can be in several
// epoll sets) with EPOLLONESHOT, and its goroutine exits. A new goroutine
// continues the read loop when the socket becomes readable (a packet, or
// the client closing it), when the keepalive deadline passes (a timer: the
// read deadline is still set, so the continued read ends with the same
// error as before), or when the client is stopped (takeover, server close,
// kick: Stop closes the socket, which removes it from the epoll set
// without an event, so stop wakes it). Writes never needed the reader:
// publishToClient starts a writer (patch 12).
//
// Only connections whose reader waits through syscall.RawConn (patch 73:
// *net.TCPConn and *net.UnixConn) are parked; TLS and WebSocket connections
// keep their goroutine, as the bytes they wait for are not the socket's.
type parker struct {
	log    *slog.Logger
	resume func(cl *Client) // continues a woken client's read loop (a new goroutine)

	once    sync.Once
	err     error // why the poller could not start; nothing is parked then
	mu      sync.Mutex
	closed  bool
	next    uint64
	clients map[uint64]*Client // parked, by the id their epoll event carries
	sys     parkerSys          // epoll instance and wake pipe (linux)
}

// park hands cl to the poller; false if it could not (the caller keeps
// reading). True means the caller no longer owns cl: it may have been woken
// and continued by a new goroutine already.
func (p *parker) park(cl *Client) bool {
	rc := cl.Net.bconn.rc
	if rc == nil {
		return false
	}
	p.once.Do(func() { p.err = p.start() })
	if p.err != nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || cl.Closed() {
		return false
	}
	p.next++
	id := p.next
	var cerr error
	err := rc.Control(func(fd uintptr) { cerr = p.sys.add(int(fd), id) })
	if err != nil || cerr != nil {
		return false // closed meanwhile, or not pollable: the read loop finds out
	}
	if p.clients == nil {
		p.clients = make(map[uint64]*Client)
	}
	p.clients[id] = cl
	st := &cl.State.rtm
	st.parkID = id
	if d := st.parkDeadline; d != 0 {
		st.parkTimer = time.AfterFunc(time.Until(time.Unix(0, d)), func() { p.wakeID(id) })
	}
	return true
}

// wake continues cl if it is parked (stop calls it: closing the socket
// removes it from the epoll set without an event).
func (p *parker) wake(cl *Client) {
	p.mu.Lock()
	id := cl.State.rtm.parkID
	p.mu.Unlock()
	if id != 0 {
		p.wakeID(id)
	}
}

// wakeID continues the client parked under id, once.
func (p *parker) wakeID(id uint64) {
	p.mu.Lock()
	cl, ok := p.clients[id]
	if ok {
		delete(p.clients, id)
		cl.State.rtm.parkID = 0
		if t := cl.State.rtm.parkTimer; t != nil {
			t.Stop()
			cl.State.rtm.parkTimer = nil
		}
		if !p.closed { // after close the epoll set is gone with its registrations
			if rc := cl.Net.bconn.rc; rc != nil {
				_ = rc.Control(func(fd uintptr) { p.sys.del(int(fd)) })
			}
		}
	}
	p.mu.Unlock()
	if ok {
		go p.resume(cl)
	}
}

// parked reports how many connections are parked.
func (p *parker) parked() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.clients)
}

// close stops the poller. Parked clients are not woken here: the server
// stops them (closeListenerClients), which wakes them.
func (p *parker) close() {
	p.once.Do(func() { p.err = errParkerClosed }) // never started: it will not be
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	if p.err == nil {
		p.sys.stop()
	}
}

var errParkerClosed = errors.New("parker closed")

// loop delivers the poller's events; it ends when the parker is closed.
func (p *parker) loop() {
	ids := make([]uint64, 0, 128)
	for {
		var stop bool
		ids, stop = p.sys.wait(ids[:0])
		for _, id := range ids {
			p.wakeID(id)
		}
		if stop {
			p.mu.Lock()
			p.sys.release()
			p.mu.Unlock()
			return
		}
	}
}

// waitOrPark waits up to Options.IdlePark, from from, for the next packet
// to start arriving; park reports that none did and the connection should
// be parked (its read deadline is back at the keepalive deadline, expiry).
// Connections that cannot be parked, or whose keepalive deadline comes
// first, return at once and wait in the read as before.
func (cl *Client) waitOrPark(from, expiry time.Time) (park bool, err error) {
	if cl.ops == nil || cl.ops.park == nil || cl.ops.options.IdlePark <= 0 ||
		cl.Net.bconn == nil || cl.Net.bconn.rc == nil || cl.Net.bconn.Buffered() > 0 {
		return false, nil
	}
	until := from.Add(cl.ops.options.IdlePark)
	if !expiry.IsZero() && !until.Before(expiry) {
		return false, nil
	}
	conn := cl.Net.Conn
	_ = conn.SetReadDeadline(until)
	_, err = cl.Net.bconn.Peek(1)
	if err == nil {
		// The packet has begun to arrive. Its fixed header is read under
		// until (at least a second away), its body, if it must wait for
		// the network, under setBodyDeadline's (patch 43), and the next
		// wait sets the keepalive deadline again: so the deadline is put
		// back (a runtime timer update, 250-400 ns on a loaded 2-core
		// machine) only without a ReadTimeout or with less than a second
		// of until left.
		if cl.ops.options.Memory.ReadTimeout <= 0 || time.Until(until) < time.Second {
			_ = conn.SetReadDeadline(expiry)
		}
		return false, nil
	}
	_ = conn.SetReadDeadline(expiry) // the keepalive bound again, for the parked wait
	if errors.Is(err, os.ErrDeadlineExceeded) && cl.Net.bconn.Buffered() == 0 && !cl.Closed() {
		st := &cl.State.rtm
		st.parkedAt = from.UnixNano()
		st.parkDeadline = 0
		if !expiry.IsZero() {
			st.parkDeadline = expiry.UnixNano()
		}
		return true, nil
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return false, nil // a wake at the very moment bytes came: read on
	}
	return false, err
}
