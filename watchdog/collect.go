package watchdog

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// NodeStats is one broker's figures as the watchdog shows them (the
// "stats" of /v1/nodes). Rates are per second over the last poll interval.
type NodeStats struct {
	Connections    int64            `json:"connections"`
	Capacity       int64            `json:"capacity"`
	Load           float64          `json:"load"`
	Subscriptions  int64            `json:"subscriptions"`
	MsgsInRate     float64          `json:"msgs_in_rate"`
	MsgsOutRate    float64          `json:"msgs_out_rate"`
	DroppedRate    float64          `json:"dropped_rate"`
	DroppedTotal   map[string]int64 `json:"dropped_total"`
	Inflight       int64            `json:"inflight"`
	Retained       int64            `json:"retained"`
	MemoryBytes    int64            `json:"memory_bytes"`
	Goroutines     int64            `json:"goroutines"`
	Uptime         float64          `json:"uptime_seconds"`
	Ready          bool             `json:"ready"`
	StoreUp        bool             `json:"store_up"`
	HistoryQueue   int64            `json:"history_queue"`   // in memory and in the spool
	HistorySpooled int64            `json:"history_spooled"` // in the spool: memory no longer holds the backlog
	HistorySpool   int64            `json:"history_spool_bytes"`
	Links          []LinkStats      `json:"links"`

	// hasStore and hasHistory say whether the broker reports them at all.
	hasStore   bool
	hasHistory bool
}

// LinkStats is one node link of a broker.
type LinkStats struct {
	Peer        string `json:"peer"`
	State       string `json:"state"`
	QueuedBytes int64  `json:"queued_bytes"`
}

// brokerStats is the part of a broker's /v1/stats the watchdog reads. The
// watchdog does not import the broker: it reads its wire format, and
// tolerates fields it does not know and fields that are missing (history,
// from brokers that predate it).
type brokerStats struct {
	Ready            bool                        `json:"ready"`
	Uptime           float64                     `json:"uptime_seconds"`
	Connections      int64                       `json:"connections"`
	Capacity         int64                       `json:"capacity"`
	Subscriptions    int64                       `json:"subscriptions"`
	Retained         int64                       `json:"retained"`
	Inflight         int64                       `json:"inflight"`
	MessagesReceived int64                       `json:"messages_received"`
	MessagesSent     int64                       `json:"messages_sent"`
	DroppedByReason  map[string]map[string]int64 `json:"messages_dropped_by_reason"`
	HeapBytes        int64                       `json:"heap_bytes"`
	Goroutines       int64                       `json:"goroutines"`
	Cluster          *struct {
		Links []struct {
			Peer       string `json:"peer"`
			State      string `json:"state"`
			QueueBytes int64  `json:"queue_bytes"`
		} `json:"links"`
	} `json:"cluster"`
	Store *struct {
		Up bool `json:"up"`
	} `json:"store"`
	// History is read loosely: its shape is the history capture's.
	History map[string]any `json:"history"`
}

// sample is one poll's raw counters, for rates.
type sample struct {
	at                      time.Time
	received, sent, dropped int64
}

// poller fetches /v1/stats from brokers' admin endpoints.
type poller struct {
	http    *http.Client
	key     string
	timeout time.Duration
}

func newPoller(key string, timeout time.Duration) *poller {
	return &poller{key: key, timeout: timeout, http: &http.Client{
		Transport: &http.Transport{MaxIdleConnsPerHost: 2, IdleConnTimeout: time.Minute},
	}}
}

// fetch reads one broker's stats, bounded by the poll timeout.
func (p *poller) fetch(ctx context.Context, admin string) (brokerStats, error) {
	var s brokerStats
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+"/v1/stats", nil)
	if err != nil {
		return s, err
	}
	if p.key != "" {
		req.Header.Set("Authorization", "Bearer "+p.key)
	}
	res, err := p.http.Do(req)
	if err != nil {
		return s, err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 4<<20))
	if err != nil {
		return s, err
	}
	if res.StatusCode != http.StatusOK {
		return s, fmt.Errorf("GET /v1/stats: status %d (is watchdog's broker.admin_keys the brokers'?)", res.StatusCode)
	}
	if err := json.Unmarshal(body, &s); err != nil {
		return s, fmt.Errorf("GET /v1/stats: %w", err)
	}
	return s, nil
}

// call POSTs to a broker's admin endpoint (drain, undrain, sys alerts).
func (p *poller) call(ctx context.Context, admin, path string, body io.Reader) error {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+admin+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if p.key != "" {
		req.Header.Set("Authorization", "Bearer "+p.key)
	}
	res, err := p.http.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
	if res.StatusCode/100 != 2 {
		return fmt.Errorf("POST %s: status %d", path, res.StatusCode)
	}
	return nil
}

