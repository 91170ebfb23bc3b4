package broker

import (
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker/link"
)

// The route window of a session move (see doc.go, "Session moves").
//
// When a session moves from S to D, S's route for its filters goes away
// when S detaches it, and D's appears when D installs it. A third node P
// that applied S's removal before D's addition found no route for a
// message published meanwhile and acknowledged it to nobody: lost after
// PUBACK. So:
//
//   - S pins the session's (non-shared) filters in its local routes from
//     just before it detaches the session until D has confirmed the move:
//     no removal is sent meanwhile (routeTable.pins), and a removal that
//     was due then is sent at the end.
//   - D confirms the move only once every peer has acknowledged on its
//     link everything D queued for it up to the installation, which
//     includes D's route additions (confirmWhenRouted): when S's removal
//     leaves S, every peer holds D's route already.
//   - Meanwhile S relays what arrives for the moved session (from peers,
//     which still route it to S, or from S's own publishers) to D, for
//     that session alone (msgMoveLate, mochi patch 91), after the move's
//     end message on the same link, so D has installed the session when it
//     arrives. Should the move fail, S delivers what it relayed to the
//     session it puts back.
//
// A message that reaches D both directly (P held D's route already) and
// relayed through S is delivered twice (QoS 1 allows it), for the short
// time between P learning D's route and P applying S's removal.

// relay forwards, from the source of a move, what arrives for the moved
// session to its destination.
type relay struct {
	move    uint64 // the move's ID at the source
	id, to  string
	adopted []string          // the failed nodes the session was adopted from, oldest first (cluster_failover.go)
	routed  chan struct{}     // closed when the destination reports its routes everywhere
	subs    *mqtt.TopicsIndex // the session's non-shared subscriptions
	// installed: the destination reported the session installed. What it
	// publishes after that report (and so sends after it on its link) it
	// delivered to the session itself: not relayed back. Its routes for
	// the session came before the report on the same link: what a client
	// here publishes once this node has read the report is forwarded to it
	// directly (direct: the clients whose current publish was), and not
	// relayed either.
	installed atomic.Bool
	direct    sync.Map // client ID → struct{}

	mu    sync.Mutex
	ended bool         // the move's end is queued: relays go out at once
	held  []publishMsg // arrived before that
	bytes int          // payload and topic bytes of held
	sent  []publishMsg // relayed: delivered here should the move fail
}

// relayKeepMax bounds what a relay keeps to deliver here should its move
// fail (a move in flight for more messages than this is rare: it lasts one
// link round trip past the end).
const relayKeepMax = 10000

// relayHeldBytesMax bounds the payload and topic bytes a relay holds before
// the move's end: messages of up to the maximum packet size make a count
// alone no bound on memory.
const relayHeldBytesMax = 64 << 20

// relayBytes is relayHeldBytesMax, or what a test set.
func (c *clusterNode) relayBytes() int {
	if n := c.testRelayBytes.Load(); n > 0 {
		return int(n)
	}
	return relayHeldBytesMax
}

// relayKeep is relayKeepMax, or what a test set.
func (c *clusterNode) relayKeep() int {
	if n := c.testRelayKeep.Load(); n > 0 {
		return int(n)
	}
	return relayKeepMax
}

// relays are the relays of the moves this node is the source of.
type relays struct {
	n  atomic.Int32 // len(by): the publish paths skip the lookup at 0
	mu sync.Mutex   // a leaf
	by map[string]*relay
}

func (rs *relays) add(r *relay) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.by == nil {
		rs.by = map[string]*relay{}
	}
	rs.by[r.id] = r
	rs.n.Store(int32(len(rs.by)))
}

func (rs *relays) remove(r *relay) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.by[r.id] == r {
		delete(rs.by, r.id)
	}
	rs.n.Store(int32(len(rs.by)))
}

func (rs *relays) get(id string) *relay {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.by[id]
}

