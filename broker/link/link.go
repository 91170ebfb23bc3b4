package link

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
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
	redial     chan struct{} // ExpectIncarnation → run: dial now, capacity 1
	wg         sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	state   string
	stateCh chan struct{} // closed and replaced on every state change
	conn    net.Conn      // while dialled, so Close can interrupt it
	q       []entry       // unacked messages in seq order
	next    int           // q[:next] are written on the current connection
	held    bool          // Hold: nothing more is written
	// heldThrough: the last seq queued before or during a Hold(true):
	// those messages are settled for good (their owner took them over
	// with the hold), even once the link is resumed.
	heldThrough uint64
	// lost: the seqs of reliable messages thrown away unacknowledged and
	// not held (Close, a peer that restarted), newest last, so Lost can
	// tell them from acknowledged ones once both left q. A range per
	// discard of the queue; at most maxLostRanges, oldest dropped first
	// (their waiters gave up long before: a PUBACK wait is bounded).
	lost []seqRange
	// ackedThrough: the last seq the peer acknowledged (Fate).
	ackedThrough uint64
	seq          uint64 // last seq handed out
	qBytes       int
	peerInc      uint64        // the peer's incarnation at the last handshake; 0 before the first
	peerIncNow   atomic.Uint64 // peerInc, read without the lock (PeerIncarnation)
	st           LinkStats     // counters; the other fields are filled by Stats
	// settledCh is made by Settled for its waiters and closed (and
	// cleared) when what they wait for may have changed: an ack that
	// freed messages, a discard, Hold(true), Close. Made only while
	// someone waits, so a Link nobody waits on pays nothing per ack.
	settledCh chan struct{}
}

// seqRange is the seqs lo..hi, both included.
type seqRange struct{ lo, hi uint64 }

// maxLostRanges bounds Link.lost: one range per restart of the peer or
// Close, so it fills only on a peer that restarts again and again.
const maxLostRanges = 64

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
	// Discarded counts queued messages thrown away: by Close, because the
	// peer came back as another process (incarnation), or, for
	// unreliable ones, because a connection broke after they were written
	// and before the peer delivered them (see Config.OnDiscard).
	Discarded int64 `json:"discarded"`
	// PeerIncarnation is the peer's incarnation as of the last handshake
	// (0 before the first, or from a peer too old to say).
	PeerIncarnation uint64 `json:"peer_incarnation,omitempty"`
	// LastError is the last dial, handshake or connection error.
	LastError string `json:"last_error,omitempty"`
}

// Discard says why a Link threw queued messages away (Config.OnDiscard).
type Discard int

const (
	// DiscardClosed: Close was called with messages still queued (the
	// peer left or failed for good, or this node shuts down).
	DiscardClosed Discard = iota + 1
	// DiscardRestarted: the peer answered a reconnect with another
	// incarnation. The queue was meant for a process that is gone, whose
	// sessions and routes went with it; the new one gets a fresh OnUp
	// snapshot instead.
	DiscardRestarted
	// DiscardUnreliable: unreliable messages written on a connection that
	// broke, which the peer's ready frame shows it never delivered. They
	// are not written again (at most once).
	DiscardUnreliable
)

func (d Discard) String() string {
	switch d {
	case DiscardClosed:
		return "closed"
	case DiscardRestarted:
		return "peer restarted"
	case DiscardUnreliable:
		return "unreliable, connection lost"
	}
	return fmt.Sprintf("discard %d", int(d))
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
		redial:  make(chan struct{}, 1),
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
	return l.Queue(m, reliable) == nil
}

// Queue is Send that says why m was not queued: ErrClosed, ErrQueueFull or
// ErrOversize.
func (l *Link) Queue(m Message, reliable bool) error {
	_, err := l.QueueSeq(m, reliable)
	return err
}

// QueueSeq is Queue that also returns the sequence number m got, for
// Settled.
func (l *Link) QueueSeq(m Message, reliable bool) (uint64, error) {
	if m.Type < MinMessageType {
		panic(fmt.Sprintf("link: Send with reserved message type %d", m.Type))
	}
	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		return 0, ErrClosed
	case len(m.Body) > l.maxBody:
		l.st.Oversize++
		l.mu.Unlock()
		return 0, ErrOversize
	case l.qBytes+len(m.Body) > l.cfg.QueueBytes:
		if reliable {
			l.st.DroppedReliable++
		} else {
			l.st.DroppedUnreliable++
		}
		l.mu.Unlock()
		return 0, ErrQueueFull
	}
	l.seq++
	seq := l.seq
	if l.held {
		l.heldThrough = seq
	}
	l.q = append(l.q, entry{seq: seq, m: m, reliable: reliable})
	l.qBytes += len(m.Body)
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return seq, nil
}

