package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

// params sizes every scenario; scaled down for the warm-up pass.
type params struct {
	size       int // payload bytes
	faninPubs  int
	faninMsgs  int
	qos1Msgs   int
	qos1Window int
	fanoutSubs int
	fanoutMsgs int
	conns      int
	connConc   int
	// Flow-control scenarios (flow.go).
	burstPubs, burstMsgs, burstWindow int
	fanin1Pubs, fanin1Window          int
	fanin1Dur                         time.Duration
	stuckMsgs, stuckWindow            int
	stuckSideRate                     int           // msg/s fed to the stuck subscriber's topic
	timeout                           time.Duration // bound on one run of one scenario
	idle                              time.Duration // no delivery for this long after the last send ends a run as lossy
}

func (p params) scaled(div int) params {
	q := p
	q.faninMsgs = max(p.faninMsgs/div, p.faninPubs)
	q.qos1Msgs = max(p.qos1Msgs/div, 1)
	q.fanoutMsgs = max(p.fanoutMsgs/div, 1)
	q.conns = max(p.conns/div, 1)
	q.burstMsgs = max(p.burstMsgs/div, 1)
	q.fanin1Dur = max(p.fanin1Dur/time.Duration(div), time.Second)
	q.stuckMsgs = max(p.stuckMsgs/div, 1)
	return q
}

// metric describes one number a scenario reports.
type metric struct {
	key, label   string
	higherBetter bool
}

// scenario is one workload, run against one target at a time.
type scenario struct {
	key, title string
	metrics    []metric
	run        func(ctx context.Context, t *target, p params, tag string) result
}

// result is one run of one scenario against one target.
type result struct {
	values   map[string]float64 // by metric key; absent if the run failed
	expected int64              // messages (or deliveries, or connections) attempted
	received int64              // ... and completed
	dups     int64              // deliveries of a message already received
	dropped  int64              // drops the broker itself counted during the run
	errs     []string
}

func (r *result) fail(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func (r *result) lost() int64 { return max(r.expected-r.received, 0) }

var scenarios = []scenario{
	{
		key: "fanin", title: "QoS 0 fan-in",
		metrics: []metric{{"rate", "msg/s received", true}},
		run:     runFanIn,
	},
	{
		key: "qos1", title: "QoS 1 end-to-end",
		metrics: []metric{
			{"rate", "msg/s received", true},
			{"p50", "p50 publish→receive (ms)", false},
			{"p99", "p99 publish→receive (ms)", false},
		},
		run: runQoS1,
	},
	{
		key: "fanout", title: "QoS 0 fan-out",
		metrics: []metric{{"rate", "deliveries/s", true}},
		run:     runFanOut,
	},
	{
		key: "connect", title: "Connection rate",
		metrics: []metric{{"rate", "CONNECT→CONNACK/s", true}},
		run:     runConnect,
	},
	{
		key: "burst", title: "QoS 1 burst into 1 subscriber",
		metrics: []metric{
			{"delivered", "% of acknowledged delivered", true},
			{"rate", "msg/s received", true},
		},
		run: runBurst,
	},
	{
		key: "fanin1", title: "QoS 1 fan-in, sustained",
		metrics: []metric{
			{"delivered", "% of acknowledged delivered", true},
			{"ackedlost", "acknowledged, not delivered", false},
			{"rate", "msg/s received", true},
			{"percpu", "msg received per broker CPU-second", true},
		},
		run: runFanIn1,
	},
	{
		key: "stuck", title: "Pair beside a stuck subscriber",
		metrics: []metric{
			{"ratio", "pair msg/s with ÷ without the stuck subscriber", true},
			{"with", "pair msg/s, stuck subscriber present", true},
			{"without", "pair msg/s, no stuck subscriber", true},
		},
		run: runStuck,
	},
}

// dialAll connects n clients named tag-i, at most conc at a time.
func dialAll(ctx context.Context, addr, tag string, n, conc int, o benchkit.Options) ([]*paho.Client, error) {
	clients := make([]*paho.Client, n)
	errs := make([]error, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(conc, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				oo := o
				oo.ID = fmt.Sprintf("%s-%d", tag, i)
				clients[i], _, errs[i] = benchkit.Dial(ctx, addr, oo)
			}
		}()
	}
	wg.Wait()
	return clients, errors.Join(errs...)
}

// hangUpAll disconnects clients, at most 50 at a time.
func hangUpAll(clients []*paho.Client) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(50, len(clients)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < len(clients); i = int(next.Add(1) - 1) {
				benchkit.HangUp(clients[i])
			}
		}()
	}
	wg.Wait()
}

