package broker

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/internal/store"
)

// PushPrefix is the topic prefix of push channels: push/{channel} (SPEC 3).
const PushPrefix = "push/"

// devicesHook keeps the store's view of devices current, so the push API can
// answer from any node: presence (connect, disconnect, which node and
// process), and the push channels a device subscribed to over MQTT. When a
// device connects, on any node, it re-applies the device's recorded push
// subscriptions (those made through the API while it was away, or on
// another node).
//
// Nothing a device does waits for the store. Writes go through a bounded
// queue to one writer goroutine that batches them (a single insert costs
// about a millisecond on the embedded store), and the recorded push
// subscriptions of devices that connected are read and applied by the same
// goroutine, many devices per query.
//
// When the store fails, the writer keeps the batch and retries it with
// backoff until the store answers again, so the records land late but in
// order. If the queue fills meanwhile, further writes are dropped and
// counted, and once the store answers and the writes queued before the drop
// are written, the writer reconciles the store with what the broker holds:
// its connected clients are recorded online, every other record of this
// node online is marked offline, and the push subscriptions of its
// sessions are recorded.
//
// When it starts, the writer first marks offline every device recorded
// online at this node by an earlier process (a crash, kill -9): those
// connections ended with it.
type devicesHook struct {
	mqtt.HookBase
	b           *Broker
	st          *store.Store
	incarnation string
	seq         atomic.Uint64

	conns     sync.Map // *mqtt.Client → connRecord written with its presence
	queue     opQueue
	reapplyMu sync.Mutex
	reapply   map[string]struct{} // client IDs whose recorded push subscriptions are to be applied
	// unsubscribed holds, by client ID, the push channels a connected
	// device unsubscribed from itself, so that re-applying its recorded
	// ones (read asynchronously, maybe before the removal is written) does
	// not subscribe it again.
	unsubscribed map[string]map[string]struct{}
	wake         chan struct{} // a reapply was added

	// ctx ends when the writer is told to stop, so that no store call
	// holds up a shutdown.
	ctx context.Context

	storeUp    atomic.Bool
	storeErr   atomic.Pointer[string] // the last failure, while down
	inBatch    atomic.Int64           // operations taken from the queue, not yet written
	dropped    atomic.Int64           // operations not queued: the queue was full
	failures   atomic.Int64           // store calls of the writer that failed (each retried)
	reconciles atomic.Int64
	reconcile  atomic.Bool // an operation was dropped: reconcile once the store answers
	done       chan struct{}
}

// opQueue is the writer's queue: a slice, not a channel, so that its
// memory follows the backlog (a channel of a node's capacity would keep
// megabytes resident once its ring had gone round).
type opQueue struct {
	mu    sync.Mutex
	ops   []deviceOp
	limit int
	wake  chan struct{} // ops were pushed
}

func newOpQueue(limit int) opQueue {
	return opQueue{limit: limit, wake: make(chan struct{}, 1)}
}

// push queues op, or reports false when the queue is full.
func (q *opQueue) push(op deviceOp) bool {
	q.mu.Lock()
	if len(q.ops) >= q.limit {
		q.mu.Unlock()
		return false
	}
	q.ops = append(q.ops, op)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// take moves queued ops, oldest first, onto batch until it holds n (all
// of them if n < 0).
func (q *opQueue) take(batch []deviceOp, n int) []deviceOp {
	q.mu.Lock()
	defer q.mu.Unlock()
	k := len(q.ops)
	if n >= 0 {
		k = max(0, min(n-len(batch), k))
	}
	batch = append(batch, q.ops[:k]...)
	if k == len(q.ops) {
		q.ops = nil // the backlog's array goes with it
	} else {
		clear(q.ops[:k])
		q.ops = q.ops[k:]
	}
	return batch
}

func (q *opQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.ops)
}

// connRecord is what was recorded for a connection.
type connRecord struct {
	id string
	at time.Time
}

// deviceOp is one queued write: a presence update, or a push subscription
// added or removed.
type deviceOp struct {
	presence *store.PresenceUpdate
	device   string
	channel  string
	add      bool
}

const (
	// deviceQueueLen is the least bound of the queue; a node's bound is
	// twice its capacity when that is more, so that a connect storm up to
	// capacity (a connect and a disconnect per device) is queued, not
	// dropped and then reconciled: a reconciliation reads every record of
	// the node, and its garbage stayed in the RSS of a node that had just
	// taken 19,000 connections.
	deviceQueueLen   = 10000
	deviceBatch      = 500
	deviceWriteWait  = 5 * time.Second // one store call of the writer
	deviceFlushWait  = 5 * time.Second // what is queued at shutdown
	storePing        = 5 * time.Second // how often an idle writer checks the store
	storeDownPing    = time.Second     // bounds the check of a store that was down
	deviceRetryFirst = 100 * time.Millisecond
	deviceRetryMax   = 2 * time.Second
)

