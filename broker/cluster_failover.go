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
	"github.com/rtm-dev/rtm/internal/cluster"
)

// Order and single delivery across a node's death (docs/clustering.md,
// "Durability").
//
// While gossip only suspects a peer, and then until its persistent
// sessions are adopted, a node keeps the peer's routes: what its clients
// publish for the peer's sessions waits in the held link (messages the
// dead peer never acknowledged, then everything published since). Once
// every session is adopted and every adopter's routes are here, the held
// link is released and its messages go on (reforward). Meanwhile the
// adopters' routes reached this node too, so a message can travel two ways
// to an adopted session: directly, and in the held link, later. Delivered
// both ways, a session got it twice, and the direct copy before the older
// messages still held: out of order.
//
// So a message has one way to a session adopted from a dead node D:
//
//   - a copy forwarded (or delivered here) while D's held link took the
//     message too carries D's name (publishMsg.Held, the local delivery's
//     Packet.Exclude: mochi patch 24), and is not delivered to the sessions
//     adopted from D;
//   - the held copy, once released, carries D's name as HeldOf, goes to
//     every peer whose routes match it (the adopted session may have moved
//     on from its adopter) and is delivered to the sessions adopted from D
//     alone (the others got the direct copy);
//   - a copy forwarded after the release carries nothing: the release
//     queues every held copy before any such copy to an adopter (flushGate),
//     on the same links, so it arrives after them.
//
// A session adopted from D moves on (a claim of its client on another
// node) only once every live broker has sent on what it held for D
// (msgHeldDone, after its held copies on each link), or after
// heldWaitMax: the held copies then reach it where it was adopted, once.
// It carries its mark when it moves (moveStartMsg.AdoptedFrom), and the
// relay of a move applies the same rule. The node it moves to checks the
// marks it brings against the brokers' words it heard, and ends each at
// the latest cluster.failed_peer_hold from its time (moveInMarks): it may
// have joined after the failure and never hear those words. The marks of D go once every
// live broker (D aside, should it be back) is done with D's held link,
// whether it released it or handed its queue over because D came back
// (resendReached, resendRestarted): a broker whose gossip sees D alive
// late still finds them. Should some broker never say so (it never saw
// D failed), they go cluster.failed_peer_hold after gossip no longer
// reports D failed (markAfterHold), when no broker holds anything for D
// any more. A node that restarts restores the marks of the sessions it
// adopted within cluster.failed_peer_hold from the store (restoreMark);
// they go at the end of that hold (the brokers' word that they are done
// went to the process before; repeating it on every reconnect could
// count a word of an earlier failure of D for a later one, and clear the
// marks while held copies are still to come: a loss, where a mark kept
// too long costs at most a duplicate), or, if the node saw D fail since,
// with that failure's marks.
// A held link that reaches a new process of D re-sends what it threw
// away as a release would (resendRestarted).
//
// An adopter A that dies during D's failover: a survivor B adopts its
// sessions again and keeps their marks of D (in the stored session,
// adopted_earlier; carriedMarks, adoptAgain), before the mark of A, so
// D's held copies still reach them and their direct copies still skip
// them. A session with both marks takes a message through the held link
// of its oldest mark that took it (heldSkip), so D's mark stays, done,
// while A's does. A survivor releases its held link for D only once no
// session adopted from D is owned by a failed node (releaseWhenAdopted):
// the copies go to B, not into its held link for A. D's held copies that
// were sent to A before it died and stayed in a survivor's link to A go
// on at that link's hand-over as D's, via A (publishMsg.Via): for the
// sessions adopted from A that carry D's mark alone.

// adoptedMarks maps the client IDs of sessions adopted from failed nodes
// to those nodes, oldest first: a session adopted from A, which had
// adopted it from D and died before every broker was done with D's held
// link, is marked adopted from D and from A. A message both held links
// took reaches it through D's copy (heldSkip), so D's mark stays while A's
// does, even once every broker is done with D's held link (done): without
// it, A's held copy of such a message would be taken too, a duplicate. A
// later mark goes on its own. The mutex is a leaf.
type adoptedMarks struct {
	n   atomic.Int32 // len(by): deliveries skip the lookup at 0
	mu  sync.Mutex
	by  map[string][]adoptedMark // client id → its marks, oldest first
	seq uint64
	// gen returns the failures of a node this node saw (heldDone's
	// generation; nil: not known). Its mutex is a leaf.
	gen func(string) uint64
}

// genOf is a.gen(node), 0 without it.
func (a *adoptedMarks) genOf(node string) uint64 {
	if a.gen == nil {
		return 0
	}
	return a.gen(node)
}

// adoptedMark is one mark of a session: the failed node, and its token
// (set), so that a timer clears only its own. done: every broker is done
// with the node's held link, and the mark stays only for a later one.
type adoptedMark struct {
	from string
	tok  uint64
	done bool
	gen  uint64 // the failures of from this node had seen when it was set
}

