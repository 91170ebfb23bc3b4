package broker

import (
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker/link"
)

// Healing: one owner per client ID after a partition. While a node is cut
// off (a network partition, a process stopped with SIGSTOP), its clients
// may reconnect elsewhere without their claim reaching it, and it keeps
// their old connections and sessions. So every link opens with the list of
// client IDs the sender holds, each with when its session was established
// there (ownersMsg), and the receiver ends each of its own sessions of the
// same ID that is older: the newest session wins, the stale one is dropped
// with its queued messages, counted (stale_session). Both ends of a healed
// link send their list, and both decide the same way.

// ownersChunk bounds the client IDs of one ownersMsg (a link frame).
const ownersChunk = 4096

// owners remembers when each session of this node was established: by a
// CONNECT here, or by a move here. Its mutex is a leaf.
type owners struct {
	mu    sync.Mutex
	since map[string]time.Time // client ID → time.Now(): wall clock and monotonic reading
	// testWallSkew (nanoseconds) runs this node's wall clock ahead (or
	// behind) for tests of clock skew between nodes; as a real skew, it
	// does not change durations measured here (monotonic).
	testWallSkew atomic.Int64
}

func newOwners() *owners { return &owners{since: map[string]time.Time{}} }

func (o *owners) set(id string, at time.Time) {
	o.mu.Lock()
	o.since[id] = at
	o.mu.Unlock()
}

// get returns when id's session was established here by the wall clock
// (unix nanoseconds; 0: not held here), to compare with other nodes'.
func (o *owners) get(id string) int64 {
	o.mu.Lock()
	at, ok := o.since[id]
	o.mu.Unlock()
	if !ok {
		return 0
	}
	return at.UnixNano() + o.testWallSkew.Load()
}

// at returns when id's session was established here, with its monotonic
// reading (zero: not held here), for durations measured on this node.
func (o *owners) at(id string) time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.since[id]
}

func (o *owners) forget(id string) {
	o.mu.Lock()
	delete(o.since, id)
	o.mu.Unlock()
}

// ownersSnapshot lists the sessions held here, for a link's opening.
func (c *clusterNode) ownersSnapshot() []link.Message {
	var out []link.Message
	var m ownersMsg
	for _, cl := range c.b.mq.Clients.GetAll() {
		if cl.Net.Inline || strings.HasPrefix(cl.ID, "$") {
			continue
		}
		m.IDs = append(m.IDs, cl.ID)
		m.Since = append(m.Since, c.owners.get(cl.ID))
		if len(m.IDs) == ownersChunk {
			out = append(out, link.Message{Type: msgOwners, Body: m.encode()})
			m = ownersMsg{}
		}
	}
	if len(m.IDs) > 0 {
		out = append(out, link.Message{Type: msgOwners, Body: m.encode()})
	}
	return out
}

// reconcile ends the sessions here that node from holds too, established
// there later (ties: the node whose name sorts last keeps it).
func (c *clusterNode) reconcile(from string, m ownersMsg) {
	self := c.b.cfg.NodeName
	for i, id := range m.IDs {
		cl, ok := c.b.mq.Clients.Get(id)
		if !ok || cl.Net.Inline || c.moves.busy(id) {
			continue
		}
		mine, theirs := c.owners.get(id), m.Since[i]
		if mine > theirs || (mine == theirs && self > from) {
			continue // this node's is the newer: the peer drops its own
		}
		// Disconnects a connection still open here (0x8E) and takes the
		// session out, with its subscriptions (and so its routes).
		sess, found := c.b.mq.DetachSession(id)
		if !found {
			continue
		}
		c.owners.forget(id)
		c.dropStaleSession(id, from, sess.Inflight, mine, theirs)
	}
}

// dropStaleSession counts the messages of a stale session ended here.
func (c *clusterNode) dropStaleSession(id, node string, queued []packets.Packet, mine, theirs int64) {
	c.staleDropped.Add(1)
	n := 0
	for _, pk := range queued {
		if pk.FixedHeader.Type == packets.Publish {
			c.b.limits.count(dropStaleSession, pk.FixedHeader.Qos, 1)
			c.b.limits.logDrop(dropKey{"client_id", id}, dropStaleSession, 1, pk.TopicName, pk.FixedHeader.Qos)
			n++
		}
	}
	c.log.Warn("client connected to another node while this one was cut off: its stale connection and session here end",
		"client_id", id, "node", node, "dropped", n,
		"here_since", time.Unix(0, mine).UTC(), "there_since", time.Unix(0, theirs).UTC())
}
