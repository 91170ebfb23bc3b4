package link

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Server accepts inbound links on one TCP address and delivers their
// messages to a Handler.
type Server struct {
	cfg  Config
	h    Handler
	log  *slog.Logger
	ln   net.Listener
	done chan struct{} // closed by Close
	wg   sync.WaitGroup

	authFailures atomic.Int64
	failMu       sync.Mutex
	failLogged   time.Time // when a failed handshake was last logged
	failUnlogged int64     // failed handshakes not logged since

	mu     sync.Mutex
	closed bool
	conns  map[*inConn]struct{} // every open inbound conn, for Close
	peers  map[string]*peer     // by sender node name
}

// inConn is one inbound connection.
type inConn struct {
	conn net.Conn
	done chan struct{} // closed when its goroutine has finished delivering
}

// peer is the receive state of one sender node. Its last and safe seqs are
// written by the sender's active connection only; a new connection reads
// them after the old one's done channel is closed.
type peer struct {
	incarnation, stream uint64
	// last is the last seq delivered, which de-duplicates resends; safe,
	// with Config.BeforeAck, the last one it reported safe, which is what
	// the sender may forget (without BeforeAck, safe is last).
	last, safe atomic.Uint64
	active     *inConn // the conn delivering for this peer, or nil

	messages, bytes, duplicates atomic.Int64
}

// ServerStats are a Server's counters.
type ServerStats struct {
	// AuthFailures counts inbound connections that failed the handshake:
	// bad secret, unsupported version, garbage, or silence until
	// HandshakeTimeout.
	AuthFailures int64 `json:"auth_failures"`
	// Peers holds the inbound state by sender node name.
	Peers map[string]InboundStats `json:"peers"`
}

// InboundStats are the counters of one sender.
type InboundStats struct {
	Connected bool `json:"connected"`
	// Incarnation is the sender's current incarnation.
	Incarnation uint64 `json:"incarnation"`
	// Messages and Bytes count delivered messages and their body bytes;
	// Duplicates counts re-sent messages skipped as already delivered.
	Messages   int64 `json:"messages"`
	Bytes      int64 `json:"bytes"`
	Duplicates int64 `json:"duplicates"`
}

// Listen binds addr, starts accepting inbound links in the background and
// delivers their messages to h. Close stops it.
func Listen(addr string, cfg Config, h Handler) (*Server, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if h == nil {
		return nil, errors.New("link: Listen needs a Handler")
	}
	cfg = cfg.withDefaults()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("link: listen: %w", err)
	}
	s := &Server{
		cfg:   cfg,
		h:     h,
		log:   cfg.Logger.With("component", "link", "node", cfg.NodeName),
		ln:    ln,
		done:  make(chan struct{}),
		conns: make(map[*inConn]struct{}),
		peers: make(map[string]*peer),
	}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// Addr returns the bound address, with port 0 resolved.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops accepting, closes every inbound connection and waits for the