// has reports whether client id's session is marked adopted from dead.
func (a *adoptedMarks) has(id, dead string) bool {
	if a.n.Load() == 0 {
		return false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.ContainsFunc(a.by[id], func(m adoptedMark) bool { return m.from == dead })
}

// skip is heldSkip for client id's session.
func (a *adoptedMarks) skip(id string, held []string, heldOf, via string) bool {
	if a.n.Load() == 0 {
		return heldOf != ""
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	ms := a.by[id]
	if via != "" && !slices.ContainsFunc(ms, func(m adoptedMark) bool { return m.from == via }) {
		return true
	}
	return heldSkipMarks(ms, held, heldOf, a.genOf)
}

// set marks client id's session adopted from node dead, after its other
// marks (a mark of dead it had keeps its place, with a new token). It
// returns the mark's token (clearToken).
func (a *adoptedMarks) set(id, dead string) uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.by == nil {
		a.by = map[string][]adoptedMark{}
	}
	a.seq++
	ms := a.by[id]
	if i := slices.IndexFunc(ms, func(m adoptedMark) bool { return m.from == dead }); i >= 0 {
		ms[i].tok, ms[i].done, ms[i].gen = a.seq, false, a.genOf(dead)
	} else {
		a.by[id] = append(ms, adoptedMark{from: dead, tok: a.seq, gen: a.genOf(dead)})
	}
	a.n.Store(int32(len(a.by)))
	return a.seq
}

// drop removes the marks of client id for which del is true, and the done
// marks no later one keeps. Called with a.mu held.
func (a *adoptedMarks) drop(id string, del func(adoptedMark) bool) {
	ms := slices.DeleteFunc(a.by[id], del)
	for len(ms) > 0 && ms[len(ms)-1].done {
		ms = ms[:len(ms)-1]
	}
	if len(ms) == 0 {
		delete(a.by, id)
	} else {
		a.by[id] = ms
	}
}

// clearToken drops client id's mark if it is still the one set returned
// tok for: not a newer mark of the same session (a later failure). A
// later mark keeps it, done (see adoptedMarks).
func (a *adoptedMarks) clearToken(id string, tok uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	ms := a.by[id]
	for i := range ms {
		if ms[i].tok == tok {
			ms[i].done = true
		}
	}
	a.drop(id, func(adoptedMark) bool { return false })
	a.n.Store(int32(len(a.by)))
}

// reset marks client id's session with marks, oldest first (each done
// as flagged), and nothing else (none: not adopted). It returns the
// marks' tokens (clearToken), in marks' order.
func (a *adoptedMarks) reset(id string, marks []earlierMark) []uint64 {
	if len(marks) == 0 && a.n.Load() == 0 {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.by, id)
	var toks []uint64
	if len(marks) > 0 {
		if a.by == nil {
			a.by = map[string][]adoptedMark{}
		}
		ms := make([]adoptedMark, 0, len(marks))
		for _, m := range marks {
			a.seq++
			ms = append(ms, adoptedMark{from: m.From, tok: a.seq, done: m.Done, gen: a.genOf(m.From)})
			toks = append(toks, a.seq)
		}
		a.by[id] = ms
		a.drop(id, func(adoptedMark) bool { return false })
	}
	a.n.Store(int32(len(a.by)))
	return toks
}

// list returns a copy of client id's marks, oldest first.
func (a *adoptedMarks) list(id string) []adoptedMark {
	if a.n.Load() == 0 {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.by[id])
}

// markedFrom returns the nodes of marks, oldest first: with active, only
// those whose held links some broker may still send on (not done).
func markedFrom(marks []adoptedMark, active bool) []string {
	var from []string
	for _, m := range marks {
		if !active || !m.done {
			from = append(from, m.from)
		}
	}
	return from
}

// clear drops client id's marks naming one of dead.
func (a *adoptedMarks) clear(id string, dead []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.drop(id, func(m adoptedMark) bool { return slices.Contains(dead, m.from) })
	a.n.Store(int32(len(a.by)))
}

// marked returns the sessions marked adopted from one of nodes.
func (a *adoptedMarks) marked(nodes []string) map[string]bool {
	if a.n.Load() == 0 {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var m map[string]bool
	for id, ms := range a.by {
		if slices.ContainsFunc(ms, func(mk adoptedMark) bool { return slices.Contains(nodes, mk.from) }) {
			if m == nil {
				m = map[string]bool{}
			}
			m[id] = true
		}
	}
	return m
}

// forget drops every mark naming dead, or marks it done where a later
// mark keeps it (see adoptedMarks).
func (a *adoptedMarks) forget(dead string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for id, ms := range a.by {
		for i := range ms {
			if ms[i].from == dead {
				ms[i].done = true
			}
		}
		a.drop(id, func(adoptedMark) bool { return false })
	}
	a.n.Store(int32(len(a.by)))
}

// heldSkip reports whether a message is not for a session adopted from
// the failed nodes marks (oldest first; none for one that was not): held
// names the failed nodes whose held links took it, heldOf the node whose
// held link gave this copy.
//
// A session marked for several nodes (adopted again from an adopter that
// died during the failover) takes a message once: through the held link
// of its oldest mark among held, whose copies of the earlier messages it
// takes too (one link, in order); a direct copy, or the copy of another
// held link, is skipped. A copy of a held link that did not take the
// message as held (a direct copy the adopter never acknowledged before it
// died) is taken only if no held link's copy is. A held copy of heldOf
// that the held link of via (an adopter that died before acknowledging
// it) gave up is for the sessions adopted from via alone, as heldOf's.
func heldSkip(marks []string, held []string, heldOf, via string) bool {
	if via != "" && !slices.Contains(marks, via) {
		return true
	}
	for _, m := range marks {
		if slices.Contains(held, m) {
			return heldOf != m
		}
	}
	return heldOf != "" && !slices.Contains(marks, heldOf)
}

// heldSkipMarks is heldSkip of the marks ms.
//
// A done mark of a node that failed again since (gen, the failures of a
// node this node saw, counts more than when it was set) does not pick the
// link: that node's new held link holds nothing for the session, and
// picking it made the session skip the copies of the held link of the
// mark it was adopted by, lost, not counted (bench/chaos stopkill,
// h13b11: TestRefailedNodeDoneMarkKeepsHeldCopies). A done mark of the
// same failure still picks it, so a message both held links took comes
// once (TestReadoptedKeepsEarlierMark). A mark set before this node saw
// the failure it is of looks older: at worst a message twice.
func heldSkipMarks(ms []adoptedMark, held []string, heldOf string, gen func(string) uint64) bool {
	for _, m := range ms {
		if m.done && gen(m.from) > m.gen {
			continue // of an earlier failure of m.from
		}
		if slices.Contains(held, m.from) {
			return heldOf != m.from
		}
	}
	return heldOf != "" && !slices.ContainsFunc(ms, func(m adoptedMark) bool { return m.from == heldOf })
}

// exclude returns the Packet.Exclude of a message with held, heldOf and
// via (nil when it carries none, as every message but during a failover).
func (c *clusterNode) exclude(held []string, heldOf, via string) func(string) bool {
	if len(held) == 0 && heldOf == "" && via == "" {
		return nil
	}
	return func(id string) bool { return c.adopted.skip(id, held, heldOf, via) }
}

// excludeLocal returns the Packet.Exclude of the local delivery of a
// message whose forward found held's links holding it. mochi delivers it
// after the forward, once this node may have handed those links over and
// heard every broker done (heldHandedOver waits for the forward, not for
// this delivery), the marks gone: so the sessions marked at the forward,
// whose held copy is on its way or delivered, stay left out, and so do
// those marked since.
func (c *clusterNode) excludeLocal(held []string) func(string) bool {
	if len(held) == 0 {
		return nil
	}
	marked := c.adopted.marked(held)
	return func(id string) bool { return marked[id] || c.adopted.skip(id, held, "", "") }
}

// flushGate keeps what is forwarded after a held link's release behind the
// held messages it re-sends: a release begins it, naming its adopters,
// before it drops the failed node's routes and ends it once every held
// message is queued or delivered. A forward waits for that only if its
// message can meet a re-sent one: its route lookup skipped the released
// peer, or it goes to one of the adopters, or to a session adopted here
// (this node one of them); other publishers go on. It waits once per publish, at most
// flushWaitMax, which only a re-delivery stalled by congested subscribers
// reaches. The mutex is a leaf.
type flushGate struct {
	n    atomic.Int32
	mu   sync.Mutex
	idle chan struct{}
	to   map[string]int // the adopters of the releases under way, each with its count
}

// flushWaitMax bounds a publisher's wait for a release's re-sends.
const flushWaitMax = 5 * time.Second

func (g *flushGate) begin(adopters []string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.n.Load() == 0 {
		g.idle = make(chan struct{})
	}
	if g.to == nil {
		g.to = map[string]int{}
	}
	for _, a := range adopters {
		g.to[a]++
	}
	g.n.Add(1)
}

func (g *flushGate) end(adopters []string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, a := range adopters {
		if g.to[a]--; g.to[a] <= 0 {
			delete(g.to, a)
		}
	}
	if g.n.Add(-1) == 0 {
		close(g.idle)
	}
}

// needed reports whether a release under way re-sends to one of names.
func (g *flushGate) needed(names ...string) bool {
	if g.n.Load() == 0 {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(names) > 0 && g.to[gateAll] > 0 {
		return true
	}
	for _, name := range names {
		if g.to[name] > 0 {
			return true
		}
	}
	return false
}

// gateAll, as an adopter given to flushGate.begin, makes every publish
// with a target wait: for the rare re-sends whose adopters are not
// tracked (a held link given up at cluster.failed_peer_hold, or one that
// reached a restarted peer), bounded like a release's.
const gateAll = "\x00all"

// allAdopters is the adopters of those re-sends.
var allAdopters = []string{gateAll}

// wait returns once no release re-sends, or after flushWaitMax. pub, the
// publisher whose read loop waits (nil for a will), first writes out the
// acknowledgements it holds back (rtm patch 70), so those of its earlier
// messages do not wait with this one.
func (g *flushGate) wait(pub *mqtt.Client) {
	if g.n.Load() == 0 {
		return
	}
	g.mu.Lock()
	ch := g.idle
	if g.n.Load() == 0 {
		ch = nil
	}
	g.mu.Unlock()
	if ch == nil {
		return
	}
	if pub != nil {
		pub.FlushHeld()
	}
	t := time.NewTimer(flushWaitMax)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	}
}

// deliverPublish delivers a publish peer from sent (or, from this node, a
// held link gave back) to the subscribers here, and relays it to the
// sessions moving away.
func (c *clusterNode) deliverPublish(from string, pm publishMsg) {
	pk := pm.Packet
	pk.Origin, pk.Created, pk.PacketID = pm.Origin, time.Now().Unix(), 0
	if pm.Expiry > 0 {
		pk.Expiry = pk.Created + int64(pm.Expiry)
	}
	var shared func(string) bool
	if routes := pm.Shared; len(routes) > 0 {
		if pm.HeldOf != "" {
			var orphans []string
			routes, orphans = c.adoptedShared(pk.TopicName, routes, pm.HeldOf)
			for _, route := range orphans {
				c.sendSharedOn(pm, route)
			}
		}
		if len(routes) > 0 {
			shared = func(route string) bool { return slices.Contains(routes, route) }
		}
	}
	pk.Exclude = c.exclude(pm.Held, pm.HeldOf, pm.Via)
	c.b.mq.DeliverFromPeer(pk, shared)
	if c.relays.n.Load() > 0 {
		c.relayFromPeer(from, pm)
	}
	if pm.HeldOf != "" {
		c.heldArrived(pm)
	}
}

// adoptedShared returns the share groups of routes that this node gives a
// held copy of dead (one whose selection was made for dead's member of
// each group) to: those with a member here whose session was adopted from
// dead, and those whose member adopted here from dead left the group since
// (it unsubscribed, or its client started a clean session) if the group
// has another member here. A hand-over sends the selections to every live
// peer (handOverTo): only where such a member is, or was, may the group
// take the copy, or a group would get it once per peer with a member. The
// shared selection is not filtered (Packet.Exclude spares the selected
// member, mochi patch 24): should the group have another member here, that
// one may take the copy instead, still once for the group. orphans are
// the groups of members adopted here that left, with no member here: the
// copy goes to a member on a live peer (sendSharedOn).
func (c *clusterNode) adoptedShared(topic string, routes []string, dead string) (keep, orphans []string) {
	local := map[string]bool{} // route → a member here is adopted from dead
	for filter, members := range c.b.mq.Topics.Subscribers(topic).Shared {
		route := mqtt.SharedRoute(filter)
		if !slices.Contains(routes, route) {
			continue
		}
		marked := local[route]
		for id := range members {
			if marked {
				break
			}
			marked = c.adopted.has(id, dead)
		}
		local[route] = marked
	}
	for _, route := range routes {
		marked, here := local[route]
		switch {
		case marked:
			keep = append(keep, route)
		case !c.adoptedGroups.has(dead, route):
			// Not this node's: the member it was chosen for is elsewhere.
		case here:
			keep = append(keep, route)
		default:
			orphans = append(orphans, route)
		}
	}
	return keep, orphans
}

// sendSharedOn gives the copy pm (held for dead) of share group route,
// whose member adopted here from dead left the group, to one member of
// the group on a live peer, as a forward chooses one: unmarked, so any
// member takes it. None reachable: counted lost.
func (c *clusterNode) sendSharedOn(pm publishMsg, route string) {
	members := c.routes.subscribers(pm.Packet.TopicName).Shared[route]
	self := c.node.Name()
	c.routes.mu.Lock()
	c.peers.mu.Lock()
	names := slices.DeleteFunc(memberNames(members, c.peers.alive), func(n string) bool { return n == self || n == pm.HeldOf })
	var p *peer
	if len(names) > 0 {
		slices.Sort(names)
		p = c.peers.alive[names[c.routes.nextShareLocked(route)%uint64(len(names))]]
	}
	c.peers.mu.Unlock()
	c.routes.mu.Unlock()
	qos := pm.Packet.FixedHeader.Qos
	if p != nil {
		m := publishMsg{Origin: pm.Origin, Expiry: pm.Expiry, Packet: pm.Packet, Shared: []string{route}}
		if body, err := m.forProto(c.peerProtocol(p.name)).encode(); err == nil {
			if err := p.link.Queue(link.Message{Type: msgPublish, Body: body}, qos > 0); err == nil {
				c.forwarded.Add(1)
				return
			}
		}
	}
	c.b.limits.count(dropHeldSharedNoMember, qos, 1)
	c.b.limits.logDrop(dropKey{"share_group", route}, dropHeldSharedNoMember, 1, pm.Packet.TopicName, qos)
}

// adoptedGroups records, for each failed node, the share groups (routes)
// the sessions adopted here from it (or moved here with its mark)
// subscribed to then, each session's apart, until they move on: the held
// copies of that node chosen for such a member are this node's to give the
// group (adoptedShared), even once the member left it. The mutex is a
// leaf.
type adoptedGroups struct {
	mu sync.Mutex
	m  map[string]map[string][]string // failed node → client ID → share routes
}

// add records the share groups among subs of client id's session, adopted
// from dead.
func (g *adoptedGroups) add(dead, id string, filters []string) {
	var routes []string
	for _, f := range filters {
		if len(f) > len(mqtt.SharePrefix) && strings.EqualFold(f[:len(mqtt.SharePrefix)+1], mqtt.SharePrefix+"/") {
			routes = append(routes, mqtt.SharedRoute(f))
		}
	}
	if dead == "" || len(routes) == 0 {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.m == nil {
		g.m = map[string]map[string][]string{}
	}
	if g.m[dead] == nil {
		g.m[dead] = map[string][]string{}
	}
	g.m[dead][id] = routes
}

// has reports whether a session adopted here from dead was in share group
// route.
func (g *adoptedGroups) has(dead, route string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, routes := range g.m[dead] {
		if slices.Contains(routes, route) {
			return true
		}
	}
	return false
}

// drop forgets client id's session, adopted from dead (it moved on, with
// its mark).
func (g *adoptedGroups) drop(dead, id string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.m[dead], id)
}

// forget forgets what was adopted from dead (its marks went).
func (g *adoptedGroups) forget(dead string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.m, dead)
}

// resendHeld sends the publishes of the released held link of the failed
// node dead on (see above): to every peer whose routes match each, and to
// the sessions here, marked HeldOf dead. Its share groups' selections go
// with it to the adopters only (as before the marks: the sessions there
// took the dead node's members). Called with the flushGate begun.
//
// For a QoS 1/2 message that carries its mark on the held link (src), it
// records where it sent it (handOvers): the acknowledgement of its
// publisher waits for those copies.
func (c *clusterNode) resendHeld(dead string, adopters []string, msgs []publishMsg) {
	self := c.node.Name()
	var recs []handOverRecord
	var local []int // the records that wait for the local delivery's writes
	for _, pm := range msgs {
		var rec *handOverRecord
		if pm.src.l != nil && pm.Packet.FixedHeader.Qos > 0 {
			recs = append(recs, handOverRecord{src: linkMark{l: pm.src.l, seq: pm.src.seq}, to: handedTo{always: pm.src.follow}})
			rec = &recs[len(recs)-1]
		}
		dropped := func() {
			if rec != nil {
				rec.to.lost = true
			}
		}
		if pm.HeldOf != "" && pm.HeldOf != dead {
			// A held copy of an earlier failure that dead, the adopter
			// it was sent to, died with: for the sessions adopted again
			// from dead that it had adopted from HeldOf (they carry
			// both marks: carriedMarks). Given as dead's own copy, it
			// would be skipped by them (heldSkip: HeldOf's link took the
			// message), lost.
			pm.Via = dead
		} else {
			pm.HeldOf = dead
		}
		shared := pm.Shared
		subs := c.routes.subscribers(pm.Packet.TopicName)
		var to []string
		for name := range subs.Subscriptions {
			to = append(to, name)
		}
		for _, members := range subs.Shared {
			for name := range members {
				to = append(to, name)
			}
		}
		to = append(to, adopters...)
		slices.Sort(to)
		to = slices.Compact(to)
		var plain, withShared [clusterProtocol + 1][]byte // by version
		for _, name := range to {
			if name == dead || name == self {
				continue
			}
			v := c.peerProtocol(name)
			if v < protoV2 && !slices.Contains(adopters, name) {
				// It cannot tell the held copy from the direct one
				// its subscribers had: it gets what the previous
				// release sent, copies for its adopted sessions only.
				continue
			}
			pm.Shared = nil
			body := &plain[v]
			if slices.Contains(adopters, name) {
				pm.Shared, body = shared, &withShared[v]
			}
			if *body == nil {
				b, err := pm.forProto(v).encode()
				if err != nil {
					c.b.limits.linkDropped(name, dropNoLink, pm.Packet.FixedHeader.Qos, 1, pm.Packet.TopicName)
					dropped()
					continue
				}
				*body = b
			}
			if p := c.peers.get(name); p != nil {
				if seq, err := p.link.QueueSeq(link.Message{Type: msgPublish, Body: *body}, true); err == nil {
					c.b.durable.reforwarded.Add(1)
					if rec != nil {
						rec.to.copies = append(rec.to.copies, linkMark{l: p.link, seq: seq, follow: true})
					}
					continue
				}
				dropped() // its queue is full: the publisher publishes again
			}
			if slices.Contains(adopters, name) {
				c.b.limits.linkDropped(name, dropNoLink, pm.Packet.FixedHeader.Qos, 1, pm.Packet.TopicName)
				dropped()
			}
		}
		pm.Shared = nil
		if slices.Contains(adopters, self) {
			pm.Shared = shared
		}
		c.deliverPublish(self, pm)
		c.b.durable.reforwarded.Add(1)
		if rec != nil && c.adopted.n.Load() > 0 {
			// Sessions adopted here may have taken it: their writes.
			local = append(local, len(recs)-1)
		}
	}
	if len(local) > 0 {
		check := c.b.durableBarrier() // after every local delivery above
		for _, i := range local {
			recs[i].to.local = check
		}
	}
	c.handOvers.add(recs, c.handOverKeep())
}

// heldDone records, for each failed node, the brokers (this one included)
// that have sent on what their held link kept for it. The mutex is a leaf.
type heldDone struct {
	mu      sync.Mutex
	done    map[string]map[string]bool // failed node → brokers done
	changed chan struct{}              // closed and replaced at each change
	gen     map[string]uint64          // failed node → its failures seen (reset)
}

// reset starts a new failure of dead: what was known of the previous one
// goes, and the timers of that one (markAfterHold) do nothing.
func (h *heldDone) reset(dead string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.done, dead)
	if h.gen == nil {
		h.gen = map[string]uint64{}
	}
	h.gen[dead]++
}

