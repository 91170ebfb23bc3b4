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

	"github.com/rtm-dev/rtm/internal/store"
)

// PushPrefix is the topic prefix of push channels: push/{channel} (SPEC 3).
const PushPrefix = "push/"

// devicesHook keeps the store's view of devices current, so the push API can
// answer from any node: presence (connect, disconnect, which node), and the
// push channels a device subscribed to over MQTT. When a device connects,
// on any node, it re-applies the device's recorded push subscriptions (those
// made through the API while it was away, or on another node).
//
// Writes leave the client's read path at once: they go through a bounded
// queue to one writer goroutine that batches them (presence in one bulk
// write per batch; a single insert costs about a millisecond on the
// embedded store). A full queue drops the write, counted and logged.
type devicesHook struct {
	mqtt.HookBase
	b   *Broker
	st  *store.Store
	seq atomic.Uint64

	conns   sync.Map // *mqtt.Client → connection ID written with its presence
	queue   chan deviceOp
	dropped atomic.Int64
	failed  atomic.Int64
	done    chan struct{}
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
	deviceQueueLen  = 10000
	deviceBatch     = 500
	deviceWriteWait = 5 * time.Second // per batch, then the batch is dropped and counted
	reapplyTimeout  = 2 * time.Second
)

func newDevicesHook(b *Broker, st *store.Store) *devicesHook {
	return &devicesHook{b: b, st: st, queue: make(chan deviceOp, deviceQueueLen), done: make(chan struct{})}
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
	select {
	case h.queue <- op:
	default:
		if h.dropped.Add(1)%1000 == 1 {
			h.b.log.Warn("device record not written: queue full (store slow or down)", "dropped_total", h.dropped.Load())
		}
	}
}

// OnSessionEstablished records the device online here, then subscribes it
// to its recorded push channels it lacks. The CONNACK is sent already; the
// store is asked for at most reapplyTimeout.
func (h *devicesHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	id := fmt.Sprintf("%s/%x/%d", h.b.cfg.NodeName, h.b.incarnation, h.seq.Add(1))
	h.conns.Store(cl, id)
	h.enqueue(deviceOp{presence: &store.PresenceUpdate{ClientID: cl.ID, Online: true, Node: h.b.cfg.NodeName, Conn: id, At: time.Now()}})

	ctx, cancel := context.WithTimeout(context.Background(), reapplyTimeout)
	defer cancel()
	subs, err := h.st.DeviceChannels(ctx, cl.ID)
	if err != nil {
		h.b.log.Warn("push subscriptions not re-applied: store unavailable", "client_id", cl.ID, "error", err)
		return
	}
	for _, s := range subs {
		filter := PushPrefix + s.Channel
		if _, ok := cl.State.Subscriptions.Get(filter); ok {
			continue
		}
		h.b.mq.SubscribeClient(cl, packets.Subscription{Filter: filter, Qos: 1})
	}
}

func (h *devicesHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	v, ok := h.conns.LoadAndDelete(cl)
	if !ok {
		return
	}
	h.enqueue(deviceOp{presence: &store.PresenceUpdate{ClientID: cl.ID, Node: h.b.cfg.NodeName, Conn: v.(string), At: time.Now()}})
}

// OnSubscribed records push channels a device subscribed to itself.
func (h *devicesHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if cl.Net.Inline {
		return
	}
	for i, f := range pk.Filters {
		if ch := channelOf(f.Filter); ch != "" && i < len(codes) && codes[i] < 0x80 {
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
			h.enqueue(deviceOp{device: cl.ID, channel: ch})
		}
	}
}

// run writes the queue until stop is closed, then what is left (bounded).
func (h *devicesHook) run(stop <-chan struct{}) {
	defer close(h.done)
	for {
		var first deviceOp
		select {
		case first = <-h.queue:
		case <-stop:
			h.flush()
			return
		}
		batch := []deviceOp{first}
	fill:
		for len(batch) < deviceBatch {
			select {
			case op := <-h.queue:
				batch = append(batch, op)
			default:
				break fill
			}
		}
		h.write(batch)
	}
}

// flush writes what is queued at shutdown, within deviceWriteWait.
func (h *devicesHook) flush() {
	var batch []deviceOp
	for {
		select {
		case op := <-h.queue:
			batch = append(batch, op)
			continue
		default:
		}
		break
	}
	h.write(batch)
}

func (h *devicesHook) write(batch []deviceOp) {
	if len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), deviceWriteWait)
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
			h.fail(len(presence), err)
		}
		presence = presence[:0]
		var err error
		if op.add {
			_, err = h.st.AddPushSubscription(ctx, op.device, op.channel, store.ViaMQTT)
		} else {
			_, err = h.st.RemovePushSubscription(ctx, op.device, op.channel)
		}
		if err != nil {
			h.fail(1, err)
		}
	}
	if err := h.st.WritePresence(ctx, presence); err != nil {
		h.fail(len(presence), err)
	}
}

func (h *devicesHook) fail(n int, err error) {
	if h.failed.Add(int64(n)) == int64(n) || h.failed.Load()%1000 < int64(n) {
		h.b.log.Warn("device records not written", "count", n, "failed_total", h.failed.Load(), "error", err)
	}
}

var _ mqtt.Hook = (*devicesHook)(nil)