// Server's goroutines, including Deliver calls in progress. It is
// idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	var err error
	if !s.closed {
		s.closed = true
		close(s.done)
		if err = s.ln.Close(); errors.Is(err, net.ErrClosed) {
			err = nil
		}
		for c := range s.conns {
			_ = c.conn.Close()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

// Stats returns a snapshot of the Server's counters.
func (s *Server) Stats() ServerStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := ServerStats{AuthFailures: s.authFailures.Load(), Peers: make(map[string]InboundStats, len(s.peers))}
	for name, p := range s.peers {
		st.Peers[name] = InboundStats{
			Connected:   p.active != nil,
			Incarnation: p.incarnation,
			Messages:    p.messages.Load(),
			Bytes:       p.bytes.Load(),
			Duplicates:  p.duplicates.Load(),
		}
	}
	return st
}

// Incarnation returns the incarnation of peer's latest inbound connection
// (0 if it never connected): the process whose messages are delivered, or
// were last.
func (s *Server) Incarnation(peer string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.peers[peer]; p != nil {
		return p.incarnation
	}
	return 0
}

// Forget closes peer's inbound connection, if any, for when gossip says it
// failed or left: should the peer be alive after all (a false suspicion, a
// healed partition), it redials and opens with a fresh OnUp snapshot, which
// the caller needs since it dropped the peer's state. The de-duplication
// state is kept (a few words per peer), so messages the peer re-sends are
// still recognised; a restarted peer resets it with its new incarnation.
func (s *Server) Forget(peer string) {
	s.mu.Lock()
	var active *inConn
	if p := s.peers[peer]; p != nil {
		active = p.active
	}
	s.mu.Unlock()
	if active != nil {
		_ = active.conn.Close()
	}
}

// accept runs the accept loop until Close.
func (s *Server) accept() {
	defer s.wg.Done()
	delay := 5 * time.Millisecond
	for {
		conn, err := s.ln.Accept()
		if err != nil {
			select {
			case <-s.done:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off, as net/http does.
			s.log.Warn("link accept failed", "error", err, "retry_in", delay)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-s.done:
				t.Stop()
				return
			}
			delay = min(2*delay, time.Second)
			continue
		}
		delay = 5 * time.Millisecond
		c := &inConn{conn: conn, done: make(chan struct{})}
		if !s.track(c) {
			_ = conn.Close()
			return
		}
		go s.serve(c)
	}
}

// track registers c and accounts for its goroutine, unless the Server is
// closed.
func (s *Server) track(c *inConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

// serve runs one inbound connection: handshake, then receive until it fails.
func (s *Server) serve(c *inConn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		_ = c.conn.Close()
	}()
	// done is closed last, after the peer is released (see release).
	defer close(c.done)

	remote := c.conn.RemoteAddr().String()
	deadline := time.Now().Add(s.cfg.HandshakeTimeout)
	_ = c.conn.SetDeadline(deadline)
	// conn carries the frames; c.conn, the TCP connection, is what Close
	// and Forget close (see Link.session).
	conn := c.conn
	if s.cfg.TLS != nil {
		tc := tls.Server(c.conn, s.cfg.TLS)
		if err := tc.Handshake(); err != nil {
			if errors.Is(err, io.EOF) {
				err = errNoHello // a TCP health check
			} else {
				err = fmt.Errorf("TLS handshake: %w", err)
			}
			s.handshakeFailed(remote, err)
			return
		}
		conn = tc
	}
	dr := &deadlineReader{conn: conn}
	r := newFrameReader(dr, bufSize, handshakeMaxFrame)
	w := newFrameWriter(conn)

	hello, err := s.acceptHandshake(c, r, w)
	if err != nil {
		s.handshakeFailed(remote, err)
		return
	}
	p, err := s.claim(c, hello, deadline)
	if err != nil {
		if !errors.Is(err, ErrClosed) {
			s.handshakeFailed(remote, fmt.Errorf("node %q: %w", hello.Node, err))
		}
		return
	}
	defer s.release(c, hello.Node, p)
	last, safe := p.last.Load(), p.safe.Load()
	if s.cfg.BeforeAck == nil {
		safe = last
	}
	// The ready frame tells the sender what it may forget: with BeforeAck,
	// what was reported safe, not all that was delivered (the rest it
	// resends, and receive skips it as a duplicate and acks it once safe).
	err = w.frame(Frame{Type: FrameReady, Seq: safe, Incarnation: s.cfg.Incarnation})
	if err == nil {
		err = w.flush()
	}
	if err != nil {
		s.log.Info("link handshake aborted", "peer", hello.Node, "remote_addr", remote, "error", err)
		return
	}
	_ = c.conn.SetDeadline(time.Time{})

	hb := hello.Heartbeat
	if hb <= 0 {
		hb = s.cfg.Heartbeat
	}
	log := s.log.With("peer", hello.Node, "remote_addr", remote)
	log.Info("inbound link up", "incarnation", hello.Incarnation, "resume_after", safe, "delivered", last)
	dr.idle = 3 * hb
	r.max = s.cfg.MaxFrame
	err = s.receive(c, hello.Node, p, r, w, dr.idle, last, safe)
	s.settle(p)
	select {
	case <-s.done:
		log.Info("inbound link down", "reason", "server closed")
	default:
		if isProtocolError(err) {
			log.Warn("inbound link protocol error", "error", err)
		} else {
			log.Info("inbound link down", "error", err)
		}
	}
}

// settle asks BeforeAck once more, when a connection has ended, whether
// what it delivered is safe, so that the next connection's ready frame
// lets the sender forget it rather than resend it: most often it is (a
// store that keeps up, or none), and a resent unreliable message is
// dropped by the sender and counted as lost though it was delivered.
func (s *Server) settle(p *peer) {
	if s.cfg.BeforeAck == nil {
		return
	}
	select {
	case <-s.done:
		return
	default:
	}
	if last := p.last.Load(); p.safe.Load() < last && s.cfg.BeforeAck()() {
		p.safe.Store(last)
	}
}

// handshakeFailed counts and logs a failed inbound handshake. A client that
// connects and leaves without a byte (a TCP health check), or one cut off
// by Close, is not a failure.
func (s *Server) handshakeFailed(remote string, err error) {
	select {
	case <-s.done:
		return
	default:
	}
	if errors.Is(err, errNoHello) {
		s.log.Debug("link connection closed before hello", "remote_addr", remote)
		return
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("handshake not done within %v: %w", s.cfg.HandshakeTimeout, err)
	}
	s.authFailures.Add(1)
	// Anyone who reaches the port can fail handshakes by the thousand: log
	// the first at once, then at most one line a second, saying how many
	// were not logged (all are counted in the stats).
	s.failMu.Lock()
	now := time.Now()
	if now.Sub(s.failLogged) < failLogInterval {
		s.failUnlogged++
		s.failMu.Unlock()
		return
	}
	unlogged := s.failUnlogged
	s.failLogged, s.failUnlogged = now, 0
	s.failMu.Unlock()
	s.log.Warn("link handshake failed", "remote_addr", remote, "error", err, "failed_since_last_line", unlogged)
}

// failLogInterval is the least time between two logged handshake failures.
const failLogInterval = time.Second

// claim makes c the active connection of hello's sender. A sender has at
// most one: an older connection is closed and waited for, so its Deliver
// calls finish before c's start and its last seq is final.
func (s *Server) claim(c *inConn, hello Frame, deadline time.Time) (*peer, error) {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, ErrClosed
		}
		p := s.peers[hello.Node]
		if p == nil {
			p = &peer{}
			s.peers[hello.Node] = p
		}
		if p.active == nil {
			p.active = c
			if p.incarnation != hello.Incarnation || p.stream != hello.Stream {
				// A restarted or re-dialling sender counts from 1 again.
				p.incarnation, p.stream = hello.Incarnation, hello.Stream
				p.last.Store(0)
				p.safe.Store(0)
			}
			s.mu.Unlock()
			return p, nil
		}
		old := p.active
		s.mu.Unlock()
		_ = old.conn.Close()
		select {
		case <-old.done:
		case <-timer.C:
			return nil, errors.New("the previous connection from this node is still delivering")
		case <-s.done:
			return nil, ErrClosed
		}
	}
}

