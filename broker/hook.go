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
// and makes every lost message visible: counted by reason and QoS, and
// logged with the client ID (or the peer) and the reason once per
// dropLogInterval per client or peer, so an overload cannot flood the log
// but no drop goes unsaid. It is the one place drops are counted: the
// cluster reports its link losses here too (linkDropped).
type limitsHook struct {
	mqtt.HookBase
	b *Broker

	drops [numDropReasons][3]atomic.Int64 // messages dropped, by reason and QoS

	mu      sync.Mutex
	pending map[dropKey]*dropCount // client or peer → drops not yet logged
}

// dropKey names who a drop is logged for: a client ("client_id") or a
// peer node ("peer").
type dropKey struct{ attr, id string }

// dropReason is why a message was not delivered (or, for a QoS 1/2
// publish refused at the link, not accepted).
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
	// dropOffline: a message delivered at QoS 0 (published at 0, or
	// downgraded by the subscription) to a client that is not connected;
	// a session keeps QoS 1/2 messages only.
	dropOffline
	// dropExpired: a message held for a client (sent and not acknowledged,
	// or kept while it is offline) whose message expiry interval, or
	// broker.message_expiry_max, passed.
	dropExpired
	// dropSessionExpired: QoS 1/2 messages still held by a session that
	// expired (broker.session_expiry_max, or the client's own interval).
	dropSessionExpired
	// dropLinkQueueFull: a peer's link queue already held
	// cluster.link_queue_bytes. QoS 1/2 publishes are refused (0x97), QoS 0
	// is dropped for that peer.
	dropLinkQueueFull
	// dropLinkOversize: the message does not fit a link frame (a client ID
	// and topic far above the usual sizes on a packet near
	// broker.max_packet_size). QoS 1/2 refused (0x80).
	dropLinkOversize
	// dropNoLink: a peer holds routes for the topic but this node has no
	// link to it (gossip does not show it alive yet, or it is being
	// removed). QoS 1/2 refused (0x80). Also a message that cannot be
	// encoded for a link (not seen in practice).
	dropNoLink
	// dropLinkClosed: queued for a peer, not yet acknowledged, and thrown
	// away: the peer left, stayed failed longer than
	// cluster.failed_peer_hold, or this node shut down.
	dropLinkClosed
	// dropLinkReset: a QoS 0 message written to a link connection that
	// broke before the peer delivered it (QoS 0 is not sent twice).
	dropLinkReset
	// dropPeerRestarted: queued for a peer that came back as a new process
	// (restarted): meant for sessions that are gone, thrown away.
	dropPeerRestarted
	// dropTooLarge: the message, as it would be sent to the client, exceeds
	// the Maximum Packet Size of the client's CONNECT; MQTT 5 says to skip
	// it for that client [MQTT-3.1.2-25] (rtm patch 31 in mochi).
	dropTooLarge
	// dropQueueBytes: the client already held broker.max_queued_bytes of
	// messages (write queue plus session).
	dropQueueBytes
	// dropMemoryBudget: the clients of this node together held
	// broker.max_queued_bytes_total (half of it, for a client that already
	// held messages).
	dropMemoryBudget
	// dropSessionNotMoved: QoS 1/2 messages held by a persistent session
	// of a node that stopped gracefully with no live peer to hand the
	// session to (or whose hand-over failed or ran out of time).
	dropSessionNotMoved
	// dropStaleSession: QoS 1/2 messages held by a session that a healed
	// partition showed stale: its client had connected to another node
	// while this one was cut off, and the newer session is kept.
	dropStaleSession
	// dropRelayFull: a session moving away from this node was sent
	// relayKeepMax messages before the move's end was queued (the move
	// stalled): later ones for it are not relayed to its new node.
	dropRelayFull
	// dropHeldSharedNoMember: a failed node's held copy of a message its
	// share group member was chosen for reached the node that adopted that
	// member after the member left the group (unsubscribed, or its client
	// started a clean session), and the group had no other member this
	// node could give it to, here or on a live peer.
	dropHeldSharedNoMember
	numDropReasons
)

// dropReasonNames are the reason label values, in dropReason order.
var dropReasonNames = [numDropReasons]string{"queue_full", "session_full", "packet_ids",
	"offline", "expired", "session_expired",
	"link_queue_full", "link_oversize", "no_link", "link_closed", "link_reset", "peer_restarted", "too_large",
	"queue_bytes", "memory_budget", "session_not_moved", "stale_session", "move_relay_full",
	"held_shared_no_member"}

// dropReasonText are the reasons as said in the log, in dropReason order.
var dropReasonText = [numDropReasons]string{"client queue full", "client session full", "no free packet identifier",
	"client offline (QoS 0)", "message expired", "session expired",
	"link queue full", "too large for a node link", "no link to a peer with matching routes",
	"link closed with messages queued", "QoS 0 lost when a link connection broke", "peer restarted",
	"larger than the client's maximum packet size", "client queue bytes full", "node queue memory budget full",
	"session not handed over when the node stopped", "stale session ended after a partition",
	"too many messages for a session moving away",
	"a failed node's share group member left the group and no other member was reachable"}

// dropNoQoS0 marks the reasons that apply to QoS 1/2 messages only: their
// QoS 0 series are not exported.
var dropNoQoS0 = [numDropReasons]bool{dropSessionFull: true, dropPacketIDs: true, dropExpired: true, dropSessionExpired: true,
	dropSessionNotMoved: true, dropStaleSession: true}

type dropCount struct {
	n     [numDropReasons]int64
	first time.Time
}

