package link

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestBasicOrderAndStats(t *testing.T) {
	rec := &recorder{}
	scfg := testConfig(t, "b")
	scfg.Incarnation = 42
	s := startServer(t, scfg, rec)
	l := dial(t, "b", s.Addr(), testConfig(t, "a"), nil)

	const n = 10000
	var body int64
	for i := range n {
		reliable := i%3 != 0
		m := Message{Type: typeData + byte(i%200), Body: payload(i, reliable, i%50)}
		body += int64(len(m.Body))
		if !l.Send(m, reliable) {
			t.Fatalf("Send %d refused", i)
		}
	}
	waitFor(t, 10*time.Second, rec.count(n))
	for i, m := range rec.messages() {
		if got, reliable := decodePayload(t, m); got != i || reliable != (i%3 != 0) || m.Type != typeData+byte(i%200) {
			t.Fatalf("message %d: index %d, reliable %v, type %d", i, got, reliable, m.Type)
		}
		if rec.from[i] != "a" {
			t.Fatalf("message %d from %q, want a", i, rec.from[i])
		}
	}
	waitFor(t, 5*time.Second, func() error {
		if st := l.Stats(); st.QueueLen != 0 || st.QueueBytes != 0 || st.Acked != n {
			return fmt.Errorf("queue %d messages / %d bytes, acked %d; want 0 / 0, %d", st.QueueLen, st.QueueBytes, st.Acked, n)
		}
		return nil
	})
	st := l.Stats()
	want := LinkStats{Peer: "b", Addr: s.Addr(), State: StateUp, Connects: 1, Messages: n, Bytes: body, Acked: n, PeerIncarnation: 42}
	if st != want {
		t.Errorf("link stats\n got %+v\nwant %+v", st, want)
	}
	in := s.Stats().Peers["a"]
	if !in.Connected || in.Messages != n || in.Bytes != body || in.Duplicates != 0 || in.Incarnation == 0 {
		t.Errorf("inbound stats %+v; want connected, %d messages, %d bytes, no duplicates", in, n, body)
	}
}

func TestOnUpFirst(t *testing.T) {
	rec := &recorder{}
	srvCfg := testConfig(t, "b")
	// The successor below is the same process listening again: a
	// restarted one would not get the queue (see TestRestarts).
	srvCfg.Incarnation = 1
	s := startServer(t, srvCfg, rec)
	p := newProxy(t, s.Addr())
	var gen atomic.Int64
	onUp := func() []Message {
		g := gen.Add(1)
		return []Message{
			{Type: typeSnap, Body: fmt.Appendf(nil, "routes-%d", g)},
			{Type: typeSnap, Body: fmt.Appendf(nil, "retained-%d", g)},
		}
	}
	l := dial(t, "b", p.addr(), testConfig(t, "a"), onUp)
	send := func(from, n int) {
		for i := from; i < from+n; i++ {
			if !l.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true) {
				t.Fatalf("Send %d refused", i)
			}
		}
	}
	// check asserts that msgs are the snapshot of generation g, then the
	// queued messages from..from+n.
	check := func(msgs []Message, g, from, n int) {
		t.Helper()
		if len(msgs) != 2+n {
			t.Fatalf("got %d messages, want %d", len(msgs), 2+n)
		}
		for i, want := range []string{fmt.Sprintf("routes-%d", g), fmt.Sprintf("retained-%d", g)} {
			if msgs[i].Type != typeSnap || string(msgs[i].Body) != want {
				t.Fatalf("message %d: type %d %q, want the OnUp message %q", i, msgs[i].Type, msgs[i].Body, want)
			}
		}
		for i, m := range msgs[2:] {
			if got, _ := decodePayload(t, m); m.Type != typeData || got != from+i {
				t.Fatalf("message %d after the snapshot: index %d, want %d", i, got, from+i)
			}
		}
	}

	// Queued while the link comes up.
	send(0, 10)
	waitFor(t, 5*time.Second, rec.count(12))
	check(rec.messages(), 1, 0, 10)

	// Written into a black hole, then resent on the next connection, after
	// its snapshot.
	waitFor(t, 5*time.Second, func() error {
		if q := l.Stats().QueueLen; q != 0 {
			return fmt.Errorf("%d messages unacked, want 0", q)
		}
		return nil
	})
	p.freeze()
	send(10, 10)
	waitFor(t, 5*time.Second, func() error {
		if w := l.Stats().Messages; w != 20 {
			return fmt.Errorf("%d messages written, want 20", w)
		}
		return nil
	})
	if p.cut() == 0 {
		t.Fatal("proxy had no connection to cut")
	}
	waitFor(t, 5*time.Second, rec.count(24))
	check(rec.messages()[12:], 2, 10, 10)
	if st := l.Stats(); st.Resends != 10 || st.Connects != 2 || st.OnUpMessages != 4 {
		t.Errorf("stats %+v; want 10 resends, 2 connects, 4 OnUp messages", st)
	}

	// Queued while the receiver is down, delivered to its successor after
	// the snapshot.
	waitFor(t, 5*time.Second, func() error {
		if q := l.Stats().QueueLen; q != 0 {
			return fmt.Errorf("%d messages unacked, want 0", q)
		}
		return nil
	})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() error {
		if l.Up() {
			return errors.New("link still up after the server closed")
		}
		return nil
	})
	send(20, 5)
	rec2 := &recorder{}
	startServerAt(t, s.Addr(), srvCfg, rec2)
	waitFor(t, 5*time.Second, rec2.count(7))
	check(rec2.messages(), 3, 20, 5)
}