// release ends c's claim on p.
func (s *Server) release(c *inConn, name string, p *peer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.active != c {
		return
	}
	p.active = nil
}

// receive reads frames until the connection fails, delivering data in order,
// skipping duplicates, and acking in batches: when no further whole frame is
// buffered, every ackEvery messages, at most ackDelay after a delivery, and
// at once for a ping.
func (s *Server) receive(c *inConn, name string, p *peer, r *frameReader, w *frameWriter, idle time.Duration, last, safe uint64) error {
	var (
		owed   bool      // an ack is due
		urgent bool      // ...right now (ping)
		count  int       // messages since the last ack
		since  time.Time // first delivery since the last ack
	)
	// With Config.BeforeAck, acks are written by their own goroutine once
	// BeforeAck returns, so waiting for it does not hold up deliveries
	// (nor claims and their answers, which share the link).
	var acker *asyncAcker
	if s.cfg.BeforeAck != nil {
		acker = startAcker(s.cfg.BeforeAck, c.conn, w, idle, safe, &p.safe)
		defer acker.stop()
	}
	for {
		if acker != nil {
			select {
			case err := <-acker.failed:
				return err
			default:
			}
		}
		f, err := r.next()
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return fmt.Errorf("heard nothing for %v: %w", idle, err)
			}
			return err
		}
		switch f.Type {
		case FrameData:
			switch {
			case f.Seq == 0: // OnUp message: never de-duplicated
				s.deliver(name, p, f.Msg)
			case f.Seq <= last:
				p.duplicates.Add(1)
			default:
				s.deliver(name, p, f.Msg)
				last = f.Seq
				p.last.Store(last)
			}
			// OnUp messages (seq 0) change nothing to ack, but acking them
			// anyway tells the dialer the link is alive while it writes a
			// large snapshot.
			if !owed {
				owed, since = true, time.Now()
			}
			count++
		case FramePing:
			owed, urgent = true, true
		default:
			return fmt.Errorf("%w: %v after the handshake", ErrUnexpectedFrame, f.Type)
		}
		if owed && (urgent || count >= ackEvery || !r.buffered() || time.Since(since) >= ackDelay) {
			if acker != nil {
				acker.ack(last)
				owed, urgent, count = false, false, 0
				continue
			}
			_ = c.conn.SetWriteDeadline(time.Now().Add(idle))
			if err := w.frame(Frame{Type: FrameAck, Seq: last}); err != nil {
				return err
			}
			if err := w.flush(); err != nil {
				return err
			}
			owed, urgent, count = false, false, 0
		}
	}
}

