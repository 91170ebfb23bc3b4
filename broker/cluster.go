package broker

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker/link"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
)

// clusterNode is a broker's part of the cluster. It owns the gossip
// membership and the link server, and composes the parts that do the work
// (see doc.go for the design, the contract and the lock order):
//
//   - peers (peerSet, cluster_peers.go): one link per alive broker, kept in
//     step with gossip, held for a while when a peer fails;
//   - routes (routeTable, cluster_routes.go): the local routes sent to
//     peers and the remote routes of every peer;
//   - forwarding (cluster_forward.go): publishes, wills and retained
//     updates of local clients queued on the links that need them;
//   - retained (retainedSync, cluster_retained.go): last-writer-wins
//     retained state across nodes;
//   - claims (claimWaiters, cluster_claims.go): one connection per client
//     ID in the cluster, and the session moving with it.
type clusterNode struct {
	mqtt.HookBase
	b           *Broker
	cfg         config.Cluster
	log         *slog.Logger
	timing      cluster.Timing
	incarnation uint64

	node  *cluster.Node
	links *link.Server

	routes    *routeTable
	peers     *peerSet
	retained  *retainedSync
	claims    *claimWaiters
	moves     *moves
	owners    *owners
	relays    relays       // cluster_relay.go: moves' route windows
	adopted   adoptedMarks // cluster_failover.go: sessions adopted from failed nodes
	heldFlush flushGate    // cluster_failover.go: held links' re-sends go first
	heldDone  heldDone     // cluster_failover.go: which nodes sent on what they held for a failed one
	resume    *resumeGuard // cluster_resume.go: after a stall, publishes wait for fresh routes
	// pubMarks: *mqtt.Client → *pubMarks, with durability, what a local
	// publisher's PUBLISH in progress was queued as on links, so its
	// acknowledgement waits for the peers' (cluster_forward.go).
	pubMarks sync.Map
	// peerAckWait bounds that wait for a peer alive in gossip that neither
	// acknowledges nor loses its link (peerAckWaitDefault; tests shorten it).
	peerAckWait atomic.Int64 // a time.Duration
	// handOvers: where held links' hand-overs sent each held message,
	// for the acknowledgements that wait on it (cluster_handover.go).
	handOvers handOvers
	// heldForwards counts the forwards under way that marked their
	// message held for a failed node, by hand-over epoch
	// (cluster_failover.go, heldHandedOver).
	heldForwards heldForwardCount
	connects     connectOrder // cluster_claims.go: an older CONNECT does not take over a newer one

	// adoptedGroups: the share groups of the sessions adopted from failed
	// nodes (cluster_failover.go).
	adoptedGroups adoptedGroups
	// movedHeld: sessions adopted from failed nodes that moved on, for
	// their held copies (cluster_relay.go).
	movedHeld movedHeld
	// syncs counts the calls of syncPeers begun (before each reads the
	// member list), synced the last whose links follow what it read;
	// syncKick asks watch for one now (syncedAfter).
	syncs, synced atomic.Uint64
	syncKick      chan struct{}

	// testMembers, if set, rewrites the member list syncPeers sees: tests
	// make a peer look failed without stopping it.
	testMembers atomic.Pointer[func([]cluster.Member) []cluster.Member]
	// testMoveChunk, if set, is called before a move's chunk is sent
	// ("source") or taken in ("destination"): tests stop a node or stall
	// a move in the middle of a transfer.
	testMoveChunk atomic.Pointer[func(side string, seq uint64)]
	// testMoveDetached, if set, is called by the source of a move right
	// after it detached the session, before it sends the rest and the end.
	testMoveDetached atomic.Pointer[func(id string)]
	// testAfterForward, if set, is called after a local publish was
	// forwarded to peers, before mochi delivers it here.
	testAfterForward atomic.Pointer[func(topic string)]
	// testForwardQueued, if set, is called by a forward after it queued
	// a message for a peer, before it queues it for the next one.
	testForwardQueued atomic.Pointer[func(topic, peer string)]
	// testBeforeSync, if set, is called as syncPeers begins: tests hold
	// the links' view of membership back, as a busy watch loop would.
	testBeforeSync atomic.Pointer[func()]
	// testBeforeClose, if set, is called by syncPeers before it closes
	// the link of a peer whose routes it dropped.
	testBeforeClose atomic.Pointer[func(peer string)]
	// testBeforeClaims, if set, is called by OnSessionEstablish before it
	// sends its claims: tests hold a CONNECT there, as a slow store or
	// adoption would.
	testBeforeClaims atomic.Pointer[func(id string)]
	testRelayKeep    atomic.Int32 // > 0: replaces relayKeepMax
	testRelayBytes   atomic.Int64 // > 0: replaces relayHeldBytesMax
	// testDeliver, if set, is called before a message from a peer is
	// handled: tests hold some back, as a slow link would, or refuse it
	// (an error), as a node of an older release would.
	testDeliver atomic.Pointer[func(from string, m link.Message) error]
	// testNoSync, if set, makes syncPeers do nothing: tests hold the links
	// where they are while gossip's verdict is read elsewhere.
	testNoSync atomic.Bool
	// testProtocol > 0 replaces clusterProtocol: tests run a node that
	// speaks an older version.
	testProtocol atomic.Int32

	// peerProtos is the cluster protocol version each broker advertises
	// in gossip, by name (see peerProtocol).
	peerProtos atomic.Pointer[map[string]int]

	forwarded, forwardedBytes, received  atomic.Int64
	claimsSent, claimsTimedOut, moved    atomic.Int64
	claimsRefused, movedOut, movesFailed atomic.Int64
	// moveYields counts moves away asked to give way to a newer CONNECT
	// here (yieldTo).
	moveYields   atomic.Int64
	staleDropped atomic.Int64

	// leaving is set when a graceful stop begins: the node shows as
	// draining until it leaves gossip.
	leaving atomic.Bool

	// tls secures the node links (nil: plaintext); set by start.
	tls *tls.Config

	stop      chan struct{}
	watchOnce sync.Once
	stopOnce  sync.Once
	closed    atomic.Bool // close began: gossip and links are going
	wg        sync.WaitGroup
}