// matching returns the relays whose session subscribes to topic.
func (rs *relays) matching(topic string) []*relay {
	if rs.n.Load() == 0 {
		return nil
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	var out []*relay
	for _, r := range rs.by {
		if _, ok := r.subs.Subscribers(topic).Subscriptions[r.id]; ok {
			out = append(out, r)
		}
	}
	return out
}

// plainFilters returns the non-shared filters of subs (shared ones are not
// pinned nor relayed: see docs/clustering.md).
func plainFilters(subs []packets.Subscription) []string {
	var out []string
	for _, s := range subs {
		if mqtt.SharedRoute(s.Filter) == s.Filter {
			out = append(out, s.Filter)
		}
	}
	return out
}

// startRelay pins the routes of client id's session and relays what
// arrives for it to peer to from now on (held until endRelay). Called just
// before the session is detached.
func (c *clusterNode) startRelay(move uint64, id, to string, subs []packets.Subscription) *relay {
	r := &relay{move: move, id: id, to: to, adopted: markedFrom(c.adopted.list(id), false), subs: mqtt.NewTopicsIndex(), routed: make(chan struct{})}
	for _, s := range subs {
		if mqtt.SharedRoute(s.Filter) == s.Filter {
			r.subs.Subscribe(id, s)
		}
	}
	c.routes.pin(plainFilters(subs))
	c.relays.add(r)
	return r
}

// endRelay: the move's end is queued on the link to the destination; what
// was held goes out, in order, and later arrivals at once.
func (c *clusterNode) endRelay(r *relay) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ended = true
	for _, pm := range r.held {
		c.sendLate(r, pm, nil)
	}
	r.held, r.bytes = nil, 0
}

// stopRelay ends r and unpins its routes (sending the removals that came
// due meanwhile). With failed, the session is back here: what was relayed
// or held is delivered to it.
func (c *clusterNode) stopRelay(r *relay, subs []packets.Subscription, failed bool) {
	c.relays.remove(r)
	r.mu.Lock()
	pending := append(r.sent, r.held...)
	r.sent, r.held, r.bytes = nil, nil, 0
	r.mu.Unlock()
	if failed {
		for _, pm := range pending {
			c.b.mq.DeliverToClient(r.id, pm.Packet)
		}
	} else if _, here := c.b.mq.Clients.Get(r.id); !here && len(r.adopted) > 0 {
		c.adopted.clear(r.id, r.adopted) // the mark went with the session
		for _, dead := range r.adopted {
			c.adoptedGroups.drop(dead, r.id)
		}
		c.keepForHeld(r)
	}
	c.unpinRoutes(plainFilters(subs))
}

// stopRelayWhenRouted stops the relay of a move that succeeded once its
// destination reports that every peer holds its routes for the session,
// or after cluster.claim_timeout.
func (c *clusterNode) stopRelayWhenRouted(r *relay, subs []packets.Subscription) {
	t := time.NewTimer(c.cfg.ClaimTimeout)
	defer t.Stop()
	select {
	case <-r.routed:
	case <-t.C:
	case <-c.stop:
	}
	c.stopRelay(r, subs, false)
}

// installed: the destination from of move reports the session installed.
func (rs *relays) installed(from string, move uint64) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for _, r := range rs.by {
		if r.move == move && r.to == from {
			r.installed.Store(true)
		}
	}
}

// routed: the destination from of move reports its routes everywhere.
func (rs *relays) routed(from string, move uint64) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for _, r := range rs.by {
		if r.move == move && r.to == from {
			select {
			case <-r.routed:
			default:
				close(r.routed)
			}
		}
	}
}

// relayTo queues pm for r's destination (held until the move's end). What
// cannot be is counted: the message was acknowledged already.
func (c *clusterNode) relayTo(r *relay, pm publishMsg, marks *pubMarks) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.ended {
		size := len(pm.Packet.Payload) + len(pm.Packet.TopicName)
		if len(r.held) >= c.relayKeep() || r.bytes+size > c.relayBytes() {
			c.b.limits.linkDropped(r.to, dropRelayFull, pm.Packet.FixedHeader.Qos, 1, pm.Packet.TopicName)
			return link.ErrQueueFull
		}
		r.held = append(r.held, pm)
		r.bytes += size
		return nil
	}
	return c.sendLate(r, pm, marks)
}

