package link

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// settledWithin waits up to d for seq to be settled on l, by Settled's
// channel (no polling), and reports whether it was.
func settledWithin(l *Link, seq uint64, d time.Duration) bool {
	stop := make(chan struct{})
	t := time.AfterFunc(d, func() { close(stop) })
	defer t.Stop()
	return l.WaitSettled(seq, stop)
}

// TestSettledWaitsForTheSafeAck: a message queued with QueueSeq is settled
// once the peer acknowledges it, which with BeforeAck it does only once
// the message is safe there: delivered is not enough.
func TestSettledWaitsForTheSafeAck(t *testing.T) {
	var safe atomic.Bool
	rec := &recorder{}
	scfg := testConfig(t, "b")
	scfg.BeforeAck = func() func() bool {
		return func() bool {
			if safe.Load() {
				return true
			}
			time.Sleep(20 * time.Millisecond)
			return false
		}
	}
	s := startServer(t, scfg, rec)
	l := dial(t, "b", s.Addr(), testConfig(t, "a"), nil)
	waitUp(t, l)
	seq1, err := l.QueueSeq(Message{Type: typeData, Body: payload(1, true, 0)}, true)
	if err != nil {
		t.Fatal(err)
	}
	seq2, _ := l.QueueSeq(Message{Type: typeData, Body: payload(2, true, 0)}, true)
	if seq2 != seq1+1 {
		t.Fatalf("seqs %d, %d: want consecutive", seq1, seq2)
	}
	waitFor(t, 5*time.Second, rec.count(2))
	if ok, ch := l.Settled(seq1); ok || ch == nil {
		t.Fatalf("settled %v (channel %v) while the peer has not made it safe", ok, ch)
	}
	if settledWithin(l, seq2, 300*time.Millisecond) {
		t.Fatal("settled while the peer has not made it safe")
	}
	safe.Store(true)
	if !settledWithin(l, seq2, 5*time.Second*raceScale) {
		t.Fatal("not settled once safe")
	}
	if ok, _ := l.Settled(seq1); !ok {
		t.Fatal("an earlier seq not settled")
	}
}

// TestSettledByHoldAndClose: a held link settles its waiters at once (its
// queue is its owner's to hand on), and so does a closed one (discarded).
func TestSettledByHoldAndClose(t *testing.T) {
	s := startServer(t, testConfig(t, "b"), &recorder{})
	px := newProxy(t, s.Addr())
	l := dial(t, "b", px.addr(), testConfig(t, "a"), nil)
	waitUp(t, l)
	px.freeze() // written, never acknowledged
	seq, _ := l.QueueSeq(Message{Type: typeData, Body: payload(1, true, 0)}, true)
	ok, ch := l.Settled(seq)
	if ok {
		t.Fatal("settled before any ack")
	}
	go l.Hold(true)
	select {
	case <-ch:
	case <-time.After(5 * time.Second * raceScale):
		t.Fatal("Hold did not wake the waiter")
	}
	if ok, _ := l.Settled(seq); !ok {
		t.Fatal("not settled on a held link")
	}
	l.Hold(false)
	if ok, _ := l.Settled(seq); !ok {
		t.Fatal("queued before the hold, not settled once resumed")
	}
	seq, _ = l.QueueSeq(Message{Type: typeData, Body: payload(2, true, 0)}, true)
	ok, ch = l.Settled(seq)
	if ok {
		t.Fatal("queued after the hold, settled with no ack")
	}
	go l.Close()
	select {
	case <-ch:
	case <-time.After(5 * time.Second * raceScale):
		t.Fatal("Close did not wake the waiter")
	}
	if ok, _ := l.Settled(seq); !ok {
		t.Fatal("not settled on a closed link")
	}
}

