package link

import (
	"fmt"
	"testing"
	"time"
)

// TestRv12LostAfterLaterAck (review rv12): Lost tells a message a Link
// threw away from one the peer acknowledged by ackedThrough, the highest
// seq ever acknowledged. A peer that restarted has the queue discarded
// (seq1); the Link then carries on to the new process, which acknowledges
// seq2. Lost(seq1) now says false: seq1 < ackedThrough. A publisher's
// acknowledgement whose wait reaches seq1 only after that (it waited for
// an earlier PUBLISH, or for another peer's mark first) is sent for a
// message the restarted peer never got (counted peer_restarted).
func TestRv12LostAfterLaterAck(t *testing.T) {
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
	seq1, err := l.QueueSeq(Message{Type: typeData, Body: payload(1, true, 0)}, true)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Incarnation = 8 // the peer restarted
	rec := &recorder{}
	startServerAt(t, s.Addr(), cfg, rec)
	if !settledWithin(l, seq1, 10*time.Second) {
		t.Fatal("seq1 not settled by the restarted peer's discard")
	}
	if !l.Lost(seq1) {
		t.Fatal("seq1 not lost right after the discard")
	}
	seq2, _ := l.QueueSeq(Message{Type: typeData, Body: payload(2, true, 0)}, true)
	if !settledWithin(l, seq2, 10*time.Second) {
		t.Fatal("seq2 not acknowledged")
	}
	if l.Lost(seq2) {
		t.Fatal("seq2 acknowledged, reported lost")
	}
	if ok, _ := l.Settled(seq1); !ok {
		t.Fatal("seq1 unsettled")
	}
	if !l.Lost(seq1) {
		t.Fatal("seq1, thrown away with the restarted peer's queue, is reported not lost once a later seq was acknowledged: its publisher gets a PUBACK")
	}
}