func newClusterNode(b *Broker, cfg config.Cluster, timing cluster.Timing) *clusterNode {
	var seed [8]byte
	_, _ = rand.Read(seed[:])
	c := &clusterNode{
		b: b, cfg: cfg, timing: timing,
		log:         b.log.With("component", "cluster"),
		incarnation: binary.LittleEndian.Uint64(seed[:]) | 1,
		claims:      newClaimWaiters(),
		moves:       newMoves(),
		owners: newOwners(func(id string) bool {
			_, ok := b.mq.Clients.Get(id)
			return ok
		}),
		stop:     make(chan struct{}),
		syncKick: make(chan struct{}, 1),
	}
	c.routes = newRouteTable(c.log)
	c.adopted.gen = c.heldDone.generation
	c.peers = newPeerSet(c.log, cfg.FailedPeerHold, func(name, addr string) *link.Link {
		return link.Dial(name, addr, c.linkConfig(), func() []link.Message { return c.snapshot(name) })
	})
	c.retained = newRetainedSync(b.cfg.NodeName, func() map[string]packets.Packet { return b.mq.Topics.Retained.GetAll() }, b.mq.RetainFromPeer)
	c.peerAckWait.Store(int64(peerAckWaitFor(cfg.ProbeInterval)))
	redialMax := link.DefaultRedialMax
	if timing == cluster.TimingFast {
		redialMax = 200 * time.Millisecond // linkConfig
	}
	c.resume = newResumeGuard(cfg.ProbeInterval, timing, redialMax)
	return c
}

func (c *clusterNode) ID() string { return "rtm-cluster" }

func (c *clusterNode) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnPublished || b == mqtt.OnPublishHold || b == mqtt.OnWillPublish || b == mqtt.OnWillSent || b == mqtt.OnSessionEstablish ||
		(b == mqtt.OnDisconnect && c.b.durable != nil) // frees pubMarks
}