// Settled reports whether the message queued as seq (see QueueSeq) is
// settled: the peer acknowledged it (with Config.BeforeAck, it is safe
// there), or it is no longer queued (discarded), or the Link is held
// (Hold) or closed, after which what becomes of the queue is its owner's
// business (Queued, Config.OnDiscard). A message that was queued when a
// hold began, or while it lasted, stays settled once the Link is resumed:
// its owner took it over with the hold. If not, the channel returned is
// closed when that may have changed: call Settled again then. Waiting
// costs no polling, and one channel per ack frame however many wait.
func (l *Link) Settled(seq uint64) (bool, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.held || seq <= l.heldThrough || len(l.q) == 0 || l.q[0].seq > seq {
		return true, nil
	}
	if l.settledCh == nil {
		l.settledCh = make(chan struct{})
	}
	return false, l.settledCh
}

// Lost reports whether the settled message queued as seq was thrown
// away (Close, or a peer that restarted) without the peer acknowledging
// it and without a hold handing it to the Link's owner: whoever waited
// for it must not take it as delivered. Meaningful once Settled(seq)
// reports true; a discarded message never becomes acknowledged.
func (l *Link) Lost(seq uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lostLocked(seq)
}

// lostLocked reports whether seq is in a range a discard threw away
// (recordLostLocked). l.mu is held.
func (l *Link) lostLocked(seq uint64) bool {
	for _, r := range l.lost {
		if seq >= r.lo && seq <= r.hi {
			return true
		}
	}
	return false
}

// Fate is what became of a queued message (Link.Fate).
type Fate int

const (
	// FatePending: queued, neither acknowledged nor thrown away, and the
	// Link not held since.
	FatePending Fate = iota
	// FateAcked: the peer acknowledged it (with Config.BeforeAck, it is
	// safe there).
	FateAcked
	// FateHeld: queued before or during a hold (Hold) and not
	// acknowledged: what becomes of it is its owner's business, who takes
	// it from Queued or Config.OnDiscard (by its Message.Seq). It can
	// still be acknowledged, should the Link write it after a hold.
	FateHeld
	// FateLost: thrown away (Close, a peer that restarted) without an
	// acknowledgement, outside a hold.
	FateLost
)

// Fate reports what became of the message queued as seq (see QueueSeq),
// whether it was queued before or during a hold (a FateAcked one too:
// acknowledged after the hold began, maybe by a peer its owner had given
// up on), and, while that can still change, a channel closed when it may
// have (an ack frame that freed messages, a discard, Hold(true), Close):
// call Fate again then. Like Settled, it costs one channel per change
// however many wait, made only while someone waits.
func (l *Link) Fate(seq uint64) (f Fate, held bool, changed <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	held = seq <= l.heldThrough
	queued := !l.closed && len(l.q) > 0 && l.q[0].seq <= seq
	switch {
	case queued && held:
		f = FateHeld
	case queued:
		f = FatePending
	case l.lostLocked(seq):
		return FateLost, held, nil
	case seq <= l.ackedThrough:
		return FateAcked, held, nil
	case held:
		return FateHeld, true, nil // handed to its owner: it stays so
	default:
		return FateLost, false, nil
	}
	if l.settledCh == nil {
		l.settledCh = make(chan struct{})
	}
	return f, held, l.settledCh
}

// WaitSettled waits until seq is settled (see Settled) and reports true,
// or until stop is closed and reports false.
func (l *Link) WaitSettled(seq uint64, stop <-chan struct{}) bool {
	for {
		ok, ch := l.Settled(seq)
		if ok {
			return true
		}
		select {
		case <-ch:
		case <-stop:
			return false
		}
	}
}

// settledLocked wakes the waiters of Settled. l.mu is held.
func (l *Link) settledLocked() {
	if l.settledCh != nil {
		close(l.settledCh)
		l.settledCh = nil
	}
}

// Hold stops (on) or resumes writing queued messages. While held, Send
// still queues and the connection stays up (heartbeats go on), but nothing
// more is written: the queue stays whole, for Queued or Close to hand out,
// however long the peer stays connected. What was written before is
// acknowledged as usual.
func (l *Link) Hold(on bool) {
	l.mu.Lock()
	l.held = on
	if on {
		l.heldThrough = l.seq
		l.settledLocked()
	}
	l.mu.Unlock()
	if !on {
		select {
		case l.wake <- struct{}{}:
		default:
		}
	}
}

// Mark returns the sequence number of the last message queued so far;
// Delivered(mark) then tells when the peer has acknowledged every message
// queued up to it.
func (l *Link) Mark() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq
}

// Queued returns the messages queued up to mark (see Mark) that the peer
// has not acknowledged, written or not, oldest first. The bodies are the
// queue's own: callers must not change them.
func (l *Link) Queued(mark uint64) []Message {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Message
	for _, e := range l.q {
		if e.seq > mark {
			break
		}
		m := e.m
		m.Seq = e.seq
		out = append(out, m)
	}
	return out
}

