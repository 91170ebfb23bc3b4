package plugins

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/oklog/ulid/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/writebehind"
)

// User properties of a history message.
const (
	// PropMessageID carries a message's id (a ULID) to subscribers and
	// into history: the push API sets it, the broker sets it for devices.
	PropMessageID = "rtm-message-id"
	// PropPublisher names who published through a service (the push API:
	// its API key's name). Honoured only from services; removed from what
	// devices publish.
	PropPublisher = "rtm-publisher"
)

// HistoryOptions configure message history capture on one broker.
type HistoryOptions struct {
	Config config.History
	// Node is the broker's name, recorded with each message.
	Node  string
	Store *store.Store
	// SpoolDir holds the spool (history.spool_max_bytes of it at most);
	// "" keeps history in memory only.
	SpoolDir string
	// Service reports clients that are rtm's own services (the push API),
	// whose message id and publisher properties are kept. nil: none.
	Service func(*mqtt.Client) bool
	Logger  *slog.Logger
	// Registerer receives the history metrics; nil registers none.
	Registerer prometheus.Registerer
}

// History captures every message on a history topic published to this
// broker and writes it to the store off the publish path (docs/history.md).
//
// Two hooks: Stamp, added before the cluster hook, gives each message its
// id (rtm-message-id) before it is forwarded or delivered; Capture, added
// last, queues it once every other hook accepted it. Messages a peer
// forwards arrive through Server.DeliverFromPeer, which runs no hook, so
// each message is captured once, by the node it was published to.
type History struct {
	o       HistoryOptions
	log     *slog.Logger
	filters []string
	firsts  []string // each filter's first level, "" for a wildcard: see matchFilters
	matches matchCache
	w       *writebehind.Writer[store.HistoryMessage]
	spool   *writebehind.Spool[store.HistoryMessage]
	service func(*mqtt.Client) bool

	ids *idGen
	// insert is the writer's Write: h.write, or a test's stand-in.
	insert func(context.Context, []store.HistoryMessage) error

	gmu      sync.Mutex
	gaps     map[string]*store.HistoryGap // by filter: drops not yet recorded
	gapsFile string

	dropped  atomic.Int64
	captured atomic.Int64
	writeDur prometheus.Histogram

	stop context.CancelFunc
	done chan struct{}
}