func TestResendAcrossDrops(t *testing.T) {
	rec := &recorder{}
	s := startServer(t, testConfig(t, "b"), rec)
	p := newProxy(t, s.Addr())
	l := dial(t, "b", p.addr(), testConfig(t, "a"), nil)

	// The sender streams 5,000 reliable messages with an unreliable one
	// before every fourth, at a paced rate and keeping at most ~500 unacked,
	// so that the cuts land mid-stream. Every message carries a global
	// index.
	const reliable = 5000
	senderDone := make(chan error, 1)
	go func() {
		idx := 0
		for r := range reliable {
			if r%4 == 0 {
				l.Send(Message{Type: typeData, Body: payload(idx, false, 0)}, false)
				idx++
			}
			if !l.Send(Message{Type: typeData, Body: payload(idx, true, 0)}, true) {
				senderDone <- fmt.Errorf("reliable Send %d refused", r)
				return
			}
			idx++
			if r%8 == 7 {
				time.Sleep(time.Millisecond) // rate limit, not synchronisation
			}
			for deadline := time.Now().Add(10 * time.Second * raceScale); l.Stats().QueueLen >= 500; {
				if time.Now().After(deadline) {
					senderDone <- fmt.Errorf("queue stuck at %+v", l.Stats())
					return
				}
				time.Sleep(time.Millisecond) // polling interval
			}
		}
		senderDone <- nil
	}()

	reliableDelivered := func() int {
		n := 0
		for _, m := range rec.messages() {
			if _, r := decodePayload(t, m); r {
				n++
			}
		}
		return n
	}
	for k := 1; k <= 5; k++ {
		waitFor(t, 10*time.Second, func() error {
			if n := reliableDelivered(); n < k*800 {
				return fmt.Errorf("%d reliable messages delivered, want %d before cut %d", n, k*800, k)
			}
			if st := l.Stats(); st.Connects != int64(k) || st.State != StateUp {
				return fmt.Errorf("link %s after %d connects, want up after %d before cut %d", st.State, st.Connects, k, k)
			}
			return nil
		})
		if k == 3 {
			// Make sure some messages are written and lost in transit.
			p.freeze()
			written := l.Stats().Messages
			waitFor(t, 5*time.Second, func() error {
				if w := l.Stats().Messages; w < written+20 {
					return fmt.Errorf("%d messages written since the freeze, want 20", w-written)
				}
				return nil
			})
		}
		p.cut()
	}
	if err := <-senderDone; err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, func() error {
		if n := reliableDelivered(); n != reliable {
			return fmt.Errorf("%d reliable messages delivered, want %d", n, reliable)
		}
		return nil
	})

	// Strictly increasing indexes: in order, no duplicates of either kind.
	prev, unreliable := -1, 0
	for _, m := range rec.messages() {
		i, r := decodePayload(t, m)
		if i <= prev {
			t.Fatalf("index %d delivered after %d", i, prev)
		}
		prev = i
		if !r {
			unreliable++
		}
	}
	st := l.Stats()
	in := s.Stats().Peers["a"]
	t.Logf("link %+v; inbound %+v; unreliable delivered %d of %d", st, in, unreliable, reliable/4)
	if st.Connects < 6 || st.Resends == 0 || in.Duplicates != 0 {
		t.Errorf("%d connects, %d resends, %d duplicates; want ≥ 6, > 0, 0", st.Connects, st.Resends, in.Duplicates)
	}
	if int64(unreliable)+st.Skipped != reliable/4 {
		t.Errorf("%d unreliable delivered + %d skipped, want %d sent", unreliable, st.Skipped, reliable/4)
	}
	if o := rec.overlaps.Load(); o != 0 {
		t.Errorf("Deliver overlapped %d times for one sender", o)
	}
}