// deliver hands m to the handler and counts it.
func (s *Server) deliver(name string, p *peer, m Message) {
	s.h.Deliver(name, m)
	p.messages.Add(1)
	p.bytes.Add(int64(len(m.Body)))
}

// asyncAcker writes a connection's acks from its own goroutine, each after
// Config.BeforeAck reports the messages safe, always for the latest seq
// delivered.
type asyncAcker struct {
	latest atomic.Uint64
	kick   chan struct{}
	failed chan error
	quit   chan struct{}
	done   chan struct{}
}

// safe is the last seq reported safe before, and peerSafe where each new
// one is recorded for the peer's next connection.
func startAcker(before func() func() bool, conn net.Conn, w *frameWriter, idle time.Duration, safe uint64, peerSafe *atomic.Uint64) *asyncAcker {
	a := &asyncAcker{kick: make(chan struct{}, 1), failed: make(chan error, 1), quit: make(chan struct{}), done: make(chan struct{})}
	write := func(seq uint64) error {
		_ = conn.SetWriteDeadline(time.Now().Add(idle))
		err := w.frame(Frame{Type: FrameAck, Seq: seq})
		if err == nil {
			err = w.flush()
		}
		return err
	}
	go func() {
		defer close(a.done)
		for {
			select {
			case <-a.quit:
				return
			case <-a.kick:
			}
			// The seq first: what was delivered up to it is what the
			// check must cover.
			seq := a.latest.Load()
			for check := before(); !check(); {
				// Not safe yet (a slow store): an ack of what was safe
				// already tells the sender the link is alive without
				// letting it forget what is not, and the same check is
				// asked again (later deliveries wait for the next one). Acking seq anyway would lose those messages
				// should this process die before they are safe.
				if err := write(safe); err != nil {
					a.failed <- err
					return
				}
				select {
				case <-a.quit:
					return
				case <-time.After(ackRetryPause):
				}
			}
			// Safe even should the write fail: a reconnect's ready
			// frame may then let the sender forget them.
			safe = seq
			peerSafe.Store(safe)
			if err := write(seq); err != nil {
				a.failed <- err
				return
			}
		}
	}()
	return a
}

// ackRetryPause spaces the keep-alive acks of an acker whose BeforeAck
// says the messages are not safe yet (well within a heartbeat).
const ackRetryPause = 50 * time.Millisecond

// ack asks for an ack of everything up to seq.
func (a *asyncAcker) ack(seq uint64) {
	a.latest.Store(seq)
	select {
	case a.kick <- struct{}{}:
	default: // an ack is pending; it will carry seq
	}
}

func (a *asyncAcker) stop() {
	close(a.quit)
	<-a.done
}