// start binds the node link and joins gossip. The broker's listeners are
// bound already, so the tags carry real addresses.
func (c *clusterNode) start(ctx context.Context) error {
	tlsCfg, mode, err := c.linkTLS()
	if err != nil {
		return err
	}
	c.tls = tlsCfg
	lcfg := c.linkConfig()
	srv, err := link.Listen(c.cfg.LinkAddr, lcfg, link.HandlerFunc(c.deliver))
	if oe := (*net.OpError)(nil); errors.As(err, &oe) {
		return &config.ListenError{Key: "cluster.link_addr", Addr: c.cfg.LinkAddr, Err: oe}
	} else if err != nil {
		return fmt.Errorf("broker: node link: %w", err)
	}
	c.links = srv
	switch {
	case c.cfg.Secret == "" && c.tls != nil:
		c.log.Warn("cluster.secret is not set: gossip is not encrypted or authenticated; any process that reaches the gossip port can join (node links are authenticated by their certificates)")
	case c.cfg.Secret == "":
		c.log.Warn("cluster.secret is not set: gossip is not encrypted and node links are not authenticated; any process that reaches the gossip and link ports can join")
	}
	if c.tls == nil {
		c.log.Warn("node links are not encrypted: what brokers forward crosses the network in clear", "link_tls", mode)
	} else {
		c.log.Info("node links use mutual TLS", "trust", mode)
	}
	opts := cluster.Options{
		NodeName:      c.b.cfg.NodeName,
		BindAddr:      c.cfg.GossipAddr,
		Join:          c.cfg.Seeds(),
		Secret:        c.cfg.Secret,
		Timing:        c.timing,
		ProbeInterval: c.cfg.ProbeInterval,
		Tags:          c.tags(),
		Logger:        c.b.log,
	}
	if c.cfg.AdvertiseHost != "" {
		if _, port, err := net.SplitHostPort(c.cfg.GossipAddr); err == nil && port != "0" {
			opts.AdvertiseAddr = net.JoinHostPort(c.cfg.AdvertiseHost, port)
		}
	}
	node, err := cluster.New(opts)
	if err != nil {
		_ = srv.Close()
		return err
	}
	events, _ := node.Subscribe(256)
	if err := node.Start(ctx); err != nil {
		_ = srv.Close()
		return fmt.Errorf("broker: %w", err)
	}
	c.node = node
	// The tags need the advertised gossip IP when listeners bind to all
	// interfaces: set them again now that it is known.
	if err := node.SetTags(c.tags()); err != nil {
		c.log.Warn("gossip tags not updated", "error", err)
	}
	c.wg.Add(1)
	go c.watch(events)
	c.resume.last.Store(c.resume.now())
	c.wg.Add(1)
	go c.resumeWatch()
	c.log.Info("cluster started", "gossip", node.Addr(), "link", srv.Addr(), "seeds", c.cfg.Seeds())
	return nil
}

// linkTLS builds the node links' TLS configuration (nil: plaintext) from
// cluster.link_tls*, and names the trust model for the logs.
func (c *clusterNode) linkTLS() (*tls.Config, string, error) {
	switch {
	case c.cfg.LinkTLS == "off":
		return nil, "off", nil
	case c.cfg.LinkTLSCert != "":
		t, err := link.FileTLS(c.cfg.LinkTLSCert, c.cfg.LinkTLSKey, c.cfg.LinkTLSCA)
		if err != nil {
			return nil, "", fmt.Errorf("broker: cluster.link_tls_cert/key/ca: %w", err)
		}
		return t, "certificates from cluster.link_tls_ca", nil
	case c.cfg.Secret != "":
		t, err := link.SecretTLS(c.cfg.Secret)
		if err != nil {
			return nil, "", fmt.Errorf("broker: node link TLS: %w", err)
		}
		return t, "key derived from cluster.secret", nil
	}
	return nil, "auto, but neither cluster.secret nor cluster.link_tls_cert is set", nil
}

func (c *clusterNode) linkConfig() link.Config {
	lc := link.Config{
		NodeName:    c.b.cfg.NodeName,
		Incarnation: c.incarnation,
		Secret:      c.cfg.Secret,
		TLS:         c.tls,
		QueueBytes:  c.cfg.LinkQueueBytes,
		MaxFrame:    c.b.cfg.MaxPacketSize + 64<<10,
		Logger:      c.b.log,
		OnDiscard:   c.discarded,
		BeforeAck:   c.b.durableBarrier, // durable_cluster.go: a forwarded message is acknowledged once written
	}
	if c.timing == cluster.TimingFast {
		lc.RedialMax = 200 * time.Millisecond
		lc.Heartbeat = 200 * time.Millisecond
	}
	return lc
}