func newDevicesHook(b *Broker, st *store.Store) *devicesHook {
	h := &devicesHook{b: b, st: st, incarnation: b.Incarnation(), queue: newOpQueue(max(deviceQueueLen, 2*b.cfg.Capacity)),
		reapply: map[string]struct{}{}, unsubscribed: map[string]map[string]struct{}{}, wake: make(chan struct{}, 1),
		ctx: context.Background(), done: make(chan struct{})}
	h.storeUp.Store(true) // Open pinged it
	return h
}

func (h *devicesHook) ID() string { return "rtm-devices" }

func (h *devicesHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnSubscribed, mqtt.OnUnsubscribed}, []byte{b})
}

// channelOf returns the channel of a push subscription filter, or "" if
// filter is not exactly push/{channel}.
func channelOf(filter string) string {
	ch, ok := strings.CutPrefix(filter, PushPrefix)
	if !ok || ch == "" || strings.ContainsAny(ch, "/+#") {
		return ""
	}
	return ch
}

func (h *devicesHook) enqueue(op deviceOp) {
	if !h.queue.push(op) {
		h.reconcile.Store(true)
		if h.dropped.Add(1)%1000 == 1 {
			h.b.log.Warn("device record not queued: queue full (store slow or down); the store is reconciled with the broker's clients once it answers",
				"dropped_total", h.dropped.Load())
		}
	}
}