// NewHistory checks the options and builds the capture; Start opens the
// spool and starts writing. It returns nil, nil when history.topics is
// empty.
func NewHistory(o HistoryOptions) (*History, error) {
	filters := o.Config.TopicList()
	if len(filters) == 0 {
		return nil, nil
	}
	if err := o.Config.Validate(); err != nil {
		return nil, err
	}
	if o.Store == nil {
		return nil, errors.New("history: a store is required")
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	firsts := make([]string, len(filters))
	for i, f := range filters {
		if first, _, _ := strings.Cut(f, "/"); first != "+" && first != "#" {
			firsts[i] = first
		}
	}
	h := &History{o: o, log: log.With("component", "history"), filters: filters, firsts: firsts, service: o.Service,
		ids: newIDGen(), gaps: map[string]*store.HistoryGap{}, done: make(chan struct{})}
	h.matches.seed = maphash.MakeSeed()
	if h.service == nil {
		h.service = func(*mqtt.Client) bool { return false }
	}
	h.insert = h.write
	h.writeDur = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "rtm_history_write_seconds",
		Help:    "Duration of each history batch insert, failed attempts included.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	})
	if o.Registerer != nil {
		if err := o.Registerer.Register(historyCollector{h}); err != nil {
			return nil, fmt.Errorf("history: metrics: %w", err)
		}
	}
	return h, nil
}

// Start opens the spool (what an earlier process left in it is written
// first) and starts the writer; call it before the broker serves.
func (h *History) Start() error {
	o := h.o
	wo := writebehind.Options[store.HistoryMessage]{
		Name:     "history",
		Write:    h.insert,
		MaxBatch: o.Config.BatchSize,
		Linger:   o.Config.BatchLinger,
		QueueLen: o.Config.QueueLen,
		OnDrop:   h.onDrop,
		// A batch the store can never take (a document too large) is
		// dropped and recorded as a "refused" gap, not retried forever
		// while everything behind it waits.
		Permanent: store.IsRefused,
		// The byte bound, so a queue long enough for a burst of small
		// messages does not hold as many large ones.
		QueueBytes: int64(o.Config.QueueBytes),
		Size:       historySize,
		Logger:     h.log,
	}
	if o.SpoolDir != "" && o.Config.SpoolMaxBytes > 0 {
		sp, err := writebehind.OpenSpool(writebehind.SpoolOptions[store.HistoryMessage]{
			Dir:      o.SpoolDir,
			MaxBytes: int64(o.Config.SpoolMaxBytes),
			Encode:   encodeHistory,
			Decode:   decodeHistory,
			Logger:   h.log,
		})
		if err != nil {
			return fmt.Errorf("history: %w", err)
		}
		h.spool = sp
		wo.Overflow = sp
		h.gapsFile = filepath.Join(o.SpoolDir, "gaps.json")
		h.loadGaps()
		if n := sp.Len(); n > 0 {
			h.log.Info("history spool left by an earlier process: writing it first", "messages", n, "bytes", sp.Bytes())
		}
	}
	w, err := writebehind.New(wo)
	if err != nil {
		if h.spool != nil {
			_ = h.spool.Close()
		}
		return err
	}
	h.w = w
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	go h.loop(ctx)
	return nil
}

// historySize is what a queued message takes in memory, roughly: its
// variable parts and the struct, its strings' headers and the id.
func historySize(m store.HistoryMessage) int {
	n := 200 + len(m.Topic) + len(m.Payload) + len(m.Publisher) + len(m.ContentType)
	for _, u := range m.User {
		n += 32 + len(u.Key) + len(u.Value)
	}
	return n
}

// encodeHistory and decodeHistory are the spool's record format: the
// message's BSON document, as the store's buckets hold it, without
// reflection.
func encodeHistory(dst []byte, m store.HistoryMessage) []byte {
	return store.AppendHistoryBSON(dst, &m)
}

func decodeHistory(b []byte) (store.HistoryMessage, error) {
	return store.DecodeHistoryBSON(b)
}

// write is the writer's Write: one unordered insert, duplicates ignored.
func (h *History) write(ctx context.Context, batch []store.HistoryMessage) error {
	start := time.Now()
	err := h.o.Store.InsertHistory(ctx, batch)
	h.writeDur.Observe(time.Since(start).Seconds())
	return err
}

// Matches reports whether topic is a history topic.
func (h *History) Matches(topic string) bool { return h.filterOf(topic) != "" }

// filterOf returns the history filter topic matches, "" if none. It is
// called twice for every message published (the stamp and the capture
// hook), with topics that repeat: the answer is cached per topic
// (history.topics does not change while the broker runs).
func (h *History) filterOf(topic string) string {
	if len(topic) > matchMaxTopic {
		return h.matchFilters(topic)
	}
	c := &h.matches
	i := maphash.String(c.seed, topic) & (matchSlots - 1)
	e := c.slots[i].Load()
	if e != nil && e.topic == topic {
		return e.filter
	}
	f := h.matchFilters(topic)
	// A slot another topic holds is taken over on every matchTakeOver-th
	// miss only: a stream of topics seen once (devices/<id>/inbox of many
	// devices) then costs no allocation a message, and a topic published
	// often still gets a slot soon.
	if e == nil || c.misses[i].Add(1)%matchTakeOver == 0 {
		// A copy: mochi's topic points into the packet's buffer, which
		// the cache must not keep (up to max_packet_size a slot).
		c.slots[i].Store(&matchEntry{topic: strings.Clone(topic), filter: f})
	}
	return f
}

// matchCache holds filterOf's answers: matchSlots slots, each an atomic
// pointer, so a lookup takes no lock and allocates nothing. It holds at
// most matchSlots topics of matchMaxTopic bytes (about 300 KiB).
type matchCache struct {
	seed   maphash.Seed
	slots  [matchSlots]atomic.Pointer[matchEntry]
	misses [matchSlots]atomic.Uint32
}

type matchEntry struct{ topic, filter string }

const (
	matchSlots    = 1024 // a power of 2
	matchMaxTopic = 256
	matchTakeOver = 8
)

// matchFilters is filterOf without the cache. Most topics are not history
// topics: a filter whose first level is a literal other than the topic's
// is passed over with one comparison (MatchFilter's first step), without
// splitting it again.
func (h *History) matchFilters(topic string) string {
	first, _, _ := strings.Cut(topic, "/")
	for i, f := range h.filters {
		if lit := h.firsts[i]; lit != "" && lit != first {
			continue
		}
		if MatchFilter(f, topic) {
			return f
		}
	}
	return ""
}

// MatchFilter reports whether the MQTT topic filter f matches topic
// (wildcards do not match a leading '$' level).
func MatchFilter(f, topic string) bool {
	if strings.HasPrefix(topic, "$") && (strings.HasPrefix(f, "+") || strings.HasPrefix(f, "#")) {
		return false
	}
	for {
		fl, frest, fmore := strings.Cut(f, "/")
		if fl == "#" {
			return true
		}
		tl, trest, tmore := strings.Cut(topic, "/")
		if fl != "+" && fl != tl {
			return false
		}
		if !fmore || !tmore {
			// "a/#" matches "a" too.
			return fmore == tmore || (fmore && frest == "#")
		}
		f, topic = frest, trest
	}
}

// stamp gives a history message its id: a service's own is kept; anything
// a device set under the reserved names is replaced.
func (h *History) stamp(cl *mqtt.Client, user []packets.UserProperty) []packets.UserProperty {
	svc := h.service(cl)
	if svc {
		for _, u := range user {
			if u.Key == PropMessageID {
				if _, err := ulid.ParseStrict(u.Val); err == nil {
					return user
				}
			}
		}
	}
	if len(user) == 0 {
		// Most messages carry no user properties: the id and the one
		// property naming it in one allocation.
		s := new(stampedID)
		h.ids.nextTo(&s.id)
		s.prop[0] = packets.UserProperty{Key: PropMessageID, Val: unsafe.String(&s.id[0], len(s.id))}
		return s.prop[:]
	}
	out := make([]packets.UserProperty, 0, len(user)+1)
	for _, u := range user {
		if u.Key == PropMessageID || (!svc && u.Key == PropPublisher) {
			continue
		}
		out = append(out, u)
	}
	return append(out, packets.UserProperty{Key: PropMessageID, Val: h.ids.next()})
}

// stampedID is a message id as text and its user property (the id's
// string is its bytes: they are never written again).
type stampedID struct {
	prop [1]packets.UserProperty
	id   [ulid.EncodedSize]byte
}

// idTime is the time of a message id made by idGen (upper-case Crockford
// base32: 10 characters of milliseconds), without parsing the rest.
func idTime(id string) (time.Time, bool) {
	if len(id) != ulid.EncodedSize || id[0] > '7' {
		return time.Time{}, false
	}
	var ms int64
	for i := range 10 {
		d := crockford[id[i]]
		if d == 0xff {
			return time.Time{}, false
		}
		ms = ms<<5 | int64(d)
	}
	return time.UnixMilli(ms).UTC(), true
}

// crockford maps ulid.Encoding's characters to their values, others to 0xff.
var crockford = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for i := range len(ulid.Encoding) {
		t[ulid.Encoding[i]] = byte(i)
	}
	return t
}()