// peerMaxWait bounds how long a message from a peer waits for a congested
// local subscriber (see mqtt.FlowControl): the link's receive goroutine
// delivers it and neither reads pings nor writes acks meanwhile, and the
// sender drops a link silent for three heartbeats. Two heartbeats leave
// one for the acks to get through.
func (c *clusterNode) peerMaxWait() time.Duration {
	hb := c.linkConfig().Heartbeat
	if hb <= 0 {
		hb = link.DefaultHeartbeat
	}
	return 2 * hb
}

// publicAddr is the address others reach a listener at.
func (c *clusterNode) publicAddr(bound string) string {
	gossip := ""
	if c.node != nil {
		gossip = c.node.Addr()
	}
	return cluster.PublicAddr(bound, c.cfg.AdvertiseHost, gossip)
}

func (c *clusterNode) tags() cluster.Tags {
	t := cluster.Tags{
		Role:        cluster.RoleBroker,
		Version:     c.b.opts.Version,
		MQTT:        c.publicAddr(c.b.addrs[ListenerTCP]),
		WS:          c.publicAddr(c.b.addrs[ListenerWS]),
		TLS:         c.publicAddr(c.b.addrs[ListenerTLS]),
		WSS:         c.publicAddr(c.b.addrs[ListenerWSS]),
		Admin:       c.publicAddr(c.b.addrs[ListenerAdmin]),
		Capacity:    c.b.cfg.Capacity,
		Connections: int(atomic.LoadInt64(&c.b.mq.Info.ClientsConnected)),
		LoadAt:      time.Now().Unix(),
		Draining:    c.b.Draining() || c.leaving.Load(),
		Incarnation: c.b.Incarnation(),
	}
	if v := c.protocol(); v > protoV1 { // version 1 advertised none
		t.Protocol = v
	}
	if c.links != nil {
		t.Link = c.publicAddr(c.links.Addr())
	}
	if c.cfg.LinkAdvertise != "" {
		t.Link = c.cfg.LinkAdvertise
	}
	return t
}

// watch follows membership: a link to every alive broker, none to others.
// It resyncs from the full member list on every event and every
// loadCheckInterval, so an event lost to a slow reader costs at most that.
func (c *clusterNode) watch(events <-chan cluster.Event) {
	defer c.wg.Done()
	tick := time.NewTicker(loadCheckInterval)
	defer tick.Stop()
	var lastConns int
	var lastTag time.Time
	for {
		select {
		case <-c.stop:
			return
		case <-events:
		case <-c.syncKick:
		case <-tick.C:
			// Load travels in the tags, for routers: soon after it
			// changes, and at least every loadRefresh, so a router can
			// tell a quiet node from a silent one.
			if n := int(atomic.LoadInt64(&c.b.mq.Info.ClientsConnected)); n != lastConns || time.Since(lastTag) >= loadRefresh {
				lastConns, lastTag = n, time.Now()
				c.retag()
			}
		}
		c.syncPeers()
	}
}

// Load reporting in the gossip tags (see watch; docs/router.md).
const (
	loadCheckInterval = 500 * time.Millisecond
	loadRefresh       = 5 * time.Second
)

// retag gossips the node's tags now (load, draining).
func (c *clusterNode) retag() {
	if c.node == nil || c.closed.Load() {
		return // a gossip node shut down blocks SetTags for its broadcast timeout
	}
	select {
	case <-c.stop:
		// Left or shut down: memberlist would block until its broadcast
		// timeout (5 s) for tags nobody gets.
		return
	default:
	}
	if err := c.node.SetTags(c.tags()); err != nil {
		c.log.Debug("gossip tags not updated", "error", err)
	}
}

