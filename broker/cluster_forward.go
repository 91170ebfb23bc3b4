package broker

import (
	"errors"
	"slices"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker/link"
)

// This file is forwarding: what local clients publish goes to the peers
// whose routes match it, retained updates to every peer, and local route
// changes to every peer as deltas.

// onRoute is mochi's TopicsIndex.OnRoute: a local filter gained its first
// subscriber or lost its last. Called with the index locked: it only
// queues messages.
func (c *clusterNode) onRoute(filter string, added bool) {
	if strings.HasPrefix(filter, "$SYS") {
		return
	}
	// The route table's lock is held while the delta is queued on every
	// link, so deltas queue in version order and a link's opening snapshot
	// (taken under the same lock) is either before or after each one.
	c.routes.mu.Lock()
	defer c.routes.mu.Unlock()
	if c.routes.pinnedLocked(filter, added) {
		return // a session holding it is moving away: removed once it moved (unpinRoutes)
	}
	c.sendRouteDeltaLocked(filter, added)
}

// sendRouteDeltaLocked records a local route change and queues it for
// every linked peer. routeTable.mu is held.
func (c *clusterNode) sendRouteDeltaLocked(filter string, added bool) {
	body := c.routes.localChangedLocked(filter, added).encode()
	c.peers.mu.Lock()
	defer c.peers.mu.Unlock()
	for p := range c.peers.linkedLocked() {
		// Reliable: a delta lost to a reconnect is sent again (and ignored
		// if the snapshot that opens the new connection covers it).
		if !p.link.Send(link.Message{Type: msgRouteDelta, Body: body}, true) {
			c.log.Error("route update not queued: link queue full; the peer resyncs on reconnect", "peer", p.name, "filter", filter)
		}
	}
}

// unpinRoutes releases the pins of a move on filters and sends the
// removals that came due meanwhile.
func (c *clusterNode) unpinRoutes(filters []string) {
	c.routes.mu.Lock()
	defer c.routes.mu.Unlock()
	for _, f := range c.routes.unpinLocked(filters) {
		c.sendRouteDeltaLocked(f, false)
	}
}

// OnPublish forwards what a local client publishes. It runs before mochi
// acknowledges the message, so an acknowledged QoS 1/2 message is already
// queued on every link it needs (and re-sent if a link drops). A QoS 1/2
// message that cannot be queued for every peer that needs it is refused
// (mochi answers with the code returned: rtm patch 25), and not delivered
// here either; peers that did queue it deliver it, so the publisher's
// retry may reach them twice, which QoS 1 allows.
//
// A message also queued on the held link of a failed peer is not
// delivered here to the sessions adopted from that peer: they get the
// held copy (cluster_failover.go).
func (c *clusterNode) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if !cl.Net.Inline {
		if pk.FixedHeader.Qos > 0 && c.b.durable != nil {
			// Whatever a refused PUBLISH before this one marked is not
			// this one's (OnPublishHold was not called for it). A read
			// of the map, no write: a publisher whose messages never
			// crossed a link has no slot.
			if v, ok := c.pubMarks.Load(cl); ok {
				v.(*pubMarks).reset()
			}
		}
		c.noteDirect(pk) // before the forward's routes are read
		held, err := c.forward(cl, pk)
		if err != nil && pk.FixedHeader.Qos > 0 {
			return pk, err
		}
		pk.Exclude = c.excludeLocal(held)
		if f := c.testAfterForward.Load(); f != nil {
			(*f)(pk.TopicName)
		}
	}
	return pk, nil
}

// OnPublished relays what a local client published at QoS 0 to the sessions moving
// away from here (cluster_relay.go). It runs after mochi delivered the
// message here, not in OnPublish with forward: a session detached between
// the two is found by neither the lookup in forward nor the local delivery
// (see doc.go, "Session moves").
func (c *clusterNode) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if !cl.Net.Inline && pk.FixedHeader.Qos == 0 {
		_ = c.relayLocal(pk, nil)
	}
}