// generation returns the failures of dead seen so far.
func (h *heldDone) generation(dead string) uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gen[dead]
}

// add records node done with dead's held link.
func (h *heldDone) add(dead, node string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.done == nil {
		h.done = map[string]map[string]bool{}
	}
	if h.done[dead] == nil {
		h.done[dead] = map[string]bool{}
	}
	h.done[dead][node] = true
	if h.changed != nil {
		close(h.changed)
		h.changed = nil
	}
}

// state reports whether every node of nodes is done with dead's held link,
// and returns a channel closed at the next change.
func (h *heldDone) state(dead string, nodes []string) (bool, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.changed == nil {
		h.changed = make(chan struct{})
	}
	for _, n := range nodes {
		if !h.done[dead][n] {
			return false, h.changed
		}
	}
	return true, h.changed
}

// forget drops what is known of dead.
func (h *heldDone) forget(dead string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.done, dead)
}

// heldWaitMax bounds how long a claim of a session adopted from a failed
// node waits for every broker's held copies (cluster.claim_timeout's
// default is 2 s: the claimant is still waiting).
const heldWaitMax = 1500 * time.Millisecond

// brokersDone reports whether this node and every live peer sent on what
// they held for dead, and returns a channel closed at the next change.
// dead itself, alive again, holds nothing for itself.
func (c *clusterNode) brokersDone(dead string) (bool, <-chan struct{}) {
	nodes := []string{c.node.Name()}
	for _, p := range c.peers.aliveList() {
		// A protoV1 peer sends no msgHeldDone: not waited for (its held
		// copies reach everyone unmarked, see publishMsg.forProto).
		if p.name != dead && c.peerProtocol(p.name) >= protoV2 {
			nodes = append(nodes, p.name)
		}
	}
	ok, changed := c.heldDone.state(dead, nodes)
	select {
	case <-c.stop:
		// Stopping (close takes the peers out of the set after stop):
		// they are gone, not done.
		return false, changed
	default:
	}
	return ok, changed
}

