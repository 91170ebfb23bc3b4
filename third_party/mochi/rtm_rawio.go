// SPDX-License-Identifier: MIT
// rtm patch 97: reads and writes of a plain TCP or Unix connection are
// raw system calls, see PATCHES.md.

package mqtt

import (
	"bytes"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
)

// writeConn writes b to the client's connection and empties it.
//
// rtm patch 97: on a *net.TCPConn or *net.UnixConn (the connections whose
// reader waits through syscall.RawConn, patch 73) the write(2) is made
// through RawConn.Write with a raw system call (sysWrite): the socket is
// non-blocking, so the call never blocks, and a full socket makes the
// runtime's poller wait for it, as net.Conn.Write does. A write through
// net.Conn enters the scheduler's syscall state (entersyscall and
// exitsyscall), which wakes the runtime's sysmon thread when it sleeps and
// lets sysmon take the P of a goroutine in a write longer than 20 µs, both
// thread wake-ups (futex) that cost more than the write of a small packet
// at a fixed, moderate rate. Other connections (TLS, WebSocket, wrappers)
// are written with WriteTo, as before.
func (cl *Client) writeConn(b *bytes.Buffer) (int64, error) {
	return cl.writeConnMode(b, false)
}

// rawWritable reports whether writeConn writes with raw system calls, so
// that a write can be tried without blocking (writeConnMode). rtm patch 101.
func (cl *Client) rawWritable() bool {
	r := cl.Net.bconn
	return r != nil && r.rc != nil && r.src == io.Reader(cl.Net.Conn)
}

// writeConnMode is writeConn; with once, a full socket does not make it
// wait: it returns, without an error, having written what the socket took,
// and b keeps the rest (the caller must check b.Len). once needs
// rawWritable. rtm patch 101.
func (cl *Client) writeConnMode(b *bytes.Buffer, once bool) (int64, error) {
	r := cl.Net.bconn
	if r == nil || r.rc == nil || r.src != io.Reader(cl.Net.Conn) {
		return b.WriteTo(cl.Net.Conn)
	}
	op := rawWritePool.Get().(*rawWrite)
	op.p, op.n, op.err, op.once = b.Bytes(), 0, nil, once
	err := r.rc.Write(op.fn)
	n, werr := op.n, op.err
	op.p, op.err = nil, nil
	rawWritePool.Put(op)
	b.Next(n)
	if b.Len() == 0 {
		b.Reset()
	}
	if err != nil { // closed, deadline: as net.Conn.Write reports them
		return int64(n), err
	}
	if werr != nil {
		return int64(n), &net.OpError{Op: "write", Net: r.netw, Err: os.NewSyscallError("write", werr)}
	}
	return int64(n), nil
}

// rawWrite is one write of writeConn; fn, its do method, is made once per
// pooled rawWrite (a method value per write would allocate).
type rawWrite struct {
	p    []byte
	n    int
	err  error
	once bool // rtm patch 101: a full socket ends the write (no wait)
	fn   func(fd uintptr) bool
}

var rawWritePool = sync.Pool{New: func() any {
	w := new(rawWrite)
	w.fn = w.do
	return w
}}

// do is the syscall.RawConn.Write callback: it writes until p is written
// or the socket is full (false: the poller waits until it is writable;
// with once, true: the caller takes the rest).
func (w *rawWrite) do(fd uintptr) bool {
	for len(w.p) > 0 {
		n, err := sysWrite(int(fd), w.p)
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EAGAIN {
			return w.once // rtm patch 101: once, the caller queues the rest
		}
		if err != nil {
			w.err = err
			return true
		}
		if n <= 0 {
			w.err = io.ErrShortWrite
			return true
		}
		w.n += n
		w.p = w.p[n:]
	}
	return true
}
