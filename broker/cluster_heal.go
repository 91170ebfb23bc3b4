package broker

import (
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
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
// link send their list.
//
// Which session is newer is decided by durations, not wall clocks (nodes'
// clocks disagree: by seconds without NTP). Each list gives every
// session's age, by its sender's monotonic clock when it encoded the list
// (protoV3); the receiver places that on its own monotonic clock (now
// minus the age) and compares it with when its own session was
// established. The link's latency (and the list's wait in the link's
// queue) makes the sender's session look newer than it is, never older.
// Two nodes each judging with such an error could both find the other's
// session newer and both drop theirs (or neither), so one decides for the
// pair: the node whose name sorts first ends its own stale sessions and
// tells the other which of its sessions are stale (msgStaleIDs, each
// with the Since the other listed, so a session established there since
// is not dropped). The other node answers the decider's list with its own
// sessions of the same IDs (answerOwners): the two links open at
// different times, and the decider's answer may find no link back and be
// given up (after ownersSendWait), so whichever link opens last the
// decider gets a list to judge and a link to tell the other. With a peer
// of protoV2, both decide alone by the wall clocks (Since), as before.

// ownersChunk bounds the client IDs of one ownersMsg (a link frame).
const ownersChunk = 4096

// owners remembers when each session of this node was established: by a
// CONNECT here, or by a move here. Its mutex is a leaf: present (which
// takes mochi's client list lock) is called without it.
type owners struct {
	mu    sync.Mutex
	since map[string]time.Time // client ID → time.Now(): wall clock and monotonic reading
	// A session that ends here (a clean client disconnects, a persistent
	// one expires) leaves its entry: set drops the entries of clients no
	// longer present once the map has doubled since its last sweep, so it
	// stays within twice the sessions held (plus sweepMin).
	present    func(id string) bool
	sweepAt    int
	sweepMin   int
	sweepGrace time.Duration // an entry this young may be of a CONNECT not yet in the client list
	// testWallSkew (nanoseconds) runs this node's wall clock ahead (or
	// behind) for tests of clock skew between nodes; as a real skew, it
	// does not change durations measured here (monotonic).
	testWallSkew atomic.Int64
	// sendWait (nanoseconds) bounds how long an answer to an owners list
	// waits for a link to its node (see sendOwnersMsg); tests shorten it.
	sendWait atomic.Int64
	// notSent counts the answers given up after sendWait.
	notSent atomic.Int64
	// testHandled, if set, is called when an owners list from a peer has
	// been judged (and answered) here.
	testHandled atomic.Pointer[func(from string)]
}

func newOwners(present func(id string) bool) *owners {
	o := &owners{since: map[string]time.Time{}, present: present, sweepMin: 1024, sweepAt: 1024, sweepGrace: time.Minute}
	o.sendWait.Store(int64(ownersSendWait))
	return o
}

func (o *owners) set(id string, at time.Time) {
	o.mu.Lock()
	o.since[id] = at
	sweep := len(o.since) >= o.sweepAt
	if sweep {
		o.sweepAt = 1 << 62 // one sweep at a time
	}
	o.mu.Unlock()
	if sweep {
		o.sweep(at)
	}
}

// sweep forgets the sessions established before now minus sweepGrace
// whose clients are gone (the grace covers a CONNECT between its set, in
// OnSessionEstablish, and mochi's adding it to the client list).
func (o *owners) sweep(now time.Time) {
	o.mu.Lock()
	old := make(map[string]time.Time, len(o.since))
	for id, at := range o.since {
		if now.Sub(at) >= o.sweepGrace {
			old[id] = at
		}
	}
	o.mu.Unlock()
	for id := range old {
		if o.present(id) {
			delete(old, id)
		}
	}
	o.mu.Lock()
	for id, at := range old {
		if cur, ok := o.since[id]; ok && cur.Equal(at) { // not established again meanwhile
			delete(o.since, id)
		}
	}
	o.sweepAt = max(2*len(o.since), o.sweepMin)
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

// ownersSnapshot lists the sessions held here, for a link's opening to
// peer (with their ages if it reads them).
func (c *clusterNode) ownersSnapshot(peer string) []link.Message {
	var out []link.Message
	var m ownersMsg
	ages := c.peerProtocol(peer) >= protoV3
	now := time.Now()
	for _, cl := range c.b.mq.Clients.GetAll() {
		if cl.Net.Inline || strings.HasPrefix(cl.ID, "$") {
			continue
		}
		m.IDs = append(m.IDs, cl.ID)
		m.Since = append(m.Since, c.owners.get(cl.ID))
		if ages {
			age := int64(-1)
			if at := c.owners.at(cl.ID); !at.IsZero() {
				age = int64(now.Sub(at))
			}
			m.Ages = append(m.Ages, age)
		}
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
	if f := c.owners.testHandled.Load(); f != nil {
		defer (*f)(from)
	}
	self := c.b.cfg.NodeName
	if len(m.Ages) == len(m.IDs) && len(m.IDs) > 0 && c.protocol() >= protoV3 {
		// Ages come only from a broker of protoV3 that sees this one as
		// such too: the node whose name sorts first decides for both.
		// The message says so, not peerProtocol(from): this node's gossip
		// may no longer list from (reaped during a long partition) while
		// from's link is already open, and judging alone by the wall
		// clocks while from leaves it to this node would keep both.
		if self < from {
			c.reconcileByAge(from, m)
		} else {
			c.answerOwners(from, m)
		}
		return
	}
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
		// The session judged, cl, only: a CONNECT here since (its time
		// unread above) takes it over and stays (fork patch 119).
		sess, res := c.b.mq.DetachClient(cl)
		if res != mqtt.Detached {
			continue // gone, or a newer connection here took it over
		}
		c.owners.forget(id)
		c.dropStaleSession(id, from, sess.Inflight, "here_since", time.Unix(0, mine).UTC(), "there_since", time.Unix(0, theirs).UTC())
	}
}

// reconcileByAge decides, for each client ID that from and this node
// both hold a session of, which one is newer, by their ages (see the top
// of this file): it ends its own if that is the older (or as old: ties go
// to the node whose name sorts last, from), and tells from to end its own
// otherwise. A session of unknown age (-1, or none recorded here) counts
// as the oldest.
func (c *clusterNode) reconcileByAge(from string, m ownersMsg) {
	now := time.Now()
	var stale ownersMsg
	for i, id := range m.IDs {
		cl, ok := c.b.mq.Clients.Get(id)
		if !ok || cl.Net.Inline || c.moves.busy(id) {
			continue
		}
		mine := c.owners.at(id)
		theirs := time.Time{}
		if m.Ages[i] >= 0 {
			theirs = now.Add(-time.Duration(m.Ages[i]))
		}
		if !mine.IsZero() && (theirs.IsZero() || mine.After(theirs)) {
			stale.IDs = append(stale.IDs, id)
			stale.Since = append(stale.Since, m.Since[i])
			if len(stale.IDs) == ownersChunk {
				c.sendOwnersStale(from, stale)
				stale = ownersMsg{}
			}
			continue
		}
		// The session judged, cl, only: a CONNECT here since (its time
		// unread above) takes it over and stays (fork patch 119).
		sess, res := c.b.mq.DetachClient(cl)
		if res != mqtt.Detached {
			continue // gone, or a newer connection here took it over
		}
		c.owners.forget(id)
		c.dropStaleSession(id, from, sess.Inflight, "here_age", c.ownedAge(mine, now), "there_age", time.Duration(m.Ages[i]))
	}
	if len(stale.IDs) > 0 {
		c.sendOwnersStale(from, stale)
	}
}

// answerOwners answers the owners list of from, the node that decides
// (its name sorts first), with this node's sessions of the same client
// IDs and their ages, for from to judge. Each node's list goes out when
// its own link to the other opens, and the two links open at different
// times (each when its node's gossip sees the other alive): should
// from's answer (msgStaleIDs) to this node's list find no link back and
// be given up, from's list, which comes on its own link, gets this answer
// and from judges again. from never answers an answer.
func (c *clusterNode) answerOwners(from string, m ownersMsg) {
	// Built at each attempt to send it: the ages are measured when it
	// goes out. The answer may wait for a link to from (this node's
	// gossip may not see from alive yet), and ages measured before that
	// wait would make this node's sessions look newer by it: from would
	// end its own session, newer than this node's, as stale.
	build := func() ownersMsg {
		var a ownersMsg
		now := time.Now()
		for _, id := range m.IDs {
			cl, ok := c.b.mq.Clients.Get(id)
			if !ok || cl.Net.Inline {
				continue
			}
			a.IDs = append(a.IDs, id)
			a.Since = append(a.Since, c.owners.get(id))
			a.Ages = append(a.Ages, int64(c.ownedAge(c.owners.at(id), now)))
		}
		return a
	}
	if a := build(); len(a.IDs) > 0 {
		c.sendOwnersBuilt(from, msgOwners, a, build, "an answer to its list of sessions not sent: no link to the node; it judges when this node's link to it opens")
	}
}

// ownedAge is the age at now of a session established at (-1: unknown).
func (c *clusterNode) ownedAge(at, now time.Time) time.Duration {
	if at.IsZero() {
		return -1
	}
	return now.Sub(at)
}

// sendOwnersStale tells to which of its sessions are stale. The list that
// made this node judge may come on a link to's side opened before this
// node has its own peer entry for to (gossip has not told it yet): the
// answer then waits for it (sendOwnersMsg).
func (c *clusterNode) sendOwnersStale(to string, m ownersMsg) {
	c.sendOwnersMsg(to, msgStaleIDs, m, "stale sessions not reported: no link to the node; this node judges again when its own link to it opens (the node answers its list)")
}

// sendOwnersMsg sends m to node to, waiting at most owners.sendWait for a
// link to it; past that it logs givenUp.
func (c *clusterNode) sendOwnersMsg(to string, typ byte, m ownersMsg, givenUp string) {
	c.sendOwnersBuilt(to, typ, m, nil, givenUp)
}

// sendOwnersBuilt is sendOwnersMsg for a message that, should it wait for
// a link, is built again (rebuild, if not nil) when it goes out.
func (c *clusterNode) sendOwnersBuilt(to string, typ byte, m ownersMsg, rebuild func() ownersMsg, givenUp string) {
	send := func(m ownersMsg) bool {
		p := c.peers.get(to)
		return p != nil && p.link.Send(link.Message{Type: typ, Body: m.encode()}, true)
	}
	if send(m) {
		return
	}
	go func() {
		tick := time.NewTicker(claimPoll)
		defer tick.Stop()
		deadline := time.NewTimer(time.Duration(c.owners.sendWait.Load()))
		defer deadline.Stop()
		for {
			select {
			case <-c.stop:
				return
			case <-deadline.C:
				c.owners.notSent.Add(1)
				c.log.Warn(givenUp, "node", to, "sessions", len(m.IDs))
				return
			case <-tick.C:
				if c.peers.get(to) == nil {
					continue
				}
				if rebuild != nil {
					if m = rebuild(); len(m.IDs) == 0 {
						return // none of them held here any more
					}
				}
				if send(m) {
					return
				}
			}
		}
	}()
}

// ownersSendWait bounds how long an answer to an owners list waits for a
// link to its node (see sendOwnersMsg).
const ownersSendWait = time.Minute

// ownersStale ends the sessions here that from found stale (reconcileByAge
// there), unless established again since this node listed them.
func (c *clusterNode) ownersStale(from string, m ownersMsg) {
	for i, id := range m.IDs {
		cl, ok := c.b.mq.Clients.Get(id)
		if !ok || cl.Net.Inline || c.moves.busy(id) || c.owners.get(id) != m.Since[i] {
			continue
		}
		mine := c.ownedAge(c.owners.at(id), time.Now())
		// The session judged, cl, only: a CONNECT here since (its time
		// unread above) takes it over and stays (fork patch 119).
		sess, res := c.b.mq.DetachClient(cl)
		if res != mqtt.Detached {
			continue // gone, or a newer connection here took it over
		}
		c.owners.forget(id)
		c.dropStaleSession(id, from, sess.Inflight, "here_age", mine, "judged_by", from)
	}
}

// dropStaleSession counts the messages of a stale session ended here.
func (c *clusterNode) dropStaleSession(id, node string, queued []packets.Packet, detail ...any) {
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
		append([]any{"client_id", id, "node", node, "dropped", n}, detail...)...)
}