// syncPeers makes the links follow membership. A peer gossip marks failed
// may only be suspected (a lost probe, a short partition): its routes are
// dropped, so what is published from now on is not queued for it, but its
// link is held for cluster.failed_peer_hold with what was queued before,
// and resent if the same process comes back (the link tells a restarted
// one by its incarnation, and discards that queue: see link.Discard).
func (c *clusterNode) syncPeers() {
	if c.testNoSync.Load() {
		return
	}
	if f := c.testBeforeSync.Load(); f != nil {
		(*f)()
	}
	seq := c.syncs.Add(1)
	want := map[string]string{}
	failed := map[string]bool{}
	protos := map[string]int{}
	for _, m := range c.members() {
		if m.Name == c.node.Name() || m.Tags.Role != cluster.RoleBroker || m.Tags.Link == "" {
			continue
		}
		protos[m.Name] = m.Tags.Protocol
		switch m.Status {
		case cluster.StatusAlive:
			want[m.Name] = m.Tags.Link
		case cluster.StatusFailed:
			failed[m.Name] = true
		}
	}
	c.peerProtos.Store(&protos)
	// The route table is locked across the peer set's change, so no
	// forward sees a peer gone with its routes still there (lock order:
	// routes, then peers).
	c.routes.mu.Lock()
	// A peer whose held link was released (its sessions adopted) and that
	// gossip sees alive again: the release dropped its routes, including
	// a snapshot it sent on a redial after the verdict, and it sends none
	// again by itself. Its inbound connection is closed below so it
	// redials and sends them (review rv13l11 F-D). Not at the release:
	// the routes would be back while it is failed and has no link.
	var back []string
	for name := range want {
		if c.routes.releasedLocked(name) && !c.peers.isAlive(name) {
			back = append(back, name)
		}
	}
	res := c.peers.sync(want, failed, time.Now())
	if c.b.durable != nil && len(res.closing) > 0 {
		// A held link given up (cluster.failed_peer_hold) hands its
		// messages to the adopted sessions as it closes (resendExpired),
		// after its routes go below: a forward that finds them gone
		// waits for that, as at a release (cluster_failover.go), so its
		// direct copy does not reach them ahead of older held copies.
		c.heldFlush.begin(allAdopters)
		defer c.heldFlush.end(allAdopters)
	}
	if c.b.durable != nil && len(res.reached) > 0 {
		// Ended by resendReached, below.
		for range res.reached {
			c.heldFlush.begin(allAdopters)
		}
	}
	if c.b.durable != nil {
		// A held link stops writing: its peer may still be connected
		// (gossip alone cut off) and would take, and acknowledge, what
		// is forwarded for the sessions adopted from it, which skip the
		// direct copies (cluster_failover.go). Under the routes' lock,
		// so nothing marked held is written. Resumed where its queue was
		// handed over (resendReached, resendRestarted), or closed.
		for _, p := range res.held {
			p.link.Hold(true)
			// A new failure: what brokers said they sent on for an
			// earlier one does not count for this one. Before this
			// node's own hand-over or release of it can add itself.
			c.heldDone.reset(p.name)
		}
	}
	c.synced.Store(seq)
	for _, name := range res.dropRoutes {
		if c.b.durable != nil && c.peers.getHeld(name) != nil {
			// With durability, a held peer's routes stay until its
			// sessions are adopted (durable_cluster.go
			// releaseWhenAdopted): what is published for them meanwhile
			// waits in the held link and goes on to the adopters.
			continue
		}
		c.routes.dropLocked(name)
	}
	// Routes of nodes that are no peer and gone from gossip (or never
	// there) and not linked to this one: a dead node's stale routes.
	inbound := c.links.Stats().Peers
	for _, name := range c.routes.peersLocked() {
		if _, alive := want[name]; !alive && !inbound[name].Connected && !c.peers.isAlive(name) && c.peers.getHeld(name) == nil {
			c.routes.dropLocked(name)
		}
	}
	c.routes.mu.Unlock()
	for _, r := range res.reached {
		if c.b.durable != nil {
			c.resendReached(r.p, r.mark, true)
		}
	}
	for _, p := range res.unheld {
		// After the hand-over above: its queue goes to the peer. Under the
		// routes lock, unless a concurrent syncPeers held it again.
		c.unholdReached(p)
	}
	// Forget closes the peer's inbound connection: should it be alive
	// after all, it redials and sends the routes dropped here again.
	for _, p := range res.forget {
		c.links.Forget(p.name)
	}
	for _, name := range back {
		c.links.Forget(name)
	}
	for _, p := range res.closing {
		c.log.Info("peer removed: its routes are dropped", "peer", p.name)
		if f := c.testBeforeClose.Load(); f != nil {
			(*f)(p.name)
		}
		p.link.Close() // what is still queued is counted (discarded)
		c.peers.doneExpiring(p.name)
	}
}

