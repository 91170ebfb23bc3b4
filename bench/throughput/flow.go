package main

// The flow-control scenarios (issue 11 item 1): what happens to
// acknowledged QoS 1 messages when publishers outrun one subscriber, and
// what one stuck subscriber costs an unrelated pair. They are meant to run
// with both brokers' default limits (-defaults).

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

// uniq counts distinct message ids (publisher << 32 | sequence) received.
type uniq struct {
	mu   sync.Mutex
	seen map[uint64]struct{}
	dups atomic.Int64
	n    atomic.Int64
	last atomic.Int64 // Mono() of the last new message
}

func newUniq() *uniq { return &uniq{seen: map[uint64]struct{}{}} }

func (u *uniq) hit(p *paho.Publish) {
	if len(p.Payload) < 8 {
		return
	}
	k := binary.BigEndian.Uint64(p.Payload)
	u.mu.Lock()
	if _, ok := u.seen[k]; ok {
		u.mu.Unlock()
		u.dups.Add(1)
		return
	}
	u.seen[k] = struct{}{}
	u.mu.Unlock()
	u.n.Add(1)
	u.last.Store(benchkit.Mono())
}

// settle waits until n reaches want or nothing new arrives for idle.
func (u *uniq) settle(ctx context.Context, want int64, idle time.Duration) {
	last, since := u.n.Load(), time.Now()
	for u.n.Load() < want && time.Since(since) < idle && ctx.Err() == nil {
		time.Sleep(20 * time.Millisecond)
		if n := u.n.Load(); n != last {
			last, since = n, time.Now()
		}
	}
}

// qos1Publisher publishes QoS 1 messages with ids id<<32|seq from window
// goroutines until more returns false, counting PUBACKs with success and
// failures.
type qos1Publisher struct {
	c             *paho.Client
	id            uint64
	window        int
	acked, failed atomic.Int64
	firstErr      atomic.Value
	next          atomic.Int64
}

func dialPublisher(ctx context.Context, addr, name string, id uint64, window int, cerrs *atomic.Int64) (*qos1Publisher, error) {
	c, ca, err := benchkit.Dial(ctx, addr, benchkit.Options{ID: name, ReceiveMax: 16, ClientErrs: cerrs})
	if err != nil {
		return nil, err
	}
	if ca.Properties != nil && ca.Properties.ReceiveMaximum != nil && int(*ca.Properties.ReceiveMaximum) < window {
		window = int(*ca.Properties.ReceiveMaximum) // the broker's Receive Maximum caps it
	}
	return &qos1Publisher{c: c, id: id, window: window}, nil
}

// run publishes until more(seq) is false, then returns once every publish
// has its answer.
func (p *qos1Publisher) run(ctx context.Context, topic string, size int, more func(seq int64) bool) {
	var wg sync.WaitGroup
	for range p.window {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				seq := p.next.Add(1) - 1
				if !more(seq) {
					return
				}
				buf := make([]byte, max(size, 8))
				binary.BigEndian.PutUint64(buf, p.id<<32|uint64(seq))
				pr, err := p.c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: buf})
				switch {
				case err != nil:
					p.firstErr.CompareAndSwap(nil, err.Error())
					p.failed.Add(1)
				case pr != nil && pr.ReasonCode >= 0x80:
					p.firstErr.CompareAndSwap(nil, fmt.Sprintf("PUBACK reason %#x", pr.ReasonCode))
					p.failed.Add(1)
				default:
					p.acked.Add(1)
				}
			}
		}()
	}
	wg.Wait()
}

func subscriber(ctx context.Context, addr, name, filter string, u *uniq, cerrs *atomic.Int64) (*paho.Client, error) {
	c, _, err := benchkit.Dial(ctx, addr, benchkit.Options{ID: name, OnPublish: u.hit, ClientErrs: cerrs})
	if err != nil {
		return nil, err
	}
	if err := benchkit.Subscribe(ctx, c, filter, 1); err != nil {
		benchkit.HangUp(c)
		return nil, err
	}
	return c, nil
}