// runFanIn: faninPubs publishers send faninMsgs QoS 0 messages in all, as
// fast as they can, on bench/<i>; one subscriber on bench/# counts them.
func runFanIn(ctx context.Context, t *target, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	res.expected = int64(p.faninMsgs)
	var cerrs atomic.Int64
	tr := benchkit.NewTracker(res.expected)
	sub, _, err := benchkit.Dial(ctx, t.addr, benchkit.Options{ID: tag + "-sub", OnPublish: func(*paho.Publish) { tr.Hit() }, ClientErrs: &cerrs})
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer benchkit.HangUp(sub)
	if err := benchkit.Subscribe(ctx, sub, "bench/#", 0); err != nil {
		res.fail("%v", err)
		return res
	}
	pubs, err := dialAll(ctx, t.addr, tag+"-pub", p.faninPubs, p.faninPubs, benchkit.Options{ReceiveMax: 16, ClientErrs: &cerrs})
	defer hangUpAll(pubs)
	if err != nil {
		res.fail("%v", err)
		return res
	}

	var perr atomic.Int64
	var wg sync.WaitGroup
	sent := make(chan struct{})
	start := benchkit.Mono()
	for i, pc := range pubs {
		share := p.faninMsgs / p.faninPubs
		if i == 0 {
			share += p.faninMsgs % p.faninPubs
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			// QoS 0: paho writes the packet before Publish returns, so one
			// payload buffer serves every message of this publisher.
			pk := &paho.Publish{Topic: fmt.Sprintf("bench/%d", i), Payload: make([]byte, p.size)}
			for range share {
				if _, err := pc.Publish(ctx, pk); err != nil {
					perr.Add(1)
					return
				}
			}
		}()
	}
	go func() { wg.Wait(); close(sent) }()
	if err := tr.Wait(ctx, sent, p.idle); err != nil {
		res.fail("%v", err)
	}
	<-sent
	res.received = tr.Received()
	res.values = map[string]float64{"rate": tr.Rate(start)}
	if n := perr.Load(); n > 0 {
		res.fail("%d publishers stopped on a write error", n)
	}
	if n := cerrs.Load(); n > 0 {
		res.fail("%d client connection errors", n)
	}
	return res
}

// runQoS1: one publisher keeps qos1Window QoS 1 publishes in flight (each
// waits for its PUBACK); one QoS 1 subscriber acknowledges each delivery.
// The payload carries the sequence number and the send time.
func runQoS1(ctx context.Context, t *target, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	res.expected = int64(p.qos1Msgs)
	size := max(p.size, 16)
	var cerrs atomic.Int64
	tr := benchkit.NewTracker(res.expected)
	var mu sync.Mutex // guards lat and dups, written on the subscriber's routing goroutine
	var dups int64
	lat := make([]int64, p.qos1Msgs) // publish→receive ns by sequence, 0 until received
	onMsg := func(pk *paho.Publish) {
		now := benchkit.Mono()
		if len(pk.Payload) < 16 {
			return
		}
		seq := binary.BigEndian.Uint64(pk.Payload)
		sentAt := int64(binary.BigEndian.Uint64(pk.Payload[8:]))
		mu.Lock()
		defer mu.Unlock()
		if seq >= uint64(len(lat)) {
			return
		}
		if lat[seq] != 0 {
			dups++
			return
		}
		lat[seq] = max(now-sentAt, 1)
		tr.Hit()
	}
	sub, _, err := benchkit.Dial(ctx, t.addr, benchkit.Options{ID: tag + "-sub", OnPublish: onMsg, ClientErrs: &cerrs})
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer benchkit.HangUp(sub)
	if err := benchkit.Subscribe(ctx, sub, "bench/q1", 1); err != nil {
		res.fail("%v", err)
		return res
	}
	pub, ca, err := benchkit.Dial(ctx, t.addr, benchkit.Options{ID: tag + "-pub", ReceiveMax: 16, ClientErrs: &cerrs})
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer benchkit.HangUp(pub)
	window := p.qos1Window
	if ca.Properties != nil && ca.Properties.ReceiveMaximum != nil && int(*ca.Properties.ReceiveMaximum) < window {
		window = int(*ca.Properties.ReceiveMaximum)
		benchkit.Logf("%s: server Receive Maximum %d caps the QoS 1 window", t.name, window)
	}

	var next, perr atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	sent := make(chan struct{})
	start := benchkit.Mono()
	for range window {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, size) // reused only once its PUBACK is in
			for seq := next.Add(1) - 1; seq < res.expected; seq = next.Add(1) - 1 {
				binary.BigEndian.PutUint64(buf, uint64(seq))
				binary.BigEndian.PutUint64(buf[8:], uint64(benchkit.Mono()))
				if _, err := pub.Publish(ctx, &paho.Publish{Topic: "bench/q1", QoS: 1, Payload: buf}); err != nil {
					firstErr.CompareAndSwap(nil, err.Error())
					perr.Add(1)
					if ctx.Err() != nil {
						return
					}
				}
			}
		}()
	}
	go func() { wg.Wait(); close(sent) }()
	if err := tr.Wait(ctx, sent, p.idle); err != nil {
		res.fail("%v", err)
	}
	<-sent
	if n := perr.Load(); n > 0 {
		res.fail("%d publishes failed (first: %v)", n, firstErr.Load())
	}
	if n := cerrs.Load(); n > 0 {
		res.fail("%d client connection errors", n)
	}
	mu.Lock()
	defer mu.Unlock()
	res.received = tr.Received()
	res.dups = dups
	got := make([]int64, 0, res.received)
	for _, d := range lat {
		if d != 0 {
			got = append(got, d)
		}
	}
	res.values = map[string]float64{"rate": tr.Rate(start)}
	if len(got) > 0 {
		slices.Sort(got)
		res.values["p50"] = ms(got[len(got)*50/100])
		res.values["p99"] = ms(got[min(len(got)*99/100, len(got)-1)])
	}
	return res
}