func TestRestarts(t *testing.T) {
	t.Run("sender", func(t *testing.T) {
		rec := &recorder{}
		s := startServer(t, testConfig(t, "b"), rec)
		total := 0
		// A restarted sender (new incarnation) and a re-dial within one
		// process (same incarnation) both count from seq 1 again.
		for round, inc := range []uint64{1, 2, 2} {
			cfg := testConfig(t, "a")
			cfg.Incarnation = inc
			l := Dial("b", s.Addr(), cfg, nil)
			for range 100 {
				l.Send(Message{Type: typeData, Body: payload(total, true, 0)}, true)
				total++
			}
			waitFor(t, 5*time.Second, rec.count(total))
			waitFor(t, 5*time.Second, func() error {
				if q := l.Stats().QueueLen; q != 0 {
					return fmt.Errorf("round %d: %d messages unacked", round, q)
				}
				return nil
			})
			l.Close()
		}
		for i, m := range rec.messages() {
			if got, _ := decodePayload(t, m); got != i {
				t.Fatalf("message %d has index %d", i, got)
			}
		}
		waitFor(t, 5*time.Second, func() error {
			if in := s.Stats().Peers["a"]; in.Connected || in.Incarnation != 2 || in.Duplicates != 0 {
				return fmt.Errorf("inbound %+v; want disconnected, incarnation 2, no duplicates", in)
			}
			return nil
		})
	})

	// A receiver that comes back as the same process (same incarnation:
	// its Server closed and listened again) gets what was queued while it
	// was away; one that restarted (new incarnation) does not: the queue
	// was meant for a process that is gone, and is reported discarded.
	for _, tc := range []struct {
		name      string
		sameInc   bool
		delivered int
	}{{"receiver same incarnation", true, 50}, {"receiver restarted", false, 0}} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			cfg := testConfig(t, "b")
			cfg.Incarnation = 7
			s := startServer(t, cfg, rec)
			dcfg := testConfig(t, "a")
			var mu sync.Mutex
			discarded := map[Discard]int{}
			dcfg.OnDiscard = func(l *Link, why Discard, msgs []Message) {
				mu.Lock()
				defer mu.Unlock()
				if l.Peer() == "b" {
					discarded[why] += len(msgs)
				}
			}
			l := dial(t, "b", s.Addr(), dcfg, nil)
			for i := range 50 {
				l.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
			}
			waitFor(t, 5*time.Second, rec.count(50))
			waitFor(t, 5*time.Second, func() error {
				if q := l.Stats().QueueLen; q != 0 {
					return fmt.Errorf("%d messages unacked", q)
				}
				return nil
			})
			if inc := l.Stats().PeerIncarnation; inc != 7 {
				t.Fatalf("peer incarnation %d, want 7", inc)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			waitFor(t, 5*time.Second, func() error {
				if st := l.Stats(); st.State != StateConnecting {
					return fmt.Errorf("link state %q after the server closed, want %q", st.State, StateConnecting)
				}
				return nil
			})
			for i := 50; i < 100; i++ {
				l.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
			}
			if !tc.sameInc {
				cfg.Incarnation = 8
			}
			rec2 := &recorder{}
			s2 := startServerAt(t, s.Addr(), cfg, rec2)
			waitFor(t, 5*time.Second, func() error {
				if st := l.Stats(); st.Connects != 2 || st.QueueLen != 0 {
					return fmt.Errorf("%d connects, %d queued; want 2 and 0", st.Connects, st.QueueLen)
				}
				return nil
			})
			// One more message shows the link works, and orders after the rest.
			l.Send(Message{Type: typeData, Body: payload(100, true, 0)}, true)
			waitFor(t, 5*time.Second, rec2.count(tc.delivered+1))
			for i, m := range rec2.messages() {
				want := 50 + i
				if i == tc.delivered {
					want = 100
				}
				if got, _ := decodePayload(t, m); got != want {
					t.Fatalf("message %d has index %d, want %d", i, got, want)
				}
			}
			mu.Lock()
			got := maps.Clone(discarded)
			mu.Unlock()
			want := map[Discard]int{}
			if !tc.sameInc {
				want[DiscardRestarted] = 50
			}
			if !maps.Equal(got, want) {
				t.Errorf("discarded %v, want %v", got, want)
			}
			if st := l.Stats(); st.Discarded != int64(50-tc.delivered) || st.PeerIncarnation != cfg.Incarnation {
				t.Errorf("stats %+v: want %d discarded, peer incarnation %d", st, 50-tc.delivered, cfg.Incarnation)
			}
			if in := s2.Stats().Peers["a"]; !in.Connected || in.Messages != int64(tc.delivered+1) {
				t.Errorf("new server's inbound stats %+v", in)
			}
		})
	}
}

