package main

import (
	"context"
	"encoding/binary"
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
	size     int           // payload bytes (at least 16: sequence number and send time)
	msgs     int           // QoS 0 throughput: messages
	qos1Msgs int           // QoS 1 throughput: messages
	window   int           // QoS 1 publishes in flight
	rate     int           // latency: messages per second
	duration time.Duration // latency: how long to send
	timeout  time.Duration // bound on one run of one scenario
	idle     time.Duration // no delivery for this long after the last send ends a run as lossy
}

func (p params) scaled(div int) params {
	q := p
	q.msgs = max(p.msgs/div, 1)
	q.qos1Msgs = max(p.qos1Msgs/div, 1)
	q.duration = max(p.duration/time.Duration(div), 500*time.Millisecond)
	return q
}

// placement is where the publisher and the subscriber connect.
type placement struct {
	key, title string
	pub, sub   *node
	// ready, if set, is called once the subscriber's SUBACK is in and
	// returns when a publish on pub reaches it.
	ready func(context.Context) error
}

// compare says how a metric's two placements are set side by side.
type compare int

const (
	none  compare = iota
	ratio         // cross / same
	added         // cross / same, and cross − same
)

// metric describes one number a scenario reports.
type metric struct {
	key, label   string
	higherBetter bool
	cmp          compare
}

// scenario is one workload, run in one placement at a time.
type scenario struct {
	key, title string
	metrics    []metric
	run        func(ctx context.Context, pl placement, p params, tag string) result
}

// result is one run of one scenario in one placement.
type result struct {
	values   map[string]float64 // by metric key; absent if the run failed
	expected int64              // messages the publisher was to send
	received int64              // distinct messages the subscriber got
	dups     int64              // deliveries of a message already received
	drops    drops              // what the brokers and the link counted as dropped during the run
	errs     []string
	notes    []string // worth reading, but the run is valid
}