// syncedAfter waits, at most max, until the links follow a member list
// read after the call began (syncPeers, run by watch, which it kicks), and
// reports whether they do. A part of the node that reads gossip apart, as
// the adoption watcher, calls it before it acts on what the links hold: a
// failure it saw may not be held yet. Never while this node stops (watch
// no longer syncs).
func (c *clusterNode) syncedAfter(max time.Duration) bool {
	seq := c.syncs.Load()
	select {
	case c.syncKick <- struct{}{}:
	default:
	}
	end := time.Now().Add(max)
	for c.synced.Load() <= seq {
		if time.Now().After(end) {
			return false
		}
		select {
		case <-c.stop:
			return false
		case <-time.After(5 * time.Millisecond):
		}
	}
	return true
}

// protocol is the cluster protocol version this node speaks.
func (c *clusterNode) protocol() int {
	if v := c.testProtocol.Load(); v > 0 {
		return int(v)
	}
	return clusterProtocol
}

// peerProtocol is the version of the messages this node may send to broker
// name: the lower of the two nodes' versions. A broker that advertises
// none, or that gossip no longer lists, gets protoV1's: a restarted node
// advertises its version in the gossip that announces it alive, before its
// link is dialled, so an upgrade is seen before anything is sent to it.
func (c *clusterNode) peerProtocol(name string) int {
	v := protoV1
	if m := c.peerProtos.Load(); m != nil {
		v = max(v, (*m)[name])
	}
	return min(v, c.protocol())
}

// members is the gossip member list, as filtered by testMembers in tests.
func (c *clusterNode) members() []cluster.Member {
	ms := c.node.Members()
	if f := c.testMembers.Load(); f != nil {
		ms = (*f)(ms)
	}
	return ms
}

// snapshot is what a link sends first on every (re)connect: all local
// routes, then every retained message (and every clear still remembered),
// so a peer that joins or comes back converges.
func (c *clusterNode) snapshot(peerName string) []link.Message {
	// Before anything it held is written to the peer again.
	c.linkReached(peerName)
	rm := c.routes.localSnapshot()
	// The owners list right after the routes: the ages it gives (see
	// cluster_heal.go) grow while it waits behind the retained messages.
	out := append([]link.Message{{Type: msgRoutes, Body: rm.encode()}}, c.ownersSnapshot(peerName)...)
	out = append(out, c.retained.snapshot()...)
	c.log.Debug("link snapshot", "peer", peerName, "routes", len(rm.Filters), "messages", len(out))
	return out
}