// TestDiscardReported: what a Link throws away is reported to OnDiscard,
// by reason: the queue on Close, and unreliable messages written on a
// connection that broke before the peer delivered them.
func TestDiscardReported(t *testing.T) {
	var mu sync.Mutex
	discarded := map[Discard][]int{}
	cfg := testConfig(t, "a")
	cfg.OnDiscard = func(_ *Link, why Discard, msgs []Message) {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range msgs {
			i, _ := decodePayload(t, m)
			discarded[why] = append(discarded[why], i)
		}
	}
	get := func() map[Discard][]int {
		mu.Lock()
		defer mu.Unlock()
		out := map[Discard][]int{}
		for k, v := range discarded {
			out[k] = slices.Clone(v)
		}
		return out
	}

	// A receiver that never delivers: the proxy passes the dialer's
	// frames to nobody once frozen.
	rec := &recorder{}
	s := startServer(t, testConfig(t, "b"), rec)
	px := newProxy(t, s.Addr())
	l := dial(t, "b", px.addr(), cfg, nil)
	waitUp(t, l)
	px.freeze()
	l.Send(Message{Type: typeData, Body: payload(1, false, 0)}, false)
	l.Send(Message{Type: typeData, Body: payload(2, true, 0)}, true)
	waitFor(t, 5*time.Second, func() error {
		if st := l.Stats(); st.Messages < 2 {
			return fmt.Errorf("%d messages written, want 2", st.Messages)
		}
		return nil
	})
	px.cut()
	// The link reconnects: the unreliable message was written and not
	// delivered, so it is gone, reported; the reliable one is sent again.
	waitFor(t, 10*time.Second, rec.count(1))
	if i, _ := decodePayload(t, rec.messages()[0]); i != 2 {
		t.Fatalf("delivered %d after the reconnect, want 2", i)
	}
	if got := get(); !slices.Equal(got[DiscardUnreliable], []int{1}) {
		t.Fatalf("discarded %v, want the unreliable message 1", got)
	}

	// Close with a queue: reported as closed.
	waitFor(t, 5*time.Second, func() error {
		if q := l.Stats().QueueLen; q != 0 {
			return fmt.Errorf("%d messages unacked", q)
		}
		return nil
	})
	px.freeze()
	l.Send(Message{Type: typeData, Body: payload(3, true, 0)}, true)
	l.Send(Message{Type: typeData, Body: payload(4, false, 0)}, false)
	l.Close()
	if got := get(); !slices.Equal(got[DiscardClosed], []int{3, 4}) {
		t.Fatalf("discarded %v, want 3 and 4 closed", got)
	}
	if st := l.Stats(); st.Discarded != 3 || st.QueueLen != 0 || st.QueueBytes != 0 {
		t.Errorf("stats %+v: want 3 discarded, empty queue", st)
	}
	if err := l.Queue(Message{Type: typeData, Body: payload(5, true, 0)}, true); !errors.Is(err, ErrClosed) {
		t.Errorf("Queue on a closed link: %v, want ErrClosed", err)
	}
}

func TestAuth(t *testing.T) {
	for _, tc := range []struct{ name, server, dialer string }{
		{"wrong secret", "secret-1", "secret-2"},
		{"dialer without secret", "secret-1", ""},
		{"acceptor without secret", "", "secret-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			sc, dc := testConfig(t, "b"), testConfig(t, "a")
			sc.Secret, dc.Secret = tc.server, tc.dialer
			s := startServer(t, sc, rec)
			l := dial(t, "b", s.Addr(), dc, nil)
			l.Send(Message{Type: typeData, Body: payload(0, true, 0)}, true)
			waitFor(t, 5*time.Second, func() error {
				if f, h := s.Stats().AuthFailures, l.Stats().HandshakeFailures; f < 2 || h < 2 {
					return fmt.Errorf("%d auth failures on the server, %d handshake failures on the link; want ≥ 2 each", f, h)
				}
				return nil
			})
			st := l.Stats()
			if st.State != StateConnecting || st.Connects != 0 || !strings.Contains(st.LastError, "bad cluster secret") {
				t.Errorf("link stats %+v; want connecting, no connects, bad cluster secret", st)
			}
			if n := rec.len(); n != 0 {
				t.Errorf("%d messages delivered despite the bad secret", n)
			}
		})
	}

	t.Run("raw clients", func(t *testing.T) {
		rec := &recorder{}
		cfg := testConfig(t, "b")
		cfg.HandshakeTimeout = 300 * time.Millisecond * raceScale
		s := startServer(t, cfg, rec)

		// expectClosed reads from conn until the server closes it and returns
		// what it sent.
		expectClosed := func(conn net.Conn) []byte {
			t.Helper()
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second * raceScale))
			var got bytes.Buffer
			// A reset counts as closed too: the server may close with
			// garbage left unread.
			if _, err := got.ReadFrom(conn); isTimeout(err) {
				t.Fatalf("want the server to close the connection, got %v", err)
			}
			return got.Bytes()
		}
		rawDial := func() net.Conn {
			t.Helper()
			conn, err := net.Dial("tcp", s.Addr())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = conn.Close() })
			return conn
		}

		garbage := rawDial()
		if _, err := garbage.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		expectClosed(garbage)

		start := time.Now()
		expectClosed(rawDial()) // silent
		if d := time.Since(start); d < cfg.HandshakeTimeout/2 {
			t.Errorf("silent client closed after %v, before the handshake timeout %v", d, cfg.HandshakeTimeout)
		}

		v2 := rawDial()
		if _, err := v2.Write(AppendFrame(nil, Frame{Type: FrameHello, Version: 2})); err != nil {
			t.Fatal(err)
		}
		f, _, err := DecodeFrame(expectClosed(v2), 1<<10)
		if err != nil || f.Type != FrameReject || !strings.Contains(f.Reason, "protocol version 2 not supported") {
			t.Errorf("answer to a version 2 hello: %+v, %v; want a reject naming the version", f, err)
		}

		waitFor(t, 5*time.Second, func() error {
			if f := s.Stats().AuthFailures; f != 3 {
				return fmt.Errorf("%d auth failures, want 3", f)
			}
			return nil
		})

		// The server still serves a good link.
		l := dial(t, "b", s.Addr(), testConfig(t, "a"), nil)
		l.Send(Message{Type: typeData, Body: payload(0, true, 0)}, true)
		waitFor(t, 5*time.Second, rec.count(1))
	})
}

