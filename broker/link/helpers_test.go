package link

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/testutil"
)

const (
	testSecret = "test-secret"
	typeData   = 16 // message type of test payloads
	typeSnap   = 17 // message type of OnUp snapshots
)

// waitFor polls cond until it returns nil, failing the test after timeout
// (scaled under -race) with cond's last error.
func waitFor(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	testutil.WaitFor(t, timeout*raceScale, cond)
}

// testConfig returns a config for node name with quiet, fast timers and logs
// that go to t.Log.
func testConfig(t testing.TB, name string) Config {
	t.Helper()
	log, buf := testutil.Logger(t)
	t.Cleanup(buf.Stop) // registered first, so it runs after every Close
	return Config{
		NodeName:         name,
		Secret:           testSecret,
		RedialMax:        100 * time.Millisecond,
		HandshakeTimeout: 2 * time.Second * raceScale,
		Logger:           log,
	}
}

// startServer listens on a loopback port and closes the server when the
// test ends.
func startServer(t testing.TB, cfg Config, h Handler) *Server {
	t.Helper()
	return startServerAt(t, "127.0.0.1:0", cfg, h)
}

func startServerAt(t testing.TB, addr string, cfg Config, h Handler) *Server {
	t.Helper()
	s, err := Listen(addr, cfg, h)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// dial starts a Link and closes it when the test ends.
func dial(t testing.TB, peer, addr string, cfg Config, onUp func() []Message) *Link {
	t.Helper()
	l := Dial(peer, addr, cfg, onUp)
	t.Cleanup(l.Close)
	return l
}

// waitUp waits for l to be up.
func waitUp(t testing.TB, l *Link) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second*raceScale)
	defer cancel()
	if err := l.WaitUp(ctx); err != nil {
		t.Fatalf("link to %s not up: %v (stats %+v)", l.Peer(), err, l.Stats())
	}
}

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

// payload encodes a test message: an index and whether it was sent
// reliably.
func payload(i int, reliable bool, pad int) []byte {
	b := make([]byte, 9+pad)
	binary.BigEndian.PutUint64(b, uint64(i))
	if reliable {
		b[8] = 1
	}
	return b
}

func decodePayload(t testing.TB, m Message) (i int, reliable bool) {
	t.Helper()
	if len(m.Body) < 9 {
		t.Fatalf("short test payload %q", m.Body)
	}
	return int(binary.BigEndian.Uint64(m.Body)), m.Body[8] == 1
}

// recorder is a Handler that keeps what it is given and checks that Deliver
// is never called concurrently for one sender.
type recorder struct {
	mu       sync.Mutex
	msgs     []Message
	from     []string
	inflight sync.Map // sender → *atomic.Int32
	overlaps atomic.Int64
}

func (r *recorder) Deliver(from string, m Message) {
	v, _ := r.inflight.LoadOrStore(from, new(atomic.Int32))
	n := v.(*atomic.Int32)
	if n.Add(1) > 1 {
		r.overlaps.Add(1)
	}
	defer n.Add(-1)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, m)
	r.from = append(r.from, from)
}

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.msgs)
}

func (r *recorder) messages() []Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Message(nil), r.msgs...)
}

// count returns a condition for waitFor: r holds exactly n messages.
func (r *recorder) count(n int) func() error {
	return func() error {
		if got := r.len(); got != n {
			return fmt.Errorf("delivered %d messages, want %d", got, n)
		}
		return nil
	}
}

// proxy is a loopback TCP proxy for fault injection: it forwards both ways
// between its clients and target, and can cut or freeze (black-hole) the
// connections it currently holds. New connections are forwarded normally.
type proxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex
	closed bool
	pairs  map[*proxyPair]struct{}

	// record, when set, keeps every byte forwarded, both ways, in recorded.
	record   atomic.Bool
	recMu    sync.Mutex
	recorded []byte
}

// bytes returns what the proxy recorded.
func (p *proxy) bytes() []byte {
	p.recMu.Lock()
	defer p.recMu.Unlock()
	return append([]byte(nil), p.recorded...)
}

type proxyPair struct {
	client, server net.Conn
	frozen         atomic.Bool
}

func (p *proxyPair) close() {
	_ = p.client.Close()
	_ = p.server.Close()
}

func newProxy(t testing.TB, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, pairs: make(map[*proxyPair]struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		pr := &proxyPair{client: c, server: s}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			pr.close()
			return
		}
		p.pairs[pr] = struct{}{}
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(pr, s, c)
		go p.pipe(pr, c, s)
	}
}

// pipe copies src to dst until either fails, discarding while frozen.
func (p *proxy) pipe(pr *proxyPair, dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !pr.frozen.Load() {
			if p.record.Load() {
				p.recMu.Lock()
				p.recorded = append(p.recorded, buf[:n]...)
				p.recMu.Unlock()
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	pr.close()
	p.mu.Lock()
	delete(p.pairs, pr)
	p.mu.Unlock()
}

// cut closes every current connection and returns how many there were.
func (p *proxy) cut() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pr := range p.pairs {
		pr.close()
	}
	return len(p.pairs)
}

// freeze makes every current connection silently drop what it carries,
// without closing it.
func (p *proxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pr := range p.pairs {
		pr.frozen.Store(true)
	}
}

func (p *proxy) close() {
	p.mu.Lock()
	p.closed = true
	_ = p.ln.Close()
	for pr := range p.pairs {
		pr.close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