// awaitHeld waits until every live broker sent on what it held for dead,
// at most max.
func (c *clusterNode) awaitHeld(dead string, max time.Duration) bool {
	t := time.NewTimer(max)
	defer t.Stop()
	for {
		ok, changed := c.brokersDone(dead)
		if ok {
			return true
		}
		select {
		case <-changed:
		case <-t.C:
			return false
		case <-c.stop:
			return false
		}
	}
}

// heldSent records that node (this one or a peer) sent on what it held
// for dead; once every live broker did, the marks of dead's sessions go.
func (c *clusterNode) heldSent(dead, node string) {
	c.heldDone.add(dead, node)
	if ok, _ := c.brokersDone(dead); ok {
		c.adopted.forget(dead)
		c.adoptedGroups.forget(dead)
	}
}

// markAfterHold drops the marks of dead, and what is known of the brokers
// done with it, cluster.failed_peer_hold after gossip reported dead no
// longer failed, unless it failed again since (a new generation) or
// still is: by then no broker holds a link for dead (each gives it up
// after that long), so no copy marked for it is on its way. It bounds
// the marks should a broker never say it is done (it never saw dead
// failed). after is the wait (cluster.failed_peer_hold less the time
// gone already).
func (c *clusterNode) markAfterHold(dead string, after time.Duration, stillFailed func() bool) {
	gen := c.heldDone.generation(dead)
	time.AfterFunc(after, func() {
		select {
		case <-c.stop:
			return
		default:
		}
		if c.heldDone.generation(dead) != gen || stillFailed() {
			return
		}
		c.adopted.forget(dead)
		c.adoptedGroups.forget(dead)
		c.heldDone.forget(dead)
	})
}