// runBurst: burstPubs publishers send burstMsgs QoS 1 messages each, with
// burstWindow in flight per publisher, into one QoS 1 subscriber that
// acknowledges each at once. Reported: the share of acknowledged messages
// delivered.
func runBurst(ctx context.Context, t *target, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	res.expected = int64(p.burstPubs * p.burstMsgs)
	var cerrs atomic.Int64
	u := newUniq()
	sub, err := subscriber(ctx, t.addr, tag+"-sub", "bench/burst", u, &cerrs)
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer benchkit.HangUp(sub)
	pubs := make([]*qos1Publisher, p.burstPubs)
	for i := range pubs {
		if pubs[i], err = dialPublisher(ctx, t.addr, fmt.Sprintf("%s-pub-%d", tag, i), uint64(i), p.burstWindow, &cerrs); err != nil {
			res.fail("%v", err)
			return res
		}
		defer benchkit.HangUp(pubs[i].c)
	}
	start := benchkit.Mono()
	var wg sync.WaitGroup
	for _, pb := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pb.run(ctx, "bench/burst", p.size, func(seq int64) bool { return seq < int64(p.burstMsgs) })
		}()
	}
	wg.Wait()
	var acked, failed int64
	for _, pb := range pubs {
		acked += pb.acked.Load()
		failed += pb.failed.Load()
	}
	u.settle(ctx, acked, p.idle)
	res.received = u.n.Load()
	res.dups = u.dups.Load()
	res.values = map[string]float64{
		"delivered": 100 * float64(res.received) / float64(max(acked, 1)),
		"rate":      float64(res.received) / time.Duration(max(u.last.Load()-start, 1)).Seconds(),
	}
	if failed > 0 {
		res.fail("%d publishes failed (first: %v)", failed, firstErr(pubs))
	}
	return res
}

// runFanIn1: fanin1Pubs QoS 1 publishers, each with fanin1Window in flight,
// publish as fast as they can for fanin1Dur into one QoS 1 subscriber.
// Reported: delivered per second, the share of acknowledged messages
// delivered, acknowledged but never delivered, and messages delivered per
// CPU-second of the broker.
func runFanIn1(ctx context.Context, t *target, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout+p.fanin1Dur)
	defer cancel()
	var cerrs atomic.Int64
	u := newUniq()
	sub, err := subscriber(ctx, t.addr, tag+"-sub", "bench/in1", u, &cerrs)
	if err != nil {
		res.fail("%v", err)
		return res
	}
	defer benchkit.HangUp(sub)
	pubs := make([]*qos1Publisher, p.fanin1Pubs)
	for i := range pubs {
		if pubs[i], err = dialPublisher(ctx, t.addr, fmt.Sprintf("%s-pub-%d", tag, i), uint64(i), p.fanin1Window, &cerrs); err != nil {
			res.fail("%v", err)
			return res
		}
		defer benchkit.HangUp(pubs[i].c)
	}
	cpu0 := t.cpuSeconds()
	start := benchkit.Mono()
	stopAt := time.Now().Add(p.fanin1Dur)
	var wg sync.WaitGroup
	for _, pb := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pb.run(ctx, "bench/in1", p.size, func(int64) bool { return time.Now().Before(stopAt) })
		}()
	}
	wg.Wait()
	var acked, failed int64
	for _, pb := range pubs {
		acked += pb.acked.Load()
		failed += pb.failed.Load()
	}
	u.settle(ctx, acked, p.idle)
	cpu := t.cpuSeconds() - cpu0
	res.expected = acked
	res.received = u.n.Load()
	res.dups = u.dups.Load()
	res.values = map[string]float64{
		"rate":      float64(res.received) / time.Duration(max(u.last.Load()-start, 1)).Seconds(),
		"delivered": 100 * float64(res.received) / float64(max(acked, 1)),
		"ackedlost": float64(max(acked-res.received, 0)),
	}
	if cpu > 0 {
		res.values["percpu"] = float64(res.received) / cpu
	}
	if failed > 0 {
		res.fail("%d publishes failed (first: %v)", failed, firstErr(pubs))
	}
	return res
}