// OnPublishHold relays a QoS 1/2 publish of a client here, as OnPublished
// does a QoS 0 one, but before its acknowledgement (mochi calls it after
// the local delivery, before the PUBACK/PUBREC): a relay that cannot hold
// the message fails the acknowledgement (the connection closes without it
// and the client publishes again) rather than following it with a drop.
//
// With durability, the acknowledgement also waits until every peer the
// message was queued for (forwardPublish, sendLate) has acknowledged it on
// the link, which it does once the message is safe there
// (durableBarrier): a link's queue is memory only, so a PUBACK sent while
// the message sat in it would be lost with this node. A message held on
// the link of a failed peer is followed to where the failover hands it
// on, and waited for there (cluster_handover.go). See docs/clustering.md,
// "A PUBACK means durable".
func (c *clusterNode) OnPublishHold(cl *mqtt.Client, pk packets.Packet) func() error {
	if cl.Net.Inline {
		return nil
	}
	var pm *pubMarks
	if c.b.durable != nil {
		if c.relays.n.Load() > 0 {
			pm = c.slot(cl) // a relay may queue it on a link
		} else if v, ok := c.pubMarks.Load(cl); ok {
			pm = v.(*pubMarks)
		}
	}
	if err := c.relayLocal(pk, pm); err != nil {
		pm.reset()
		return func() error { return err }
	}
	return c.settledWait(pm, pk.FixedHeader.Qos == 2)
}

// OnDisconnect frees the marks of a publisher whose connection ended and
// releases its acknowledgements still waiting for peers (they are not
// sent: the connection is gone).
func (c *clusterNode) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	if v, ok := c.pubMarks.LoadAndDelete(cl); ok {
		close(v.(*pubMarks).done)
	}
}

// pubMarks are the link messages one publisher's PUBLISH in progress was
// queued as, for OnPublishHold. A client's publishes are handled one at a
// time on its read loop, which alone touches marks; the slot is made at
// the first PUBLISH that crossed a link and lives as long as the
// connection (OnDisconnect).
type pubMarks struct {
	marks []linkMark
	done  chan struct{} // closed by OnDisconnect
}

// linkMark is one message queued on a link: seq on l. follow: a publish,
// which the failover hands on should the link be held (its peer failed):
// the acknowledgement waits for it where it was handed (ackWait).
type linkMark struct {
	l      *link.Link
	seq    uint64
	follow bool
}

func (pm *pubMarks) reset() {
	if pm != nil {
		clear(pm.marks)
		pm.marks = pm.marks[:0]
	}
}

// mark records that pub's PUBLISH in progress was queued as seq on l.
func (c *clusterNode) mark(pub *mqtt.Client, l *link.Link, seq uint64) {
	pm := c.slot(pub)
	pm.marks = append(pm.marks, linkMark{l: l, seq: seq, follow: true})
}

// slot returns pub's pubMarks, made at its first use.
func (c *clusterNode) slot(pub *mqtt.Client) *pubMarks {
	v, ok := c.pubMarks.Load(pub)
	if !ok {
		v, _ = c.pubMarks.LoadOrStore(pub, &pubMarks{done: make(chan struct{})})
	}
	return v.(*pubMarks)
}

// Why an acknowledgement held for peers is not sent.
var (
	errPublisherGone = errors.New("publisher disconnected before the peers acknowledged its message")
	errNodeStopping  = errors.New("node stopping before the peers acknowledged the message")
	errForwardLost   = errors.New("a peer's link threw the message away (the peer restarted or left) before acknowledging it")
	errPeerAckSlow   = errors.New("a peer did not acknowledge the message on its link in time")
)

// peerAckWaitDefault is how long a publisher's acknowledgement waits for
// a peer that stays alive in gossip and connected but does not acknowledge
// (its store is down, its link stalls): longer than failure detection
// (about 6 s by default), which holds the link of a peer that died; past
// it the publisher's connection is closed without the acknowledgement and
// the client publishes again. A held message gets as much again for its
// hand-over (ackWait).
const peerAckWaitDefault = 10 * time.Second