// restoreMark marks client id's session, restored at this node's start,
// adopted from dead at adoptedAt, if that was within
// cluster.failed_peer_hold: the node may have restarted during the
// failover, and the held copies of dead that survivors send on after it
// must still reach the session (and its direct copies marked held skip
// it). The mark goes at the end of that hold, unless this node saw dead
// fail since (then with that failure's marks: heldSent, markAfterHold;
// adoptedMarks.reset): the word of the brokers that they were done with
// dead's held link reached the process before this one, and a mark kept
// after the failover costs at most a duplicate (a held copy of a later
// failure of dead, which the session also got directly before this node
// saw that failure).
func (c *clusterNode) restoreMark(id, dead string, adoptedAt time.Time) uint64 {
	hold := c.peers.hold
	left := hold - time.Since(adoptedAt)
	if dead == "" || adoptedAt.IsZero() || hold <= 0 || left <= 0 {
		return 0
	}
	// adopted_at is another node's wall clock, maybe ahead of this one's.
	left = min(left, hold)
	gen := c.heldDone.generation(dead) // before the mark: a failure seen meanwhile keeps it
	tok := c.adopted.set(id, dead)
	// Tied to this mark (a later failure of dead may mark the session
	// again: adoptedMarks.reset) and to the failure generation seen here,
	// as moveInMarks: a failure of dead this node sees before the timer
	// (a later one, or the same one first seen by a process that restarted
	// during it) leaves the mark to that failure's words or to
	// markAfterHold. Ended by the timer in its middle, the session skipped
	// the direct copy and then the held copy of a message, lost (review
	// rv12 finding 4); kept, it costs at most a duplicate.
	time.AfterFunc(left, func() {
		if c.heldDone.generation(dead) != gen {
			return
		}
		c.adopted.clearToken(id, tok)
	})
	return tok
}