// idGen makes message ids that increase in the order they are made.
// ulid.Make does not: it reads the clock before taking its lock, so of two
// goroutines the one that read the earlier millisecond may draw fresh
// entropy after the other, below an id one client already got; that
// client's next message could then sort before its previous one.
type idGen struct {
	mu      sync.Mutex
	ms      uint64
	entropy *ulid.MonotonicEntropy
	id      ulid.ULID // the last id; a field, so that making one allocates nothing
}

func newIDGen() *idGen { return &idGen{entropy: ulid.Monotonic(rand.Reader, 0)} }

func (g *idGen) next() string {
	var b [ulid.EncodedSize]byte
	g.nextTo(&b)
	return string(b[:])
}

// nextTo writes the next id's text to b. It is ulid.New, whose id escapes
// to the heap (its entropy is read through an interface).
func (g *idGen) nextTo(b *[ulid.EncodedSize]byte) {
	g.mu.Lock()
	// Never back in time (a clock step), so ids keep increasing.
	g.ms = max(g.ms, ulid.Now())
	if err := g.entropy.MonotonicRead(g.ms, g.id[6:]); err != nil {
		// Entropy exhausted within the millisecond: use the next one.
		g.ms++
		if err := g.entropy.MonotonicRead(g.ms, g.id[6:]); err != nil {
			panic(err) // crypto/rand failed: nothing sound is left to do
		}
	}
	if err := g.id.SetTime(g.ms); err != nil {
		panic(err) // after the year 10889
	}
	id := g.id
	g.mu.Unlock()
	_ = id.MarshalTextTo(b[:])
}