// deliver handles one message from a peer's link, in the order it sent them.
// A publish may wait here for congested local subscribers (flow control,
// at most peerMaxWait): the link's receiver, and with it the peer's
// messages behind this one, waits too, while the peer keeps them queued.
// Nothing this goroutine waits for depends on the link, so the wait cannot
// deadlock; it only delays the next messages, acks and ping answers by at
// most two heartbeats.
func (c *clusterNode) deliver(from string, m link.Message) {
	var err error
	if f := c.testDeliver.Load(); f != nil {
		if err = (*f)(from, m); err != nil {
			c.log.Error("bad message from peer ignored", "peer", from, "type", m.Type, "error", err)
			return
		}
	}
	switch m.Type {
	case msgRoutes:
		var rm routesMsg
		if rm, err = decodeRoutes(m.Body); err == nil {
			inc := c.links.Incarnation(from)
			// First the outbound link learns of a restart (its queue was
			// for the old process; it may still be redialling), then the
			// routes: a forward between the two refuses the old routes
			// (routesOfGoneLocked), never takes the new ones for the old
			// process.
			c.expectIncarnation(from, inc)
			c.routes.set(from, rm, inc)
			c.resumeSnapshot(from)
		}
	case msgRouteDelta:
		var d routeDeltaMsg
		if d, err = decodeRouteDelta(m.Body); err == nil {
			c.routes.apply(from, d)
		}
	case msgPublish:
		var pm publishMsg
		if pm, err = decodePublish(m.Body); err == nil {
			c.received.Add(1)
			c.deliverPublish(from, pm)
		}
	case msgMoveLate:
		var ml moveLateMsg
		if ml, err = decodeMoveLate(m.Body); err == nil {
			c.lateArrived(from, ml)
		}
	case msgRetained:
		var rm retainedMsg
		if rm, err = decodeRetained(m.Body); err == nil {
			c.retained.apply(rm)
		}
	case msgClaim:
		var cm claimMsg
		if cm, err = decodeClaim(m.Body); err == nil {
			c.answerClaim(from, cm)
		}
	case msgClaimReply:
		var r claimReplyMsg
		if r, err = decodeClaimReply(m.Body); err == nil {
			r.from = from
			c.claimAnswered(r)
		}
	case msgMoveStart:
		var ms moveStartMsg
		if ms, err = decodeMoveStart(m.Body); err == nil {
			c.moveStarted(from, ms)
		}
	case msgMoveChunk:
		var mc moveChunkMsg
		if mc, err = decodeMoveChunk(m.Body); err == nil {
			c.moveChunk(from, mc)
		}
	case msgMoveEnd:
		var me moveEndMsg
		if me, err = decodeMoveEnd(m.Body); err == nil {
			c.moveEnded(from, me)
		}
	case msgOwners, msgStaleIDs:
		var om ownersMsg
		if om, err = decodeOwners(m.Body); err == nil {
			if m.Type == msgOwners {
				c.reconcile(from, om)
			} else {
				c.ownersStale(from, om)
			}
		}
	case msgHeldDone:
		var hd heldDoneMsg
		if hd, err = decodeHeldDone(m.Body); err == nil {
			c.heldSent(hd.Dead, from)
		}
	case msgMoveRouted:
		var ma moveAckMsg
		if ma, err = decodeMoveAck(m.Body); err == nil {
			c.relays.routed(from, ma.Move)
		}
	case msgMoveAck, msgMoveDone:
		var ma moveAckMsg
		if ma, err = decodeMoveAck(m.Body); err == nil {
			if m.Type == msgMoveAck {
				c.moveAcked(from, ma)
			} else {
				c.moveDone(from, ma)
			}
		}
	default:
		err = fmt.Errorf("unknown message type %d", m.Type)
	}
	if err != nil {
		c.log.Error("bad message from peer ignored", "peer", from, "type", m.Type, "error", err)
	}
}

// setLeaving marks the node draining in gossip at once: routers stop
// sending it devices, and peers stop picking it for sessions.
func (c *clusterNode) setLeaving() {
	c.leaving.Store(true)
	c.retag()
}

// leave tells the cluster this node goes, bounded by ctx, so routers and
// peers drop it at once instead of detecting a failure.
func (c *clusterNode) leave(ctx context.Context) {
	if c.node == nil {
		return
	}
	// Stop following membership first: retagging a node that has left
	// blocks in memberlist until its broadcast timeout, and peers that
	// leave now need no links.
	c.stopWatch()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := c.node.Leave(ctx); err != nil {
		c.log.Warn("gossip leave not confirmed", "error", err)
	}
}

// flushWait bounds how long a graceful stop waits for peers to acknowledge
// what this node queued for them (a peer that is down cannot).
const flushWait = 5 * time.Second

// flush waits until every live peer acknowledged what is queued for it, or
// flushWait or ctx ends: the messages this node acknowledged to its
// publishers before it stopped are delivered, not discarded with the links.
func (c *clusterNode) flush(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, flushWait)
	defer cancel()
	peers := c.peers.aliveList()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		queued := 0
		for _, p := range peers {
			queued += p.link.Stats().QueueLen
		}
		if queued == 0 {
			return
		}
		select {
		case <-ctx.Done():
			c.log.Warn("stopping with messages peers have not acknowledged: they are dropped (link_closed)", "queued", queued)
			return
		case <-tick.C:
		}
	}
}

// shutdown closes the links and gossip; messages still queued are lost,
// and counted (link_closed).
func (c *clusterNode) shutdown() {
	c.stopOnce.Do(c.close)
}

func (c *clusterNode) stopWatch() {
	c.watchOnce.Do(func() {
		close(c.stop)
		c.wg.Wait()
	})
}

func (c *clusterNode) close() {
	c.closed.Store(true)
	c.stopWatch()
	peers := c.peers.takeAll()
	for _, p := range peers {
		p.link.Close()
	}
	if c.links != nil {
		_ = c.links.Close()
	}
	if c.node != nil {
		_ = c.node.Shutdown()
	}
}