// adoptAgain marks client id's session, adopted now from the failed node
// dead: first with the marks it keeps from its stored document
// (carriedMarks, oldest first, each until the end of
// cluster.failed_peer_hold from its time: restoreMark), then "adopted
// from dead". A carried mark whose node every live broker is done with
// already is kept done, for dead's: a held copy of that node that dead
// never acknowledged still reaches the session (publishMsg.Via), and a
// message both held links took is still taken once. Checked after the
// set: a word that arrives meanwhile makes it done in heldSent.
func (c *clusterNode) adoptAgain(id string, earlier []earlierMark, dead string) {
	toks := make([]uint64, len(earlier))
	for i, e := range earlier {
		toks[i] = c.restoreMark(id, e.From, time.UnixMilli(e.At))
	}
	c.adopted.set(id, dead)
	for i, e := range earlier {
		if ok, _ := c.brokersDone(e.From); ok && toks[i] != 0 {
			c.adopted.clearToken(id, toks[i])
		}
	}
}

// moveInMarks marks client id's session, which moves in, with the marks
// it carries (oldest first; At 0: not known, now). A mark the source flags
// done is kept done. The brokers' words heard here are not asked: they may
// be of an earlier failure of the same node (the words carry no failure),
// and a mark dropped too early loses the held copies of the later one,
// where a mark kept too long costs at most a move's wait (review rv13c10:
// TestMovedInMarkOfLaterFailureStaysActive). Each mark goes at the latest
// cluster.failed_peer_hold from its time, as a restored one (restoreMark):
// a node that heard the words before the mark arrived, or that joined
// after the failure, hears none later, and a mark kept for good would
// make every move out of here wait heldWaitMax. A word that arrives after
// the marks are set clears them in heldSent.
func (c *clusterNode) moveInMarks(id string, marks []earlierMark) {
	toks := c.adopted.reset(id, marks)
	hold := c.peers.hold
	now := time.Now()
	for i, m := range marks {
		if hold <= 0 {
			continue
		}
		at := now
		if m.At > 0 {
			at = time.UnixMilli(m.At)
		}
		// adopted_at is another node's wall clock, maybe ahead of this one's.
		left := min(hold-now.Sub(at), hold)
		if left <= 0 {
			c.adopted.clearToken(id, toks[i])
			continue
		}
		tok := toks[i]
		// Tied to the failure generation seen here, as markAfterHold: a
		// later failure of the same node seen before the timer leaves the
		// mark to that failure's words or to markAfterHold; ended by the
		// timer in its middle, the session skipped the direct copy and
		// then the held copy of a message (review rv13l11 F-C).
		from, gen := m.From, c.heldDone.generation(m.From)
		time.AfterFunc(left, func() {
			if c.heldDone.generation(from) != gen {
				return
			}
			c.adopted.clearToken(id, tok)
		})
	}
}

// carriedMarks returns the marks that session s, adopted now from its
// owner, a failed node that had adopted it from another failed node D
// (and maybe D from a third), keeps, oldest first: those of failed nodes
// whose held links may still hold copies for it, or whose held copies
// may still be in the held links of its owner (within
// cluster.failed_peer_hold of the mark). The copies that reached s only
// through D's held links then still reach it where it is adopted again,
// and s skips their direct copies. Without these marks it was marked
// adopted from its owner alone, and D's held copies skipped it: lost,
// not counted.
func (c *clusterNode) carriedMarks(s *sessionDoc, now time.Time) []earlierMark {
	hold := c.peers.hold
	if hold <= 0 || s.AdoptedFrom == "" {
		return nil
	}
	var out []earlierMark
	for _, e := range append(slices.Clip(s.AdoptedEarlier), earlierMark{From: s.AdoptedFrom, At: s.AdoptedAt}) {
		if e.From == "" || e.At <= 0 || e.From == s.Owner || e.From == c.node.Name() ||
			now.Sub(time.UnixMilli(e.At)) >= hold ||
			slices.ContainsFunc(out, func(o earlierMark) bool { return o.From == e.From }) {
			continue
		}
		out = append(out, e)
	}
	return out
}

