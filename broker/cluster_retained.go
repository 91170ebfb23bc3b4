package broker

import (
	"maps"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker/link"
)

// retainedSync keeps the retained messages of every node the same: each
// update is stamped (time at the node that set it, node name), sent to
// every peer, and applied only if newer than the one held (last writer
// wins, ties broken by node name), so nodes converge whatever the order
// the updates arrive in. A link's opening snapshot carries every retained
// message and every clear still remembered.
//
// Its mutex is a leaf: nothing else is locked while it is held.
type retainedSync struct {
	node     string // this node's name
	retained func() map[string]packets.Packet
	setLocal func(packets.Packet) // mochi's RetainFromPeer

	mu        sync.Mutex
	meta      map[string]retainStamp // topic → who set its retained message last, and when
	lastStamp int64
}

type retainStamp struct {
	at   int64 // unix nanoseconds at the node that set it
	node string
}

// newer reports whether (at, node) was set after s: last writer wins, ties
// broken by node name so every node picks the same one.
func (s retainStamp) newer(at int64, node string) bool {
	return at > s.at || (at == s.at && node > s.node)
}

func newRetainedSync(node string, retained func() map[string]packets.Packet, setLocal func(packets.Packet)) *retainedSync {
	return &retainedSync{node: node, retained: retained, setLocal: setLocal, meta: map[string]retainStamp{}}
}

// stamp records a retained message (or clear) set by a local client and
// returns the message to send to every peer.
func (r *retainedSync) stamp(pk packets.Packet) retainedMsg {
	r.mu.Lock()
	at := time.Now().UnixNano()
	if at <= r.lastStamp {
		at = r.lastStamp + 1
	}
	r.lastStamp = at
	r.meta[pk.TopicName] = retainStamp{at: at, node: r.node}
	r.mu.Unlock()
	return retainedMsg{Stamp: at, Node: r.node, Expiry: expiryLeft(pk.Expiry), Packet: pk}
}

// apply sets a peer's retained update here if it is newer than the one held.
func (r *retainedSync) apply(m retainedMsg) {
	if strings.HasPrefix(m.Packet.TopicName, "$SYS") || !mqtt.IsValidFilter(m.Packet.TopicName, true) {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.meta[m.Packet.TopicName].newer(m.Stamp, m.Node) {
		return
	}
	r.meta[m.Packet.TopicName] = retainStamp{at: m.Stamp, node: m.Node}
	pk := m.Packet
	pk.FixedHeader.Retain = true
	pk.Created = time.Now().Unix()
	if m.Expiry > 0 {
		pk.Expiry = pk.Created + int64(m.Expiry)
	}
	r.setLocal(pk)
}

// snapshot returns every retained message held, and every clear still
// remembered, as link messages.
func (r *retainedSync) snapshot() []link.Message {
	r.mu.Lock()
	meta := maps.Clone(r.meta)
	r.mu.Unlock()
	held := r.retained()
	var out []link.Message
	for topic, pk := range held {
		if strings.HasPrefix(topic, "$SYS") {
			continue
		}
		st := meta[topic]
		m := retainedMsg{Stamp: st.at, Node: st.node, Expiry: expiryLeft(pk.Expiry), Packet: pk}
		if m.Node == "" {
			m.Node = r.node
		}
		if body, err := m.encode(); err == nil {
			out = append(out, link.Message{Type: msgRetained, Body: body})
		}
	}
	for topic, st := range meta {
		if _, ok := held[topic]; ok {
			continue
		}
		clear := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: topic}
		if body, err := (retainedMsg{Stamp: st.at, Node: st.node, Packet: clear}).encode(); err == nil {
			out = append(out, link.Message{Type: msgRetained, Body: body})
		}
	}
	return out
}

// expiryLeft converts mochi's absolute expiry (unix seconds) to the
// seconds left, at least 1 so a message about to expire still does.
func expiryLeft(at int64) uint32 {
	if at <= 0 {
		return 0
	}
	return uint32(max(at-time.Now().Unix(), 1))
}

// seed records who set a topic's retained message and when, for one
// restored from the store at start (durable_cluster.go), unless a later
// change is known already.
func (r *retainedSync) seed(topic string, at int64, node string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.meta[topic].newer(at, node) {
		r.meta[topic] = retainStamp{at: at, node: node}
	}
}