func TestWrongPeer(t *testing.T) {
	rec := &recorder{}
	s := startServer(t, testConfig(t, "b"), rec)
	l := dial(t, "c", s.Addr(), testConfig(t, "a"), nil)
	l.Send(Message{Type: typeData, Body: payload(0, true, 0)}, true)
	waitFor(t, 5*time.Second, func() error {
		st := l.Stats()
		if st.HandshakeFailures == 0 || !strings.Contains(st.LastError, `dialled "c" but "b" answered`) {
			return fmt.Errorf("link stats %+v; want a failed handshake naming both nodes", st)
		}
		return nil
	})
	if st := l.Stats(); st.State != StateConnecting || st.Connects != 0 {
		t.Errorf("link stats %+v; want connecting, no connects", st)
	}
	waitFor(t, 5*time.Second, func() error {
		if f := s.Stats().AuthFailures; f == 0 {
			return errors.New("the server counted no failure")
		}
		return nil
	})
	if n := rec.len(); n != 0 {
		t.Errorf("%d messages delivered to the wrong node", n)
	}
}

func TestQueueBound(t *testing.T) {
	addr := freeAddr(t)
	cfg := testConfig(t, "a")
	cfg.QueueBytes, cfg.MaxFrame = 1000, 512
	l := dial(t, "b", addr, cfg, nil)
	for i := range 10 {
		if !l.Send(Message{Type: typeData, Body: payload(i, i%2 == 0, 91)}, i%2 == 0) {
			t.Fatalf("Send %d refused with the queue at %+v", i, l.Stats())
		}
	}
	if err := l.Queue(Message{Type: typeData, Body: payload(10, true, 0)}, true); !errors.Is(err, ErrQueueFull) {
		t.Errorf("reliable Queue beyond QueueBytes: %v, want ErrQueueFull", err)
	}
	if l.Send(Message{Type: typeData, Body: payload(10, false, 0)}, false) {
		t.Error("unreliable Send beyond QueueBytes accepted")
	}
	if err := l.Queue(Message{Type: typeData, Body: make([]byte, 512-11)}, true); !errors.Is(err, ErrOversize) {
		t.Errorf("Queue of a body over MaxFrame-12: %v, want ErrOversize", err)
	}
	st := l.Stats()
	if st.State != StateConnecting || st.QueueLen != 10 || st.QueueBytes != 1000 ||
		st.DroppedReliable != 1 || st.DroppedUnreliable != 1 || st.Oversize != 1 || st.Discarded != 0 {
		t.Errorf("stats %+v; want connecting, 10 queued (1000 bytes), one drop of each kind, one oversize", st)
	}

	// The queue survives until the peer appears.
	rec := &recorder{}
	scfg := testConfig(t, "b")
	scfg.MaxFrame = 512
	startServerAt(t, addr, scfg, rec)
	waitFor(t, 5*time.Second, rec.count(10))
	for i, m := range rec.messages() {
		if got, _ := decodePayload(t, m); got != i {
			t.Fatalf("message %d has index %d", i, got)
		}
	}

	defer func() {
		if recover() == nil {
			t.Error("Send with a reserved type did not panic")
		}
	}()
	l.Send(Message{Type: MinMessageType - 1}, true)
}