// OnSessionEstablished records the device online here, and has its
// recorded push channels applied. The CONNACK is sent already, and the
// device's packets are read without waiting for either.
func (h *devicesHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	rec := connRecord{id: fmt.Sprintf("%s/%s/%d", h.b.cfg.NodeName, h.incarnation, h.seq.Add(1)), at: time.Now()}
	h.conns.Store(cl, rec)
	h.enqueue(deviceOp{presence: h.online(cl.ID, rec)})
	h.reapplyMu.Lock()
	h.reapply[cl.ID] = struct{}{}
	delete(h.unsubscribed, cl.ID)
	h.reapplyMu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

func (h *devicesHook) online(clientID string, rec connRecord) *store.PresenceUpdate {
	return &store.PresenceUpdate{ClientID: clientID, Online: true, Node: h.b.cfg.NodeName, Incarnation: h.incarnation, Conn: rec.id, At: rec.at}
}

func (h *devicesHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	v, ok := h.conns.LoadAndDelete(cl)
	if !ok {
		return
	}
	// A takeover's old connection may end after the new one unsubscribed
	// from channels: those marks are the new connection's to keep.
	if cur, ok := h.b.mq.Clients.Get(cl.ID); !ok || cur == cl {
		h.reapplyMu.Lock()
		delete(h.unsubscribed, cl.ID)
		h.reapplyMu.Unlock()
	}
	h.enqueue(deviceOp{presence: &store.PresenceUpdate{ClientID: cl.ID, Node: h.b.cfg.NodeName, Conn: v.(connRecord).id, At: time.Now()}})
}

// OnSubscribed records push channels a device subscribed to itself.
func (h *devicesHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if cl.Net.Inline {
		return
	}
	for i, f := range pk.Filters {
		if ch := channelOf(f.Filter); ch != "" && i < len(codes) && codes[i] < 0x80 {
			h.setUnsubscribed(cl.ID, ch, false)
			h.enqueue(deviceOp{device: cl.ID, channel: ch, add: true})
		}
	}
}

// OnUnsubscribed forgets push channels a device unsubscribed from itself.
// mochi also calls it when a session ends (with no packet ID): a push
// subscription outlives the session, and is re-applied at the next one.
func (h *devicesHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline || pk.PacketID == 0 {
		return
	}
	for _, f := range pk.Filters {
		if ch := channelOf(f.Filter); ch != "" {
			h.setUnsubscribed(cl.ID, ch, true)
			h.enqueue(deviceOp{device: cl.ID, channel: ch})
		}
	}
}

// setUnsubscribed notes (or forgets) that the device left channel itself.
func (h *devicesHook) setUnsubscribed(clientID, ch string, left bool) {
	h.reapplyMu.Lock()
	defer h.reapplyMu.Unlock()
	m := h.unsubscribed[clientID]
	if left {
		if m == nil {
			m = map[string]struct{}{}
			h.unsubscribed[clientID] = m
		}
		m[ch] = struct{}{}
	} else if m != nil {
		delete(m, ch)
	}
}

// run is the writer: it sweeps the previous incarnation's records, then
// writes the queue and applies recorded push subscriptions until stop is
// closed, then writes what is left (bounded by deviceFlushWait).
func (h *devicesHook) run(stop <-chan struct{}) {
	defer close(h.done)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	h.ctx = ctx // before any store call; only this goroutine reads it
	var (
		batch     []deviceOp
		swept     bool
		before    = -1 // operations to write before reconciling; -1: none due
		retry     = deviceRetryFirst
		idle      = time.NewTimer(storePing)
		lastCheck = time.Now()
	)
	defer idle.Stop()
	for {
		if before < 0 && h.reconcile.Swap(false) {
			// Reconcile after the operations queued before the drop,
			// which are older than the clients' state it writes.
			before = len(batch) + h.queue.len()
		}
		if len(batch) == 0 && swept && before != 0 && !h.reapplyDue() && h.queue.len() == 0 {
			idle.Reset(storePing)
			select {
			case <-h.queue.wake:
			case <-h.wake:
			case <-idle.C:
				if time.Since(lastCheck) >= storePing {
					h.check(storePing)
					lastCheck = time.Now()
				}
				continue
			case <-stop:
				h.flush(batch)
				return
			}
		}
		batch = h.queue.take(batch, deviceBatch)
		h.inBatch.Store(int64(len(batch)))

		err := h.step(&swept, &batch, &before)
		lastCheck = time.Now()
		if err == nil {
			h.up()
			retry = deviceRetryFirst
			continue
		}
		if ctx.Err() != nil { // stopping: not the store's fault
			h.flush(batch)
			return
		}
		h.down(err)
		select {
		case <-time.After(retry):
		case <-stop:
			h.flush(batch)
			return
		}
		retry = min(2*retry, deviceRetryMax)
		// Do not wait for a whole write timeout per attempt while the
		// store is gone.
		for !h.check(storeDownPing) {
			select {
			case <-time.After(retry):
			case <-stop:
				h.flush(batch)
				return
			}
			retry = min(2*retry, deviceRetryMax)
		}
	}
}

// step does the writer's next piece of work: the sweep, then the batch,
// then a due reconciliation, then re-applying push subscriptions. On error
// the work is kept, to be done again.
func (h *devicesHook) step(swept *bool, batch *[]deviceOp, before *int) error {
	if !*swept {
		ctx, cancel := context.WithTimeout(h.ctx, deviceWriteWait)
		n, err := h.st.SweepPresence(ctx, h.b.cfg.NodeName, h.incarnation)
		cancel()
		if err != nil {
			return err
		}
		*swept = true
		if n > 0 {
			h.b.log.Info("devices of the previous process of this node recorded offline", "count", n)
		}
	}
	if len(*batch) > 0 {
		if err := h.write(h.ctx, *batch); err != nil {
			return err
		}
		if *before > 0 {
			*before = max(0, *before-len(*batch))
		}
		*batch = (*batch)[:0]
		h.inBatch.Store(0)
	}
	if *before == 0 {
		if err := h.reconcileNow(); err != nil {
			return err
		}
		*before = -1
	}
	return h.reapplyBatch()
}

// write writes one batch in order: consecutive presence updates in one
// bulk write, push subscriptions one by one. Every write is idempotent, so
// a batch that failed half way is written again whole.
func (h *devicesHook) write(ctx context.Context, batch []deviceOp) error {
	ctx, cancel := context.WithTimeout(ctx, deviceWriteWait)
	defer cancel()
	var presence []store.PresenceUpdate
	for _, op := range batch {
		if op.presence != nil {
			presence = append(presence, *op.presence)
			continue
		}
		// Presence first, in order, so a connect and its subscriptions
		// land in the order they happened.
		if err := h.st.WritePresence(ctx, presence); err != nil {
			return err
		}
		presence = presence[:0]
		var err error
		if op.add {
			_, err = h.st.AddPushSubscription(ctx, op.device, op.channel, store.ViaMQTT)
		} else {
			_, err = h.st.RemovePushSubscription(ctx, op.device, op.channel)
		}
		if err != nil {
			return err
		}
	}
	return h.st.WritePresence(ctx, presence)
}

// reconcileNow makes the store agree with the broker after writes were
// dropped: each connected client online with its connection, no other
// record of this node online, and the push subscriptions of every session
// recorded (a push channel a device left while its removal was dropped
// stays recorded, and is applied at its next connect).
func (h *devicesHook) reconcileNow() error {
	// Each call gets deviceWriteWait: a large node writes many batches.
	call := func(f func(ctx context.Context) error) error {
		ctx, cancel := context.WithTimeout(h.ctx, deviceWriteWait)
		defer cancel()
		return f(ctx)
	}
	live := map[string]string{} // client ID → connection ID
	var ups []store.PresenceUpdate
	h.conns.Range(func(k, v any) bool {
		cl, rec := k.(*mqtt.Client), v.(connRecord)
		live[cl.ID] = rec.id
		ups = append(ups, *h.online(cl.ID, rec))
		return true
	})
	var recorded []store.Presence
	err := call(func(ctx context.Context) (err error) {
		recorded, err = h.st.OnlineAt(ctx, h.b.cfg.NodeName)
		return err
	})
	if err != nil {
		return err
	}
	now := time.Now()
	for _, p := range recorded {
		if live[p.ClientID] != p.Conn {
			ups = append(ups, store.PresenceUpdate{ClientID: p.ClientID, Node: h.b.cfg.NodeName, Conn: p.Conn, At: now})
		}
	}
	for len(ups) > 0 {
		n := min(len(ups), deviceBatch)
		if err := call(func(ctx context.Context) error { return h.st.WritePresence(ctx, ups[:n]) }); err != nil {
			return err
		}
		ups = ups[n:]
	}
	var subs []store.PushSubscription
	for _, cl := range h.b.mq.Clients.GetAll() {
		if cl.Net.Inline {
			continue
		}
		for filter := range cl.State.Subscriptions.GetAll() {
			if ch := channelOf(filter); ch != "" {
				subs = append(subs, store.PushSubscription{Device: cl.ID, Channel: ch, Via: store.ViaMQTT})
			}
		}
	}
	for len(subs) > 0 {
		n := min(len(subs), deviceBatch)
		if err := call(func(ctx context.Context) error { return h.st.AddPushSubscriptions(ctx, subs[:n]) }); err != nil {
			return err
		}
		subs = subs[n:]
	}
	h.reconciles.Add(1)
	h.b.log.Info("device records reconciled with the broker's clients after writes were dropped", "connected", len(live), "recorded_online", len(recorded))
	return nil
}

func (h *devicesHook) reapplyDue() bool {
	h.reapplyMu.Lock()
	defer h.reapplyMu.Unlock()
	return len(h.reapply) > 0
}

// reapplyBatch applies the recorded push subscriptions of up to
// deviceBatch devices that connected, read in one query, to their
// sessions. On error they stay due.
func (h *devicesHook) reapplyBatch() error {
	h.reapplyMu.Lock()
	ids := make([]string, 0, min(len(h.reapply), deviceBatch))
	for id := range h.reapply {
		if len(ids) == deviceBatch {
			break
		}
		ids = append(ids, id)
	}
	h.reapplyMu.Unlock()
	if len(ids) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(h.ctx, deviceWriteWait)
	defer cancel()
	subs, err := h.st.DevicesChannels(ctx, ids)
	if err != nil {
		return err
	}
	h.reapplyMu.Lock()
	for _, id := range ids {
		delete(h.reapply, id)
	}
	h.reapplyMu.Unlock()
	left := func(id, ch string) bool {
		h.reapplyMu.Lock()
		defer h.reapplyMu.Unlock()
		_, ok := h.unsubscribed[id][ch]
		return ok
	}
	for id, list := range subs {
		// The session now, which may have been taken over since.
		cl, ok := h.b.mq.Clients.Get(id)
		if !ok || cl.Net.Inline {
			continue
		}
		for _, s := range list {
			if left(id, s.Channel) {
				continue
			}
			filter := PushPrefix + s.Channel
			if _, ok := cl.State.Subscriptions.Get(filter); ok {
				continue
			}
			h.b.mq.SubscribeClient(cl, packets.Subscription{Filter: filter, Qos: 1})
			// An UNSUBSCRIBE that came meanwhile wins (no lock is held
			// across SubscribeClient, which may write to the client).
			if left(id, s.Channel) {
				h.b.mq.UnsubscribeClientFilter(cl, filter)
			}
		}
	}
	return nil
}

// check pings the store within d and records whether it answered.
func (h *devicesHook) check(d time.Duration) bool {
	ctx, cancel := context.WithTimeout(h.ctx, d)
	defer cancel()
	if err := h.st.Ping(ctx); err != nil {
		h.down(err)
		return false
	}
	h.up()
	return true
}

func (h *devicesHook) up() {
	if !h.storeUp.Swap(true) {
		h.b.log.Info("store answers again; writing the device records held meanwhile", "pending", h.pending())
	}
	h.storeErr.Store(nil)
}

func (h *devicesHook) down(err error) {
	h.failures.Add(1)
	msg := err.Error()
	h.storeErr.Store(&msg)
	if h.storeUp.Swap(false) {
		h.b.log.Warn("store unavailable: device records are held and written when it answers; MQTT is not affected",
			"pending", h.pending(), "error", err)
	}
}

// pending counts device records waiting to be written.
func (h *devicesHook) pending() int64 { return int64(h.queue.len()) + h.inBatch.Load() }

// flush writes what is queued at shutdown, within deviceFlushWait; what is
// left then is lost (the next process's sweep marks its devices offline).
func (h *devicesHook) flush(batch []deviceOp) {
	batch = h.queue.take(batch, -1)
	if len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), deviceFlushWait)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- h.write(ctx, batch) }()
	select {
	case err := <-done:
		if err != nil {
			h.b.log.Warn("device records not written at shutdown", "count", len(batch), "error", err)
		}
	case <-ctx.Done():
		h.b.log.Warn("device records not written at shutdown: store too slow", "count", len(batch))
	}
}

