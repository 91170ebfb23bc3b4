package broker

import (
	"bytes"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// limitsHook enforces the node's capacity and keepalive bounds at CONNECT,
// and makes every dropped message visible: counted by reason and QoS, and
// logged with the client ID and the reason once per dropLogInterval per
// client, so an overload cannot flood the log but no drop goes unsaid.
type limitsHook struct {
	mqtt.HookBase
	b *Broker

	drops [numDropReasons][3]atomic.Int64 // messages dropped, by reason and QoS

	mu      sync.Mutex
	pending map[string]*dropCount // client ID → drops not yet logged
}

// dropReason is why a message was not delivered to a client.
type dropReason int

const (
	// dropQueueFull: the client's write queue already held broker.max_queued
	// packets (its socket does not drain).
	dropQueueFull dropReason = iota
	// dropSessionFull: the client's session already held broker.max_queued
	// QoS 1/2 messages not acknowledged yet (sent, or kept while offline).
	dropSessionFull
	// dropPacketIDs: no free packet identifier for a QoS 1/2 message (all
	// 65,535 in use; not reachable while broker.max_queued < 65,535).
	dropPacketIDs
	// dropTooLarge: the message, as it would be sent to the client, exceeds
	// the Maximum Packet Size of the client's CONNECT; MQTT 5 says to skip
	// it for that client [MQTT-3.1.2-25] (rtm patch 31 in mochi).
	dropTooLarge
	numDropReasons
)

// dropReasonNames are the reason label values, in dropReason order.
var dropReasonNames = [numDropReasons]string{"queue_full", "session_full", "packet_ids", "too_large"}

// dropReasonText are the reasons as said in the log, in dropReason order.
var dropReasonText = [numDropReasons]string{"client queue full", "client session full", "no free packet identifier",
	"larger than the client's maximum packet size"}

type dropCount struct {
	n     [numDropReasons]int64
	first time.Time
}

const dropLogInterval = time.Second

func (h *limitsHook) ID() string { return "rtm-limits" }

func (h *limitsHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnPublishDropped, mqtt.OnPacketIDExhausted, mqtt.OnClientExpired}, []byte{b})
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
			// In a cluster, an MQTT 5 client is sent to the broker the
			// router would pick (0x9C with a Server Reference).
			code, props := packets.ErrQuotaExceeded, (*packets.Properties)(nil)
			if cl.Properties.ProtocolVersion < 5 {
				code = packets.ErrServerUnavailable
			} else if ref := h.b.reference(cl.Net.Listener); ref != "" {
				code, props = packets.ErrUseAnotherServer, &packets.Properties{ServerReference: ref}
			}
			_ = s.SendConnack(cl, code, false, props)
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

// OnPublishDropped is called by mochi when a message is not delivered to cl
// because its write queue is full or (rtm patch) its session is full: mochi
// checks the session first, and calls the hook for a full queue after
// removing the dropped message from the session, so a session holding
// broker.max_queued QoS 1/2 messages now means the session was the limit.
// (A concurrent acknowledgement or publish to the same client can tip a drop
// to the other reason; every drop is still counted exactly once.)
//
// mochi also calls it for a message it did not write because it exceeds the
// client's Maximum Packet Size (rtm patch 31), and only then with
// pk.Mods.MaxSize set: WritePacket sets it on its copy of the packet.
func (h *limitsHook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	reason := dropQueueFull
	if pk.Mods.MaxSize > 0 {
		reason = dropTooLarge
	} else if pk.FixedHeader.Qos > 0 && cl.State.Inflight.Len() >= int(h.b.mq.Options.Capabilities.MaximumInflight) {
		reason = dropSessionFull
	}
	h.dropped(cl, pk, reason)
}

// OnPacketIDExhausted is called by mochi when a QoS 1/2 message is dropped
// for cl because every packet identifier is in use.
func (h *limitsHook) OnPacketIDExhausted(cl *mqtt.Client, pk packets.Packet) {
	h.dropped(cl, pk, dropPacketIDs)
}

// dropped counts a message not delivered to cl, and logs it: the first drop
// of a client at once, later ones summed into one line per interval by
// flushDrops.
func (h *limitsHook) dropped(cl *mqtt.Client, pk packets.Packet, reason dropReason) {
	if q := pk.FixedHeader.Qos; q <= 2 {
		h.drops[reason][q].Add(1)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.pending == nil {
		h.pending = map[string]*dropCount{}
	}
	d := h.pending[cl.ID]
	if d == nil {
		h.pending[cl.ID] = &dropCount{first: time.Now()}
		h.b.log.Warn("message dropped: "+dropReasonText[reason], "client_id", cl.ID, "reason", dropReasonNames[reason],
			"topic", pk.TopicName, "qos", pk.FixedHeader.Qos, "max_queued", h.b.cfg.MaxQueued)
		return
	}
	d.n[reason]++
}

// flushDrops logs the drops summed since the last call, one line per client
// naming the reason (several, with a count each, if they differ), and
// forgets clients with nothing new.
func (h *limitsHook) flushDrops(log *slog.Logger) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, d := range h.pending {
		var total int64
		var reasons []dropReason
		for r, n := range d.n {
			if n > 0 {
				total += n
				reasons = append(reasons, dropReason(r))
			}
		}
		if total == 0 {
			if time.Since(d.first) > dropLogInterval {
				delete(h.pending, id)
			}
			continue
		}
		if len(reasons) == 1 {
			r := reasons[0]
			log.Warn("messages dropped: "+dropReasonText[r], "client_id", id, "reason", dropReasonNames[r],
				"count", total, "max_queued", h.b.cfg.MaxQueued)
		} else {
			attrs := []any{"client_id", id}
			names := make([]string, len(reasons))
			for i, r := range reasons {
				names[i] = dropReasonNames[r]
				attrs = append(attrs, dropReasonNames[r], d.n[r]) // e.g. queue_full=3 session_full=5
			}
			attrs = append(attrs, "reason", strings.Join(names, ","), "count", total, "max_queued", h.b.cfg.MaxQueued)
			log.Warn("messages dropped", attrs...)
		}
		d.n, d.first = [numDropReasons]int64{}, time.Now()
	}
}

// dropCounts returns the drops counted so far, by reason name then QoS.
func (h *limitsHook) dropCounts() map[string]map[string]int64 {
	m := make(map[string]map[string]int64, numDropReasons)
	for r := range h.drops {
		byQoS := map[string]int64{}
		for q := range h.drops[r] {
			if q == 0 && dropReason(r) != dropQueueFull && dropReason(r) != dropTooLarge {
				continue // a session holds QoS 1/2 messages only
			}
			byQoS[strconv.Itoa(q)] = h.drops[r][q].Load()
		}
		m[dropReasonNames[r]] = byQoS
	}
	return m
}

var _ mqtt.Hook = (*limitsHook)(nil)