// historyNumber reads the first of keys that the history stats carry.
func historyNumber(h map[string]any, keys ...string) (int64, bool) {
	for _, k := range keys {
		if v, ok := h[k].(float64); ok {
			return int64(v), true
		}
	}
	return 0, false
}

// convert turns raw stats into NodeStats, with rates against prev.
func convert(s brokerStats, now time.Time, prev *sample) (NodeStats, sample) {
	cur := sample{at: now, received: s.MessagesReceived, sent: s.MessagesSent}
	ns := NodeStats{
		Connections: s.Connections, Capacity: s.Capacity, Subscriptions: s.Subscriptions,
		Inflight: s.Inflight, Retained: s.Retained, MemoryBytes: s.HeapBytes, Goroutines: s.Goroutines,
		Uptime: s.Uptime, Ready: s.Ready, DroppedTotal: map[string]int64{}, Links: []LinkStats{},
	}
	if s.Capacity > 0 {
		ns.Load = float64(s.Connections) / float64(s.Capacity)
	}
	for reason, byQoS := range s.DroppedByReason {
		var n int64
		for _, c := range byQoS {
			n += c
		}
		ns.DroppedTotal[reason] = n
		cur.dropped += n
	}
	if prev != nil {
		if dt := now.Sub(prev.at).Seconds(); dt > 0 {
			rate := func(a, b int64) float64 {
				if a < b { // counters went back: the broker restarted
					return 0
				}
				return float64(a-b) / dt
			}
			ns.MsgsInRate = rate(cur.received, prev.received)
			ns.MsgsOutRate = rate(cur.sent, prev.sent)
			ns.DroppedRate = rate(cur.dropped, prev.dropped)
		}
	}
	if s.Cluster != nil {
		for _, l := range s.Cluster.Links {
			ns.Links = append(ns.Links, LinkStats{Peer: l.Peer, State: l.State, QueuedBytes: l.QueueBytes})
		}
	}
	if s.Store != nil {
		ns.hasStore, ns.StoreUp = true, s.Store.Up
	} else {
		ns.StoreUp = true // no store configured: nothing unreachable
	}
	if s.History != nil {
		// The backlog is what the store has not taken yet: the memory
		// queue and, while the store is slow or down, the spool.
		q, okQ := historyNumber(s.History, "queued")
		n, okN := historyNumber(s.History, "spool_messages")
		sp, okS := historyNumber(s.History, "spool_bytes")
		ns.HistoryQueue, ns.HistorySpooled, ns.HistorySpool, ns.hasHistory = q+n, n, sp, okQ || okN || okS
	}
	return ns, cur
}

// series is a node's last hour, one point per poll, in a ring.
type series struct {
	mu                              sync.Mutex
	max                             int
	t                               []int64
	in, out, dropped, conns, memory []float64
}

func newSeries(max int) *series { return &series{max: max} }

func (s *series) add(at time.Time, ns NodeStats) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.t) >= s.max {
		n := len(s.t) - s.max + 1
		s.t, s.in, s.out, s.dropped, s.conns, s.memory = s.t[n:], s.in[n:], s.out[n:], s.dropped[n:], s.conns[n:], s.memory[n:]
	}
	s.t = append(s.t, at.Unix())
	s.in = append(s.in, ns.MsgsInRate)
	s.out = append(s.out, ns.MsgsOutRate)
	s.dropped = append(s.dropped, ns.DroppedRate)
	s.conns = append(s.conns, float64(ns.Connections))
	s.memory = append(s.memory, float64(ns.MemoryBytes))
}

// SeriesJSON is one node's series in /v1/series.
type SeriesJSON struct {
	T           []int64   `json:"t"`
	MsgsInRate  []float64 `json:"msgs_in_rate"`
	MsgsOutRate []float64 `json:"msgs_out_rate"`
	DroppedRate []float64 `json:"dropped_rate"`
	Connections []float64 `json:"connections"`
	MemoryBytes []float64 `json:"memory_bytes"`
}

func (s *series) snapshot() SeriesJSON {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := func(v []float64) []float64 { return append([]float64{}, v...) }
	return SeriesJSON{T: append([]int64{}, s.t...), MsgsInRate: c(s.in), MsgsOutRate: c(s.out), DroppedRate: c(s.dropped),
		Connections: c(s.conns), MemoryBytes: c(s.memory)}
}