// capture queues pk for the store. stamped says that the stamp hook gave
// pk its id just before (a device's publish): its time is then the id's,
// read once by the stamp, instead of the clock a second time.
func (h *History) capture(cl *mqtt.Client, pk *packets.Packet, stamped bool) {
	m := store.HistoryMessage{
		Topic: pk.TopicName,
		// Not copied: mochi decodes each packet into a buffer of its own
		// and never writes into it again (the retained store and the
		// inflight queues keep it as it is, too), and a copy was an
		// allocation on the publish path.
		Payload:     pk.Payload,
		QoS:         int(pk.FixedHeader.Qos),
		Retain:      pk.FixedHeader.Retain,
		Publisher:   cl.ID,
		Node:        h.o.Node,
		ContentType: pk.Properties.ContentType,
	}
	svc := h.service(cl)
	for _, u := range pk.Properties.User {
		switch {
		case u.Key == PropMessageID && m.ID == "":
			m.ID = u.Val
		case u.Key == PropPublisher && svc:
			m.Publisher = u.Val
		default:
			m.User = append(m.User, store.UserProperty{Key: u.Key, Value: u.Val})
		}
	}
	if m.ID == "" {
		m.ID = h.ids.next() // not stamped (cannot happen): stored all the same
	}
	var ok bool
	if stamped && !svc {
		m.Time, ok = idTime(m.ID)
	}
	if !ok {
		m.Time = time.Now().UTC().Truncate(time.Millisecond)
	}
	if h.w == nil {
		return // not started
	}
	h.captured.Add(1)
	// ErrFull is counted and recorded by onDrop; ErrClosed only while the
	// broker shuts down, after its clients are gone.
	_ = h.w.Add(m)
}

// onDrop records what could not be stored, as gaps: a full spool, a batch
// the store refused, or memory left at a shutdown that ran out of time
// (put in the spool if it has room).
func (h *History) onDrop(items []store.HistoryMessage, err error) {
	if errors.Is(err, writebehind.ErrClosed) && h.spool != nil {
		if h.spool.Put(items) == nil {
			// Written at the next start, after what was already spooled:
			// ids keep queries in order regardless.
			return
		}
	}
	reason := "spool_full"
	switch {
	case errors.Is(err, writebehind.ErrClosed):
		reason = "shutdown"
	case !errors.Is(err, writebehind.ErrFull):
		reason = "refused"
	}
	h.dropped.Add(int64(len(items)))
	h.gmu.Lock()
	defer h.gmu.Unlock()
	for _, m := range items {
		f := h.filterOf(m.Topic)
		if f == "" {
			f = m.Topic
		}
		g := h.gaps[f]
		if g == nil {
			g = &store.HistoryGap{ID: ulid.Make().String(), Filter: f, From: m.Time, To: m.Time, Node: h.o.Node, Reason: reason}
			h.gaps[f] = g
		}
		if m.Time.Before(g.From) {
			g.From = m.Time
		}
		if m.Time.After(g.To) {
			g.To = m.Time
		}
		g.Count++
	}
}

// loop writes gap records, syncs the spool and purges old messages.
func (h *History) loop(ctx context.Context) {
	defer close(h.done)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	purgeEvery := h.o.Config.PurgeInterval
	nextPurge := time.Now().Add(min(purgeEvery, 10*time.Second))
	ttlDone := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if h.spool != nil {
			if err := h.spool.Sync(); err != nil {
				h.log.Warn("history spool sync failed", "err", err)
			}
		}
		h.flushGaps(ctx)
		if !ttlDone {
			ctx2, cancel := context.WithTimeout(ctx, 10*time.Second)
			ok, err := h.o.Store.EnsureHistoryTTL(ctx2, h.o.Config.Retention)
			cancel()
			if err == nil {
				ttlDone = true
				h.log.Info("history retention", "retention", h.o.Config.Retention, "ttl_index", ok, "purge_interval", purgeEvery)
			}
		}
		if time.Now().After(nextPurge) {
			nextPurge = time.Now().Add(purgeEvery)
			ctx2, cancel := context.WithTimeout(ctx, time.Minute)
			n, err := h.Purge(ctx2, time.Now())
			cancel()
			if err != nil {
				h.log.Warn("history purge failed; retried at the next interval", "err", err)
			} else if n > 0 {
				h.log.Info("history purged", "messages", n, "older_than", h.o.Config.Retention)
			}
		}
	}
}

