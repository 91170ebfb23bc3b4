package broker

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/broker/link"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestRv12aLateWaitSeesHandOverFailure (review rv12a): a publisher's
// acknowledgement waits are run one at a time, in order (mochi patch 54,
// releaseAcks), so the wait of a PUBLISH starts only once every earlier
// one of the same client ended: behind a few earlier waits that each
// succeed late (a stalled peer that acknowledges near the bound, a
// hand-over's copies acknowledged near the second bound), it starts more
// than handOverKeep (two bounds and a second) after the hand-over of its
// held message. By then the hand-over's record is gone. Here the record
// said the hand-over could not queue the copy (lost: counted dropped),
// and the held link then wrote the message to the same process of its
// peer, which acknowledged it (the peer came back: resendReached, then the
// link resumed; its copies of the adopted sessions are stale). Fate says
// acknowledged, after a hold, and with no record the wait takes the
// peer's acknowledgement: the PUBACK goes for a message no entitled
// session has. It must fail as it does while the record lasts
// (errForwardLost: the publisher publishes again).
func TestRv12aLateWaitSeesHandOverFailure(t *testing.T) {
	log, buf := testutil.Logger(t)
	t.Cleanup(buf.Stop)
	got := make(chan link.Message, 4)
	srv, err := link.Listen("127.0.0.1:0", link.Config{NodeName: "peer", Logger: log}, link.HandlerFunc(func(_ string, m link.Message) { got <- m }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	l := link.Dial("peer", srv.Addr(), link.Config{NodeName: "me", Logger: log}, nil)
	t.Cleanup(l.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	c := &clusterNode{stop: make(chan struct{})}
	c.peerAckWait.Store(int64(100 * time.Millisecond)) // keep: 1.2 s
	l.Hold(true)                                       // the peer failed
	published := time.Now()
	seq, err := l.QueueSeq(link.Message{Type: msgPublish, Body: []byte("m")}, true)
	if err != nil {
		t.Fatal(err)
	}
	m := linkMark{l: l, seq: seq, follow: true}
	// The hand-over (resendReached) could not queue the adopter's copy.
	c.handOvers.add([]handOverRecord{{src: linkMark{l: l, seq: seq}, to: handedTo{lost: true}}}, c.handOverKeep())
	l.Hold(false) // handed over: the link writes its queue to the peer
	select {
	case <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("the resumed link did not deliver the held message")
	}
	testutil.WaitFor(t, 30*time.Second, func() error {
		if f, held, _ := l.Fate(seq); f != link.FateAcked || !held {
			return fmt.Errorf("fate %v held %v, want acknowledged after a hold", f, held)
		}
		return nil
	})
	// While the record lasts, the wait fails.
	w := ackWait{c: c, done: make(chan struct{})}
	if err := w.await(m); !errors.Is(err, errForwardLost) {
		t.Fatalf("wait within the record's life: %v, want errForwardLost", err)
	}
	w.stop()
	// A wait that starts after it (behind earlier slow ones) must too.
	testutil.WaitFor(t, 30*time.Second, func() error {
		if n := c.handOvers.n.Load(); n != 0 {
			return fmt.Errorf("%d hand-over records", n)
		}
		return nil
	})
	// Its bound counts from its PUBLISH (settledWait sets start), which
	// came before the hand-over: by now it is over, and the wait ends
	// without the acknowledgement (the publisher publishes again).
	w = ackWait{c: c, done: make(chan struct{}), start: published}
	defer w.stop()
	if err := w.await(m); err == nil {
		t.Fatalf("wait started after the hand-over's record expired: %v, want a failure (the hand-over lost the copy; the PUBACK would go)", err)
	}
}
