package broker

import (
	"io"
	"log/slog"
	"strconv"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// TestTakeoverKeepsNewUnsubscribes: when a takeover's old connection ends
// after the new one left a push channel with UNSUBSCRIBE, the new
// connection's mark stays, so re-applying the recorded channels does not
// subscribe it again. (Before: the old connection's end cleared the marks
// of its client ID, the new one's included.)
func TestTakeoverKeepsNewUnsubscribes(t *testing.T) {
	b := &Broker{mq: mqtt.New(nil), log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	h := newDevicesHook(b, nil)
	old := b.mq.NewClient(nil, "t", "dev", false)
	h.conns.Store(old, connRecord{id: "old"})
	nu := b.mq.NewClient(nil, "t", "dev", false)
	b.mq.Clients.Add(nu) // the takeover installed the new connection
	h.conns.Store(nu, connRecord{id: "new"})
	h.OnUnsubscribed(nu, packets.Packet{PacketID: 1, Filters: packets.Subscriptions{{Filter: "push/news"}}})
	h.OnDisconnect(old, nil, false)
	if _, ok := h.unsubscribed["dev"]["news"]; !ok {
		t.Fatal("the new connection's UNSUBSCRIBE of push/news was forgotten when the old connection ended")
	}
	h.OnDisconnect(nu, nil, false) // the session's own end clears them
	if len(h.unsubscribed["dev"]) != 0 {
		t.Fatal("marks kept after the connection that made them ended")
	}
}

// TestDeviceQueueHoldsACapacityStorm: the device record queue of a node
// holds a connect and a disconnect for each connection up to its capacity,
// in order, so a connect storm is queued, not dropped and reconciled.
// (Before: a fixed 10,000, overflowed by 19,000 connections at 2,000/s on
// the embedded store.)
func TestDeviceQueueHoldsACapacityStorm(t *testing.T) {
	b := &Broker{mq: mqtt.New(nil), log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	b.cfg.Capacity = 20000
	h := newDevicesHook(b, nil)
	for i := range 2 * b.cfg.Capacity {
		h.enqueue(deviceOp{device: strconv.Itoa(i)})
	}
	if n := h.dropped.Load(); n != 0 {
		t.Fatalf("%d of %d device records dropped by a node of capacity %d", n, 2*b.cfg.Capacity, b.cfg.Capacity)
	}
	h.enqueue(deviceOp{device: "over"})
	if n := h.dropped.Load(); n != 1 {
		t.Fatalf("dropped %d past the bound, want 1", n)
	}
	var got []deviceOp
	for i := 0; ; i++ {
		batch := h.queue.take(nil, deviceBatch)
		if len(batch) == 0 {
			break
		}
		if len(batch) > deviceBatch {
			t.Fatalf("batch of %d, want at most %d", len(batch), deviceBatch)
		}
		got = append(got, batch...)
	}
	if len(got) != 2*b.cfg.Capacity {
		t.Fatalf("took %d, want %d", len(got), 2*b.cfg.Capacity)
	}
	for i, op := range got {
		if op.device != strconv.Itoa(i) {
			t.Fatalf("op %d is %q: out of order", i, op.device)
		}
	}
}