// Purge deletes messages older than the retention at now.
func (h *History) Purge(ctx context.Context, now time.Time) (int64, error) {
	return h.o.Store.PurgeHistory(ctx, now.Add(-h.o.Config.Retention))
}

// flushGaps writes pending gap records when the store answers, and keeps
// them in gaps.json until then, so a restart does not forget them.
func (h *History) flushGaps(ctx context.Context) {
	h.gmu.Lock()
	if len(h.gaps) == 0 {
		h.gmu.Unlock()
		return
	}
	var gaps []store.HistoryGap
	for _, g := range h.gaps {
		gaps = append(gaps, *g)
	}
	h.gmu.Unlock()
	// Tried every second; it succeeds once the store answers again.
	ctx2, cancel := context.WithTimeout(ctx, 5*time.Second)
	err := h.o.Store.InsertHistoryGaps(ctx2, gaps)
	cancel()
	h.gmu.Lock()
	defer h.gmu.Unlock()
	if err == nil {
		for _, g := range gaps {
			if cur := h.gaps[g.Filter]; cur != nil && cur.ID == g.ID {
				if cur.Count == g.Count {
					delete(h.gaps, g.Filter)
				} else {
					// More drops since the snapshot: a new record for them.
					rest := *cur
					rest.ID, rest.Count, rest.From = ulid.Make().String(), cur.Count-g.Count, g.To
					h.gaps[g.Filter] = &rest
				}
			}
		}
	}
	h.saveGapsLocked()
}

func (h *History) saveGapsLocked() {
	if h.gapsFile == "" {
		return
	}
	if len(h.gaps) == 0 {
		_ = os.Remove(h.gapsFile)
		return
	}
	b, _ := json.Marshal(h.gaps)
	tmp := h.gapsFile + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err == nil {
		_ = os.Rename(tmp, h.gapsFile)
	}
}

func (h *History) loadGaps() {
	b, err := os.ReadFile(h.gapsFile)
	if err != nil {
		return
	}
	var gaps map[string]*store.HistoryGap
	if json.Unmarshal(b, &gaps) == nil {
		h.gaps = gaps
	}
}

// Flush waits until everything captured so far is written (spool
// included), or ctx ends.
func (h *History) Flush(ctx context.Context) error {
	if h.w == nil {
		return nil
	}
	return h.w.Flush(ctx)
}

// Close writes what is queued within history.flush_timeout (or ctx),
// then stops; what is left stays in the spool for the next start.
func (h *History) Close(ctx context.Context) error {
	if h.w == nil {
		return nil
	}
	if h.o.Config.FlushTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, h.o.Config.FlushTimeout)
		defer cancel()
	}
	err := h.w.Close(ctx)
	if h.stop != nil {
		h.stop()
		<-h.done
	}
	h.gmu.Lock()
	h.saveGapsLocked()
	h.gmu.Unlock()
	if h.spool != nil {
		if serr := h.spool.Close(); serr != nil && err == nil {
			err = serr
		}
		if n := h.spool.Len(); n > 0 {
			h.log.Warn("history left in the spool for the next start", "messages", n)
		}
	}
	return err
}

// HistoryStats are the capture's counters, for /v1/stats.
type HistoryStats struct {
	Captured      int64   `json:"captured"`
	Queued        int     `json:"queued"`
	SpoolMessages int     `json:"spool_messages"`
	SpoolBytes    int64   `json:"spool_bytes"`
	Written       int64   `json:"written"`
	Dropped       int64   `json:"dropped"`
	Failures      int64   `json:"write_failures"`
	StoreUp       bool    `json:"store_up"`
	LastError     string  `json:"last_error,omitempty"`
	LastWriteSecs float64 `json:"last_write_seconds"`
}

// Stats returns the capture's counters.
func (h *History) Stats() HistoryStats {
	if h.w == nil {
		return HistoryStats{StoreUp: true}
	}
	s := h.w.Stats()
	st := HistoryStats{
		Captured: h.captured.Load(), Queued: s.Queued, SpoolMessages: s.Overflowed, Written: s.Written,
		Dropped: h.dropped.Load(), Failures: s.Failures, StoreUp: s.Up, LastError: s.LastError,
		LastWriteSecs: s.LastWrite.Seconds(),
	}
	if h.spool != nil {
		st.SpoolBytes = h.spool.Bytes()
	}
	return st
}

