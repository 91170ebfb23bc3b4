package plugins

import (
	"context"
	"crypto/rand"
	"fmt"
	"hash/maphash"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/oklog/ulid/v2"

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

// A burst of large messages while the store is slow goes to the spool at
// history.queue_bytes, not after queue_len messages of any size: memory
// stays bounded in bytes. Everything is written, in order, when the store
// catches up.
func TestHistoryQueueBytesSpills(t *testing.T) {
	cfg := config.Defaults().History
	cfg.QueueLen = 100000
	cfg.QueueBytes = 64 << 10
	h, err := NewHistory(HistoryOptions{Config: cfg, Node: "n", Store: new(store.Store), SpoolDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	var mu sync.Mutex
	var got []string
	h.insert = func(ctx context.Context, batch []store.HistoryMessage) error {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
		mu.Lock()
		defer mu.Unlock()
		for _, m := range batch {
			got = append(got, m.ID)
		}
		return nil
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	h.stop() // no gap records, purge or TTL: there is no store behind h.insert
	var open sync.Once
	defer h.Close(context.Background())
	defer open.Do(func() { close(gate) })
	stamp, capture := h.StampHook(), h.CaptureHook()
	cl := &mqtt.Client{ID: "dev1"}
	var ids []string
	for range 100 {
		pk := packets.Packet{TopicName: "push/big", Payload: make([]byte, 4096),
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
		p, _ := stamp.OnPublish(cl, pk)
		_, _ = capture.OnPublish(cl, p)
		ids = append(ids, p.Properties.User[len(p.Properties.User)-1].Val)
	}
	// 64 KiB holds 15 of these (4 KiB and some bookkeeping each).
	st := h.Stats()
	if st.Queued > 16 || st.SpoolMessages < 84 {
		t.Fatalf("queued %d in memory, %d in the spool: want at most 16 (64 KiB) in memory", st.Queued, st.SpoolMessages)
	}
	open.Do(func() { close(gate) })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(got, ids) {
		t.Fatalf("written %d, want the %d captured in order", len(got), len(ids))
	}
}

// filterOf passes over a filter whose first level is a literal other than
// the topic's without calling MatchFilter: it must answer as the first
// matching filter in order, for wildcards, '$' topics and parent levels.
func TestFilterOfIsFirstMatchingFilter(t *testing.T) {
	sets := [][]string{
		config.Defaults().History.TopicList(),
		{"a/b", "a/#", "+/b", "#"},
		{"$SYS/#", "+/x", "x", "x/+/y"},
		{"#"},
	}
	topics := []string{"a", "a/b", "a/b/c", "b", "x", "x/y", "x/q/y", "q/x", "$SYS/x", "$x/x", "groups", "groups/g1",
		"push/news", "devices/d1/inbox", "devices/d1/inbox/z", "bench/0123/3", "", "/", "a//b"}
	for _, filters := range sets {
		cfg := config.Defaults().History
		cfg.Topics = strings.Join(filters, ",")
		h, err := NewHistory(HistoryOptions{Config: cfg, Node: "n", Store: new(store.Store)})
		if err != nil {
			t.Fatal(err)
		}
		for _, topic := range topics {
			want := ""
			for _, f := range filters {
				if MatchFilter(f, topic) {
					want = f
					break
				}
			}
			if got := h.filterOf(topic); got != want {
				t.Errorf("filters %q, topic %q: filterOf = %q, first matching filter %q", filters, topic, got, want)
			}
		}
	}
}

// BenchmarkHistoryMatches is the history check the stamp and the capture
// hook each make for every message, with the default history.topics.
func BenchmarkHistoryMatches(b *testing.B) {
	h, err := NewHistory(HistoryOptions{Config: config.Defaults().History, Node: "n", Store: new(store.Store)})
	if err != nil {
		b.Fatal(err)
	}
	for _, topic := range []string{"bench/0123456789abcdef/3", "push/news", "devices/dev-000017/inbox", "groups/g1/x"} {
		b.Run(topic, func(b *testing.B) {
			for b.Loop() {
				h.Matches(topic)
			}
		})
	}
}

// Capturing a message allocates only what the subscribers see too: for a
// device's message without user properties, its id and the property that
// carries it (one allocation); for a service's message that carries both,
// nothing. Before, the payload was copied, the id allocated twice over and
// the writer's queue reallocated as it moved: 4 and more a message, each
// one garbage the publishers' goroutines helped collect.
func TestCaptureAllocations(t *testing.T) {
	cfg := config.Defaults().History
	cfg.QueueLen = 1 << 20
	cfg.QueueBytes = 1 << 30
	h, err := NewHistory(HistoryOptions{Config: cfg, Node: "n", Store: new(store.Store),
		Service: func(cl *mqtt.Client) bool { return cl.ID == "api" }})
	if err != nil {
		t.Fatal(err)
	}
	// Nothing is written while the allocations are counted: the writer's
	// own, per batch, are not the publish path's.
	gate := make(chan struct{})
	h.insert = func(ctx context.Context, _ []store.HistoryMessage) error {
		select {
		case <-gate:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	h.stop() // no gap records, purge or TTL: there is no store behind h.insert
	defer h.Close(context.Background())
	defer close(gate)
	stamp, capture := h.StampHook(), h.CaptureHook()
	dev, api := &mqtt.Client{ID: "dev1"}, &mqtt.Client{ID: "api"}
	payload := make([]byte, 64)
	devPk := packets.Packet{TopicName: "push/news", Payload: payload,
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
	apiPk := devPk
	apiPk.Properties.User = []packets.UserProperty{{Key: PropMessageID, Val: newIDGen().next()}, {Key: PropPublisher, Val: "key-0123abcd"}}
	for _, c := range []struct {
		name string
		cl   *mqtt.Client
		pk   packets.Packet
		max  float64
	}{{"device", dev, devPk, 1}, {"service", api, apiPk, 0}} {
		allocs := testing.AllocsPerRun(2000, func() {
			p, _ := stamp.OnPublish(c.cl, c.pk)
			_, _ = capture.OnPublish(c.cl, p)
		})
		if allocs > c.max {
			t.Errorf("%s: %.1f allocations a captured message, want at most %.0f", c.name, allocs, c.max)
		}
	}
	if q := h.Stats().Queued; q != 2*2001 {
		t.Fatalf("queued %d, want %d", q, 2*2001)
	}
}

// A device's message is stamped with the time of the id the broker made
// for it (read from the clock once for both); a service's message, whose
// id the service made, and a will, whose id was made at CONNECT, with the
// time the broker captured it.
func TestCaptureTimestamps(t *testing.T) {
	cfg := config.Defaults().History
	h, err := NewHistory(HistoryOptions{Config: cfg, Node: "n", Store: new(store.Store),
		Service: func(cl *mqtt.Client) bool { return cl.ID == "api" }})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got []store.HistoryMessage
	h.insert = func(_ context.Context, b []store.HistoryMessage) error {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, b...)
		return nil
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	h.stop()
	defer h.Close(context.Background())
	stamp, capture := h.StampHook(), h.CaptureHook()
	pk := packets.Packet{TopicName: "push/news", Payload: []byte("x"), FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}}
	// Ids from an hour ago: their time is not now.
	old := ulid.MustNew(ulid.Timestamp(time.Now().Add(-time.Hour)), rand.Reader).String()
	h.ids.ms = ulid.Timestamp(time.Now().Add(time.Hour)) // the device's id: an hour ahead (a clock stepped back)
	apiPk := pk
	apiPk.Properties.User = []packets.UserProperty{{Key: PropMessageID, Val: old}}
	before := time.Now().Truncate(time.Millisecond)
	for _, c := range []struct {
		cl *mqtt.Client
		pk packets.Packet
	}{{&mqtt.Client{ID: "dev1"}, pk}, {&mqtt.Client{ID: "api"}, apiPk}} {
		p, _ := stamp.OnPublish(c.cl, c.pk)
		_, _ = capture.OnPublish(c.cl, p)
	}
	will := pk
	will.Properties.User = []packets.UserProperty{{Key: PropMessageID, Val: old}}
	capture.(*historyCapture).OnWillSent(&mqtt.Client{ID: "dev2"}, will)
	if err := h.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 3 {
		t.Fatalf("captured %d messages, want 3", len(got))
	}
	id, err := ulid.ParseStrict(got[0].ID)
	if err != nil {
		t.Fatal(err)
	}
	if want := ulid.Time(id.Time()).UTC(); !got[0].Time.Equal(want) {
		t.Errorf("device's message: timestamp %v, want its id's %v", got[0].Time, want)
	}
	for _, m := range got[1:] {
		if m.ID != old {
			t.Errorf("%s: id %s, want the one it had, %s", m.Publisher, m.ID, old)
		}
		if m.Time.Before(before) || m.Time.After(after) {
			t.Errorf("%s: timestamp %v, want the capture's, between %v and %v", m.Publisher, m.Time, before, after)
		}
	}
}

// The hooks' per-topic cache of the history filter answers as the filters
// do, for more topics than it has slots; it keeps a copy of a topic, not
// the string the broker passed (mochi's points into the packet's buffer);
// a cached topic costs no allocation, and neither does a stream of topics
// seen once each (devices/<id>/inbox of many devices) on average.
func TestHistoryMatchCache(t *testing.T) {
	cfg := config.Defaults().History
	cfg.Topics = "groups/#,push/#,devices/+/inbox,+/x/#"
	h, err := NewHistory(HistoryOptions{Config: cfg, Node: "n", Store: new(store.Store)})
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{
		"push/news": "push/#", "push": "push/#", "pushy/news": "", "groups/g1": "groups/#",
		"devices/d1/inbox": "devices/+/inbox", "devices/d1/outbox": "", "devices/d1/inbox/x": "",
		"a/x": "+/x/#", "a/x/y/z": "+/x/#", "$SYS/x": "", "a/y": "",
	}
	for range 2 { // the second time from the cache
		for topic, want := range cases {
			if got := h.filterOf(topic); got != want {
				t.Fatalf("filterOf(%q) = %q, want %q", topic, got, want)
			}
		}
	}
	for i := range 3 * matchSlots {
		topic := fmt.Sprintf("devices/d%d/inbox", i)
		if i%3 == 0 {
			topic = fmt.Sprintf("devices/d%d/other", i)
		}
		for range 2 {
			if got := h.Matches(topic); got != (i%3 != 0) {
				t.Fatalf("Matches(%q) = %v", topic, got)
			}
		}
	}

	// The broker's topic string points into its packet's buffer: the
	// cache keeps a copy, not the buffer (up to max_packet_size a slot).
	buf := []byte("push/reused")
	topic := unsafe.String(&buf[0], len(buf))
	for range 2 * matchTakeOver {
		if !h.Matches(topic) {
			t.Fatal("push/reused is a history topic")
		}
	}
	e := h.matches.slots[maphash.String(h.matches.seed, topic)&(matchSlots-1)].Load()
	if e == nil || e.topic != topic {
		t.Fatalf("push/reused not cached after %d lookups: %+v", 2*matchTakeOver, e)
	}
	if unsafe.StringData(e.topic) == &buf[0] {
		t.Fatal("the cache keeps the broker's topic string, and with it the packet's buffer")
	}

	if a := testing.AllocsPerRun(1000, func() { h.Matches("push/news") }); a != 0 {
		t.Fatalf("a cached topic: %v allocations", a)
	}
	once := make([]string, 1100)
	for i := range once {
		once[i] = fmt.Sprintf("devices/new%d/inbox", i)
	}
	i := 0
	if a := testing.AllocsPerRun(1000, func() { h.Matches(once[i]); i++ }); a >= 1 {
		t.Fatalf("topics seen once: %v allocations each", a)
	}
}