func TestHeartbeat(t *testing.T) {
	const hb = 100 * time.Millisecond

	t.Run("black hole", func(t *testing.T) {
		rec := &recorder{}
		s := startServer(t, testConfig(t, "b"), rec)
		p := newProxy(t, s.Addr())
		cfg := testConfig(t, "a")
		cfg.Heartbeat = hb * raceScale
		l := dial(t, "b", p.addr(), cfg, nil)
		waitUp(t, l)
		l.Send(Message{Type: typeData, Body: payload(0, true, 0)}, true)
		waitFor(t, 5*time.Second, rec.count(1))

		p.freeze()
		start := time.Now()
		waitFor(t, 5*time.Second, func() error {
			if st := l.Stats(); st.Connects != 2 || st.State != StateUp {
				return fmt.Errorf("link %s after %d connects, want up after 2", st.State, st.Connects)
			}
			return nil
		})
		d := time.Since(start)
		t.Logf("reconnected %v after the freeze (heartbeat %v)", d, cfg.Heartbeat)
		if d < cfg.Heartbeat || d > 10*cfg.Heartbeat {
			t.Errorf("reconnected %v after the freeze, want about 3 heartbeats of %v", d, cfg.Heartbeat)
		}
		l.Send(Message{Type: typeData, Body: payload(1, true, 0)}, true)
		waitFor(t, 5*time.Second, rec.count(2))
	})

	t.Run("silent dialer", func(t *testing.T) {
		// A dialer that completes the handshake, announcing a short
		// heartbeat, and then says nothing is cut off by the acceptor.
		s := startServer(t, testConfig(t, "b"), &recorder{})
		conn, err := net.Dial("tcp", s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		r, w := newFrameReader(conn, 1<<10, 1<<10), newFrameWriter(conn)
		nonceD := nonce()
		_ = w.frame(Frame{Type: FrameHello, Version: ProtocolVersion, Node: "a", Incarnation: 1, Stream: 1, Heartbeat: hb, Nonce: nonceD})
		_ = w.flush()
		ch, err := expect(r, FrameChallenge)
		if err != nil {
			t.Fatal(err)
		}
		_ = w.frame(Frame{Type: FrameAuth, MAC: proof(testSecret, labelDialer, &ch.Nonce, &nonceD, "a", "b")})
		_ = w.flush()
		if _, err := expect(r, FrameReady); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second * raceScale))
		if _, err := r.next(); err == nil || errors.Is(err, net.ErrClosed) || isTimeout(err) {
			t.Fatalf("read after going silent: %v; want the acceptor to close the connection", err)
		}
		if d := time.Since(start); d < 2*hb {
			t.Errorf("closed after %v, before 3 heartbeats of %v", d, hb)
		}
	})
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestCloseLeavesNoGoroutine(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		rec := &recorder{}
		s, err := Listen("127.0.0.1:0", testConfig(t, "b"), rec)
		if err != nil {
			t.Fatal(err)
		}
		p := newProxy(t, s.Addr())
		up := Dial("b", p.addr(), testConfig(t, "a"), func() []Message { return []Message{{Type: typeSnap}} })
		down := Dial("c", freeAddr(t), testConfig(t, "a"), nil)
		idle, err := net.Dial("tcp", s.Addr()) // a client stuck in the handshake
		if err != nil {
			t.Fatal(err)
		}
		defer idle.Close()
		for i := range 100 {
			up.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
			down.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
		}
		waitFor(t, 5*time.Second, rec.count(101))

		// Close the server first: the link must go back to connecting.
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		_ = s.Close()
		waitFor(t, 5*time.Second, func() error {
			if up.Up() {
				return errors.New("link still up after the server closed")
			}
			return nil
		})
		for _, l := range []*Link{up, down} {
			l.Close()
			l.Close()
			if st := l.Stats(); st.State != StateClosed || st.QueueLen != 0 {
				t.Errorf("after Close: %+v", st)
			}
			if l.Send(Message{Type: typeData}, true) {
				t.Error("Send on a closed link accepted")
			}
			if err := l.WaitUp(t.Context()); !errors.Is(err, ErrClosed) {
				t.Errorf("WaitUp on a closed link: %v", err)
			}
		}
		p.close()
	}()
	waitFor(t, 5*time.Second, func() error {
		if n := runtime.NumGoroutine(); n > before {
			return fmt.Errorf("%d goroutines, %d before", n, before)
		}
		return nil
	})
}

// TestForgetMakesPeerResnapshot: Forget closes a live peer's connection; it
// redials, opens with a fresh OnUp snapshot, and nothing it re-sends is
// delivered twice.
func TestForgetMakesPeerResnapshot(t *testing.T) {
	rec := &recorder{}
	s := startServer(t, testConfig(t, "b"), rec)
	var snaps atomic.Int64
	l := dial(t, "b", s.Addr(), testConfig(t, "a"), func() []Message {
		snaps.Add(1)
		return []Message{{Type: typeSnap, Body: []byte("snap")}}
	})
	waitUp(t, l)
	for i := range 100 {
		l.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
	}
	waitFor(t, 5*time.Second, rec.count(101))
	s.Forget("a")
	waitFor(t, 5*time.Second, func() error {
		if n := snaps.Load(); n != 2 {
			return fmt.Errorf("%d snapshots, want 2 (one per connection)", n)
		}
		return nil
	})
	for i := 100; i < 200; i++ {
		l.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
	}
	waitFor(t, 5*time.Second, rec.count(202))
	next := 0
	for _, m := range rec.messages() {
		if m.Type == typeSnap {
			continue
		}
		if i, _ := decodePayload(t, m); i != next {
			t.Fatalf("message %d after %d: duplicate or gap", i, next-1)
		}
		next++
	}
	if d := s.Stats().Peers["a"].Duplicates; d != 0 {
		t.Logf("%d re-sent messages skipped", d)
	}
}