// StampHook and CaptureHook are History's two mochi hooks (see History).
func (h *History) StampHook() mqtt.Hook   { return &historyStamp{h: h} }
func (h *History) CaptureHook() mqtt.Hook { return &historyCapture{h: h} }

type historyStamp struct {
	mqtt.HookBase
	h *History
}

func (s *historyStamp) ID() string { return "rtm-history-stamp" }

func (s *historyStamp) Provides(b byte) bool { return b == mqtt.OnPublish || b == mqtt.OnWill }

func (s *historyStamp) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || !s.h.Matches(pk.TopicName) {
		return pk, nil
	}
	pk.Properties.User = s.h.stamp(cl, pk.Properties.User)
	return pk, nil
}

func (s *historyStamp) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	if s.h.Matches(will.TopicName) {
		will.User = s.h.stamp(cl, will.User)
	}
	return will, nil
}

type historyCapture struct {
	mqtt.HookBase
	h *History
}

func (c *historyCapture) ID() string { return "rtm-history-capture" }

func (c *historyCapture) Provides(b byte) bool { return b == mqtt.OnPublish || b == mqtt.OnWillSent }

// OnPublish runs after every other hook accepted the message (the broker
// adds this hook last): mochi then always delivers it.
func (c *historyCapture) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if !cl.Net.Inline && c.h.Matches(pk.TopicName) {
		c.h.capture(cl, &pk, true)
	}
	return pk, nil
}

func (c *historyCapture) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	if c.h.Matches(pk.TopicName) {
		// The will's id was made when it was set (at CONNECT): now is
		// when the broker publishes it.
		c.h.capture(cl, &pk, false)
	}
}

// IsService reports whether cl authenticated as one of rtm's services.
func (h *AuthHook) IsService(cl *mqtt.Client) bool {
	a := authSlot.Load(cl)
	return a != nil && !a.plain.Load() && a.id.service
}

var (
	descHistQueued   = prometheus.NewDesc("rtm_history_queue_depth", "Messages captured for history and held in memory, not yet written to the store.", nil, nil)
	descHistSpoolN   = prometheus.NewDesc("rtm_history_spool_messages", "Messages in the history spool (on disk) while the store is slow or down.", nil, nil)
	descHistSpoolB   = prometheus.NewDesc("rtm_history_spool_bytes", "Bytes of the history spool (history.spool_max_bytes bounds it).", nil, nil)
	descHistCaptured = prometheus.NewDesc("rtm_history_captured_total", "Messages captured for history on this node.", nil, nil)
	descHistWritten  = prometheus.NewDesc("rtm_history_written_total", "History messages written to the store.", nil, nil)
	descHistDropped  = prometheus.NewDesc("rtm_history_dropped_total", "History messages not stored (spool full, refused by the store, or left at a shutdown with a full spool); each is in a gap record.", nil, nil)
	descHistFailures = prometheus.NewDesc("rtm_history_write_failures_total", "Failed history batch inserts (each retried).", nil, nil)
	descHistUp       = prometheus.NewDesc("rtm_history_store_up", "1 while the last history insert succeeded.", nil, nil)
)

type historyCollector struct{ h *History }

func (c historyCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descHistQueued, descHistSpoolN, descHistSpoolB, descHistCaptured, descHistWritten, descHistDropped, descHistFailures, descHistUp} {
		ch <- d
	}
	c.h.writeDur.Describe(ch)
}

func (c historyCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.h.Stats()
	up := 0.0
	if s.StoreUp {
		up = 1
	}
	ch <- prometheus.MustNewConstMetric(descHistQueued, prometheus.GaugeValue, float64(s.Queued))
	ch <- prometheus.MustNewConstMetric(descHistSpoolN, prometheus.GaugeValue, float64(s.SpoolMessages))
	ch <- prometheus.MustNewConstMetric(descHistSpoolB, prometheus.GaugeValue, float64(s.SpoolBytes))
	ch <- prometheus.MustNewConstMetric(descHistCaptured, prometheus.CounterValue, float64(s.Captured))
	ch <- prometheus.MustNewConstMetric(descHistWritten, prometheus.CounterValue, float64(s.Written))
	ch <- prometheus.MustNewConstMetric(descHistDropped, prometheus.CounterValue, float64(s.Dropped))
	ch <- prometheus.MustNewConstMetric(descHistFailures, prometheus.CounterValue, float64(s.Failures))
	ch <- prometheus.MustNewConstMetric(descHistUp, prometheus.GaugeValue, up)
	c.h.writeDur.Collect(ch)
}
