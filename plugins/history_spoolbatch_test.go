package plugins

import (
	"context"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store"
)

// TestSpoolReplayBatchWithinQueueBytes: history.queue_bytes bounds what
// the writer holds in memory (docs/history.md, Sizing), a batch taken back
// from the spool too. Before, such a batch was bounded by
// history.batch_size messages alone, whatever their size: 2,000 spooled
// messages of 16 KiB came back as one batch of 32 MB against queue_bytes
// of 1 MiB (found by the session 10 review; 4,096 such messages, 64 MiB,
// with the new batch_size default).
func TestSpoolReplayBatchWithinQueueBytes(t *testing.T) {
	cfg := config.Defaults().History
	cfg.QueueBytes = 1 << 20
	const n, size = 2000, 16 << 10
	h, err := NewHistory(HistoryOptions{Config: cfg, Node: "n", Store: new(store.Store), SpoolDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	var mu sync.Mutex
	var maxBytes, written int
	h.insert = func(ctx context.Context, batch []store.HistoryMessage) error {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
		b := 0
		for _, m := range batch {
			b += historySize(m)
		}
		mu.Lock()
		maxBytes = max(maxBytes, b)
		written += len(batch)
		mu.Unlock()
		return nil
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	h.stop()
	var open sync.Once
	defer h.Close(context.Background())
	defer open.Do(func() { close(gate) })
	stamp, capture := h.StampHook(), h.CaptureHook()
	cl := &mqtt.Client{ID: "dev1"}
	for range n {
		pk := packets.Packet{TopicName: "push/big", Payload: make([]byte, size),
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
		p, _ := stamp.OnPublish(cl, pk)
		_, _ = capture.OnPublish(cl, p)
	}
	open.Do(func() { close(gate) })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if written != n {
		t.Fatalf("written %d, want %d", written, n)
	}
	if maxBytes > cfg.QueueBytes {
		t.Fatalf("a batch of %d bytes in memory (batch_size %d), history.queue_bytes %d", maxBytes, cfg.BatchSize, cfg.QueueBytes)
	}
}
