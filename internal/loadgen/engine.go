package loadgen

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"

	"github.com/rtm-dev/rtm/plugins/token"
)

// Progress is a snapshot of a run, about once a second.
type Progress struct {
	Phase     string // "connect", "run", "drain"
	Elapsed   time.Duration
	Duration  time.Duration
	Connected int64
	Sent      int64
	Delivered int64
	// Expected is the deliveries the sends so far should make.
	Expected int64
}

// Latency percentiles in milliseconds, publish to delivery.
type Latency struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// Usage is CPU time and memory of the broker processes (--broker-pid) or
// of the generator itself.
type Usage struct {
	CPUSeconds float64 `json:"cpu_s"`
	// CPUShare is CPU seconds per wall-clock second of the measured window
	// (1.0 is one core busy).
	CPUShare    float64 `json:"cpu_share"`
	RSSBytes    int64   `json:"rss_bytes,omitempty"`
	RSSBefore   int64   `json:"rss_before_bytes,omitempty"`
	MsgsPerCPUs float64 `json:"msgs_per_cpu_s,omitempty"`
}

// Result is the outcome of one run; its JSON form is `rtm bench --json`.
type Result struct {
	Scenario     string   `json:"scenario"`
	Addrs        []string `json:"addrs"`
	PubAddrs     []string `json:"pub_addrs,omitempty"`
	SubAddrs     []string `json:"sub_addrs,omitempty"`
	MQTTVersion  string   `json:"mqtt_version"`
	QoS          int      `json:"qos"`
	Publishers   int      `json:"publishers"`
	Subscribers  int      `json:"subscribers"`
	PayloadBytes int      `json:"payload_bytes"`
	// TargetRate is the asked rate (messages or connections per second);
	// 0 is unlimited.
	TargetRate float64 `json:"target_rate"`
	// DurationS is how long publishing (or holding connections) lasted;
	// ElapsedS the whole run, drain included.
	DurationS float64 `json:"duration_s"`
	ElapsedS  float64 `json:"elapsed_s"`

	Sent int64 `json:"sent"`
	// Acked is QoS 1/2 publishes acknowledged with success; Refused those
	// acknowledged with a failure reason code (MQTT 5).
	Acked   int64 `json:"acked"`
	Refused int64 `json:"refused"`
	// Expected is the deliveries the sent messages entitle subscribers to
	// (sent × subscribers per message); Delivered counts distinct
	// messages received, Duplicated deliveries of one already received,
	// Lost Expected − Delivered. In the sub scenario, with no known
	// sender, Expected and Lost come from gaps in each sender's sequence.
	Expected      int64    `json:"expected"`
	Delivered     int64    `json:"delivered"`
	Duplicated    int64    `json:"duplicated"`
	Lost          int64    `json:"lost"`
	SentRate      float64  `json:"sent_per_s"`
	DeliveredRate float64  `json:"delivered_per_s"`
	Latency       *Latency `json:"latency_ms,omitempty"`

	// The conn scenario.
	Connections int64    `json:"connections,omitempty"`
	ConnFailed  int64    `json:"conn_failed,omitempty"`
	ConnRate    float64  `json:"conn_per_s,omitempty"`
	ConnLatency *Latency `json:"conn_latency_ms,omitempty"`
	// RSSPerConn is the brokers' RSS growth per connection held, bytes,
	// read --rss-after the last connection was made (RSSAfterS);
	// RSSPerConnFresh the same 1 s after it, while the connections are
	// fresh.
	RSSPerConn      float64 `json:"rss_per_conn_bytes,omitempty"`
	RSSPerConnFresh float64 `json:"rss_per_conn_fresh_bytes,omitempty"`
	RSSAfterS       float64 `json:"rss_after_s,omitempty"`

	Broker    *Usage   `json:"broker,omitempty"`
	Generator Usage    `json:"generator"`
	Errors    []string `json:"errors"`
}

type role struct {
	pub    bool
	index  int
	topic  string // the publisher's topic or the subscriber's filter
	target Target
}

