package link

import (
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
