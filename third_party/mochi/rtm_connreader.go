// SPDX-License-Identifier: MIT
// rtm patch 73: a connection's read buffer is lent only while bytes are
// buffered, see PATCHES.md.

package mqtt

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
)

// connReader is the buffered reader of a client connection (it replaces
// v2.7.9's bufio.Reader, with the methods mochi uses).
//
// rtm patch 73: bufio.Reader holds its buffer (ClientNetReadBufferSize,
// rtm 1 KiB) for the connection's life, while an idle connection has
// nothing buffered. On a *net.TCPConn or *net.UnixConn, connReader gives
// the buffer back to a pool when it is empty and waits for the socket to
// become readable without one (syscall.RawConn.Read: the runtime's poller
// waits, as for a plain Read); the read(2) that follows is made into a
// buffer taken from the pool, so there is still one read(2) per fill. Other
// connections (TLS, WebSocket, wrappers) keep a buffer, as before.
type connReader struct {
	src  io.Reader
	rc   syscall.RawConn // nil: src is read with Read, buf is kept
	size int
	buf  []byte  // nil while idle (rc != nil)
	box  *[]byte // rtm patch 96: buf's pool box, nil when buf was not pooled
	r, w int     // buf[r:w] is buffered
	err  error   // an error to return once the buffered bytes are read

	netw   string                // "tcp" or "unix", for errors
	rawFn  func(fd uintptr) bool // c.rawRead, built once (a method value per fill would allocate)
	rawN   int
	rawErr error
	rawBox *[]byte

	// rtm patch 109: see burst.
	onData  func() bool // the burst's handler of buffered bytes, nil between bursts
	inBurst atomic.Bool // a burst holds the descriptor (Close waits for it)
	reads   int         // read(2) calls made, for tests (the reading goroutine's own)
}

// readBufPool holds idle read buffers of connReaders (all of one size in a
// server; a buffer of another size is dropped), each in its box (a
// *[]byte).
//
// rtm patch 96: the box goes back to the pool with its buffer. Patch 73
// boxed the slice afresh on every Put (&b escapes), so every fill and
// every read that found the socket empty allocated 24 bytes: about 2.5
// allocations per message in a fan-in.
var readBufPool sync.Pool

func getReadBuf(size int) *[]byte {
	if p, ok := readBufPool.Get().(*[]byte); ok {
		if cap(*p) == size {
			*p = (*p)[:size]
			return p
		}
	}
	b := make([]byte, size)
	return &b
}

func putReadBuf(p *[]byte) {
	if p != nil {
		readBufPool.Put(p)
	}
}

func newConnReader(src io.Reader, size int) *connReader {
	if size < 16 {
		size = 16 // as bufio.NewReaderSize
	}
	c := &connReader{src: src, size: size}
	var sc syscall.Conn
	switch t := src.(type) { // exactly these: a wrapper's Read must not be bypassed
	case *net.TCPConn:
		sc, c.netw = t, "tcp"
	case *net.UnixConn:
		sc, c.netw = t, "unix"
	}
	if sc != nil {
		if rc, err := sc.SyscallConn(); err == nil {
			c.rc = rc
			c.rawFn = c.rawRead
		}
	}
	if c.rc == nil {
		c.buf = make([]byte, size)
	}
	return c
}

// Buffered returns the number of bytes that can be read without waiting.
func (c *connReader) Buffered() int { return c.w - c.r }

// fill reads at least one more byte into the buffer, or returns an error.
func (c *connReader) fill() error {
	if c.err != nil {
		err := c.err
		c.err = nil
		return err
	}
	if c.r > 0 {
		copy(c.buf, c.buf[c.r:c.w])
		c.w -= c.r
		c.r = 0
	}
	if c.rc != nil && c.w == 0 {
		return c.fillRaw()
	}
	if c.buf == nil {
		c.box = getReadBuf(c.size)
		c.buf = *c.box
	}
	if c.w == len(c.buf) {
		return errors.New("connReader: buffer full") // not reached: callers peek at most the buffer's size
	}
	for i := 0; i < 100; i++ {
		n, err := c.src.Read(c.buf[c.w:])
		c.w += n
		if n > 0 {
			c.err = err
			return nil
		}
		if err != nil {
			return err
		}
	}
	return io.ErrNoProgress
}

// fillRaw waits, holding no buffer, until the socket is readable, then
// reads into a pooled buffer.
func (c *connReader) fillRaw() error {
	if c.buf != nil {
		putReadBuf(c.box)
		c.buf, c.box = nil, nil
	}
	c.rawN, c.rawErr, c.rawBox = 0, nil, nil
	err := c.rc.Read(c.rawFn)
	box, n, rerr := c.rawBox, c.rawN, c.rawErr
	c.rawBox = nil
	if err != nil { // deadline, closed: as net.Conn.Read reports them
		putReadBuf(box)
		return err
	}
	if rerr != nil {
		putReadBuf(box)
		return &net.OpError{Op: "read", Net: c.netw, Err: os.NewSyscallError("read", rerr)}
	}
	if n == 0 {
		putReadBuf(box)
		return io.EOF
	}
	c.buf, c.box, c.r, c.w = *box, box, 0, n
	return nil
}