// sendLate queues one relayed message on the link to r's destination,
// recording it in marks (if not nil) for the publisher's acknowledgement.
// r.mu is held.
func (c *clusterNode) sendLate(r *relay, pm publishMsg, marks *pubMarks) error {
	body, err := moveLateMsg{ClientID: r.id, Pub: pm.forProto(c.peerProtocol(r.to))}.encode()
	if err != nil {
		return err
	}
	p := c.peers.get(r.to)
	if p == nil {
		p = c.peers.getHeld(r.to)
	}
	if p == nil {
		c.b.limits.linkDropped(r.to, dropNoLink, pm.Packet.FixedHeader.Qos, 1, pm.Packet.TopicName)
		return link.ErrClosed
	}
	seq, err := p.link.QueueSeq(link.Message{Type: msgMoveLate, Body: body}, pm.Packet.FixedHeader.Qos > 0)
	if err != nil {
		c.b.limits.linkDropped(r.to, linkDropReason(err), pm.Packet.FixedHeader.Qos, 1, pm.Packet.TopicName)
		return err
	}
	if marks != nil && pm.Packet.FixedHeader.Qos > 0 {
		marks.marks = append(marks.marks, linkMark{l: p.link, seq: seq}) // not followed: the failover hands on publishes only
	}
	if len(r.sent) < relayKeepMax {
		r.sent = append(r.sent, pm)
	}
	return nil
}