func (r *result) fail(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func (r *result) lost() int64 { return max(r.expected-r.received, 0) }

var scenarios = []scenario{
	{
		key: "qos0", title: "QoS 0 throughput",
		metrics: []metric{
			{"rate", "msg/s received", true, ratio},
			{"loss", "loss %", false, none},
		},
		run: runQoS0,
	},
	{
		key: "qos1", title: "QoS 1 throughput",
		metrics: []metric{{"rate", "msg/s received", true, ratio}},
		run:     runQoS1,
	},
	{
		key: "latency", title: "QoS 1 latency at a fixed rate",
		metrics: []metric{
			{"p50", "p50 publish→receive (ms)", false, added},
			{"p99", "p99 publish→receive (ms)", false, added},
			{"max", "max publish→receive (ms)", false, added},
			{"ack50", "p50 publish→PUBACK (ms)", false, added},
			{"ack99", "p99 publish→PUBACK (ms)", false, added},
		},
		run: runLatency,
	},
}

// inbox records one run's deliveries by sequence number: every payload
// starts with the sequence number and the benchkit.Mono() time it was sent at.
type inbox struct {
	tr   *benchkit.Tracker
	mu   sync.Mutex // guards the rest; written on the subscriber's routing goroutine
	lat  []int64    // receive − send in ns by sequence, 0 until received
	dups int64
	bad  int64 // payloads that are not this run's
}

func newInbox(n int) *inbox { return &inbox{tr: benchkit.NewTracker(int64(n)), lat: make([]int64, n)} }

func (in *inbox) onPublish(pk *paho.Publish) {
	now := benchkit.Mono()
	in.mu.Lock()
	defer in.mu.Unlock()
	if len(pk.Payload) < 16 {
		in.bad++
		return
	}
	seq := binary.BigEndian.Uint64(pk.Payload)
	sentAt := int64(binary.BigEndian.Uint64(pk.Payload[8:]))
	if seq >= uint64(len(in.lat)) {
		in.bad++
		return
	}
	if in.lat[seq] != 0 {
		in.dups++
		return
	}
	in.lat[seq] = max(now-sentAt, 1)
	in.tr.Hit()
}

// close records the inbox's counts into res and returns the latencies of
// the messages received, sorted.
func (in *inbox) close(res *result) []int64 {
	in.mu.Lock()
	defer in.mu.Unlock()
	res.received = in.tr.Received()
	res.dups = in.dups
	if in.bad > 0 {
		res.fail("%d deliveries carried a foreign payload", in.bad)
	}
	got := make([]int64, 0, res.received)
	for _, d := range in.lat {
		if d != 0 {
			got = append(got, d)
		}
	}
	slices.Sort(got)
	return got
}

// stamp writes seq and the current benchkit.Mono() time at the start of buf.
func stamp(buf []byte, seq int64) {
	binary.BigEndian.PutUint64(buf, uint64(seq))
	binary.BigEndian.PutUint64(buf[8:], uint64(benchkit.Mono()))
}

// connectPair connects the subscriber (to pl.sub, subscribed to topic at
// qos, deliveries to in) and then the publisher (to pl.pub), and waits
// until a publish can reach the subscriber. The returned function hangs up
// both.
func connectPair(ctx context.Context, pl placement, tag, topic string, qos byte, in *inbox, cerrs *atomic.Int64) (pub *paho.Client, ca *paho.Connack, hang func(), err error) {
	sub, _, err := benchkit.Dial(ctx, pl.sub.mqtt, benchkit.Options{ID: tag + "-sub", OnPublish: in.onPublish, ClientErrs: cerrs})
	if err != nil {
		return nil, nil, nil, err
	}
	if err := benchkit.Subscribe(ctx, sub, topic, qos); err != nil {
		benchkit.HangUp(sub)
		return nil, nil, nil, err
	}
	if pl.ready != nil {
		if err := pl.ready(ctx); err != nil {
			benchkit.HangUp(sub)
			return nil, nil, nil, err
		}
	}
	pub, ca, err = benchkit.Dial(ctx, pl.pub.mqtt, benchkit.Options{ID: tag + "-pub", ReceiveMax: 16, ClientErrs: cerrs})
	if err != nil {
		benchkit.HangUp(sub)
		return nil, nil, nil, err
	}
	return pub, ca, func() { benchkit.HangUp(pub); benchkit.HangUp(sub) }, nil
}

// runQoS0: one publisher sends msgs QoS 0 messages as fast as it can; one
// QoS 0 subscriber counts them. QoS 0 may be dropped under overload, so a
// run ends after idle without a delivery and counts the rest as lost.
func runQoS0(ctx context.Context, pl placement, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	res.expected = int64(p.msgs)
	topic := "bench/" + tag
	var cerrs atomic.Int64
	in := newInbox(p.msgs)
	pub, _, hang, err := connectPair(ctx, pl, tag, topic, 0, in, &cerrs)
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer hang()

	sent := make(chan struct{})
	var perr atomic.Value
	start := benchkit.Mono()
	go func() {
		defer close(sent)
		// QoS 0: paho writes the packet before Publish returns, so one
		// payload buffer serves every message.
		pk := &paho.Publish{Topic: topic, Payload: make([]byte, max(p.size, 16))}
		for seq := range int64(p.msgs) {
			stamp(pk.Payload, seq)
			if _, err := pub.Publish(ctx, pk); err != nil {
				perr.Store(fmt.Sprintf("publish %d stopped the publisher: %v", seq, err))
				return
			}
		}
	}()
	if err := in.tr.Wait(ctx, sent, p.idle); err != nil {
		res.fail("%v", err)
	}
	<-sent
	in.close(&res)
	res.values = map[string]float64{
		"rate": in.tr.Rate(start),
		"loss": 100 * float64(res.lost()) / float64(res.expected),
	}
	if e := perr.Load(); e != nil {
		res.fail("%v", e)
	}
	if n := cerrs.Load(); n > 0 {
		res.fail("%d client connection errors", n)
	}
	return res
}

// runQoS1: one publisher keeps window QoS 1 publishes in flight (each
// waits for its PUBACK); one QoS 1 subscriber acknowledges each delivery.
func runQoS1(ctx context.Context, pl placement, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	res.expected = int64(p.qos1Msgs)
	topic := "bench/" + tag
	var cerrs atomic.Int64
	in := newInbox(p.qos1Msgs)
	pub, ca, hang, err := connectPair(ctx, pl, tag, topic, 1, in, &cerrs)
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer hang()
	window := p.window
	if ca.Properties != nil && ca.Properties.ReceiveMaximum != nil && int(*ca.Properties.ReceiveMaximum) < window {
		window = int(*ca.Properties.ReceiveMaximum)
		benchkit.Logf("%s: server Receive Maximum %d caps the QoS 1 window", pl.pub.name, window)
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
			buf := make([]byte, max(p.size, 16)) // reused only once its PUBACK is in
			for seq := next.Add(1) - 1; seq < res.expected; seq = next.Add(1) - 1 {
				stamp(buf, seq)
				if _, err := pub.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: buf}); err != nil {
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
	if err := in.tr.Wait(ctx, sent, p.idle); err != nil {
		res.fail("%v", err)
	}
	<-sent
	in.close(&res)
	res.values = map[string]float64{"rate": in.tr.Rate(start)}
	if n := perr.Load(); n > 0 {
		res.fail("%d publishes failed (first: %v)", n, firstErr.Load())
	}
	if n := cerrs.Load(); n > 0 {
		res.fail("%d client connection errors", n)
	}
	return res
}

// runLatency: one publisher sends QoS 1 messages at a fixed rate for
// duration, each on schedule from a pool of window senders (so a slow
// PUBACK does not delay the next send); one QoS 1 subscriber records
// receive − send for each. The send time is taken just before the
// publish; how late sends left against their schedule is checked, since a
// publisher that falls behind would hide latency.
func runLatency(ctx context.Context, pl placement, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout+p.duration)
	defer cancel()
	n := max(int(p.duration.Seconds()*float64(p.rate)), 1)
	interval := int64(time.Second) / int64(p.rate)
	res.expected = int64(n)
	topic := "bench/" + tag
	var cerrs atomic.Int64
	in := newInbox(n)
	pub, _, hang, err := connectPair(ctx, pl, tag, topic, 1, in, &cerrs)
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer hang()

	var perr, maxLag atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	acks := make([]int64, n) // publish→PUBACK of each seq (each written by one sender)
	jobs := make(chan int64)
	sent := make(chan struct{})
	start := benchkit.Mono()
	for range p.window {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, max(p.size, 16))
			for seq := range jobs {
				stamp(buf, seq)
				lag := int64(binary.BigEndian.Uint64(buf[8:])) - (start + seq*interval)
				for cur := maxLag.Load(); lag > cur && !maxLag.CompareAndSwap(cur, lag); cur = maxLag.Load() {
				}
				if _, err := pub.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: buf}); err != nil {
					firstErr.CompareAndSwap(nil, err.Error())
					perr.Add(1)
				} else {
					acks[seq] = benchkit.Mono() - int64(binary.BigEndian.Uint64(buf[8:]))
				}
			}
		}()
	}
	go func() {
		defer close(jobs)
		timer := time.NewTimer(0)
		defer timer.Stop()
		<-timer.C
		for seq := range int64(n) {
			if d := time.Duration(start + seq*interval - benchkit.Mono()); d > 0 {
				timer.Reset(d)
				select {
				case <-timer.C:
				case <-ctx.Done():
					return
				}
			}
			select {
			case jobs <- seq:
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() { wg.Wait(); close(sent) }()
	if err := in.tr.Wait(ctx, sent, p.idle); err != nil {
		res.fail("%v", err)
	}
	<-sent
	got := in.close(&res)
	if len(got) > 0 {
		res.values = map[string]float64{
			"p50": ms(got[len(got)*50/100]),
			"p99": ms(got[min(len(got)*99/100, len(got)-1)]),
			"max": ms(got[len(got)-1]),
		}
		var acked []int64
		for _, d := range acks {
			if d > 0 {
				acked = append(acked, d)
			}
		}
		if len(acked) > 0 {
			slices.Sort(acked)
			res.values["ack50"] = ms(acked[len(acked)*50/100])
			res.values["ack99"] = ms(acked[min(len(acked)*99/100, len(acked)-1)])
		}
	}
	if lag := time.Duration(maxLag.Load()); lag > 10*time.Millisecond {
		res.notes = append(res.notes, fmt.Sprintf("the publisher fell behind its schedule by up to %s (client short of CPU, or all %d senders waiting for PUBACKs)", lag.Round(time.Millisecond), p.window))
	}
	if n := perr.Load(); n > 0 {
		res.fail("%d publishes failed (first: %v)", n, firstErr.Load())
	}
	if n := cerrs.Load(); n > 0 {
		res.fail("%d client connection errors", n)
	}
	return res
}

func ms(ns int64) float64 { return float64(ns) / 1e6 }