// peerAckWaitFor is peerAckWaitDefault, or longer with a probe interval
// slower than the default 1 s: failure detection takes about six probe
// intervals, and a wait that ended before it would close the connection of
// every publisher whose message waits for a dead peer, where the verdict
// would have settled it.
func peerAckWaitFor(probe time.Duration) time.Duration {
	return max(peerAckWaitDefault, 10*probe)
}

// settledWait takes pm's marks and returns a wait for all of them to be
// safe (ackWait.await), or nil if there are none. It returns early, with
// an error, if the publisher disconnects (not for a QoS 2 PUBLISH, qos2),
// the node stops or the bound passes.
//
// A QoS 2 PUBLISH's wait goes on after its connection ended: its outcome
// decides whether the session owes the PUBREC (mochi patch 123). The
// client, reconnected, sends the PUBLISH again (DUP), and that one is
// answered once this wait is known: a success sends the PUBREC and
// publishes nothing twice; a failure closes the connection and the next
// resend is published anew. Failing it when the connection ended made
// every such resend a second copy for the subscribers.
func (c *clusterNode) settledWait(pm *pubMarks, qos2 bool) func() error {
	if pm == nil || len(pm.marks) == 0 {
		return nil
	}
	marks := slices.Clone(pm.marks)
	pm.reset()
	done := pm.done
	if qos2 {
		done = nil // never ready: the wait ends settled, lost, timed out, or at the node's stop
	}
	start := time.Now() // the bound counts from the PUBLISH (ackWait)
	return func() error {
		w := ackWait{c: c, done: done, start: start}
		defer w.stop()
		for _, m := range marks {
			if err := w.await(m); err != nil {
				return err
			}
		}
		return nil
	}
}

// OnWillPublish forwards a will message before mochi publishes it here
// (rtm patch 28), as OnPublish does a client's PUBLISH: a will the held
// link of a failed peer took too is not delivered here to the sessions
// adopted from that peer (the Exclude set here goes with the packet to the
// local delivery and to OnWillSent); they get the held copy. There is
// nobody to refuse: what cannot be queued is counted.
func (c *clusterNode) OnWillPublish(_ *mqtt.Client, pk packets.Packet) packets.Packet {
	held, _ := c.forward(nil, pk)
	pk.Exclude = c.excludeLocal(held)
	return pk
}

// OnWillSent relays a will once it was published here, as OnPublished
// does a client's message.
func (c *clusterNode) OnWillSent(_ *mqtt.Client, pk packets.Packet) {
	_ = c.relayLocal(pk, nil)
}

// forward queues pk for every peer whose routes match it, and its retained
// state for every peer, counting each peer it could not be queued for. It
// returns the failed peers whose held links took pk, and the reason code to
// refuse a QoS 1/2 publish with if any peer was missed: 0x97 (quota
// exceeded) for a full link queue, else 0x80. If pk is for a session
// adopted here from a failed node whose held link this node is releasing,
// it returns after the re-sends (flushGate), so the local delivery that
// follows comes after them too. pub is the publisher (nil for a will).
func (c *clusterNode) forward(pub *mqtt.Client, pk packets.Packet) ([]string, error) {
	if strings.HasPrefix(pk.TopicName, "$SYS") {
		return nil, nil
	}
	c.awaitFreshRoutes(pub) // cluster_resume.go: after a stall
	var refuse error
	var missed map[string]bool
	var held []string
	waited := false
	if c.routes.count.Load() > 0 { // else no peer subscribes to anything: skip the lookup
		missed, held, waited, refuse = c.forwardPublish(pub, pk)
	}
	// A refused message is not retained here (mochi skips it), so not on
	// the peers either.
	if pk.FixedHeader.Retain && (refuse == nil || pk.FixedHeader.Qos == 0) {
		c.forwardRetained(pk, missed)
	}
	// Once per publish: forwardPublish's wait covered the local delivery
	// too (a release that begins after its route lookup left this
	// message's copies marked for the held link: see exclude).
	if !waited && c.heldFlush.needed(c.node.Name()) && c.adoptedSubscriber(pk.TopicName) {
		c.heldFlush.wait(pub)
	}
	return held, refuse
}