// Delivered reports whether every message queued up to mark (see Mark) was
// acknowledged by the peer, or is no longer queued (discarded, closed).
func (l *Link) Delivered(mark uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.q) == 0 || l.q[0].seq > mark
}

// Close stops the Link, discards its queue (reported to Config.OnDiscard
// as DiscardClosed once the goroutines are done) and waits for its
// goroutines, including an OnUp call in progress. It is idempotent.
func (l *Link) Close() {
	var lost []Message
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		l.cancel()
		close(l.done)
		if l.conn != nil {
			_ = l.conn.Close()
		}
		l.recordLostLocked(l.q)
		lost = l.discardLocked(l.q)
		l.q, l.next, l.qBytes = nil, 0, 0
		l.setStateLocked(StateClosed)
		l.settledLocked()
	}
	l.mu.Unlock()
	l.wg.Wait()
	l.report(DiscardClosed, lost)
}

// discardLocked returns the messages of es, counted as discarded, and
// clears es. l.mu is held.
func (l *Link) discardLocked(es []entry) []Message {
	if len(es) == 0 {
		return nil
	}
	out := make([]Message, len(es))
	for i, e := range es {
		out[i] = e.m
		out[i].Seq = e.seq
		l.qBytes -= len(e.m.Body)
	}
	l.st.Discarded += int64(len(es))
	clear(es)
	l.settledLocked()
	return out
}

// recordLostLocked records, for Lost, that the whole queue es (in seq
// order) is thrown away: what a hold handed to the owner (up to
// heldThrough) is not lost. The seqs between es's that are missing were
// skipped unreliable messages, thrown away before, so one range is exact
// for every message a waiter can ask about. l.mu is held.
func (l *Link) recordLostLocked(es []entry) {
	if len(es) == 0 || es[len(es)-1].seq <= l.heldThrough {
		return
	}
	r := seqRange{lo: max(es[0].seq, l.heldThrough+1), hi: es[len(es)-1].seq}
	if len(l.lost) == maxLostRanges {
		l.lost = append(l.lost[:0], l.lost[1:]...)
	}
	l.lost = append(l.lost, r)
}

// report tells Config.OnDiscard about lost messages; no lock is held.
func (l *Link) report(why Discard, lost []Message) {
	if len(lost) == 0 {
		return
	}
	l.log.Warn("link discarded queued messages", "reason", why.String(), "count", len(lost))
	if l.cfg.OnDiscard != nil {
		l.cfg.OnDiscard(l, why, lost)
	}
}

// Stats returns a snapshot of the Link's state and counters.
func (l *Link) Stats() LinkStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.st
	st.Peer, st.Addr, st.State = l.peer, l.addr, l.state
	st.QueueLen, st.QueueBytes = len(l.q), l.qBytes
	st.PeerIncarnation = l.peerInc
	return st
}

// Up reports whether the handshake is done and the connection healthy.
func (l *Link) Up() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state == StateUp
}

// PeerIncarnation returns the peer's incarnation as of the last
// handshake (0 before the first): the process the Link writes to.
func (l *Link) PeerIncarnation() uint64 { return l.peerIncNow.Load() }