type run struct {
	cfg   Config
	runID uint32
	tls   *tls.Config
	sign  *token.Signer
	idPfx string

	errMu sync.Mutex
	errs  []string
	nerr  map[string]int

	sent, acked, refused atomic.Int64
	connected            atomic.Int64
}

func (r *run) fail(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.errMu.Lock()
	defer r.errMu.Unlock()
	if r.nerr == nil {
		r.nerr = map[string]int{}
	}
	r.nerr[msg]++
	if r.nerr[msg] == 1 && len(r.errs) < 20 {
		r.errs = append(r.errs, msg)
	}
}

func (r *run) errors() []string {
	r.errMu.Lock()
	defer r.errMu.Unlock()
	out := []string{}
	for _, e := range r.errs {
		if n := r.nerr[e]; n > 1 {
			e = fmt.Sprintf("%s (%d times)", e, n)
		}
		out = append(out, e)
	}
	return out
}

// Run runs cfg (validated first) until its duration and drain are over or
// ctx ends. It returns an error when the run could not start: no
// connection, a refused subscription. Failures during the run are in
// Result.Errors.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	var idb [4]byte
	_, _ = rand.Read(idb[:])
	r := &run{cfg: cfg, runID: binary.BigEndian.Uint32(idb[:]), idPfx: "bench-" + hex.EncodeToString(idb[:3])}
	var err error
	if r.tls, err = cfg.tlsConfig(); err != nil {
		return nil, err
	}
	if cfg.TokenKey != "" {
		if r.sign, err = token.NewSigner([]string{cfg.TokenKey}); err != nil {
			return nil, fmt.Errorf("--token-key: %w", err)
		}
	}
	if r.cfg.Topic == "" {
		r.cfg.Topic = "bench/" + hex.EncodeToString(idb[:])
		if cfg.Scenario == ScenarioPub || cfg.Scenario == ScenarioSub {
			r.cfg.Topic = "bench"
		}
	}
	if cfg.Scenario == ScenarioConn {
		return r.conn(ctx)
	}
	return r.messages(ctx)
}

func targets(list []string) []Target {
	out := make([]Target, len(list))
	for i, a := range list {
		out[i], _ = ParseTarget(a) // validated
	}
	return out
}

// roles lays out the scenario's publishers and subscribers.
func (r *run) roles() (pubs, subs []role) {
	c := r.cfg
	pa, sa := c.Addrs, c.Addrs
	if len(c.PubAddrs) > 0 {
		pa = c.PubAddrs
	}
	if len(c.SubAddrs) > 0 {
		sa = c.SubAddrs
	}
	pt, st := targets(pa), targets(sa)
	pub := func(i int, topic string) role { return role{pub: true, index: i, topic: topic, target: pt[i%len(pt)]} }
	sub := func(i int, filter string) role { return role{index: i, topic: filter, target: st[i%len(st)]} }
	t := c.Topic
	switch c.Scenario {
	case ScenarioPub:
		for i := range c.Clients {
			pubs = append(pubs, pub(i, fmt.Sprintf("%s/%d", t, i)))
		}
	case ScenarioSub:
		for i := range c.Clients {
			subs = append(subs, sub(i, t+"/#"))
		}
	case ScenarioFanIn:
		for i := range c.Clients {
			pubs = append(pubs, pub(i, fmt.Sprintf("%s/%d", t, i)))
		}
		subs = append(subs, sub(0, t+"/+"))
	case ScenarioFanOut:
		pubs = append(pubs, pub(0, t+"/all"))
		for i := range c.Clients {
			subs = append(subs, sub(i, t+"/all"))
		}
	case ScenarioPairs:
		for i := range c.Clients {
			pubs = append(pubs, pub(i, fmt.Sprintf("%s/%d", t, i)))
			subs = append(subs, sub(i, fmt.Sprintf("%s/%d", t, i)))
		}
	}
	return pubs, subs
}

// receivers is how many subscribers each publisher's messages reach.
func (r *run) receivers(nsubs int) int64 {
	switch r.cfg.Scenario {
	case ScenarioFanOut:
		return int64(nsubs)
	case ScenarioFanIn, ScenarioPairs:
		return 1
	}
	return 0
}

