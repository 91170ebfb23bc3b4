package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rtm-dev/rtm/internal/loadgen"
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

// The fan-in, QoS 1, fan-out and connection-rate scenarios run on `rtm
// bench`'s engine (internal/loadgen): its own MQTT codec, so the same
// client drives every broker here and in `make bench`.

// runLoad runs one loadgen scenario against t and maps its result.
func runLoad(ctx context.Context, t *target, p params, c loadgen.Config) (res result, lr *loadgen.Result) {
	c.Addrs = []string{t.addr}
	c.Size = max(p.size, loadgen.HeaderSize)
	c.Duration = p.timeout
	c.Drain = p.idle
	c.SetupTimeout = p.timeout
	if c.ConnectConcurrency == 0 {
		c.ConnectConcurrency = 20
	}
	c.Topic = "bench"
	if c.Inflight == 0 {
		c.Inflight = 64
	}
	lr, err := loadgen.Run(ctx, c)
	if err != nil {
		res.fail("%v", err)
		return res, nil
	}
	res.expected, res.received, res.dups = lr.Expected, lr.Delivered, lr.Duplicated
	for _, e := range lr.Errors {
		res.fail("%s", e)
	}
	return res, lr
}

// runFanIn: faninPubs publishers send faninMsgs QoS 0 messages in all, as
// fast as they can, on bench/<i>; one subscriber on bench/+ counts them.
func runFanIn(ctx context.Context, t *target, p params, _ string) result {
	res, lr := runLoad(ctx, t, p, loadgen.Config{Scenario: loadgen.ScenarioFanIn, Version: loadgen.V5, Clients: p.faninPubs, Count: int64(p.faninMsgs)})
	if lr != nil {
		res.values = map[string]float64{"rate": lr.DeliveredRate}
	}
	return res
}

// runQoS1: one publisher keeps qos1Window QoS 1 publishes in flight; one
// QoS 1 subscriber acknowledges each delivery. The payload carries the
// sequence number and the send time.
func runQoS1(ctx context.Context, t *target, p params, _ string) result {
	res, lr := runLoad(ctx, t, p, loadgen.Config{Scenario: loadgen.ScenarioPairs, Version: loadgen.V5, QoS: 1, Clients: 1,
		Count: int64(p.qos1Msgs), Inflight: p.qos1Window})
	if lr != nil {
		res.values = map[string]float64{"rate": lr.DeliveredRate}
		if lr.Latency != nil {
			res.values["p50"], res.values["p99"] = lr.Latency.P50, lr.Latency.P99
		}
	}
	return res
}

// runFanOut: fanoutSubs QoS 0 subscribers on bench/all; one publisher sends
// fanoutMsgs QoS 0 messages as fast as it can.
func runFanOut(ctx context.Context, t *target, p params, _ string) result {
	res, lr := runLoad(ctx, t, p, loadgen.Config{Scenario: loadgen.ScenarioFanOut, Version: loadgen.V5, Clients: p.fanoutSubs, Count: int64(p.fanoutMsgs)})
	if lr != nil {
		res.values = map[string]float64{"rate": lr.DeliveredRate}
	}
	return res
}

// runConnect: conns clients connect (TCP, CONNECT, CONNACK), connConc at a
// time, and stay connected until all are in; then all disconnect.
func runConnect(ctx context.Context, t *target, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	res.expected = int64(p.conns)
	clients := make([]*loadgen.Client, p.conns)
	errs := make([]error, p.conns)
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range min(p.connConc, p.conns) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < p.conns; i = int(next.Add(1) - 1) {
				clients[i], errs[i] = loadgen.Dial(ctx, loadgen.ClientOptions{Addr: t.addr, ClientID: fmt.Sprintf("%s-%d", tag, i), ReadBuffer: 512})
			}
		}()
	}
	wg.Wait()
	end := time.Now()
	var first error
	for i, c := range clients {
		if c != nil {
			res.received++
		} else if first == nil {
			first = errs[i]
		}
	}
	if first != nil {
		res.fail("%d connects failed, first: %v", res.expected-res.received, first)
	}
	res.values = map[string]float64{"rate": float64(res.received) / end.Sub(start).Seconds()}
	var cw sync.WaitGroup
	sem := make(chan struct{}, 50)
	for _, c := range clients {
		if c != nil {
			cw.Add(1)
			sem <- struct{}{}
			go func() { defer cw.Done(); c.Close(); <-sem }()
		}
	}
	cw.Wait()
	return res
}