// TestBeforeAckNotSafeKeepsMessages: while the acceptor's BeforeAck says the
// messages delivered are not safe yet (its store is slow), the sender keeps
// them queued (it would resend them should the acceptor die), and the link
// stays up past three heartbeats; once they are safe, they are acknowledged.
// Before, the acceptor acknowledged them anyway when BeforeAck gave up
// waiting, and the sender forgot messages the acceptor had not written.
func TestBeforeAckNotSafeKeepsMessages(t *testing.T) {
	const hb = 100 * time.Millisecond
	var safe atomic.Bool
	var asked atomic.Int64
	rec := &recorder{}
	scfg := testConfig(t, "b")
	scfg.BeforeAck = func() func() bool {
		return func() bool {
			asked.Add(1)
			if safe.Load() {
				return true
			}
			time.Sleep(hb / 2) // a bounded wait that gives up
			return false
		}
	}
	s := startServer(t, scfg, rec)
	cfg := testConfig(t, "a")
	cfg.Heartbeat = hb * raceScale
	l := dial(t, "b", s.Addr(), cfg, nil)
	waitUp(t, l)
	for i := range 5 {
		l.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
	}
	waitFor(t, 5*time.Second, rec.count(5))
	// Well past three heartbeats of BeforeAck answering "not yet".
	waitFor(t, 10*time.Second, func() error {
		if n := asked.Load(); n < int64(8*raceScale) {
			return fmt.Errorf("BeforeAck asked %d times", n)
		}
		return nil
	})
	if st := l.Stats(); st.Acked != 0 || st.QueueLen != 5 || st.Connects != 1 || st.State != StateUp {
		t.Fatalf("while not safe: acked %d, queued %d, connects %d, state %s; want 0 acked, 5 queued, one connection, up",
			st.Acked, st.QueueLen, st.Connects, st.State)
	}
	safe.Store(true)
	waitFor(t, 5*time.Second, func() error {
		if st := l.Stats(); st.Acked != 5 || st.QueueLen != 0 {
			return fmt.Errorf("once safe: acked %d, queued %d", st.Acked, st.QueueLen)
		}
		return nil
	})
	if st := l.Stats(); st.Connects != 1 || rec.len() != 5 {
		t.Fatalf("connects %d, delivered %d: want 1 and 5 (nothing resent)", st.Connects, rec.len())
	}
}

// TestBeforeAckNotSafeSurvivesReconnect: messages the acceptor delivered but
// whose BeforeAck says are not safe yet stay queued at the sender across a
// reconnect (same incarnation), and are delivered only once: the acceptor
// skips their resend and acknowledges them once safe. Before, the ready
// frame carried the last seq delivered, and the sender forgot messages the
// acceptor had not written (lost should it then die).
func TestBeforeAckNotSafeSurvivesReconnect(t *testing.T) {
	const hb = 100 * time.Millisecond
	var safe atomic.Bool
	var asked atomic.Int64
	rec := &recorder{}
	scfg := testConfig(t, "b")
	scfg.BeforeAck = func() func() bool {
		return func() bool {
			asked.Add(1)
			if safe.Load() {
				return true
			}
			time.Sleep(hb / 2) // a bounded wait that gives up
			return false
		}
	}
	s := startServer(t, scfg, rec)
	p := newProxy(t, s.Addr())
	cfg := testConfig(t, "a")
	cfg.Heartbeat = hb * raceScale
	l := dial(t, "b", p.addr(), cfg, nil)
	waitUp(t, l)
	for i := range 5 {
		l.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
	}
	waitFor(t, 5*time.Second, rec.count(5))
	waitFor(t, 10*time.Second, func() error {
		if n := asked.Load(); n < 3 {
			return fmt.Errorf("BeforeAck asked %d times", n)
		}
		return nil
	})

	// A network blip: the link redials the same acceptor process.
	if n := p.cut(); n == 0 {
		t.Fatal("the proxy held no connection to cut")
	}
	waitFor(t, 10*time.Second, func() error {
		if st := l.Stats(); st.Connects < 2 || st.State != StateUp {
			return fmt.Errorf("connects %d, state %s", st.Connects, st.State)
		}
		return nil
	})
	if st := l.Stats(); st.Acked != 0 || st.QueueLen != 5 {
		t.Fatalf("reconnected, while not safe: acked %d, queued %d; want 0 acked, 5 queued", st.Acked, st.QueueLen)
	}
	// The resent messages reach the acceptor, which skips them, and its
	// keep-alive acks carry on.
	waitFor(t, 10*time.Second, func() error {
		if d := s.Stats().Peers["a"].Duplicates; d < 5 {
			return fmt.Errorf("acceptor skipped %d resent messages, want 5", d)
		}
		return nil
	})
	from := asked.Load()
	waitFor(t, 10*time.Second, func() error {
		if n := asked.Load() - from; n < 4 {
			return fmt.Errorf("BeforeAck asked %d times since the resends", n)
		}
		return nil
	})
	if st := l.Stats(); st.Acked != 0 || st.QueueLen != 5 {
		t.Fatalf("after the reconnect, while not safe: acked %d, queued %d; want 0 acked, 5 queued", st.Acked, st.QueueLen)
	}

	safe.Store(true)
	waitFor(t, 5*time.Second, func() error {
		if st := l.Stats(); st.Acked != 5 || st.QueueLen != 0 {
			return fmt.Errorf("once safe: acked %d, queued %d", st.Acked, st.QueueLen)
		}
		return nil
	})
	if n := rec.len(); n != 5 {
		t.Fatalf("delivered %d messages, want 5 (none twice)", n)
	}
}

