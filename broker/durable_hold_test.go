package broker

import (
	"context"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/internal/writebehind"
)

// holdHook is a durableHook whose store writes wait for gate.
func holdHook(t *testing.T, gate chan struct{}) *durableHook {
	t.Helper()
	d := &durableHook{waiting: map[string]*heldMsg{}}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	w, err := writebehind.New(writebehind.Options[durOp]{Name: "test", Write: func(ctx context.Context, _ []durOp) error {
		select {
		case <-gate:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	d.w = w
	t.Cleanup(func() {
		d.cancel()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = w.Close(ctx)
	})
	return d
}

// A PUBLISH's acknowledgement waits for the latest write recorded for it,
// even when an older ticket is recorded last (a relayed or forwarded
// message under the same origin).
func TestDurableHoldKeepsLatestTicket(t *testing.T) {
	d := holdHook(t, make(chan struct{}))
	cl := &mqtt.Client{ID: "pub"}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
	older, err := d.put(durOp{kind: opRetain})
	if err != nil {
		t.Fatal(err)
	}
	newer, err := d.put(durOp{kind: opRetain})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = d.OnPublish(cl, pk)
	d.record(cl.ID, newer, nil, true)
	d.record(cl.ID, older, nil, true)
	d.mu.Lock()
	got := d.hold(cl.ID).t
	d.mu.Unlock()
	if !got.Covers(newer) {
		t.Fatal("the hold waits for the older ticket recorded last")
	}
}

// A connection taken over in the middle of its PUBLISH does not take the
// new connection's hold with it (its acknowledgement would then go out at
// once, before the new PUBLISH's writes are committed).
func TestDurableHoldBelongsToItsConnection(t *testing.T) {
	d := holdHook(t, make(chan struct{}))
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
	old, cur := &mqtt.Client{ID: "pub"}, &mqtt.Client{ID: "pub"}
	_, _ = d.OnPublish(old, pk)
	_, _ = d.OnPublish(cur, pk)
	tk, err := d.put(durOp{kind: opRetain})
	if err != nil {
		t.Fatal(err)
	}
	d.record(cur.ID, tk, nil, true)
	if wait := d.OnPublishHold(old, pk); wait != nil {
		t.Fatal("the old connection's PUBLISH took a hold")
	}
	wait := d.OnPublishHold(cur, pk)
	if wait == nil {
		t.Fatal("the new connection's PUBLISH does not wait for its write")
	}
	done := make(chan error, 1)
	go func() { done <- wait() }()
	select {
	case err := <-done:
		t.Fatalf("acknowledged before the write was committed: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
}

// A QoS 1 PUBLISH that writes nothing durable (its subscribers' sessions
// end with their connections: the common case) neither waits for the
// hook's lock, which a store commit or a session's end can hold, nor
// allocates. Before, OnPublish and OnPublishHold each took d.mu.
func TestDurableHoldNonDurablePublishLockFree(t *testing.T) {
	d := holdHook(t, make(chan struct{}))
	cl := &mqtt.Client{ID: "pub"}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
	publish := func() func() error {
		_, _ = d.OnPublish(cl, pk)
		return d.OnPublishHold(cl, pk)
	}
	publish() // the connection's first PUBLISH makes its slot
	d.mu.Lock()
	done := make(chan func() error, 1)
	go func() { done <- publish() }()
	select {
	case wait := <-done:
		d.mu.Unlock()
		if wait != nil {
			t.Fatal("a PUBLISH that wrote nothing waits for something")
		}
	case <-time.After(10 * time.Second):
		d.mu.Unlock()
		<-done
		t.Fatal("a PUBLISH that wrote nothing waited for the durable hook's lock")
	}
	if n := testing.AllocsPerRun(100, func() { publish() }); n != 0 {
		t.Fatalf("a PUBLISH that wrote nothing allocates %.1f times", n)
	}
	// A write for the next PUBLISH of the connection still holds it.
	_, _ = d.OnPublish(cl, pk)
	tk, err := d.put(durOp{kind: opRetain})
	if err != nil {
		t.Fatal(err)
	}
	d.record(cl.ID, tk, nil, true)
	if d.OnPublishHold(cl, pk) == nil {
		t.Fatal("a PUBLISH that wrote a retained message does not wait for its commit")
	}
}

// A node link acknowledgement's barrier does not report safe a write the
// sessions writer lost when it closed with the store down (before, a
// barrier counted dropped writes as done, and the link let the peer forget
// a message never stored), nor does a barrier taken after that Close.
func TestDurableBarrierNotSafeForWritesLostAtClose(t *testing.T) {
	d := holdHook(t, make(chan struct{})) // the store never answers
	b := &Broker{durable: d}
	if _, err := d.put(durOp{kind: opMsg, client: "sub", pid: 1, msg: &msgDoc{ID: msgKey("sub", 1), Client: "sub", PID: 1}}); err != nil {
		t.Fatal(err)
	}
	check := b.durableBarrier()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_ = d.w.Close(ctx)
	if check() {
		t.Fatal("barrier over a write lost at close: safe")
	}
	if b.durableBarrier()() {
		t.Fatal("barrier taken after a close that lost a write: safe")
	}
	if n := d.barrierDropped.Load(); n != 2 {
		t.Fatalf("barrierDropped %d, want 2", n)
	}
}

// BenchmarkDurableNonDurablePublish: the durable hook's share of a QoS 1
// PUBLISH that writes nothing durable (OnPublish and OnPublishHold).
func BenchmarkDurableNonDurablePublish(b *testing.B) {
	d := &durableHook{waiting: map[string]*heldMsg{}}
	cl := &mqtt.Client{ID: "pub"}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		_, _ = d.OnPublish(cl, pk)
		_ = d.OnPublishHold(cl, pk)
	}
}
