package broker

import (
	"bytes"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// limitsHook enforces the node's capacity and keepalive bounds at CONNECT,
// and makes every dropped message visible: counted by QoS, and logged with
// the client ID once per dropLogInterval per client, so an overload cannot
// flood the log but no drop goes unsaid.
type limitsHook struct {
	mqtt.HookBase
	b *Broker

	dropsQoS [3]atomic.Int64 // messages dropped because a client's queue was full, by QoS

	mu    sync.Mutex
	drops map[string]*dropCount // client ID → drops not yet logged
}

type dropCount struct {
	n     int64
	first time.Time
}

const dropLogInterval = time.Second

func (h *limitsHook) ID() string { return "rtm-limits" }

func (h *limitsHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnPublishDropped, mqtt.OnClientExpired, mqtt.OnPacketEncode}, []byte{b})
}

// OnPacketEncode advertises broker.max_packet_size in v5 CONNACKs (3.2.2.3.6):
// mochi enforces the limit but does not tell clients, which then send a
// larger packet and lose their connection instead of refusing it locally.
func (h *limitsHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack && cl.Properties.ProtocolVersion == 5 && h.b.cfg.MaxPacketSize > 0 {
		pk.Properties.MaximumPacketSize = uint32(h.b.cfg.MaxPacketSize)
	}
	return pk
}

// OnClientExpired releases what an expired session still holds. mochi only
// forgets the client, leaving its subscriptions in the topic index and its
// queued messages counted as in flight; a later client reusing the ID would
// then receive messages for the old subscriptions [MQTT-3.1.2-23].
func (h *limitsHook) OnClientExpired(cl *mqtt.Client) {
	cl.ClearInflights()
	h.b.mq.UnsubscribeClient(cl)
}

func (h *limitsHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	s := h.b.mq
	if atomic.LoadInt64(&s.Info.ClientsConnected) >= int64(h.b.cfg.Capacity) {
		// A reconnect with the ID of a live client takes that client's
		// place, so it does not add to the load.
		if old, ok := s.Clients.Get(cl.ID); !ok || old.Closed() {
			h.b.rejectedFull.Add(1)
			// mochi sends no CONNACK when OnConnect fails: send ours.
			// v3.1.1 clients get code 3 (server unavailable) by mochi's mapping.
			code := packets.ErrQuotaExceeded
			if cl.Properties.ProtocolVersion < 5 {
				code = packets.ErrServerUnavailable
			}
			_ = s.SendConnack(cl, code, false, nil)
			return code
		}
	}
	if cl.Properties.ProtocolVersion == 5 {
		ka := time.Duration(cl.State.Keepalive) * time.Second
		lo, hi := h.b.cfg.KeepaliveMin, h.b.cfg.KeepaliveMax
		switch {
		case hi > 0 && (ka == 0 || ka > hi):
			ka = hi
		case lo > 0 && ka < lo:
			ka = lo
		}
		if want := uint16(ka / time.Second); want != cl.State.Keepalive {
			cl.State.Keepalive = want
			cl.State.ServerKeepalive = true // [MQTT-3.1.2-21]: sent as Server Keep Alive in CONNACK
		}
	}
	return nil
}

func (h *limitsHook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	if q := pk.FixedHeader.Qos; q <= 2 {
		h.dropsQoS[q].Add(1)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.drops == nil {
		h.drops = map[string]*dropCount{}
	}
	d := h.drops[cl.ID]
	if d == nil {
		// The first drop of a client is logged at once; later ones are
		// summed into one line per interval by flushDrops.
		h.drops[cl.ID] = &dropCount{first: time.Now()}
		h.b.log.Warn("message dropped: client queue full", "client_id", cl.ID, "topic", pk.TopicName,
			"qos", pk.FixedHeader.Qos, "max_queued", h.b.cfg.MaxQueued)
		return
	}
	d.n++
}

// flushDrops logs the drops summed since the last call, one line per client,
// and forgets clients with nothing new.
func (h *limitsHook) flushDrops(log *slog.Logger) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, d := range h.drops {
		if d.n == 0 {
			if time.Since(d.first) > dropLogInterval {
				delete(h.drops, id)
			}
			continue
		}
		log.Warn("messages dropped: client queue full", "client_id", id, "count", d.n, "max_queued", h.b.cfg.MaxQueued)
		d.n, d.first = 0, time.Now()
	}
}

var _ mqtt.Hook = (*limitsHook)(nil)