// TestQueuedUpToMark: Queued returns what is queued up to a mark, oldest
// first, acknowledged messages not included.
func TestQueuedUpToMark(t *testing.T) {
	rec := &recorder{}
	s := startServer(t, testConfig(t, "b"), rec)
	px := newProxy(t, s.Addr())
	l := dial(t, "b", px.addr(), testConfig(t, "a"), nil)
	waitUp(t, l)
	l.Send(Message{Type: typeData, Body: payload(1, true, 0)}, true)
	waitFor(t, 5*time.Second, func() error {
		if q := l.Stats().QueueLen; q != 0 {
			return fmt.Errorf("%d messages unacked", q)
		}
		return nil
	})
	px.freeze()
	l.Send(Message{Type: typeData, Body: payload(2, true, 0)}, true)
	mark := l.Mark()
	l.Send(Message{Type: typeData, Body: payload(3, false, 0)}, false)
	var got []int
	for _, m := range l.Queued(mark) {
		i, _ := decodePayload(t, m)
		got = append(got, i)
	}
	if !slices.Equal(got, []int{2}) {
		t.Fatalf("queued up to the mark %v, want [2]", got)
	}
	got = got[:0]
	for _, m := range l.Queued(l.Mark()) {
		i, _ := decodePayload(t, m)
		got = append(got, i)
	}
	if !slices.Equal(got, []int{2, 3}) {
		t.Fatalf("queued %v, want [2 3]", got)
	}
}

// TestHoldKeepsQueueUnwritten: a held link writes nothing more while its
// connection stays up (the peer cannot take and acknowledge what the
// broker keeps for others, see broker.syncPeers); what it queued stays
// for Queued, and goes out once resumed.
func TestHoldKeepsQueueUnwritten(t *testing.T) {
	rec := &recorder{}
	s := startServer(t, testConfig(t, "b"), rec)
	l := dial(t, "b", s.Addr(), testConfig(t, "a"), nil)
	waitUp(t, l)
	l.Send(Message{Type: typeData, Body: payload(1, true, 0)}, true)
	waitFor(t, 5*time.Second, rec.count(1))
	l.Hold(true)
	l.Send(Message{Type: typeData, Body: payload(2, true, 0)}, true)
	// Not written: nothing to poll for; unheld, it arrives in well under
	// a millisecond here.
	time.Sleep(300 * time.Millisecond)
	if n, st := rec.len(), l.Stats(); n != 1 || st.State != StateUp || len(l.Queued(l.Mark())) != 1 {
		t.Fatalf("held: %d delivered, state %s, %d queued; want 1, up, 1", n, st.State, len(l.Queued(l.Mark())))
	}
	l.Hold(false)
	waitFor(t, 5*time.Second, rec.count(2))
	if i, _ := decodePayload(t, rec.messages()[1]); i != 2 {
		t.Fatalf("delivered %d after the hold, want 2", i)
	}
}

// TestHeldLinkKeepsPinging: a held link whose queue keeps receiving
// messages still pings, so its peer keeps the connection. Each Send wakes
// the writer, which takes nothing while held; when those wakes restarted
// the ping timer, a Send more often than a heartbeat silenced the link and
// the peer dropped it after three heartbeats (5 connects in a second).
func TestHeldLinkKeepsPinging(t *testing.T) {
	const hb = 50 * time.Millisecond
	rec := &recorder{}
	s := startServer(t, testConfig(t, "b"), rec)
	cfg := testConfig(t, "a")
	cfg.Heartbeat = hb * raceScale
	l := dial(t, "b", s.Addr(), cfg, nil)
	waitUp(t, l)
	l.Hold(true)
	const n = 100
	tick := time.NewTicker(cfg.Heartbeat / 5)
	defer tick.Stop()
	for i := range n { // 20 heartbeats of Sends
		<-tick.C
		l.Send(Message{Type: typeData, Body: payload(i, true, 0)}, true)
	}
	if st := l.Stats(); st.Connects != 1 || st.State != StateUp {
		t.Fatalf("held link under steady Sends: %d connects, state %s; want 1, up", st.Connects, st.State)
	}
	l.Hold(false)
	waitFor(t, 5*time.Second, rec.count(n))
	for j, m := range rec.messages() {
		if i, _ := decodePayload(t, m); i != j {
			t.Fatalf("message %d is %d, want in order", j, i)
		}
	}
}