const dropLogInterval = time.Second

func (h *limitsHook) ID() string { return "rtm-limits" }

func (h *limitsHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnPublishDropped, mqtt.OnPacketIDExhausted, mqtt.OnClientExpired,
		mqtt.OnPublishDroppedOffline, mqtt.OnPublishExpired, mqtt.OnPublishDroppedBytes}, []byte{b})
}

// OnClientExpired counts the messages an expired session still held: they
// are lost. mochi (rtm patch 41) then releases the session's messages and
// subscriptions.
func (h *limitsHook) OnClientExpired(cl *mqtt.Client) {
	for _, pk := range cl.State.Inflight.GetAll(false) {
		if pk.FixedHeader.Type == packets.Publish {
			h.dropped(cl, pk, dropSessionExpired)
		}
	}
}

// sessionNotMoved counts the messages of a session a stopping node could
// not hand over: they are lost with the node.
func (h *limitsHook) sessionNotMoved(cl *mqtt.Client) {
	for _, pk := range cl.State.Inflight.GetAll(false) {
		if pk.FixedHeader.Type == packets.Publish {
			h.dropped(cl, pk, dropSessionNotMoved)
		}
	}
}

func (h *limitsHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	h.b.connects.Add(1)
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

// OnPublishDroppedBytes is called by mochi (rtm patches 40, 41) when a
// message is not delivered to cl because of a byte bound.
func (h *limitsHook) OnPublishDroppedBytes(cl *mqtt.Client, pk packets.Packet, reason error) {
	r := dropQueueBytes
	if reason == mqtt.ErrMemoryBudgetExceeded {
		r = dropMemoryBudget
	}
	h.dropped(cl, pk, r)
}

// OnPacketIDExhausted is called by mochi when a QoS 1/2 message is dropped
// for cl because every packet identifier is in use.
func (h *limitsHook) OnPacketIDExhausted(cl *mqtt.Client, pk packets.Packet) {
	h.dropped(cl, pk, dropPacketIDs)
}

// OnPublishDroppedOffline is called by mochi (rtm patch 26) when a message
// for a client that is not connected is delivered at QoS 0.
func (h *limitsHook) OnPublishDroppedOffline(cl *mqtt.Client, pk packets.Packet) {
	h.dropped(cl, pk, dropOffline)
}

// OnPublishExpired is called by mochi (rtm patch 27) when a message held
// for cl expires; pk is the held copy, at the QoS it is delivered with.
func (h *limitsHook) OnPublishExpired(cl *mqtt.Client, pk packets.Packet) {
	h.dropped(cl, pk, dropExpired)
}

// dropped counts a message not delivered to cl, and logs it (see logDrop).
func (h *limitsHook) dropped(cl *mqtt.Client, pk packets.Packet, reason dropReason) {
	h.count(reason, pk.FixedHeader.Qos, 1)
	h.logDrop(dropKey{"client_id", cl.ID}, reason, 1, pk.TopicName, pk.FixedHeader.Qos)
}

// linkDropped counts n messages of QoS qos lost (or, QoS 1/2 at Send,
// refused) on the way to peer, and logs them (see logDrop).
func (h *limitsHook) linkDropped(peer string, reason dropReason, qos byte, n int64, topic string) {
	h.count(reason, qos, n)
	h.logDrop(dropKey{"peer", peer}, reason, n, topic, qos)
}

func (h *limitsHook) count(reason dropReason, qos byte, n int64) {
	if qos <= 2 {
		h.drops[reason][qos].Add(n)
	}
}

// logDrop logs drops: the first of a client or peer at once, later ones
// summed into one line per interval by flushDrops.
func (h *limitsHook) logDrop(k dropKey, reason dropReason, n int64, topic string, qos byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.pending == nil {
		h.pending = map[dropKey]*dropCount{}
	}
	d := h.pending[k]
	if d == nil {
		h.pending[k] = &dropCount{first: time.Now()}
		attrs := []any{k.attr, k.id, "reason", dropReasonNames[reason], "topic", topic, "qos", qos}
		if n > 1 {
			attrs = append(attrs, "count", n)
		}
		switch reason {
		case dropQueueFull, dropSessionFull:
			attrs = append(attrs, "max_queued", h.b.cfg.MaxQueued)
		case dropLinkQueueFull:
			if h.b.cluster != nil {
				attrs = append(attrs, "link_queue_bytes", h.b.cluster.cfg.LinkQueueBytes)
			}
		}
		h.b.log.Warn("message dropped: "+dropReasonText[reason], attrs...)
		return
	}
	d.n[reason] += n
}

// flushDrops logs the drops summed since the last call, one line per client
// naming the reason (several, with a count each, if they differ), and
// forgets clients with nothing new.
func (h *limitsHook) flushDrops(log *slog.Logger) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for k, d := range h.pending {
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
				delete(h.pending, k)
			}
			continue
		}
		if len(reasons) == 1 {
			r := reasons[0]
			log.Warn("messages dropped: "+dropReasonText[r], k.attr, k.id, "reason", dropReasonNames[r],
				"count", total, "max_queued", h.b.cfg.MaxQueued)
		} else {
			attrs := []any{k.attr, k.id}
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
			if q == 0 && dropNoQoS0[r] {
				continue // a session holds QoS 1/2 messages only
			}
			byQoS[strconv.Itoa(q)] = h.drops[r][q].Load()
		}
		m[dropReasonNames[r]] = byQoS
	}
	return m
}

var _ mqtt.Hook = (*limitsHook)(nil)