// heldHandedOver tells the cluster this node is done with dead's held link
// once it handed the link's queue to the sessions adopted from dead
// (resendReached, resendRestarted): after every forward that marked a
// message held for a failed node before the hand-over has queued its
// copies, including the re-send of one queued on the link after the
// hand-over (forwardPublish): they travel the same links, ahead of the
// msgHeldDone, so the adopters' marks, which the msgHeldDone may clear,
// are still there for them. Forwards after the hand-over mark nothing for
// dead; the wait is bounded (a publisher stalled at the flush gate).
//
// Only the forwards begun before this call are waited for (heldForwards'
// epochs): under sustained load during a failover some forward marked
// held is always under way (for dead's held link until the hand-over, or
// for another failed node's), and a wait for none at all lasted until the
// bound, where the word could go ahead of one begun before the hand-over
// (review rv12, note F-B).
func (c *clusterNode) heldHandedOver(dead string) {
	epoch := c.heldForwards.cut()
	go func() {
		t := time.NewTimer(flushWaitMax + time.Second)
		defer t.Stop()
	wait:
		for {
			busy, changed := c.heldForwards.busy(epoch)
			if !busy {
				break
			}
			select {
			case <-c.stop:
				return
			case <-changed:
			case <-t.C:
				break wait
			}
		}
		select {
		case <-c.stop:
			return
		default:
		}
		c.sendHeldDone(dead)
	}()
}

// heldForwardCount counts the forwards under way that marked their message
// held for a failed node, by the epoch they began in: each hand-over of a
// held link (heldHandedOver) ends one, and waits for the forwards of the
// epochs up to it alone. The mutex is a leaf.
type heldForwardCount struct {
	mu      sync.Mutex
	epoch   uint64         // the current epoch: hand-overs so far
	n       map[uint64]int // epoch → forwards under way begun in it
	changed chan struct{}  // closed and replaced when an epoch has none left
}

// begin counts a forward that marked its message held; end(the epoch it
// returns) when it queued its copies.
func (h *heldForwardCount) begin() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n == nil {
		h.n = map[uint64]int{}
	}
	h.n[h.epoch]++
	return h.epoch
}

// end is the end of a forward begun in epoch.
func (h *heldForwardCount) end(epoch uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n[epoch]--; h.n[epoch] > 0 {
		return
	}
	delete(h.n, epoch)
	if h.changed != nil {
		close(h.changed)
		h.changed = nil
	}
}

// cut ends the current epoch and returns it: the forwards begun so far are
// those of the epochs up to it.
func (h *heldForwardCount) cut() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.epoch++
	return h.epoch - 1
}

// busy reports whether a forward begun in an epoch up to epoch is under
// way, and returns a channel closed at the next end of an epoch's last.
func (h *heldForwardCount) busy(epoch uint64) (bool, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.changed == nil {
		h.changed = make(chan struct{})
	}
	for e := range h.n {
		if e <= epoch {
			return true, h.changed
		}
	}
	return false, h.changed
}

// sendHeldDone tells every live peer, after what this node's held link for
// dead sent on (on the same links), that it is done with it.
func (c *clusterNode) sendHeldDone(dead string) {
	body := heldDoneMsg{Dead: dead}.encode()
	for _, p := range c.peers.aliveList() {
		if p.name == dead || c.peerProtocol(p.name) < protoV2 {
			continue // it would ignore it (dead: back, it adopted nothing of its own)
		}
		if !p.link.Send(link.Message{Type: msgHeldDone, Body: body}, true) {
			c.log.Warn("held-link end not sent: link queue full; sessions adopted there move after a pause", "peer", p.name, "node", dead)
		}
	}
	c.heldSent(dead, c.node.Name())
}

// resendExpired hands what the held link of a failed peer kept, given up
// before all of its sessions were adopted (cluster.failed_peer_hold), to
// the sessions adopted from it so far: they skipped the direct copies of
// these (see above). For the others it is lost, and counted by the caller:
// the acknowledgements that wait for these messages fail (handOvers).
// Nothing is sent on for a peer that is not failed, or while this node
// stops.
func (c *clusterNode) resendExpired(l *link.Link, msgs []link.Message) {
	if !c.resending() {
		return
	}
	peer := l.Peer()
	failed := false
	for _, m := range c.members() {
		if m.Name == peer {
			failed = m.Status == cluster.StatusFailed
		}
	}
	if !failed {
		return
	}
	c.resendHeld(peer, nil, linkPublishes(nil, msgs))
	lost := make([]handOverRecord, 0, len(msgs))
	for _, m := range msgs {
		lost = append(lost, handOverRecord{src: linkMark{l: l, seq: m.Seq}, to: handedTo{lost: true}})
	}
	c.handOvers.add(lost, c.handOverKeep())
}

// resendRestarted hands what a link threw away because its peer restarted
// (a new process answered at the same address) to the sessions adopted
// from the peer, as a release would: should the peer have died and come
// back before this node released its held link, those sessions skipped
// the direct copies of these messages. For a peer none of whose sessions
// were adopted the copies reach nobody; the caller counts the messages
// lost (the peer's own sessions are gone with its process).
//
// A held link that reached a new process holds nothing more: what is
// forwarded from now on is not marked held for the peer (a new process
// drops what it gets for the old one's sessions). The flushGate keeps
// such forwards behind the re-sent copies, as at a release.
func (c *clusterNode) resendRestarted(l *link.Link, msgs []link.Message) {
	if !c.resending() {
		return
	}
	peer := l.Peer()
	c.routes.mu.Lock()
	p := c.peers.getHeld(peer)
	gate := p != nil && !p.reached.Load()
	var mark uint64
	if gate {
		c.heldFlush.begin(allAdopters)
		p.reached.Store(true)
		p.handOver.Store(false) // nothing left to hand over (resendReached)
		// A forward that read the routes before this (held, not yet
		// reached) may have queued its message on the held link after
		// the discard: in neither the discarded queue nor a re-send of
		// its own (it saw handOver still set). Handed over below, up to
		// here (review rv12a).
		mark = l.Mark()
	}
	c.routes.mu.Unlock()
	if gate {
		defer c.heldFlush.end(allAdopters)
	}
	lp := c.peers.getLinked(peer)
	if lp != nil {
		// Handed over already when gossip saw the peer alive again.
		msgs = lp.notHanded(msgs)
	}
	var to []string
	if p != nil {
		to = c.handOverTo(peer) // not for a live peer's restart: nothing was held
	}
	if gate {
		if late := l.Queued(mark); len(late) > 0 {
			if lp != nil {
				late = lp.notHanded(late)
			}
			msgs = append(slices.Clip(msgs), late...)
		}
	}
	c.resendHeld(peer, to, linkPublishes(l, msgs))
	if p != nil {
		p.resent.Store(true)
		c.unholdReached(p) // it holds nothing more for the adopted sessions
		c.heldHandedOver(peer)
	}
}

