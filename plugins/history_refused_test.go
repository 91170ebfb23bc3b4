package plugins

import (
	"context"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store/storetest"
)

// TestHistoryRefusedBatchIsAGap: a message the store can never take (a
// document too large: the config forbids such packets, but a BSON
// document can outgrow its packet) is recorded as a "refused" gap, as
// docs/history.md says, and the messages captured after it are still
// written. Before, history set no Permanent for its writer: the batch was
// retried forever and nothing behind it reached the store.
func TestHistoryRefusedBatchIsAGap(t *testing.T) {
	s := storetest.Open(t)
	cfg := config.Defaults().History
	cfg.Topics = "push/#"
	cfg.BatchLinger = 0
	h, err := NewHistory(HistoryOptions{Config: cfg, Node: "n", Store: s})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	defer h.Close(context.Background())
	stamp, capture := h.StampHook(), h.CaptureHook()
	cl := &mqtt.Client{ID: "dev1"}
	publish := func(topic string, size int) {
		pk := packets.Packet{TopicName: topic, Payload: make([]byte, size),
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
		p, _ := stamp.OnPublish(cl, pk)
		_, _ = capture.OnPublish(cl, p)
	}
	publish("push/big", 50<<20) // over the driver's 48 MB message limit
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := h.Flush(ctx); err != nil {
		t.Fatalf("flush with a document the store refuses: %v (stats %+v)", err, h.Stats())
	}
	publish("push/small", 10)
	if err := h.Flush(ctx); err != nil {
		t.Fatalf("flush after it: %v (stats %+v)", err, h.Stats())
	}
	if st := h.Stats(); st.Dropped != 1 || st.Written != 1 {
		t.Fatalf("stats %+v: want 1 dropped, 1 written", st)
	}
	all, err := s.AllHistory(ctx)
	if err != nil || len(all) != 1 || all[0].Topic != "push/small" {
		t.Fatalf("stored %d messages (%v), want push/small alone", len(all), err)
	}
	h.flushGaps(ctx) // the pending gap, if the writer's loop has not stored it yet
	gaps, err := s.HistoryGaps(ctx, time.Time{}, time.Now().Add(time.Hour))
	if err != nil || len(gaps) != 1 || gaps[0].Reason != "refused" || gaps[0].Count != 1 || gaps[0].Filter != "push/#" {
		t.Fatalf("gaps %+v, %v: want one refused gap of 1 message for push/#", gaps, err)
	}
}
