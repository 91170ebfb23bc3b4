package plugins

import (
	"context"
	"sync"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/writebehind"
)

// Ids made by concurrent publishers increase, for each of them, in the
// order it got them: a client's messages sort in the order it sent them.
// ulid.Make failed this (a goroutine that read the clock earlier could draw
// new, lower entropy after another's).
func TestIDsIncreasePerCaller(t *testing.T) {
	g := newIDGen()
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			prev := ""
			for range 20000 {
				id := g.next()
				if id <= prev {
					errs <- prev + " then " + id
					return
				}
				prev = id
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal("id went down:", e)
	}
}

// BenchmarkCaptureOnThePublishPath is what capture adds to one publish:
// both hooks on a history topic, the writer's insert a no-op (the store's
// own cost is not the publish path's).
func BenchmarkCaptureOnThePublishPath(b *testing.B) {
	cfg := config.Defaults().History
	cfg.QueueLen = 1 << 20
	h, err := NewHistory(HistoryOptions{Config: cfg, Node: "n", Store: new(store.Store)})
	if err != nil {
		b.Fatal(err)
	}
	h.o.Store = nil
	w, err := writebehind.New(writebehind.Options[store.HistoryMessage]{Write: func(context.Context, []store.HistoryMessage) error { return nil },
		QueueLen: cfg.QueueLen, MaxBatch: cfg.BatchSize})
	if err != nil {
		b.Fatal(err)
	}
	h.w = w
	defer w.Close(context.Background())
	stamp, capture := h.StampHook(), h.CaptureHook()
	cl := &mqtt.Client{ID: "dev1"}
	pk := packets.Packet{TopicName: "push/news", Payload: make([]byte, 64),
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
	b.ReportAllocs()
	for b.Loop() {
		p, _ := stamp.OnPublish(cl, pk)
		_, _ = capture.OnPublish(cl, p)
	}
}