// unholdReached resumes the link of p, held while its peer was failed,
// once what it queued was handed over (resendRestarted, linkReached),
// unless gossip marked the peer failed again since: syncPeers held the
// link anew (Hold(true), under the routes' lock, with reached reset), and
// a late Hold(false) of the earlier episode would let the link write what
// is forwarded for the sessions adopted this time, which skip their
// direct copies. Decided under the routes' lock, as syncPeers holds it.
func (c *clusterNode) unholdReached(p *peer) {
	c.routes.mu.Lock()
	defer c.routes.mu.Unlock()
	if c.peers.getHeld(p.name) == p && !p.reached.Load() {
		return // held again: the newer hold stands
	}
	p.link.Hold(false)
}

// resendReached hands a copy of what the held link of a failed peer kept
// to the sessions adopted from the peer, as a release would, when that
// link is about to deliver it to the same process of the peer instead (a
// partition healed, a stopped process resumed): those sessions skipped
// the direct copies of these messages, and the peer's own copies of the
// sessions are stale (the heal ends them, and counts what they held as
// stale_session). It runs at the first of:
//
//   - the link's next connection, to the same process, while gossip still
//     reports the peer failed: its OnUp, before the queue is written
//     again (what follows is not held for the adopted sessions any more,
//     as for a restarted peer);
//   - gossip reporting the peer alive again (syncPeers): its link then
//     delivers the queue to the peer whenever it connects.
//
// What it queued up to mark goes: held messages, and what the peer never
// acknowledged before it failed. A message marked held and queued after
// mark is re-sent by its forward (forwardPublish). The flushGate keeps
// the forwards that follow behind the copies. A held link whose peer
// restarted threw its queue away, and re-sent it, instead
// (resendRestarted).
func (c *clusterNode) resendReached(p *peer, mark uint64, remember bool) {
	defer c.heldFlush.end(allAdopters)
	lms := p.link.Queued(mark)
	if remember {
		p.handedOver(lms)
	}
	msgs := linkPublishes(p.link, lms)
	if len(msgs) > 0 {
		c.log.Info("held link of a failed peer delivers to the same process again: what it held goes to the sessions adopted from the peer too",
			"peer", p.name, "messages", len(msgs))
	}
	c.resendHeld(p.name, c.handOverTo(p.name), msgs)
	p.resent.Store(true)
	c.heldHandedOver(p.name)
}

// handOverTo returns the peers a held link's hand-over sends its copies
// to, besides those whose routes match: every live peer that tells held
// copies apart (protoV2), as the peer came back before its sessions were
// all adopted, maybe, and an adopter's routes may not be here yet (a
// session installed there takes the copy by its mark: others skip it).
// Only the sessions installed after the copy arrives miss it.
func (c *clusterNode) handOverTo(dead string) []string {
	var to []string
	for _, p := range c.peers.aliveList() {
		if p.name != dead && c.peerProtocol(p.name) >= protoV2 {
			to = append(to, p.name)
		}
	}
	return to
}

// linkReached is the link's OnUp part of resendReached: the link to peer
// connected, to the same process as before (a restart was reported
// already, before OnUp).
func (c *clusterNode) linkReached(peer string) {
	p := c.peers.getLinked(peer)
	if p == nil {
		return
	}
	p.forgetHanded()
	if !p.handOver.Load() || !c.resending() {
		return
	}
	c.routes.mu.Lock()
	if c.peers.getHeld(peer) != p || !p.handOver.Swap(false) {
		c.routes.mu.Unlock()
		return
	}
	c.heldFlush.begin(allAdopters)
	p.reached.Store(true)
	mark := p.link.Mark()
	c.routes.mu.Unlock()
	c.resendReached(p, mark, false)
	c.unholdReached(p) // handed over: its queue goes to the peer, as for a peer alive again
}

// linkPublishes decodes the publishes among msgs (a link's discarded
// queue), leaving out what does not decode. With from, the held link they
// were queued on, each carries its mark there (publishMsg.src): the
// acknowledgement of its publisher follows where resendHeld sends it.
func linkPublishes(from *link.Link, msgs []link.Message) []publishMsg {
	var pms []publishMsg
	for _, m := range msgs {
		if m.Type != msgPublish {
			continue
		}
		if pm, err := decodePublish(m.Body); err == nil {
			if from != nil {
				pm.src = linkMark{l: from, seq: m.Seq}
			}
			pms = append(pms, pm)
		}
	}
	return pms
}

// resending reports whether a discarded held queue is to be sent on: with
// durability (sessions were adopted), and not while this node stops.
func (c *clusterNode) resending() bool {
	if c.b.durable == nil {
		return false
	}
	select {
	case <-c.stop:
		return false
	default:
		return true
	}
}

// filtersOf returns the filters of subs.
func filtersOf(subs []packets.Subscription) []string {
	out := make([]string, len(subs))
	for i, s := range subs {
		out[i] = s.Filter
	}
	return out
}

// subFilters returns the filters of a stored session's subscriptions.
func subFilters(subs []subDoc) []string {
	out := make([]string, len(subs))
	for i, s := range subs {
		out[i] = s.Filter
	}
	return out
}
