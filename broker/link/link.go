package link

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Link is the outbound stream to one peer. It dials in the background,
// redials with exponential backoff until Close, and keeps every sent message
// queued until the peer acknowledges it.
type Link struct {
	peer, addr string
	cfg        Config
	stream     uint64 // random per Link: its seqs start at 1, whatever the incarnation
	onUp       func() []Message
	log        *slog.Logger
	maxBody    int
	ctx        context.Context // cancelled by Close, to abort a dial
	cancel     context.CancelFunc
	done       chan struct{} // closed by Close
	wake       chan struct{} // Send → writer, capacity 1
	wg         sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	state   string
	stateCh chan struct{} // closed and replaced on every state change
	conn    net.Conn      // while dialled, so Close can interrupt it
	q       []entry       // unacked messages in seq order
	next    int           // q[:next] are written on the current connection
	seq     uint64        // last seq handed out
	qBytes  int
	st      LinkStats // counters; the other fields are filled by Stats
}

// entry is one queued message.
type entry struct {
	seq      uint64
	m        Message
	reliable bool
	written  bool // written at least once, on any connection
}

// LinkStats are a Link's state and counters.
type LinkStats struct {
	Peer string `json:"peer"`
	Addr string `json:"addr"`
	// State is StateConnecting, StateUp or StateClosed.
	State string `json:"state"`
	// Connects counts successful handshakes; HandshakeFailures counts
	// failed ones (bad secret, wrong peer, rejected, timeout), not failed
	// dials.
	Connects          int64 `json:"connects"`
	HandshakeFailures int64 `json:"handshake_failures"`
	// Messages and Bytes count queued messages and their body bytes written
	// for the first time; OnUpMessages counts the unsequenced messages
	// returned by OnUp and written.
	Messages     int64 `json:"messages"`
	Bytes        int64 `json:"bytes"`
	OnUpMessages int64 `json:"onup_messages"`
	// Resends counts reliable messages written again after a reconnect;
	// Skipped counts unreliable ones dropped instead because they had
	// already been written once.
	Resends int64 `json:"resends"`
	Skipped int64 `json:"skipped"`
	// Acked counts messages the peer acknowledged.
	Acked int64 `json:"acked"`
	// QueueLen and QueueBytes are the messages (and their body bytes)
	// waiting to be written or acked.
	QueueLen   int `json:"queue_len"`
	QueueBytes int `json:"queue_bytes"`
	// DroppedReliable and DroppedUnreliable count messages Send refused
	// because the queue was full; Oversize counts those refused because
	// the body exceeds MaxFrame-12 bytes (also OnUp messages).
	DroppedReliable   int64 `json:"dropped_reliable"`
	DroppedUnreliable int64 `json:"dropped_unreliable"`
	Oversize          int64 `json:"oversize"`
	// LastError is the last dial, handshake or connection error.
	LastError string `json:"last_error,omitempty"`
}

// Dial starts a Link from cfg.NodeName to the node peer at addr and returns
// at once; dialling runs in the background. onUp, if not nil, is called on
// every (re)connect, after the handshake and with no link lock held, and the
// messages it returns are written before any queued message, unsequenced.
// Dial panics if peer or cfg.NodeName is empty or invalid: like a reserved
// type passed to Send, that is a programming error.
func Dial(peer, addr string, cfg Config, onUp func() []Message) *Link {
	if err := cfg.validate(); err != nil {
		panic(err)
	}
	if peer == "" {
		panic("link: Dial with an empty peer name")
	}
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	l := &Link{
		peer:    peer,
		addr:    addr,
		cfg:     cfg,
		stream:  random64(),
		onUp:    onUp,
		log:     cfg.Logger.With("component", "link", "node", cfg.NodeName, "peer", peer, "addr", addr),
		maxBody: cfg.MaxFrame - dataOverhead,
		ctx:     ctx,
		cancel:  cancel,
		done:    make(chan struct{}),
		wake:    make(chan struct{}, 1),
		state:   StateConnecting,
		stateCh: make(chan struct{}),
	}
	l.wg.Add(1)
	go l.run()
	return l
}

// Peer returns the peer's node name.
func (l *Link) Peer() string { return l.peer }