func (r *run) dialOpts(t Target, id string) dialOpts {
	c := r.cfg
	o := dialOpts{target: t, tls: r.tls, connect: connectOpts{version: c.Version, clientID: id, keepAlive: 60, receiveMax: 65535}}
	if r.sign != nil {
		tok, _, err := r.sign.Issue(id, c.SetupTimeout+c.Duration+c.Drain+10*time.Minute, time.Now())
		if err == nil {
			o.connect.username, o.connect.hasUser = id, true
			o.connect.password, o.connect.hasPass = tok, true
		}
	}
	if c.Username != "" {
		o.connect.username, o.connect.hasUser = c.Username, true
	}
	if c.Password != "" {
		o.connect.password, o.connect.hasPass = c.Password, true
	}
	return o
}

// tracker is one subscriber's view: what it received from whom.
type tracker struct {
	runID     uint32
	foreign   bool // sub scenario: accept every run ID
	delivered atomic.Int64
	last      atomic.Int64 // UnixNano of the latest delivery
	// Written only on the subscriber's reader goroutine; read after it
	// ended.
	seen  map[uint64][]uint64 // (run, publisher) → bitset of sequences
	maxSq map[uint64]uint64
	dups  int64
	other int64 // payloads without our header
	hist  *hdrhistogram.Histogram
}

func newTracker(runID uint32, foreign bool) *tracker {
	return &tracker{runID: runID, foreign: foreign, seen: map[uint64][]uint64{}, maxSq: map[uint64]uint64{},
		hist: hdrhistogram.New(1, 3_600_000_000, 3)} // microseconds, up to an hour
}

func (t *tracker) onPublish(_, payload []byte) {
	now := time.Now().UnixNano()
	if len(payload) < HeaderSize {
		t.other++
		return
	}
	run := binary.BigEndian.Uint32(payload)
	if run != t.runID && !t.foreign {
		t.other++
		return
	}
	key := uint64(run)<<32 | uint64(binary.BigEndian.Uint32(payload[4:]))
	seq := binary.BigEndian.Uint64(payload[8:])
	sentAt := int64(binary.BigEndian.Uint64(payload[16:]))
	if seq > 1<<34 {
		t.other++
		return
	}
	set := t.seen[key]
	w := int(seq / 64)
	if w >= len(set) {
		set = append(set, make([]uint64, w-len(set)+1+len(set)/2)...)
		t.seen[key] = set
	}
	bit := uint64(1) << (seq % 64)
	if set[w]&bit != 0 {
		t.dups++
		return
	}
	set[w] |= bit
	if seq > t.maxSq[key] {
		t.maxSq[key] = seq
	}
	_ = t.hist.RecordValue(max((now-sentAt)/1000, 1))
	t.last.Store(now)
	t.delivered.Add(1)
}