// ExpectIncarnation tells the Link that its peer now runs as process inc,
// learnt from the peer's own connection to this node, which a restarted
// peer opens at once while this Link may still be waiting out its redial
// backoff. If inc differs from the process of the last handshake, the
// queue, meant for the process that is gone, is thrown away now
// (DiscardRestarted, as the handshake would) and PeerIncarnation reports
// inc, so what is queued from here on is for the new process and its next
// handshake resumes it; a connection still up to the old process is
// closed and the redial does not wait for its backoff. Nothing changes
// while the Link is held (its owner hands the queue on) or before its
// first handshake.
func (l *Link) ExpectIncarnation(inc uint64) {
	l.mu.Lock()
	if inc == 0 || l.closed || l.held || l.peerInc == 0 || l.peerInc == inc {
		l.mu.Unlock()
		return
	}
	l.peerInc = inc
	l.peerIncNow.Store(inc)
	l.recordLostLocked(l.q)
	lost := l.discardLocked(l.q)
	l.q, l.next = nil, 0
	if l.state == StateUp && l.conn != nil {
		_ = l.conn.Close()
	}
	l.mu.Unlock()
	select {
	case l.redial <- struct{}{}:
	default:
	}
	l.log.Info("link peer restarted (learnt from its inbound link)", "peer_incarnation", inc)
	l.report(DiscardRestarted, lost)
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
		case <-l.redial:
			t.Stop()
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
	raw, err := d.DialContext(l.ctx, "tcp", l.addr)
	if err != nil {
		return false, detailed(errDial, "%v", err)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		_ = raw.Close()
		return false, ErrClosed
	}
	l.conn = raw
	l.mu.Unlock()
	defer func() {
		_ = raw.Close()
		l.mu.Lock()
		l.conn = nil
		l.setStateLocked(StateConnecting)
		l.mu.Unlock()
	}()

	// conn carries the frames; raw is what gets closed, by this function,
	// the reader or Close: closing a TLS connection would first try to
	// send a close alert, which can block on a peer that does not read.
	conn := raw
	_ = conn.SetDeadline(deadline)
	if l.cfg.TLS != nil {
		tc := tls.Client(raw, l.cfg.TLS)
		if err := tc.HandshakeContext(l.ctx); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				err = fmt.Errorf("TLS handshake not done within %v: %w", l.cfg.HandshakeTimeout, err)
			} else {
				err = fmt.Errorf("TLS handshake: %w", err)
			}
			l.mu.Lock()
			l.st.HandshakeFailures++
			l.mu.Unlock()
			return false, err
		}
		conn = tc
	}
	dr := &deadlineReader{conn: conn}
	r := newFrameReader(dr, 4<<10, handshakeMaxFrame)
	w := newFrameWriter(conn)
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
	restarted, lost := l.resume(ready)
	if restarted {
		l.report(DiscardRestarted, lost)
	} else {
		l.report(DiscardUnreliable, lost)
	}
	l.log.Info("link up", "resume_after", ready.Seq, "peer_incarnation", ready.Incarnation)

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
		_ = raw.Close()
	}()
	err = l.writeOnUp(w)
	if err == nil {
		err = l.write(w, readDone)
	}
	_ = raw.Close()
	<-readDone
	if errors.Is(err, net.ErrClosed) || errors.Is(err, errReaderDone) {
		err = readErr // the reader saw the cause first
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("heard nothing for %v: %w", dr.idle, err)
	}
	return true, err
}

// resume prepares the queue for a new connection whose peer has delivered,
// and made safe (Config.BeforeAck), everything up to ready.Seq: those
// messages go, written unreliable ones are skipped, and the rest is written
// from the start (the peer skips what it delivered already). If the peer is another
// process than at the last handshake (its incarnation changed), the whole
// queue goes instead: it was meant for the process that is gone. It returns
// the messages thrown away, and whether the peer restarted.
func (l *Link) resume(ready Frame) (restarted bool, lost []Message) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ready.Incarnation != 0 {
		restarted = l.peerInc != 0 && ready.Incarnation != l.peerInc
		l.peerInc = ready.Incarnation
		l.peerIncNow.Store(ready.Incarnation)
	}
	if restarted {
		l.recordLostLocked(l.q)
		lost = l.discardLocked(l.q)
		l.q = nil
	} else {
		l.popLocked(ready.Seq)
		keep := l.q[:0]
		var skipped []entry
		for _, e := range l.q {
			if e.written && !e.reliable {
				skipped = append(skipped, e)
				l.st.Skipped++
				continue
			}
			keep = append(keep, e)
		}
		lost = l.discardLocked(skipped)
		clear(l.q[len(keep):])
		l.q = keep
	}
	l.next = 0
	l.st.Connects++
	l.st.LastError = ""
	l.setStateLocked(StateUp)
	return restarted, lost
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
// up, and pings when it has written nothing for a heartbeat.
//
// The ping timer restarts only after a write: a wake that finds nothing to
// take (a Send to a held link, see Hold) must not put the ping off, or a
// held link with steady traffic would go silent and its peer would drop
// the connection after three heartbeats.
func (l *Link) write(w *frameWriter, readDone <-chan struct{}) error {
	ping := time.NewTimer(l.cfg.Heartbeat)
	defer ping.Stop()
	batch := make([]entry, 0, 64)
	wrote := false // since the ping timer last started
	for {
		batch = l.take(batch[:0])
		if len(batch) == 0 {
			if err := w.flush(); err != nil {
				return err
			}
			if wrote {
				ping.Reset(l.cfg.Heartbeat)
				wrote = false
			}
			select {
			case <-l.wake:
			case <-ping.C:
				if err := w.frame(Frame{Type: FramePing}); err != nil {
					return err
				}
				wrote = true
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
		wrote = true
		clear(batch) // drop the bodies
	}
}

// take moves up to cap(dst) unwritten messages to dst, counting them as
// written. Counting before the write errs on the side of at most once for
// unreliable messages.
func (l *Link) take(dst []entry) []entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	for !l.held && l.next < len(l.q) && len(dst) < cap(dst) {
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
	l.ackedThrough = max(l.ackedThrough, l.q[n-1].seq)
	clear(l.q[:n])
	l.q = l.q[n:]
	l.next = max(l.next-n, 0)
	l.st.Acked += int64(n)
	l.settledLocked()
}