// TestFate: what Fate says of a message through a hold and a close, with
// the Seq that Queued and OnDiscard give: pending until the hold, held
// from then on (also once discarded: its owner took it over), and a
// message queued after the hold was resumed lost at the close.
func TestFate(t *testing.T) {
	s := startServer(t, testConfig(t, "b"), &recorder{})
	px := newProxy(t, s.Addr())
	cfg := testConfig(t, "a")
	discarded := make(chan []Message, 1)
	cfg.OnDiscard = func(_ *Link, _ Discard, msgs []Message) { discarded <- msgs }
	l := dial(t, "b", px.addr(), cfg, nil)
	waitUp(t, l)
	px.freeze() // written, never acknowledged
	seq1, _ := l.QueueSeq(Message{Type: typeData, Body: payload(1, true, 0)}, true)
	f, held, ch := l.Fate(seq1)
	if f != FatePending || held || ch == nil {
		t.Fatalf("before the hold: %v, held %v, channel %v; want pending, false, a channel", f, held, ch)
	}
	go l.Hold(true)
	select {
	case <-ch:
	case <-time.After(5 * time.Second * raceScale):
		t.Fatal("Hold did not wake the waiter")
	}
	if f, held, ch := l.Fate(seq1); f != FateHeld || !held || ch == nil {
		t.Fatalf("held: %v, held %v, channel %v; want held, true, a channel (it can still be acknowledged)", f, held, ch)
	}
	if q := l.Queued(l.Mark()); len(q) != 1 || q[0].Seq != seq1 {
		t.Fatalf("Queued %+v, want one message with seq %d", q, seq1)
	}
	l.Hold(false)
	seq2, _ := l.QueueSeq(Message{Type: typeData, Body: payload(2, true, 0)}, true)
	if f, held, _ := l.Fate(seq2); f != FatePending || held {
		t.Fatalf("queued after the hold: %v, held %v; want pending, false", f, held)
	}
	l.Close()
	msgs := <-discarded
	if len(msgs) != 2 || msgs[0].Seq != seq1 || msgs[1].Seq != seq2 {
		t.Fatalf("discarded %+v, want seqs %d and %d", msgs, seq1, seq2)
	}
	if f, held, ch := l.Fate(seq1); f != FateHeld || !held || ch != nil {
		t.Fatalf("held, then closed: %v, held %v, channel %v; want held, true, none", f, held, ch)
	}
	if f, _, ch := l.Fate(seq2); f != FateLost || ch != nil {
		t.Fatalf("closed outside a hold: %v, channel %v; want lost, none", f, ch)
	}
}

// TestFateLostToRestartStaysLost: a message a restarted peer's discard
// threw away stays lost once the new process acknowledges later ones
// (acks are cumulative: before, Lost took it for acknowledged then).
func TestFateLostToRestartStaysLost(t *testing.T) {
	cfg := testConfig(t, "b")
	cfg.Incarnation = 7
	s := startServer(t, cfg, &recorder{})
	l := dial(t, "b", s.Addr(), testConfig(t, "a"), nil)
	waitUp(t, l)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() error {
		if st := l.Stats(); st.State != StateConnecting {
			return fmt.Errorf("link state %q, want %q", st.State, StateConnecting)
		}
		return nil
	})
	seq1, _ := l.QueueSeq(Message{Type: typeData, Body: payload(1, true, 0)}, true)
	cfg.Incarnation = 8
	rec2 := &recorder{}
	startServerAt(t, s.Addr(), cfg, rec2)
	waitFor(t, 5*time.Second, func() error {
		if st := l.Stats(); st.Connects != 2 {
			return fmt.Errorf("%d connects, want 2", st.Connects)
		}
		return nil
	})
	seq2, _ := l.QueueSeq(Message{Type: typeData, Body: payload(2, true, 0)}, true)
	if !settledWithin(l, seq2, 5*time.Second*raceScale) {
		t.Fatal("not acknowledged by the new process")
	}
	if f, _, _ := l.Fate(seq1); f != FateLost || !l.Lost(seq1) {
		t.Fatalf("thrown away at the restart: %v (Lost %v); want lost", f, l.Lost(seq1))
	}
	if f, _, _ := l.Fate(seq2); f != FateAcked || l.Lost(seq2) {
		t.Fatalf("acknowledged: %v (Lost %v); want acked", f, l.Lost(seq2))
	}
}