// forwardPublish queues pk for the peers whose routes match it. It returns
// the peers it could not be queued for, each counted once, the failed
// peers whose held links took it, whether it waited for a release's
// re-sends, and the refusal for a QoS 1/2 publisher (see forward).
func (c *clusterNode) forwardPublish(pub *mqtt.Client, pk packets.Packet) (map[string]bool, []string, bool, error) {
	subs := c.routes.subscribers(pk.TopicName)
	if len(subs.Subscriptions) == 0 && len(subs.Shared) == 0 {
		return nil, nil, false, nil // no peer wants it: nothing crosses a link
	}
	type target struct {
		p      *peer
		shared []string // share groups this peer is chosen for
		held   bool     // p failed: its held link takes it (the failover's to hand on)
	}
	targets := make([]target, 0, len(subs.Subscriptions)+len(subs.Shared))
	var missing []string // peers with matching routes and no link
	var held []string    // failed peers whose held link takes it
	var gone []string    // routes of a process its link no longer reaches
	skipped := false     // a released peer's route matched
	c.routes.mu.Lock()
	c.peers.mu.Lock()
	for name := range subs.Subscriptions {
		p := c.peers.alive[name]
		if c.routesOfGoneLocked(p) {
			gone = append(gone, name)
			continue
		}
		if p == nil {
			// Failed, and sending its routes again: it may be alive after
			// all. Its held link takes the message, resent if it heals.
			// Not once its link reached the peer again, a new process
			// or the same one: nothing is held for the adopted sessions
			// any more (resendRestarted, resendReached).
			if p = c.peers.held[name]; p != nil && !p.reached.Load() {
				held = append(held, name)
			}
		}
		if p == nil {
			if c.routes.releasedLocked(name) {
				// Its held link was released (its sessions adopted) after
				// the lookup above: the adopters' routes took over.
				skipped = true
				continue
			}
			missing = append(missing, name)
			continue
		}
		targets = append(targets, target{p: p, held: c.peers.alive[name] == nil})
	}
	for route, members := range subs.Shared {
		if c.routes.hasLocalLocked(route) {
			continue // a local member takes it (mochi picks one)
		}
		// Members on alive peers first; if there are none, on held ones
		// (as for plain routes above).
		pool := c.peers.alive
		names := memberNames(members, pool)
		heldPool := len(names) == 0
		if heldPool {
			pool = c.peers.held
			names = memberNames(members, pool)
		}
		if len(names) == 0 {
			for name := range members {
				missing = append(missing, name) // one is enough to count the group
				break
			}
			continue
		}
		slices.Sort(names)
		n := c.routes.nextShareLocked(route)
		p := pool[names[n%uint64(len(names))]]
		if !heldPool && c.routesOfGoneLocked(p) {
			gone = append(gone, p.name)
			continue
		}
		i := slices.IndexFunc(targets, func(t target) bool { return t.p == p })
		if i < 0 {
			targets = append(targets, target{p: p, held: heldPool})
			i = len(targets) - 1
		}
		targets[i].shared = append(targets[i].shared, route)
	}
	if len(held) > 0 {
		// Counted under the routes' lock, as a hand-over of a held link
		// begins: its msgHeldDone waits for this forward's copies
		// (heldHandedOver).
		epoch := c.heldForwards.begin()
		defer c.heldForwards.end(epoch)
	}
	c.peers.mu.Unlock()
	c.routes.mu.Unlock()

	qos := pk.FixedHeader.Qos
	var refuse error
	var missed map[string]bool
	fail := func(peer string, reason dropReason) {
		c.b.limits.linkDropped(peer, reason, qos, 1, pk.TopicName)
		if missed == nil {
			missed = map[string]bool{}
		}
		missed[peer] = true
		if refuse == nil || reason == dropLinkQueueFull {
			refuse = packets.ErrUnspecifiedError
			if reason == dropLinkQueueFull {
				refuse = packets.ErrQuotaExceeded
			}
		}
	}
	for _, name := range missing {
		fail(name, dropNoLink)
	}
	slices.Sort(gone)
	for _, name := range slices.Compact(gone) {
		fail(name, dropPeerRestarted)
	}
	// Encoding and queueing happen outside the lock, so publishers on
	// different connections forward in parallel; each one's messages still
	// queue in its order. Every target is tried, even after a failure, so
	// a publisher that does not retry still reaches every peer it can.
	// Behind the re-sends of a held link released meanwhile (its routes
	// are gone from what was read above), if this message can meet them:
	// it goes to an adopter, or to a session adopted here, this node being
	// an adopter (cluster_failover.go). Publishers whose messages go
	// elsewhere do not wait.
	waited := false
	if c.heldFlush.n.Load() > 0 {
		names := make([]string, 0, len(targets))
		for _, t := range targets {
			names = append(names, t.p.name)
		}
		if skipped || c.heldFlush.needed(names...) ||
			(c.heldFlush.needed(c.node.Name()) && c.adoptedSubscriber(pk.TopicName)) {
			c.heldFlush.wait(pub)
			waited = true
		}
	}
	m := publishMsg{Origin: pk.Origin, Expiry: expiryLeft(pk.Expiry), Packet: pk, Held: held}
	var plain [clusterProtocol + 1][]byte // the body for peers with no share group, by version, encoded once
	for _, t := range targets {
		v := c.peerProtocol(t.p.name)
		body := plain[v]
		if t.shared != nil || body == nil {
			m.Shared = t.shared
			var err error
			if body, err = m.forProto(v).encode(); err != nil {
				c.log.Error("message not forwarded: cannot encode it", "topic", pk.TopicName, "peer", t.p.name, "error", err)
				fail(t.p.name, dropNoLink)
				continue
			}
			if t.shared == nil {
				plain[v] = body
			}
		}
		seq, err := t.p.link.QueueSeq(link.Message{Type: msgPublish, Body: body}, qos > 0)
		if err != nil {
			fail(t.p.name, linkDropReason(err))
			continue
		}
		if qos > 0 && pub != nil && c.b.durable != nil {
			// Its acknowledgement waits for the peer's (OnPublishHold),
			// or, a held link's, for the copies the failover hands on.
			c.mark(pub, t.p.link, seq)
		}
		c.forwarded.Add(1)
		c.forwardedBytes.Add(int64(len(body)))
		if f := c.testForwardQueued.Load(); f != nil {
			(*f)(pk.TopicName, t.p.name)
		}
		if slices.Contains(held, t.p.name) && !t.p.handOver.Load() {
			// Queued, marked held, on a held link that since reached
			// the peer again (a new process, or the same one: then it
			// gets it, for sessions that are stale), or whose peer
			// gossip sees alive again: maybe after what the link's
			// queue handed to the adopted sessions, which skip the
			// direct copy. They get it here, as resendRestarted and
			// resendReached send the rest (maybe twice).
			rm := m
			rm.Shared = nil
			// Its acknowledgement follows these copies, whatever the
			// link does with the message (follow: always).
			rm.src = linkMark{l: t.p.link, seq: seq, follow: true}
			// To the adopters too, whose routes may not be here yet,
			// as resendReached and resendRestarted send (review rv12a).
			c.resendHeld(t.p.name, c.handOverTo(t.p.name), []publishMsg{rm})
		}
	}
	return missed, held, waited, refuse
}