// rawRead is the syscall.RawConn.Read callback: false asks the poller to
// wait until the socket is readable.
func (c *connReader) rawRead(fd uintptr) bool {
	box := getReadBuf(c.size)
	for {
		n, err := sysRead(int(fd), *box) // rtm patch 97: a raw system call
		c.reads++
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EAGAIN {
			putReadBuf(box)
			return false
		}
		if n < 0 {
			n = 0
		}
		c.rawN, c.rawErr, c.rawBox = n, err, box
		return true
	}
}

// ReadByte reads one byte.
func (c *connReader) ReadByte() (byte, error) {
	for c.r == c.w {
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
	b := c.buf[c.r]
	c.r++
	return b, nil
}

// Read reads up to len(p) bytes: what is buffered, or one fill's worth.
func (c *connReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if c.r == c.w {
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.buf[c.r:c.w])
	c.r += n
	return n, nil
}

// Peek returns the next n bytes without consuming them, waiting for them
// if need be; n must not exceed the buffer size.
func (c *connReader) Peek(n int) ([]byte, error) {
	if n > c.size {
		return nil, errors.New("connReader: peek larger than the buffer")
	}
	for c.w-c.r < n {
		if err := c.fill(); err != nil {
			return c.buf[c.r:c.w], err // what is buffered, as bufio.Reader.Peek
		}
	}
	return c.buf[c.r : c.r+n], nil
}

// burst reads from the socket and hands what it read to handle, all within
// one syscall.RawConn.Read, until handle returns false, the read fails (the
// error is kept for the next fill, as a read's error after buffered bytes)
// or the poller's wait ends with an error (returned: the read deadline, a
// closed connection). rtm patch 109.
//
// Why: RawConn.Read resets the poller's readiness before its first call of
// the callback, so a read loop that leaves it after every packet must read
// the socket once more before it may wait: at a fixed rate, where packets
// arrive one at a time, that read finds the socket empty for nearly every
// packet (0.58 EAGAIN reads a message in a QoS 0 fan-in, besides the 0.60
// that read data). Within one RawConn.Read the readiness is not reset: a
// read shorter than the room it had took everything the socket held, and
// any byte arriving after it sets the readiness the wait then finds, so the
// callback may return false (wait) without that read.
//
// handle runs inside the callback, holding the descriptor: Close waits for
// it (see inBurst and (*Client).stop).
func (c *connReader) burst(handle func() bool) error {
	c.onData = handle
	c.inBurst.Store(true)
	err := c.rc.Read(c.burstRead)
	c.inBurst.Store(false)
	c.onData = nil
	c.releaseIfEmpty()
	return err
}

// burstRead is burst's syscall.RawConn.Read callback.
func (c *connReader) burstRead(fd uintptr) bool {
	for {
		if c.buf == nil {
			c.box = getReadBuf(c.size)
			c.buf, c.r, c.w = *c.box, 0, 0
		} else if c.r > 0 {
			copy(c.buf, c.buf[c.r:c.w])
			c.w -= c.r
			c.r = 0
		}
		room := len(c.buf) - c.w
		if room == 0 {
			return true // a packet longer than the buffer: for the read loop
		}
		n, err := sysRead(int(fd), c.buf[c.w:])
		c.reads++
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			c.releaseIfEmpty() // idle: no buffer held (patch 73)
			return false
		case err != nil:
			c.err = &net.OpError{Op: "read", Net: c.netw, Err: os.NewSyscallError("read", err)}
			return true
		case n == 0:
			c.err = io.EOF
			return true
		}
		c.w += n
		if !c.onData() {
			return true
		}
		if n < room {
			c.releaseIfEmpty()
			return false // the socket is empty: wait without reading it again
		}
	}
}

// releaseIfEmpty returns the buffer to the pool when nothing is buffered
// (rtm patch 73: an idle connection holds no read buffer).
func (c *connReader) releaseIfEmpty() {
	if c.rc != nil && c.buf != nil && c.r == c.w {
		putReadBuf(c.box)
		c.buf, c.box, c.r, c.w = nil, nil, 0, 0
	}
}

// partFits reports whether the partly buffered next packet, if any, fits
// in the buffer once whole (false: it is read by the read loop, which
// reads longer packets in pieces).
func (c *connReader) partFits() bool {
	b := c.buf[c.r:c.w]
	rem, shift := 0, 0
	for i := 1; i < len(b) && i < 5; i++ { // b[0] is the type; then the remaining length
		rem |= int(b[i]&0x7f) << shift
		if b[i]&0x80 == 0 {
			return i+1+rem <= c.size
		}
		shift += 7
	}
	return true // the length is still incomplete: at most 5 bytes
}