// ClusterStats is the cluster as this node sees it (/v1/stats, /v1/cluster).
type ClusterStats struct {
	Node           string                       `json:"node"`
	Gossip         string                       `json:"gossip_addr"`
	Link           string                       `json:"link_addr"`
	Members        []MemberStats                `json:"members"`
	Links          []link.LinkStats             `json:"links"`
	Inbound        map[string]link.InboundStats `json:"inbound"`
	AuthFailures   int64                        `json:"link_auth_failures"`
	LocalRoutes    int                          `json:"local_routes"`
	RemoteRoutes   map[string]int               `json:"remote_routes"`
	Forwarded      int64                        `json:"messages_forwarded"`
	ForwardedBytes int64                        `json:"bytes_forwarded"`
	Received       int64                        `json:"messages_received_from_peers"`
	Claims         int64                        `json:"client_id_claims"`
	ClaimTimeouts  int64                        `json:"client_id_claim_timeouts"`
	SessionsMoved  int64                        `json:"sessions_moved_here"`
	// SessionsMovedOut counts sessions this node moved to another one and
	// that one confirmed; SessionMovesFailed those that stayed here
	// (destination gone, stalled or refused); ClaimsRefused the CONNECTs
	// refused (0x88, 3.1.1 code 3) because the client's session could not
	// be moved here.
	SessionsMovedOut   int64 `json:"sessions_moved_out"`
	SessionMovesFailed int64 `json:"session_moves_failed"`
	ClaimsRefused      int64 `json:"client_id_claims_refused"`
	// StaleSessions counts sessions (and connections) this node ended on
	// a link's opening because their client connected to another node
	// later, while this one was cut off (see cluster_heal.go).
	StaleSessions int64 `json:"stale_sessions_ended"`
}

// MemberStats is one member of the gossip cluster.
type MemberStats struct {
	Name        string `json:"name"`
	Addr        string `json:"gossip_addr"`
	Status      string `json:"status"`
	Role        string `json:"role"`
	Version     string `json:"version,omitempty"`
	MQTT        string `json:"mqtt,omitempty"`
	WS          string `json:"ws,omitempty"`
	Admin       string `json:"admin,omitempty"`
	Connections int    `json:"connections"`
	Capacity    int    `json:"capacity,omitempty"`
	Draining    bool   `json:"draining,omitempty"`
}

func (c *clusterNode) stats() *ClusterStats {
	s := &ClusterStats{Node: c.b.cfg.NodeName, RemoteRoutes: map[string]int{}}
	if c.node != nil {
		s.Gossip = c.node.Addr()
		for _, m := range c.node.Members() {
			s.Members = append(s.Members, MemberStats{Name: m.Name, Addr: m.Addr, Status: string(m.Status), Role: m.Tags.Role,
				Version: m.Tags.Version, MQTT: m.Tags.MQTT, WS: m.Tags.WS, Admin: m.Tags.Admin,
				Connections: m.Tags.Connections, Capacity: m.Tags.Capacity, Draining: m.Tags.Draining})
		}
		sort.Slice(s.Members, func(i, j int) bool { return s.Members[i].Name < s.Members[j].Name })
	}
	if c.links != nil {
		s.Link = c.links.Addr()
		ls := c.links.Stats()
		s.Inbound, s.AuthFailures = ls.Peers, ls.AuthFailures
	}
	s.Links = c.peers.linkStats()
	s.LocalRoutes, s.RemoteRoutes = c.routes.stats()
	sort.Slice(s.Links, func(i, j int) bool { return s.Links[i].Peer < s.Links[j].Peer })
	s.Forwarded, s.ForwardedBytes, s.Received = c.forwarded.Load(), c.forwardedBytes.Load(), c.received.Load()
	s.Claims, s.ClaimTimeouts, s.SessionsMoved = c.claimsSent.Load(), c.claimsTimedOut.Load(), c.moved.Load()
	s.SessionsMovedOut, s.SessionMovesFailed, s.ClaimsRefused = c.movedOut.Load(), c.movesFailed.Load(), c.claimsRefused.Load()
	s.StaleSessions = c.staleDropped.Load()
	return s
}

var _ mqtt.Hook = (*clusterNode)(nil)