// relayLocal relays a message published here to the destination of each
// matching move, after its local delivery (OnPublished). It is relayed
// even when the destination routes the topic itself: the copy forwarded
// to it directly may precede the move's end there, and so the session
// (QoS 1 allows the duplicate a later one makes).
//
// marks, if not nil, is the publisher's (OnPublishHold): what is queued on
// a link for it is recorded there.
func (c *clusterNode) relayLocal(pk packets.Packet, marks *pubMarks) error {
	if c.relays.n.Load() == 0 || pk.Ignore || strings.HasPrefix(pk.TopicName, "$SYS") {
		return nil
	}
	var first error
	for _, r := range c.relays.matching(pk.TopicName) {
		if _, ok := r.direct.Load(pk.Origin); ok {
			continue // forwarded to the destination directly (see relay.installed)
		}
		if len(r.adopted) > 0 && pk.Exclude != nil && pk.Exclude(r.id) {
			continue // the session gets the held copy (cluster_failover.go)
		}
		if err := c.relayTo(r, publishMsg{Origin: pk.Origin, Expiry: expiryLeft(pk.Expiry), Packet: pk}, marks); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// noteDirect records, before a client here publishes pk, for each move
// whose session subscribes to it, whether the destination had reported the
// session installed: then its routes for the session are here, pk is
// forwarded to it directly, and relayLocal does not relay it. A client's
// publishes are handled one at a time, so the record is its current one's.
func (c *clusterNode) noteDirect(pk packets.Packet) {
	if c.relays.n.Load() == 0 || pk.Ignore {
		return
	}
	for _, r := range c.relays.matching(pk.TopicName) {
		if r.installed.Load() {
			r.direct.Store(pk.Origin, struct{}{})
		} else {
			r.direct.Delete(pk.Origin)
		}
	}
}

// relayFromPeer relays a publish peer from sent here (it still routes the
// moved session's topics here) to the destination of each matching move,
// but not back to a destination that had the session installed when it
// sent the publish.
func (c *clusterNode) relayFromPeer(from string, pm publishMsg) {
	for _, r := range c.relays.matching(pm.Packet.TopicName) {
		if r.to == from && r.installed.Load() {
			continue
		}
		if (len(pm.Held) > 0 || pm.HeldOf != "") && heldSkip(r.adopted, pm.Held, pm.HeldOf, pm.Via) {
			continue // not this session's copy (cluster_failover.go)
		}
		_ = c.relayTo(r, publishMsg{Origin: pm.Origin, Expiry: pm.Expiry, Packet: pm.Packet}, nil)
	}
}

// lateArrived delivers a message relayed by the source of a move to the
// moved session; if the session moved on from here meanwhile, it is
// relayed on.
func (c *clusterNode) lateArrived(from string, m moveLateMsg) {
	pk := m.Pub.Packet
	if c.moves.stale(from, m.ClientID) {
		// Relayed by the source of a move answered stale (a partition
		// healed): it reached the stale session there. The client's newer
		// session here got what was published since it subscribed
		// directly; the rest went with the stale session.
		if pk.FixedHeader.Qos > 0 {
			c.b.limits.count(dropStaleSession, pk.FixedHeader.Qos, 1)
		}
		c.log.Debug("message relayed for a stale session dropped", "client_id", m.ClientID, "node", from, "topic", pk.TopicName)
		return
	}
	pk.Origin, pk.Created, pk.PacketID = m.Pub.Origin, time.Now().Unix(), 0
	if m.Pub.Expiry > 0 {
		pk.Expiry = pk.Created + int64(m.Pub.Expiry)
	}
	if c.b.mq.DeliverToClient(m.ClientID, pk) {
		return
	}
	if r := c.relays.get(m.ClientID); r != nil {
		_ = c.relayTo(r, m.Pub, nil)
		return
	}
	// The session is gone from here (ended with a clean start, or expired):
	// nobody is entitled to the message any more.
	c.log.Debug("relayed message for a session not here dropped", "client_id", m.ClientID, "topic", pk.TopicName)
}

// confirmWhenRouted tells the source of an installed move once every
// alive peer acknowledged what this node queued for it up to now (the
// route additions of the installation among it), or after
// cluster.claim_timeout: only then does the source drop its routes.
func (c *clusterNode) confirmWhenRouted(from string, move uint64) {
	type mark struct {
		p   *peer
		seq uint64
	}
	var marks []mark
	for _, p := range c.peers.aliveList() {
		marks = append(marks, mark{p, p.link.Mark()})
	}
	go func() {
		deadline := time.Now().Add(c.cfg.ClaimTimeout)
		for time.Now().Before(deadline) {
			left := marks[:0]
			for _, m := range marks {
				if !m.p.link.Delivered(m.seq) && c.peers.get(m.p.name) == m.p {
					left = append(left, m)
				}
			}
			if marks = left; len(marks) == 0 {
				break
			}
			select {
			case <-c.stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
		c.sendMoveMsg(from, msgMoveRouted, moveAckMsg{Move: move})
	}()
}

// keepForHeld keeps sending on to r's destination, after the relay
// ended, the held copies of r.adopted's held links that reach this node
// for the session (heldArrived), until every live broker said it sent on
// what it held for r.adopted, at most cluster.failed_peer_hold. A session
// adopted from a failed node moves on without them after heldWaitMax
// (moveOut), and the relay ends once every peer holds its new node's
// routes: a held copy released to this node before the move (its
// adopter, or its routes then) can still be on its way, behind others on
// a busy link. Found with no session, it was lost, not counted.
func (c *clusterNode) keepForHeld(r *relay) {
	c.movedHeld.mu.Lock()
	c.movedHeld.by = append(c.movedHeld.by, r)
	c.movedHeld.n.Store(int32(len(c.movedHeld.by)))
	c.movedHeld.mu.Unlock()
	go func() {
		end := time.Now().Add(c.peers.hold) // one bound for all of its marks
		for _, dead := range r.adopted {
			if left := time.Until(end); left > 0 {
				c.awaitHeld(dead, left)
			}
		}
		c.movedHeld.mu.Lock()
		defer c.movedHeld.mu.Unlock()
		if i := slices.Index(c.movedHeld.by, r); i >= 0 {
			c.movedHeld.by = slices.Delete(c.movedHeld.by, i, i+1)
		}
		c.movedHeld.n.Store(int32(len(c.movedHeld.by)))
	}()
}

// heldArrived sends pm, a held copy of pm.HeldOf's held link delivered
// here, on to the sessions adopted from pm.HeldOf that moved on from here
// (keepForHeld) and subscribe to its topic (not share groups).
func (c *clusterNode) heldArrived(pm publishMsg) {
	if c.movedHeld.n.Load() == 0 {
		return
	}
	c.movedHeld.mu.Lock()
	var to []*relay
	for _, r := range c.movedHeld.by {
		if !slices.Contains(r.adopted, pm.HeldOf) {
			continue
		}
		if _, ok := r.subs.Subscribers(pm.Packet.TopicName).Subscriptions[r.id]; ok {
			to = append(to, r)
		}
	}
	c.movedHeld.mu.Unlock()
	for _, r := range to {
		r.mu.Lock()
		_ = c.sendLate(r, publishMsg{Origin: pm.Origin, Expiry: pm.Expiry, Packet: pm.Packet}, nil)
		r.mu.Unlock()
	}
}

// movedHeld: the relays kept for held copies (keepForHeld).
type movedHeld struct {
	n  atomic.Int32
	mu sync.Mutex
	by []*relay
}