func (r *run) messages(ctx context.Context) (*Result, error) {
	c := r.cfg
	began := time.Now()
	pubRoles, subRoles := r.roles()
	res := &Result{Scenario: c.Scenario, Addrs: c.Addrs, PubAddrs: c.PubAddrs, SubAddrs: c.SubAddrs, MQTTVersion: versionName(c.Version),
		QoS: int(c.QoS), Publishers: len(pubRoles), Subscribers: len(subRoles), PayloadBytes: c.Size, TargetRate: c.Rate}

	// Setup: subscribers first, so nothing published is missed.
	sctx, cancel := context.WithTimeout(ctx, c.SetupTimeout)
	defer cancel()
	trackers := make([]*tracker, len(subRoles))
	subs := make([]*client, len(subRoles))
	pubs := make([]*client, len(pubRoles))
	defer func() {
		closeAll(subs)
		closeAll(pubs)
	}()
	err := r.forEach(sctx, len(subRoles), func(ctx context.Context, i int) error {
		ro := subRoles[i]
		tr := newTracker(r.runID, c.Scenario == ScenarioSub)
		o := r.dialOpts(ro.target, fmt.Sprintf("%s-s%d", r.idPfx, i))
		o.readBuffer = 64 << 10
		o.onPublish = tr.onPublish
		cl, err := dial(ctx, o, 1)
		if err != nil {
			return err
		}
		subs[i], trackers[i] = cl, tr
		r.connected.Add(1)
		if _, err := cl.subscribe(ctx, ro.topic, c.QoS); err != nil {
			return fmt.Errorf("%s: %w", ro.target, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = r.forEach(sctx, len(pubRoles), func(ctx context.Context, i int) error {
		ro := pubRoles[i]
		o := r.dialOpts(ro.target, fmt.Sprintf("%s-p%d", r.idPfx, i))
		o.readBuffer = 4096
		o.onAck = func(rc byte) {
			if rc >= 0x80 {
				r.refused.Add(1)
			} else {
				r.acked.Add(1)
			}
		}
		cl, err := dial(ctx, o, c.Inflight)
		if err != nil {
			return err
		}
		pubs[i] = cl
		r.connected.Add(1)
		return nil
	})
	if err != nil {
		return nil, err
	}

	if c.Settle > 0 {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(c.Settle):
		}
	}
	delivered := func() int64 {
		var n int64
		for _, t := range trackers {
			n += t.delivered.Load()
		}
		return n
	}
	recv := r.receivers(len(subRoles))
	brokerCPU0, berr := pidsCPU(c.BrokerPIDs)
	rss0, _ := pidsRSS(c.BrokerPIDs)
	genCPU0 := selfCPU()
	start := time.Now()

	// Publish until the duration ends.
	pctx, pcancel := context.WithDeadline(ctx, start.Add(c.Duration))
	defer pcancel()
	var wg sync.WaitGroup
	perPub := c.Rate / float64(max(len(pubs), 1))
	for i, cl := range pubs {
		share := int64(-1) // unbounded
		if c.Count > 0 {
			share = c.Count / int64(len(pubs))
			if i < int(c.Count%int64(len(pubs))) {
				share++
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Publisher i of n starts i/n of its interval late: R msg/s
			// arrive one every 1/R s, not n at once every n/R s (a burst
			// that a broker must queue, which measured its burst
			// throughput as latency).
			phase := float64(i) / float64(len(pubs))
			r.publishLoop(pctx, cl, uint32(i), pubRoles[i].topic, perPub, phase, start, share)
		}()
	}
	pubsDone := make(chan struct{})
	go func() { wg.Wait(); close(pubsDone) }()

	progress := func(phase string) {
		if c.Progress != nil {
			c.Progress(Progress{Phase: phase, Elapsed: time.Since(start), Duration: c.Duration, Connected: r.connected.Load(),
				Sent: r.sent.Load(), Delivered: delivered(), Expected: r.sent.Load() * recv})
		}
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
wait:
	for {
		select {
		case <-pctx.Done():
			break wait
		case <-pubsDone:
			if c.Count > 0 {
				break wait
			}
			pubsDone = nil // publishers that failed: keep the clock to the duration
		case <-tick.C:
			progress("run")
		}
	}
	// A publisher blocked in a write to a broker that stopped reading
	// would hold the run past its bound: its write fails after a grace.
	for _, cl := range pubs {
		_ = cl.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	}
	wg.Wait()
	pubEnd := time.Now()
	for _, cl := range pubs {
		_ = cl.conn.SetWriteDeadline(time.Time{})
	}

	// Drain: wait for acknowledgements and deliveries, up to c.Drain; end
	// early when everything is in, or nothing arrived for a second.
	dctx, dcancel := context.WithTimeout(ctx, c.Drain)
	defer dcancel()
	for _, cl := range pubs {
		if !cl.waitAcks(dctx) {
			break
		}
	}
	lastN, lastChange := delivered(), time.Now()
	for dctx.Err() == nil && c.Scenario != ScenarioSub {
		n := delivered()
		if n >= r.sent.Load()*recv {
			break
		}
		if n != lastN {
			lastN, lastChange = n, time.Now()
		} else if time.Since(lastChange) > time.Second {
			break
		}
		select {
		case <-dctx.Done():
		case <-tick.C:
			progress("drain")
		case <-time.After(10 * time.Millisecond):
		}
	}
	end := time.Now()
	genCPU := selfCPU() - genCPU0
	brokerCPU, berr2 := pidsCPU(c.BrokerPIDs)
	rss, _ := pidsRSS(c.BrokerPIDs)
	for _, cl := range pubs {
		if !cl.alive() {
			r.fail("a publisher lost its connection: %v", cl.closedErr())
		}
	}
	for _, cl := range subs {
		if !cl.alive() {
			r.fail("a subscriber lost its connection: %v", cl.closedErr())
		}
	}
	// The trackers are read once their readers are gone.
	closeAll(subs)
	closeAll(pubs)

	res.Sent, res.Acked, res.Refused = r.sent.Load(), r.acked.Load(), r.refused.Load()
	res.DurationS = pubEnd.Sub(start).Seconds()
	res.ElapsedS = time.Since(began).Seconds()
	res.Expected = res.Sent * recv
	hist := hdrhistogram.New(1, 3_600_000_000, 3)
	var last int64
	for _, t := range trackers {
		res.Delivered += t.delivered.Load()
		res.Duplicated += t.dups
		hist.Merge(t.hist)
		last = max(last, t.last.Load())
		if c.Scenario == ScenarioSub {
			for _, m := range t.maxSq {
				res.Expected += int64(m) + 1
			}
		}
		if t.other > 0 {
			r.fail("%d messages without this run's payload header (another publisher on the topics?)", t.other)
		}
	}
	res.Lost = max(res.Expected-res.Delivered, 0)
	if d := pubEnd.Sub(start).Seconds(); d > 0 {
		res.SentRate = float64(res.Sent) / d
	}
	if last > 0 {
		if d := time.Unix(0, last).Sub(start).Seconds(); d > 0 {
			res.DeliveredRate = float64(res.Delivered) / d
		}
	}
	if hist.TotalCount() > 0 {
		res.Latency = latency(hist)
	}
	window := end.Sub(start).Seconds()
	res.Generator = Usage{CPUSeconds: genCPU.Seconds(), CPUShare: genCPU.Seconds() / window}
	if len(c.BrokerPIDs) > 0 {
		if err := errors.Join(berr, berr2); err != nil {
			r.fail("%v", err)
		} else {
			u := &Usage{CPUSeconds: (brokerCPU - brokerCPU0).Seconds(), RSSBytes: rss, RSSBefore: rss0}
			u.CPUShare = u.CPUSeconds / window
			if u.CPUSeconds > 0 {
				msgs := res.Delivered
				if len(subRoles) == 0 {
					msgs = res.Sent
				}
				u.MsgsPerCPUs = float64(msgs) / u.CPUSeconds
			}
			res.Broker = u
		}
	}
	res.Errors = r.errors()
	return res, nil
}

func latency(h *hdrhistogram.Histogram) *Latency {
	ms := func(us int64) float64 { return float64(us) / 1000 }
	return &Latency{P50: ms(h.ValueAtQuantile(50)), P90: ms(h.ValueAtQuantile(90)), P99: ms(h.ValueAtQuantile(99)),
		P999: ms(h.ValueAtQuantile(99.9)), Max: ms(h.Max()), Mean: h.Mean() / 1000}
}

// publishLoop publishes on topic until ctx ends or count messages are
// sent (count < 0: no limit), at rate msg/s (0: as fast as the window and
// the connection let it), each send phase (0 to 1) of an interval after
// the interval starts.
func (r *run) publishLoop(ctx context.Context, cl *client, index uint32, topic string, rate, phase float64, start time.Time, count int64) {
	c := r.cfg
	payload := make([]byte, c.Size)
	binary.BigEndian.PutUint32(payload, r.runID)
	binary.BigEndian.PutUint32(payload[4:], index)
	var scratch []byte
	var err error
	for seq := uint64(0); ctx.Err() == nil && (count < 0 || int64(seq) < count); seq++ {
		if rate > 0 {
			// Pace by the clock, not by sleeps: a late wake-up sends what
			// is due at once, so the average rate holds.
			due := start.Add(time.Duration((float64(seq) + phase) / rate * float64(time.Second)))
			if dl, ok := ctx.Deadline(); ok && !due.Before(dl) {
				return
			}
			if d := time.Until(due); d > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(d):
				}
			}
		}
		binary.BigEndian.PutUint64(payload[8:], seq)
		binary.BigEndian.PutUint64(payload[16:], uint64(time.Now().UnixNano()))
		scratch, err = cl.publish(ctx, scratch, c.QoS, topic, payload)
		if err != nil {
			if ctx.Err() == nil {
				r.fail("publish: %v", err)
			}
			return
		}
		r.sent.Add(1)
	}
}

// forEach runs f for 0..n-1, ConnectConcurrency at a time, at most Rate
// starts per second in the conn scenario; the first error cancels the
// rest and is returned.
func (r *run) forEach(ctx context.Context, n int, f func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var first error
	var once sync.Once
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(r.cfg.ConnectConcurrency, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n && ctx.Err() == nil; i = int(next.Add(1) - 1) {
				if err := f(ctx, i); err != nil {
					once.Do(func() { first = err; cancel() })
					return
				}
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first
	}
	return ctx.Err()
}

func closeAll(cs []*client) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i, c := range cs {
		if c == nil {
			continue
		}
		cs[i] = nil
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			c.close()
			<-sem
		}()
	}
	wg.Wait()
}

// connPingEvery is how often the conn scenario's idle clients ping
// (keep-alive 60 s).
const connPingEvery = 45 * time.Second

// conn opens Clients connections at Rate per second, holds them until the
// duration ends (pinging within the keep-alive), and reports the connect
// rate, failures and the brokers' RSS per connection.
func (r *run) conn(ctx context.Context) (*Result, error) {
	c := r.cfg
	began := time.Now()
	ts := targets(c.Addrs)
	res := &Result{Scenario: c.Scenario, Addrs: c.Addrs, MQTTVersion: versionName(c.Version), QoS: int(c.QoS), TargetRate: c.Rate}
	rss0, rerr := pidsRSS(c.BrokerPIDs)
	brokerCPU0, _ := pidsCPU(c.BrokerPIDs)
	genCPU0 := selfCPU()
	start := time.Now()
	hctx, hcancel := context.WithDeadline(ctx, start.Add(c.Duration))
	defer hcancel()

	clients := make([]*client, c.Clients)
	defer closeAll(clients)
	hist := hdrhistogram.New(1, 3_600_000_000, 3)
	var histMu sync.Mutex
	var failed atomic.Int64
	var lastConn atomic.Int64
	var next atomic.Int64
	var wg sync.WaitGroup
	conc := c.ConnectConcurrency
	if c.Rate > 0 {
		conc = max(conc, int(c.Rate/10)) // enough workers that slow CONNACKs do not hold the rate down
	}
	for range min(conc, c.Clients) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < c.Clients && hctx.Err() == nil; i = int(next.Add(1) - 1) {
				if c.Rate > 0 {
					due := start.Add(time.Duration(float64(i) / c.Rate * float64(time.Second)))
					if d := time.Until(due); d > 0 {
						select {
						case <-hctx.Done():
							return
						case <-time.After(d):
						}
					}
				}
				t := ts[i%len(ts)]
				o := r.dialOpts(t, fmt.Sprintf("%s-c%d", r.idPfx, i))
				o.readBuffer = 64
				if t.loopback() && (t.Scheme == "tcp" || t.Scheme == "tls") {
					// 254 source addresses: past the ~28k ephemeral ports
					// one source address has towards one port.
					o.local = &net.TCPAddr{IP: net.IPv4(127, 0, byte(i/254%256), byte(1+i%254))}
				}
				dctx, dcancel := context.WithTimeout(hctx, 30*time.Second)
				t0 := time.Now()
				cl, err := dial(dctx, o, 1)
				dcancel()
				if err != nil {
					if hctx.Err() == nil {
						failed.Add(1)
						r.fail("%v", err)
					}
					continue
				}
				d := time.Since(t0)
				histMu.Lock()
				_ = hist.RecordValue(max(d.Microseconds(), 1))
				histMu.Unlock()
				clients[i] = cl
				lastConn.Store(time.Now().UnixNano())
				r.connected.Add(1)
			}
		}()
	}
	connDone := make(chan struct{})
	go func() { wg.Wait(); close(connDone) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	// Ping at three quarters of the keep-alive (60 s), as a device would,
	// counted again from the last connect: a ping wakes every connection
	// in the broker (rtm unparks them), so none falls between the last
	// connect and an RSS reading up to 45 s later.
	ping := time.NewTicker(connPingEvery)
	defer ping.Stop()
	progress := func(phase string) {
		if c.Progress != nil {
			c.Progress(Progress{Phase: phase, Elapsed: time.Since(start), Duration: c.Duration, Connected: r.connected.Load()})
		}
	}
	after := max(c.RSSAfter, time.Second)
	phase := "connect"
	var held int64
	var rss, rssFresh int64
	var fresh, settled <-chan time.Time // RSS readings, once every connection is made
	for hctx.Err() == nil {
		select {
		case <-connDone:
			connDone = nil
			phase = "hold"
			ping.Reset(connPingEvery)
			fresh = time.After(min(time.Second, time.Until(start.Add(c.Duration))/2))
			settled = time.After(after)
			if time.Now().Add(after).After(start.Add(c.Duration)) && c.RSSAfter > 0 {
				r.fail("--duration ends before --rss-after (%v) has passed since the last connection: RSS read at the end instead", c.RSSAfter)
			}
		case <-fresh:
			fresh = nil
			rssFresh, _ = pidsRSS(c.BrokerPIDs)
			if settled != nil {
				rss = rssFresh
				held = r.connected.Load()
			}
		case <-settled:
			settled = nil
			rss, _ = pidsRSS(c.BrokerPIDs)
			held = r.connected.Load()
			res.RSSAfterS = after.Seconds()
		case <-tick.C:
			progress(phase)
		case <-ping.C:
			for _, cl := range clients {
				if cl != nil && cl.alive() {
					_ = cl.ping()
				}
			}
		case <-hctx.Done():
		}
	}
	if connDone != nil {
		<-connDone
		rss, _ = pidsRSS(c.BrokerPIDs)
		rssFresh = rss
		held = r.connected.Load()
		r.fail("--duration ended before every connection was opened (%d of %d)", held, c.Clients)
	} else if settled != nil {
		rss, _ = pidsRSS(c.BrokerPIDs)
		held = r.connected.Load()
		if lc := lastConn.Load(); lc > 0 {
			res.RSSAfterS = time.Since(time.Unix(0, lc)).Seconds()
		}
		if fresh != nil {
			rssFresh = rss
		}
	}
	var dropped int64
	for _, cl := range clients {
		if cl != nil && !cl.alive() {
			dropped++
		}
	}
	if dropped > 0 {
		r.fail("%d connections closed by the server while held", dropped)
	}
	genCPU := selfCPU() - genCPU0
	brokerCPU, _ := pidsCPU(c.BrokerPIDs)
	window := time.Since(start).Seconds()
	res.Connections = r.connected.Load()
	res.ConnFailed = failed.Load()
	res.Subscribers, res.Publishers = 0, 0
	res.DurationS = window
	if l := lastConn.Load(); l > 0 && res.Connections > 0 {
		res.ConnRate = float64(res.Connections) / time.Unix(0, l).Sub(start).Seconds()
	}
	if hist.TotalCount() > 0 {
		res.ConnLatency = latency(hist)
	}
	res.Generator = Usage{CPUSeconds: genCPU.Seconds(), CPUShare: genCPU.Seconds() / window}
	if len(c.BrokerPIDs) > 0 {
		if rerr != nil {
			r.fail("%v", rerr)
		} else {
			u := &Usage{CPUSeconds: (brokerCPU - brokerCPU0).Seconds(), RSSBytes: rss, RSSBefore: rss0}
			u.CPUShare = u.CPUSeconds / window
			res.Broker = u
			if held > 0 {
				res.RSSPerConn = float64(rss-rss0) / float64(held)
				res.RSSPerConnFresh = float64(rssFresh-rss0) / float64(held)
			}
		}
	}
	closeAll(clients)
	res.ElapsedS = time.Since(began).Seconds()
	res.Errors = r.errors()
	if res.Connections == 0 && res.ConnFailed > 0 {
		return res, fmt.Errorf("no connection succeeded: %s", res.Errors[0])
	}
	return res, nil
}
