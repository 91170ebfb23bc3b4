package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// stats is the part of a broker's /v1/stats the harness reads.
type stats struct {
	Connections     int64            `json:"connections"`
	MessagesDropped map[string]int64 `json:"messages_dropped"`
	InflightDropped int64            `json:"inflight_dropped"`
}

// dropped is every message the broker says it dropped: queue full (all
// QoS) plus session inflight full.
func (s stats) dropped() int64 {
	n := s.InflightDropped
	for _, v := range s.MessagesDropped {
		n += v
	}
	return n
}

// clusterStats is the part of a broker's /v1/cluster the harness reads.
// Links and inbound peers are kept as objects with folded keys (see
// fields).
type clusterStats struct {
	Members []struct {
		Name   string `json:"name"`
		Status string `json:"status"`
	} `json:"members"`
	Links          []fields          `json:"links"`
	Inbound        map[string]fields `json:"inbound"`
	RemoteRoutes   map[string]int    `json:"remote_routes"`
	Forwarded      int64             `json:"messages_forwarded"`
	ForwardedBytes int64             `json:"bytes_forwarded"`
	Received       int64             `json:"messages_received_from_peers"`
}

// link returns the outbound link to peer, or nil.
func (s *clusterStats) link(peer string) fields {
	for _, l := range s.Links {
		if l.str("peer") == peer {
			return l
		}
	}
	return nil
}

// member returns peer's gossip status, or "" if it is not a member.
func (s *clusterStats) member(peer string) string {
	for _, m := range s.Members {
		if m.Name == peer {
			return m.Status
		}
	}
	return ""
}

// fields is one JSON object whose keys are folded to lower case without
// underscores, so "QueueLen" and "queue_len" read alike: the link
// counters are served without JSON tags today and may get snake_case ones.
type fields map[string]any

func (f *fields) UnmarshalJSON(b []byte) error {
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return err
	}
	*f = make(fields, len(m))
	for k, v := range m {
		(*f)[fold(k)] = v
	}
	return nil
}

func fold(k string) string { return strings.ToLower(strings.ReplaceAll(k, "_", "")) }

func (f fields) int(key string) int64 {
	v, _ := f[fold(key)].(float64)
	return int64(v)
}

func (f fields) str(key string) string {
	v, _ := f[fold(key)].(string)
	return v
}

func decodeJSON(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }

// pair is the cluster under test: a store and two brokers, a and b.
type pair struct {
	store *proc
	a, b  *node
	// last holds the drop counters read after the previous run, the next
	// run's "before": nothing but the harness touches the brokers.
	last drops
}

// drops are the counters of messages the cluster itself says it dropped.
type drops struct {
	a, b int64 // /v1/stats messages_dropped + inflight_dropped
	link int64 // a's link to b: dropped_reliable + dropped_unreliable (queue full)
}

func (d drops) sub(o drops) drops { return drops{a: d.a - o.a, b: d.b - o.b, link: d.link - o.link} }

// formed checks that x sees peer alive and its link to peer up.
func formed(ctx context.Context, x *node, peer string) error {
	var cs clusterStats
	if err := x.get(ctx, "/v1/cluster", &cs); err != nil {
		return err
	}
	if st := cs.member(peer); st != "alive" {
		return fmt.Errorf("%s sees %s as %q, want alive", x.name, peer, st)
	}
	l := cs.link(peer)
	if l == nil {
		return fmt.Errorf("%s has no link to %s", x.name, peer)
	}
	if st := l.str("state"); st != "up" {
		return fmt.Errorf("%s's link to %s is %q (last error %q), want up", x.name, peer, st, l.str("last_error"))
	}
	return nil
}

// waitFormed waits until each broker sees the other alive with its link
// up: a forwards publishes over a→b, b announces its routes over b→a.
func (c *pair) waitFormed(ctx context.Context, timeout time.Duration) error {
	err := poll(ctx, c.a.proc, timeout, "cluster not formed", func(ctx context.Context) error {
		return errors.Join(formed(ctx, c.a, "b"), formed(ctx, c.b, "a"), c.b.alive())
	})
	if err != nil {
		return err
	}
	c.last, err = c.drops(ctx)
	return err
}

// waitRoute waits until a knows that b has at least one route: b announces
// a new subscription asynchronously, and a publish that reaches a before
// the announcement is not forwarded.
func (c *pair) waitRoute(ctx context.Context) error {
	return poll(ctx, c.a.proc, 10*time.Second, "route from b not seen on a", func(ctx context.Context) error {
		var cs clusterStats
		if err := c.a.get(ctx, "/v1/cluster", &cs); err != nil {
			return err
		}
		if n := cs.RemoteRoutes["b"]; n < 1 {
			return fmt.Errorf("a's remote_routes[b] = %d, want >= 1", n)
		}
		return nil
	})
}

// quiet checks that x holds no client, no route of its peer, and nothing
// queued on its link to peer.
func quiet(ctx context.Context, x *node, peer string) error {
	var s stats
	if err := x.get(ctx, "/v1/stats", &s); err != nil {
		return err
	}
	if s.Connections != 0 {
		return fmt.Errorf("%s holds %d connections, want 0", x.name, s.Connections)
	}
	var cs clusterStats
	if err := x.get(ctx, "/v1/cluster", &cs); err != nil {
		return err
	}
	if n := cs.RemoteRoutes[peer]; n != 0 {
		return fmt.Errorf("%s still has %d routes of %s, want 0", x.name, n, peer)
	}
	l := cs.link(peer)
	if l == nil || l.str("state") != "up" {
		return fmt.Errorf("%s's link to %s is not up: %v", x.name, peer, l)
	}
	if n := l.int("queue_len"); n != 0 {
		return fmt.Errorf("%s's link to %s has %d messages queued, want 0", x.name, peer, n)
	}
	return nil
}

// drained waits until the run's clients are gone from both brokers, their
// routes withdrawn and both links idle and up, so one run does not overlap
// the next (a route of b left on a would make a same-node run forward to
// b), then returns the drops counted since the previous call.
func (c *pair) drained(ctx context.Context, timeout time.Duration) (drops, error) {
	err := poll(ctx, c.a.proc, timeout, "cluster not drained", func(ctx context.Context) error {
		return errors.Join(quiet(ctx, c.a, "b"), quiet(ctx, c.b, "a"), c.b.alive())
	})
	now, derr := c.drops(ctx)
	if derr != nil {
		return drops{}, errors.Join(err, derr)
	}
	d := now.sub(c.last)
	c.last = now
	return d, err
}

func (c *pair) drops(ctx context.Context) (drops, error) {
	var sa, sb stats
	var cs clusterStats
	if err := errors.Join(c.a.get(ctx, "/v1/stats", &sa), c.b.get(ctx, "/v1/stats", &sb), c.a.get(ctx, "/v1/cluster", &cs)); err != nil {
		return drops{}, fmt.Errorf("read drop counters: %w", err)
	}
	d := drops{a: sa.dropped(), b: sb.dropped()}
	if l := cs.link("b"); l != nil {
		d.link = l.int("dropped_reliable") + l.int("dropped_unreliable")
	}
	return d, nil
}

// stop stops b, a and the store, in that order, each by PID.
func (c *pair) stop() {
	for _, p := range []*proc{c.procOf(c.b), c.procOf(c.a), c.store} {
		if p != nil {
			p.stop(20 * time.Second)
		}
	}
}

func (c *pair) procOf(n *node) *proc {
	if n == nil {
		return nil
	}
	return n.proc
}