// Send queues m for the peer and returns at once; it never waits for the
// network. A reliable message is re-sent after a reconnect until the peer
// acknowledges it; an unreliable one is written at most once. Send returns
// false, dropping m, if the Link is closed, if the queue would exceed
// Config.QueueBytes, or if the body exceeds MaxFrame-12 bytes. It panics if
// m.Type is below MinMessageType.
func (l *Link) Send(m Message, reliable bool) bool {
	if m.Type < MinMessageType {
		panic(fmt.Sprintf("link: Send with reserved message type %d", m.Type))
	}
	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		return false
	case len(m.Body) > l.maxBody:
		l.st.Oversize++
		l.mu.Unlock()
		return false
	case l.qBytes+len(m.Body) > l.cfg.QueueBytes:
		if reliable {
			l.st.DroppedReliable++
		} else {
			l.st.DroppedUnreliable++
		}
		l.mu.Unlock()
		return false
	}
	l.seq++
	l.q = append(l.q, entry{seq: l.seq, m: m, reliable: reliable})
	l.qBytes += len(m.Body)
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return true
}

// Close stops the Link, discards its queue and waits for its goroutines,
// including an OnUp call in progress. It is idempotent.
func (l *Link) Close() {
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		l.cancel()
		close(l.done)
		if l.conn != nil {
			_ = l.conn.Close()
		}
		clear(l.q)
		l.q, l.next, l.qBytes = nil, 0, 0
		l.setStateLocked(StateClosed)
	}
	l.mu.Unlock()
	l.wg.Wait()
}

// Stats returns a snapshot of the Link's state and counters.
func (l *Link) Stats() LinkStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.st
	st.Peer, st.Addr, st.State = l.peer, l.addr, l.state
	st.QueueLen, st.QueueBytes = len(l.q), l.qBytes
	return st
}

// Up reports whether the handshake is done and the connection healthy.
func (l *Link) Up() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state == StateUp
}

// WaitUp waits until the Link is up, ctx ends (returning its error) or the
// Link is closed (returning ErrClosed).
func (l *Link) WaitUp(ctx context.Context) error {
	for {
		l.mu.Lock()
		state, ch := l.state, l.stateCh
		l.mu.Unlock()
		switch state {
		case StateUp:
			return nil
		case StateClosed:
			return ErrClosed
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (l *Link) setStateLocked(s string) {
	if l.state == s || l.state == StateClosed {
		return
	}
	l.state = s
	close(l.stateCh)
	l.stateCh = make(chan struct{})
}

// run dials, serves and redials until Close.
func (l *Link) run() {
	defer l.wg.Done()
	bo := &backoff.ExponentialBackOff{
		InitialInterval:     redialMin,
		RandomizationFactor: 0.2,
		Multiplier:          2,
		MaxInterval:         l.cfg.RedialMax,
	}
	bo.Reset()
	var lastErr string // to log a repeated failure once, not every redial
	for {
		wasUp, err := l.session()
		select {
		case <-l.done:
			return
		default:
		}
		l.mu.Lock()
		l.st.LastError = err.Error()
		l.mu.Unlock()
		switch {
		case wasUp:
			bo.Reset()
			lastErr = ""
			if isProtocolError(err) {
				l.log.Warn("link protocol error", "error", err)
			} else {
				l.log.Info("link down", "error", err)
			}
		case err.Error() == lastErr:
			l.log.Debug("link connect failed", "error", err)
		case errors.Is(err, errDial):
			l.log.Info("link connect failed", "error", err)
		default:
			l.log.Warn("link handshake failed", "error", err)
		}
		if !wasUp {
			lastErr = err.Error()
		}
		t := time.NewTimer(min(bo.NextBackOff(), l.cfg.RedialMax))
		select {
		case <-t.C:
		case <-l.done:
			t.Stop()
			return
		}
	}
}

// errDial marks a failed dial, as opposed to a failed handshake.
var errDial = errors.New("dial")

// session runs one connection: dial, handshake, OnUp, then write the queue
// and read acks until the connection fails or the Link is closed. wasUp
// reports whether the handshake succeeded.
func (l *Link) session() (wasUp bool, err error) {
	deadline := time.Now().Add(l.cfg.HandshakeTimeout)
	d := net.Dialer{Deadline: deadline}
	conn, err := d.DialContext(l.ctx, "tcp", l.addr)
	if err != nil {
		return false, detailed(errDial, "%v", err)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		_ = conn.Close()
		return false, ErrClosed
	}
	l.conn = conn
	l.mu.Unlock()
	defer func() {
		_ = conn.Close()
		l.mu.Lock()
		l.conn = nil
		l.setStateLocked(StateConnecting)
		l.mu.Unlock()
	}()

	dr := &deadlineReader{conn: conn}
	r := newFrameReader(dr, 4<<10, handshakeMaxFrame)
	w := newFrameWriter(conn)
	_ = conn.SetDeadline(deadline)
	ready, err := l.dialHandshake(conn, r, w)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("handshake not done within %v: %w", l.cfg.HandshakeTimeout, err)
		}
		l.mu.Lock()
		l.st.HandshakeFailures++
		l.mu.Unlock()
		return false, err
	}
	_ = conn.SetDeadline(time.Time{})
	l.resume(ready)
	l.log.Info("link up", "resume_after", ready)

	// The reader owns the read side from here on, so the heartbeat also
	// guards the OnUp writes. Whichever of reader and writer fails first
	// closes conn, which stops the other.
	dr.idle = 3 * l.cfg.Heartbeat
	var readErr error
	readDone := make(chan struct{})
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer close(readDone)
		readErr = l.readAcks(r)
		_ = conn.Close()
	}()
	err = l.writeOnUp(w)
	if err == nil {
		err = l.write(w, readDone)
	}
	_ = conn.Close()
	<-readDone
	if errors.Is(err, net.ErrClosed) || errors.Is(err, errReaderDone) {
		err = readErr // the reader saw the cause first
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("heard nothing for %v: %w", dr.idle, err)
	}
	return true, err
}