// runStuck measures an unrelated QoS 1 pair (one publisher, stuckWindow in
// flight, stuckMsgs messages → one subscriber) twice in the same run:
// beside a subscriber that never reads its socket, fed by another
// publisher (stuckPrefill messages, then stuckSideRate msg/s), and beside
// the same feed with nobody subscribed. The order alternates with the round. Reported: both rates and
// their ratio.
func runStuck(ctx context.Context, t *target, p params, tag string) (res result) {
	ctx, cancel := context.WithTimeout(ctx, 2*p.timeout)
	defer cancel()
	var cerrs atomic.Int64
	measure := func(stuck bool, name string) (float64, error) {
		if stuck {
			conn, err := stuckConn(ctx, t.addr, name+"-stuck", "bench/side")
			if err != nil {
				return 0, err
			}
			defer conn.Close()
		}
		feeder, err := dialPublisher(ctx, t.addr, name+"-feed", 99, 1, &cerrs)
		if err != nil {
			return 0, err
		}
		defer benchkit.HangUp(feeder.c)
		fctx, fstop := context.WithCancel(ctx)
		fdone := make(chan struct{})
		go func() { // the side feed: stuckPrefill at once, then paced by a ticker
			defer close(fdone)
			tick := time.NewTicker(time.Second / time.Duration(max(p.stuckSideRate, 1)))
			defer tick.Stop()
			feeder.run(fctx, "bench/side", p.size, func(seq int64) bool {
				if seq < stuckPrefill {
					return fctx.Err() == nil
				}
				select {
				case <-tick.C:
					return true
				case <-fctx.Done():
					return false
				}
			})
		}()
		defer func() { fstop(); <-fdone }()
		// Measure once the stuck subscriber's session is full (the broker
		// drops for it; rtm has stalled it).
		for feeder.acked.Load()+feeder.failed.Load() < stuckPrefill && ctx.Err() == nil {
			time.Sleep(10 * time.Millisecond)
		}
		u := newUniq()
		sub, err := subscriber(ctx, t.addr, name+"-sub", "bench/pair", u, &cerrs)
		if err != nil {
			return 0, err
		}
		defer benchkit.HangUp(sub)
		pub, err := dialPublisher(ctx, t.addr, name+"-pub", 1, p.stuckWindow, &cerrs)
		if err != nil {
			return 0, err
		}
		defer benchkit.HangUp(pub.c)
		start := benchkit.Mono()
		pub.run(ctx, "bench/pair", p.size, func(seq int64) bool { return seq < int64(p.stuckMsgs) })
		u.settle(ctx, pub.acked.Load(), p.idle)
		res.expected += int64(p.stuckMsgs)
		res.received += u.n.Load()
		res.dups += u.dups.Load()
		if n := pub.failed.Load(); n > 0 {
			return 0, fmt.Errorf("%d pair publishes failed (first: %v)", n, pub.firstErr.Load())
		}
		return float64(u.n.Load()) / time.Duration(max(u.last.Load()-start, 1)).Seconds(), nil
	}
	var with, without float64
	var err1, err2 error
	if strings.HasPrefix(tag, "r") && roundNumber(tag)%2 == 0 {
		without, err2 = measure(false, tag+"-a")
		with, err1 = measure(true, tag+"-b")
	} else {
		with, err1 = measure(true, tag+"-a")
		without, err2 = measure(false, tag+"-b")
	}
	for _, err := range []error{err1, err2} {
		if err != nil {
			res.fail("%v", err)
		}
	}
	if err1 == nil && err2 == nil && without > 0 {
		res.values = map[string]float64{"with": with, "without": without, "ratio": with / without}
	}
	return res
}

// stuckPrefill is how many messages the stuck subscriber's topic gets at
// once before the pair is measured: more than both brokers' default queue
// (1,000), so the stuck subscriber is over its limit while measured.
const stuckPrefill = 1500

// roundNumber parses the round from a tag "r<N>-...".
func roundNumber(tag string) int {
	s, _, _ := strings.Cut(strings.TrimPrefix(tag, "r"), "-")
	n, _ := strconv.Atoi(s)
	return n
}

// stuckConn connects over raw TCP as MQTT 3.1.1, subscribes to filter at
// QoS 1 and never reads its socket again: a subscriber whose device hung.
func stuckConn(ctx context.Context, addr, id, filter string) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	str := func(s string) []byte { return append([]byte{byte(len(s) >> 8), byte(len(s))}, s...) }
	connect := append([]byte{0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 120}, str(id)...)
	sub := append(append([]byte{0, 1}, str(filter)...), 1)
	msg := append(append([]byte{0x10, byte(len(connect))}, connect...), append([]byte{0x82, byte(len(sub))}, sub...)...)
	if _, err := conn.Write(msg); err != nil {
		conn.Close()
		return nil, err
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	ack := make([]byte, 9) // CONNACK (4) + SUBACK (5)
	if _, err := readFull(conn, ack); err != nil || ack[3] != 0 || ack[8] != 1 {
		conn.Close()
		return nil, fmt.Errorf("stuck subscriber: CONNACK/SUBACK % x: %v", ack, err)
	}
	return conn, nil
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// cpuSeconds returns the user+system CPU time of the target process so far
// (Linux /proc; 0 where unavailable).
func (t *target) cpuSeconds() float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", t.pid()))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces, in parentheses).
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 {
		s = s[i+1:]
	}
	f := strings.Fields(s)
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100 // USER_HZ, 100 on Linux
}

// firstErr is the first error any of pubs recorded.
func firstErr(pubs []*qos1Publisher) any {
	for _, pb := range pubs {
		if e := pb.firstErr.Load(); e != nil {
			return e
		}
	}
	return nil
}