// routesOfGoneLocked reports whether the alive peer p (nil: none) is
// reached by its link as another process than the one whose routes this
// node holds: the peer restarted and its link reached the new process
// before the new process's routes came (or before this node's links
// followed gossip: a node stopped while the peer died and restarted). The
// new process has no session for those routes (with durability, the old
// one's were adopted elsewhere), so what is forwarded on them would be
// acknowledged on the link and reach nobody. With durability the
// publish is refused instead (counted peer_restarted), and the client's
// retry goes by the new routes. routeTable.mu and peerSet.mu are held.
func (c *clusterNode) routesOfGoneLocked(p *peer) bool {
	return p != nil && c.b.durable != nil && c.routes.ofOtherProcessLocked(p.name, p.link.PeerIncarnation())
}

// adoptedSubscriber reports whether a session here that was adopted from a
// failed node subscribes to topic: only a release's wait asks (a lookup of
// the local subscribers).
func (c *clusterNode) adoptedSubscriber(topic string) bool {
	if c.adopted.n.Load() == 0 {
		return false
	}
	subs := c.b.mq.Topics.Subscribers(topic)
	for id := range subs.Subscriptions {
		if len(c.adopted.list(id)) > 0 {
			return true
		}
	}
	for _, members := range subs.Shared {
		for id := range members {
			if len(c.adopted.list(id)) > 0 {
				return true
			}
		}
	}
	return false
}