// resume prepares the queue for a new connection whose peer has delivered
// everything up to ready: acked messages go, written unreliable ones are
// skipped, and the rest is written from the start.
func (l *Link) resume(ready uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.popLocked(ready)
	keep := l.q[:0]
	for _, e := range l.q {
		if e.written && !e.reliable {
			l.qBytes -= len(e.m.Body)
			l.st.Skipped++
			continue
		}
		keep = append(keep, e)
	}
	clear(l.q[len(keep):])
	l.q, l.next = keep, 0
	l.st.Connects++
	l.st.LastError = ""
	l.setStateLocked(StateUp)
}

// writeOnUp calls onUp without any lock and writes its messages, seq 0.
func (l *Link) writeOnUp(w *frameWriter) error {
	if l.onUp == nil {
		return nil
	}
	var oversize int64
	for _, m := range l.onUp() {
		if m.Type < MinMessageType {
			panic(fmt.Sprintf("link: OnUp returned reserved message type %d", m.Type))
		}
		if len(m.Body) > l.maxBody {
			oversize++
			continue
		}
		if err := w.data(0, m); err != nil {
			return err
		}
		l.mu.Lock()
		l.st.OnUpMessages++
		l.mu.Unlock()
	}
	if oversize > 0 {
		l.mu.Lock()
		l.st.Oversize += oversize
		l.mu.Unlock()
		l.log.Warn("link dropped oversize OnUp messages", "count", oversize, "max_body", l.maxBody)
	}
	return nil
}

// errReaderDone means the writer stopped because the reader had.
var errReaderDone = errors.New("reader done")

// write writes queued messages as they come, flushing whenever it has caught
// up, and pings when idle for a heartbeat.
func (l *Link) write(w *frameWriter, readDone <-chan struct{}) error {
	ping := time.NewTimer(l.cfg.Heartbeat)
	defer ping.Stop()
	batch := make([]entry, 0, 64)
	for {
		batch = l.take(batch[:0])
		if len(batch) == 0 {
			if err := w.flush(); err != nil {
				return err
			}
			ping.Reset(l.cfg.Heartbeat)
			select {
			case <-l.wake:
			case <-ping.C:
				if err := w.frame(Frame{Type: FramePing}); err != nil {
					return err
				}
			case <-readDone:
				return errReaderDone
			case <-l.done:
				return ErrClosed
			}
			continue
		}
		for _, e := range batch {
			if err := w.data(e.seq, e.m); err != nil {
				return err
			}
		}
		clear(batch) // drop the bodies
	}
}

// take moves up to cap(dst) unwritten messages to dst, counting them as
// written. Counting before the write errs on the side of at most once for
// unreliable messages.
func (l *Link) take(dst []entry) []entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.next < len(l.q) && len(dst) < cap(dst) {
		e := &l.q[l.next]
		if e.written {
			l.st.Resends++
		} else {
			e.written = true
			l.st.Messages++
			l.st.Bytes += int64(len(e.m.Body))
		}
		dst = append(dst, *e)
		l.next++
	}
	return dst
}

// readAcks reads acks until the connection fails.
func (l *Link) readAcks(r *frameReader) error {
	for {
		f, err := r.next()
		if err != nil {
			return err
		}
		if f.Type != FrameAck {
			return fmt.Errorf("%w: %v from the acceptor", ErrUnexpectedFrame, f.Type)
		}
		l.mu.Lock()
		l.popLocked(f.Seq)
		l.mu.Unlock()
	}
}

// popLocked drops the queued messages up to seq, which the peer delivered.
func (l *Link) popLocked(seq uint64) {
	n := 0
	for n < len(l.q) && l.q[n].seq <= seq {
		l.qBytes -= len(l.q[n].m.Body)
		n++
	}
	if n == 0 {
		return
	}
	clear(l.q[:n])
	l.q = l.q[n:]
	l.next = max(l.next-n, 0)
	l.st.Acked += int64(n)
}