func ms(ns int64) float64 { return float64(ns) / 1e6 }

// runFanOut: fanoutSubs QoS 0 subscribers on bench/fan; one publisher sends
// fanoutMsgs QoS 0 messages as fast as it can.
func runFanOut(ctx context.Context, t *target, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	res.expected = int64(p.fanoutMsgs) * int64(p.fanoutSubs)
	var cerrs atomic.Int64
	tr := benchkit.NewTracker(res.expected)
	subs, err := dialAll(ctx, t.addr, tag+"-sub", p.fanoutSubs, 20,
		benchkit.Options{ReceiveMax: 4096, OnPublish: func(*paho.Publish) { tr.Hit() }, ClientErrs: &cerrs})
	defer hangUpAll(subs)
	if err != nil {
		res.fail("%v", err)
		return res
	}
	for _, s := range subs {
		if err := benchkit.Subscribe(ctx, s, "bench/fan", 0); err != nil {
			res.fail("%v", err)
			return res
		}
	}
	pub, _, err := benchkit.Dial(ctx, t.addr, benchkit.Options{ID: tag + "-pub", ReceiveMax: 16, ClientErrs: &cerrs})
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer benchkit.HangUp(pub)

	sent := make(chan struct{})
	start := benchkit.Mono()
	go func() {
		defer close(sent)
		pk := &paho.Publish{Topic: "bench/fan", Payload: make([]byte, p.size)}
		for range p.fanoutMsgs {
			if _, err := pub.Publish(ctx, pk); err != nil {
				cerrs.Add(1)
				return
			}
		}
	}()
	if err := tr.Wait(ctx, sent, p.idle); err != nil {
		res.fail("%v", err)
	}
	<-sent
	res.received = tr.Received()
	res.values = map[string]float64{"rate": tr.Rate(start)}
	if n := cerrs.Load(); n > 0 {
		res.fail("%d client errors", n)
	}
	return res
}

// runConnect: conns clients connect (TCP, CONNECT, CONNACK), connConc at a
// time, and stay connected until all are in; then all disconnect.
func runConnect(ctx context.Context, t *target, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	res.expected = int64(p.conns)
	var cerrs atomic.Int64
	start := benchkit.Mono()
	clients, err := dialAll(ctx, t.addr, tag, p.conns, p.connConc, benchkit.Options{ReceiveMax: 16, ClientErrs: &cerrs})
	end := benchkit.Mono()
	defer hangUpAll(clients)
	for _, c := range clients {
		if c != nil {
			res.received++
		}
	}
	if err != nil {
		res.fail("%d connects failed, first: %v", res.expected-res.received, firstLine(err))
	}
	if n := cerrs.Load(); n > 0 {
		res.fail("%d client connection errors", n)
	}
	res.values = map[string]float64{"rate": float64(res.received) / time.Duration(end-start).Seconds()}
	return res
}

func firstLine(err error) string {
	s := err.Error()
	for i := range len(s) {
		if s[i] == '\n' {
			return s[:i]
		}
	}
	return s
}