// memberNames returns the names of the share group's members found in pool.
func memberNames(members map[string]packets.Subscription, pool map[string]*peer) []string {
	var names []string
	for name := range members {
		if _, ok := pool[name]; ok {
			names = append(names, name)
		}
	}
	return names
}

// linkDropReason is the drop reason of a link.Queue error.
func linkDropReason(err error) dropReason {
	switch {
	case errors.Is(err, link.ErrQueueFull):
		return dropLinkQueueFull
	case errors.Is(err, link.ErrOversize):
		return dropLinkOversize
	default: // closed while a peer was removed
		return dropNoLink
	}
}

// discarded is link.Config.OnDiscard: publishes a link threw away are
// counted by reason and QoS. Retained updates are not: a peer that comes
// back gets every retained message in its link's opening snapshot.
func (c *clusterNode) discarded(l *link.Link, why link.Discard, msgs []link.Message) {
	peer := l.Peer()
	if c.reforward(l, msgs) {
		return // durable_cluster.go: sent on to the nodes that adopted the peer's sessions
	}
	switch why {
	case link.DiscardClosed:
		c.resendExpired(l, msgs)
	case link.DiscardRestarted:
		c.resendRestarted(l, msgs)
	}
	reason := dropLinkClosed
	switch why {
	case link.DiscardRestarted:
		reason = dropPeerRestarted
	case link.DiscardUnreliable:
		reason = dropLinkReset
	}
	var n [3]int64
	topic := ""
	for _, m := range msgs {
		if m.Type != msgPublish {
			continue
		}
		pm, err := decodePublish(m.Body)
		if err != nil {
			continue
		}
		if q := pm.Packet.FixedHeader.Qos; q <= 2 {
			n[q]++
		}
		topic = pm.Packet.TopicName
	}
	for q, k := range n {
		if k > 0 {
			c.b.limits.linkDropped(peer, reason, byte(q), k, topic)
		}
	}
}

// forwardRetained tells every peer the topic's new retained message (or its
// clear), whatever their routes: a later subscriber on any node gets it.
// A peer it cannot be queued for is counted (unless counted already, in
// counted, for the same message as a publish); it gets the message in the
// snapshot that opens its link's next connection.
func (c *clusterNode) forwardRetained(pk packets.Packet, counted map[string]bool) {
	body, err := c.retained.stamp(pk).encode()
	if err != nil {
		c.log.Error("retained message not forwarded: cannot encode it", "topic", pk.TopicName, "error", err)
		return
	}
	type miss struct {
		peer   string
		reason dropReason
	}
	var missed []miss
	c.peers.mu.Lock()
	for p := range c.peers.linkedLocked() {
		if err := p.link.Queue(link.Message{Type: msgRetained, Body: body}, true); err != nil && !counted[p.name] {
			missed = append(missed, miss{p.name, linkDropReason(err)})
		}
	}
	c.peers.mu.Unlock()
	for _, m := range missed {
		c.b.limits.linkDropped(m.peer, m.reason, pk.FixedHeader.Qos, 1, pk.TopicName)
	}
}