// StoreStats is the store's state as the broker sees it, in /v1/stats and
// /readyz.
type StoreStats struct {
	// Up is false from a failed store call until one succeeds again.
	Up bool `json:"up"`
	// Error is the last failure while the store is down.
	Error string `json:"error,omitempty"`
	// Pending counts device records (presence, push subscriptions) waiting
	// to be written; Dropped those not kept because broker's queue was
	// full, repaired by a reconciliation once the store answers.
	Pending    int64 `json:"pending_writes"`
	Dropped    int64 `json:"dropped_writes"`
	Failures   int64 `json:"failed_calls"`
	Reconciles int64 `json:"reconciles"`
}

func (h *devicesHook) stats() *StoreStats {
	s := &StoreStats{Up: h.storeUp.Load(), Pending: h.pending(), Dropped: h.dropped.Load(),
		Failures: h.failures.Load(), Reconciles: h.reconciles.Load()}
	if e := h.storeErr.Load(); e != nil && !s.Up {
		s.Error = *e
	}
	return s
}

var (
	descStoreUp       = prometheus.NewDesc("rtm_broker_store_up", "1 while the store answers the broker's device records (presence, push subscriptions); MQTT does not depend on it.", nil, nil)
	descStorePending  = prometheus.NewDesc("rtm_broker_store_pending_writes", "Device records waiting to be written to the store.", nil, nil)
	descStoreDropped  = prometheus.NewDesc("rtm_broker_store_dropped_writes_total", "Device records not queued because the queue was full; a reconciliation with the broker's clients repairs them once the store answers.", nil, nil)
	descStoreFailures = prometheus.NewDesc("rtm_broker_store_failed_calls_total", "Store calls of the device record writer that failed (each retried).", nil, nil)
	descReconciles    = prometheus.NewDesc("rtm_broker_store_reconciles_total", "Reconciliations of the store's device records with the broker's clients after dropped writes.", nil, nil)
)

// storeCollector exports the writer's state.
type storeCollector struct{ h *devicesHook }

func (c storeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descStoreUp, descStorePending, descStoreDropped, descStoreFailures, descReconciles} {
		ch <- d
	}
}

func (c storeCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.h.stats()
	up := 0.0
	if s.Up {
		up = 1
	}
	ch <- prometheus.MustNewConstMetric(descStoreUp, prometheus.GaugeValue, up)
	ch <- prometheus.MustNewConstMetric(descStorePending, prometheus.GaugeValue, float64(s.Pending))
	ch <- prometheus.MustNewConstMetric(descStoreDropped, prometheus.CounterValue, float64(s.Dropped))
	ch <- prometheus.MustNewConstMetric(descStoreFailures, prometheus.CounterValue, float64(s.Failures))
	ch <- prometheus.MustNewConstMetric(descReconciles, prometheus.CounterValue, float64(s.Reconciles))
}

var (
	_ mqtt.Hook            = (*devicesHook)(nil)
	_ prometheus.Collector = storeCollector{}
)
