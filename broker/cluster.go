package broker

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"maps"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/rtm-dev/rtm/broker/link"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
)

// clusterNode is a broker's part of the cluster: its gossip membership, its
// node links to the other brokers, the routes (topic filters) each of them
// subscribes to, and the mochi hooks that forward what local clients publish
// to the peers whose routes match it, and hand sessions over when a client ID
// moves between nodes. See docs/clustering.md for the protocol.
type clusterNode struct {
	mqtt.HookBase
	b           *Broker
	cfg         config.Cluster
	log         *slog.Logger
	timing      cluster.Timing
	incarnation uint64

	node  *cluster.Node
	links *link.Server

	// remote indexes the routes of every peer, the peer's name standing for
	// the client ID: Subscribers(topic) names the peers to forward to.
	remote *mqtt.TopicsIndex

	mu          sync.Mutex
	peers       map[string]*peer               // alive brokers with a link, by name
	held        map[string]*peer               // failed brokers whose link keeps what was queued (cluster.failed_peer_hold)
	localRoutes map[string]struct{}            // filters local clients subscribe to (and share groups)
	routeVer    uint64                         // bumped by every local route change
	remoteSets  map[string]map[string]struct{} // peer → its routes, as held in remote
	remoteVer   map[string]uint64              // peer → version of its routes held
	shareNext   map[string]uint64              // share route → round-robin counter

	remoteCount atomic.Int64 // routes held in remote, all peers

	retMu     sync.Mutex
	retMeta   map[string]retainStamp // topic → who set its retained message last, and when
	lastStamp int64

	claimSeq atomic.Uint64
	claimMu  sync.Mutex
	claims   map[uint64]chan claimReplyMsg

	// testMembers, if set, rewrites the member list syncPeers sees: tests
	// make a peer look failed without stopping it.
	testMembers atomic.Pointer[func([]cluster.Member) []cluster.Member]

	forwarded, forwardedBytes, received atomic.Int64
	claimsSent, claimsTimedOut, moved   atomic.Int64

	// tls secures the node links (nil: plaintext); set by start.
	tls *tls.Config

	stop      chan struct{}
	watchOnce sync.Once
	stopOnce  sync.Once
	wg        sync.WaitGroup
}

// linkStateHeld is the state ClusterStats gives a link held for a failed
// peer (see syncPeers), whatever its connection's state.
const linkStateHeld = "held"

// peer is another broker node and the link to it.
type peer struct {
	name, linkAddr string
	link           *link.Link
	heldUntil      time.Time // while in clusterNode.held: when its queue is given up
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

func newClusterNode(b *Broker, cfg config.Cluster, timing cluster.Timing) *clusterNode {
	var seed [8]byte
	_, _ = rand.Read(seed[:])
	return &clusterNode{
		b: b, cfg: cfg, timing: timing,
		log:         b.log.With("component", "cluster"),
		incarnation: binary.LittleEndian.Uint64(seed[:]) | 1,
		remote:      mqtt.NewTopicsIndex(),
		peers:       map[string]*peer{},
		held:        map[string]*peer{},
		localRoutes: map[string]struct{}{},
		remoteSets:  map[string]map[string]struct{}{},
		remoteVer:   map[string]uint64{},
		shareNext:   map[string]uint64{},
		retMeta:     map[string]retainStamp{},
		claims:      map[uint64]chan claimReplyMsg{},
		stop:        make(chan struct{}),
	}
}

func (c *clusterNode) ID() string { return "rtm-cluster" }

func (c *clusterNode) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnWillSent || b == mqtt.OnSessionEstablish
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
		BeforeAck:   c.b.durableBarrier, // durable.go: a forwarded message is acknowledged once written
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
		Draining:    c.b.Draining(),
		Incarnation: c.b.Incarnation(),
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
	if c.node == nil {
		return
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
	want := map[string]string{}
	failed := map[string]bool{}
	for _, m := range c.members() {
		if m.Name == c.node.Name() || m.Tags.Role != cluster.RoleBroker || m.Tags.Link == "" {
			continue
		}
		switch m.Status {
		case cluster.StatusAlive:
			want[m.Name] = m.Tags.Link
		case cluster.StatusFailed:
			failed[m.Name] = true
		}
	}
	now := time.Now()
	c.mu.Lock()
	var closing, forget []*peer
	for name, p := range c.peers {
		if addr, ok := want[name]; !ok || addr != p.linkAddr {
			delete(c.peers, name)
			hold := !ok && failed[name] && c.cfg.FailedPeerHold > 0
			if !hold || c.b.durable == nil {
				// With durability, a held peer's routes stay until its
				// sessions are adopted (durable_cluster.go releaseWhenAdopted).
				c.dropRoutesLocked(name)
			}
			forget = append(forget, p)
			if hold {
				p.heldUntil = now.Add(c.cfg.FailedPeerHold)
				c.held[name] = p
				c.log.Info("peer failed: its routes are dropped; what was queued for it is kept in case it comes back",
					"peer", name, "queued", p.link.Stats().QueueLen, "hold", c.cfg.FailedPeerHold)
			} else {
				closing = append(closing, p)
			}
		}
	}
	for name, p := range c.held {
		addr, alive := want[name]
		switch {
		case alive && addr == p.linkAddr:
			delete(c.held, name)
			c.peers[name] = p
			c.log.Info("failed peer alive again: its link resends what was queued", "peer", name, "queued", p.link.Stats().QueueLen)
		case alive || !failed[name] || now.After(p.heldUntil):
			delete(c.held, name)
			closing = append(closing, p)
		}
	}
	for name, addr := range want {
		if _, ok := c.peers[name]; ok {
			continue
		}
		p := &peer{name: name, linkAddr: addr}
		p.link = link.Dial(name, addr, c.linkConfig(), func() []link.Message { return c.snapshot(name) })
		c.peers[name] = p
		c.log.Info("peer added", "peer", name, "link", addr)
	}
	// Routes of nodes that are no peer and gone from gossip (or never
	// there) and not linked to this one: a dead node's stale routes.
	inbound := c.links.Stats().Peers
	for name := range c.remoteSets {
		if _, ok := c.peers[name]; !ok && c.held[name] == nil && !inbound[name].Connected {
			if _, alive := want[name]; !alive {
				c.dropRoutesLocked(name)
			}
		}
	}
	c.mu.Unlock()
	// Forget closes the peer's inbound connection: should it be alive
	// after all, it redials and sends the routes dropped here again.
	for _, p := range forget {
		c.links.Forget(p.name)
	}
	for _, p := range closing {
		c.log.Info("peer removed: its routes are dropped", "peer", p.name)
		p.link.Close() // what is still queued is counted (discarded)
	}
}

// members is the gossip member list, as filtered by testMembers in tests.
func (c *clusterNode) members() []cluster.Member {
	ms := c.node.Members()
	if f := c.testMembers.Load(); f != nil {
		ms = (*f)(ms)
	}
	return ms
}

// dropRoutesLocked forgets every route of a peer. c.mu is held.
func (c *clusterNode) dropRoutesLocked(name string) {
	for f := range c.remoteSets[name] {
		c.remote.Unsubscribe(f, name)
	}
	c.remoteCount.Add(-int64(len(c.remoteSets[name])))
	delete(c.remoteSets, name)
	delete(c.remoteVer, name)
}

// snapshot is what a link sends first on every (re)connect: all local
// routes, then every retained message (and every clear still remembered),
// so a peer that joins or comes back converges.
func (c *clusterNode) snapshot(peerName string) []link.Message {
	c.mu.Lock()
	rm := routesMsg{Version: c.routeVer, Filters: slices.Sorted(maps.Keys(c.localRoutes))}
	c.mu.Unlock()
	out := []link.Message{{Type: msgRoutes, Body: rm.encode()}}

	c.retMu.Lock()
	meta := maps.Clone(c.retMeta)
	c.retMu.Unlock()
	held := c.b.mq.Topics.Retained.GetAll()
	for topic, pk := range held {
		if strings.HasPrefix(topic, "$SYS") {
			continue
		}
		st := meta[topic]
		m := retainedMsg{Stamp: st.at, Node: st.node, Expiry: expiryLeft(pk.Expiry), Packet: pk}
		if m.Node == "" {
			m.Node = c.node.Name()
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
	c.log.Debug("link snapshot", "peer", peerName, "routes", len(rm.Filters), "retained", len(out)-1)
	return out
}

// onRoute is mochi's TopicsIndex.OnRoute: a local filter gained its first
// subscriber or lost its last. Called with the index locked: it only
// queues messages.
func (c *clusterNode) onRoute(filter string, added bool) {
	if strings.HasPrefix(filter, "$SYS") {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.routeVer++
	if added {
		c.localRoutes[filter] = struct{}{}
	} else {
		delete(c.localRoutes, filter)
	}
	body := routeDeltaMsg{Version: c.routeVer, Added: added, Filter: filter}.encode()
	for p := range c.linkedLocked() {
		// Reliable: a delta lost to a reconnect is sent again (and ignored
		// if the snapshot that opens the new connection covers it).
		if !p.link.Send(link.Message{Type: msgRouteDelta, Body: body}, true) {
			c.log.Error("route update not queued: link queue full; the peer resyncs on reconnect", "peer", p.name, "filter", filter)
		}
	}
}

// linkedLocked yields every peer with a link: alive ones and held ones.
// Route and retained updates go to held peers too: a peer marked failed
// while its link stays connected gets no snapshot when it heals, so an
// update skipped during the suspicion would be missing for good.
func (c *clusterNode) linkedLocked() iter.Seq[*peer] {
	return func(yield func(*peer) bool) {
		for _, set := range []map[string]*peer{c.peers, c.held} {
			for _, p := range set {
				if !yield(p) {
					return
				}
			}
		}
	}
}

// OnPublish forwards what a local client publishes. It runs before mochi
// acknowledges the message, so an acknowledged QoS 1/2 message is already
// queued on every link it needs (and re-sent if a link drops). A QoS 1/2
// message that cannot be queued for every peer that needs it is refused
// (mochi answers with the code returned: rtm patch 25), and not delivered
// here either; peers that did queue it deliver it, so the publisher's
// retry may reach them twice, which QoS 1 allows.
func (c *clusterNode) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if !cl.Net.Inline {
		if err := c.forward(pk); err != nil && pk.FixedHeader.Qos > 0 {
			return pk, err
		}
	}
	return pk, nil
}

// OnWillSent forwards a will message once it was published locally. There
// is nobody to refuse: what cannot be queued is counted.
func (c *clusterNode) OnWillSent(_ *mqtt.Client, pk packets.Packet) { _ = c.forward(pk) }

// forward queues pk for every peer whose routes match it, and its retained
// state for every peer, counting each peer it could not be queued for. It
// returns the reason code to refuse a QoS 1/2 publish with if any peer was
// missed: 0x97 (quota exceeded) for a full link queue, else 0x80.
func (c *clusterNode) forward(pk packets.Packet) error {
	if strings.HasPrefix(pk.TopicName, "$SYS") {
		return nil
	}
	var refuse error
	var missed map[string]bool
	if c.remoteCount.Load() > 0 { // else no peer subscribes to anything: skip the lookup
		missed, refuse = c.forwardPublish(pk)
	}
	// A refused message is not retained here (mochi skips it), so not on
	// the peers either.
	if pk.FixedHeader.Retain && (refuse == nil || pk.FixedHeader.Qos == 0) {
		c.forwardRetained(pk, missed)
	}
	return refuse
}

// forwardPublish queues pk for the peers whose routes match it. It returns
// the peers it could not be queued for, each counted once, and the refusal
// for a QoS 1/2 publisher (see forward).
func (c *clusterNode) forwardPublish(pk packets.Packet) (map[string]bool, error) {
	subs := c.remote.Subscribers(pk.TopicName)
	if len(subs.Subscriptions) == 0 && len(subs.Shared) == 0 {
		return nil, nil // no peer wants it: nothing crosses a link
	}
	type target struct {
		p      *peer
		shared []string // share groups this peer is chosen for
	}
	targets := make([]target, 0, len(subs.Subscriptions)+len(subs.Shared))
	var missing []string // peers with matching routes and no link
	c.mu.Lock()
	for name := range subs.Subscriptions {
		p := c.peers[name]
		if p == nil {
			// Failed, and sending its routes again: it may be alive after
			// all. Its held link takes the message, resent if it heals.
			p = c.held[name]
		}
		if p == nil {
			missing = append(missing, name)
			continue
		}
		targets = append(targets, target{p: p})
	}
	for route, members := range subs.Shared {
		if _, ok := c.localRoutes[route]; ok {
			continue // a local member takes it (mochi picks one)
		}
		// Members on alive peers first; if there are none, on held ones
		// (as for plain routes above).
		pool := c.peers
		names := memberNames(members, pool)
		if len(names) == 0 {
			pool = c.held
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
		n := c.shareNext[route]
		c.shareNext[route] = n + 1
		p := pool[names[n%uint64(len(names))]]
		i := slices.IndexFunc(targets, func(t target) bool { return t.p == p })
		if i < 0 {
			targets = append(targets, target{p: p})
			i = len(targets) - 1
		}
		targets[i].shared = append(targets[i].shared, route)
	}
	c.mu.Unlock()

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

	// Encoding and queueing happen outside the lock, so publishers on
	// different connections forward in parallel; each one's messages still
	// queue in its order. Every target is tried, even after a failure, so
	// a publisher that does not retry still reaches every peer it can.
	m := publishMsg{Origin: pk.Origin, Expiry: expiryLeft(pk.Expiry), Packet: pk}
	var plain []byte // the body for peers with no share group, encoded once
	for _, t := range targets {
		body := plain
		if t.shared != nil || plain == nil {
			m.Shared = t.shared
			var err error
			if body, err = m.encode(); err != nil {
				c.log.Error("message not forwarded: cannot encode it", "topic", pk.TopicName, "peer", t.p.name, "error", err)
				fail(t.p.name, dropNoLink)
				continue
			}
			if t.shared == nil {
				plain = body
			}
		}
		if err := t.p.link.Queue(link.Message{Type: msgPublish, Body: body}, qos > 0); err != nil {
			fail(t.p.name, linkDropReason(err))
			continue
		}
		c.forwarded.Add(1)
		c.forwardedBytes.Add(int64(len(body)))
	}
	return missed, refuse
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
func (c *clusterNode) discarded(peer string, why link.Discard, msgs []link.Message) {
	if c.reforward(peer, msgs) {
		return // durable_cluster.go: sent on to the nodes that adopted the peer's sessions
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
	c.retMu.Lock()
	at := time.Now().UnixNano()
	if at <= c.lastStamp {
		at = c.lastStamp + 1
	}
	c.lastStamp = at
	c.retMeta[pk.TopicName] = retainStamp{at: at, node: c.node.Name()}
	c.retMu.Unlock()
	body, err := retainedMsg{Stamp: at, Node: c.node.Name(), Expiry: expiryLeft(pk.Expiry), Packet: pk}.encode()
	if err != nil {
		c.log.Error("retained message not forwarded: cannot encode it", "topic", pk.TopicName, "error", err)
		return
	}
	type miss struct {
		peer   string
		reason dropReason
	}
	var missed []miss
	c.mu.Lock()
	for p := range c.linkedLocked() {
		if err := p.link.Queue(link.Message{Type: msgRetained, Body: body}, true); err != nil && !counted[p.name] {
			missed = append(missed, miss{p.name, linkDropReason(err)})
		}
	}
	c.mu.Unlock()
	for _, m := range missed {
		c.b.limits.linkDropped(m.peer, m.reason, pk.FixedHeader.Qos, 1, pk.TopicName)
	}
}

// expiryLeft converts mochi's absolute expiry (unix seconds) to the
// seconds left, at least 1 so a message about to expire still does.
func expiryLeft(at int64) uint32 {
	if at <= 0 {
		return 0
	}
	return uint32(max(at-time.Now().Unix(), 1))
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
	switch m.Type {
	case msgRoutes:
		var rm routesMsg
		if rm, err = decodeRoutes(m.Body); err == nil {
			c.setRoutes(from, rm)
		}
	case msgRouteDelta:
		var d routeDeltaMsg
		if d, err = decodeRouteDelta(m.Body); err == nil {
			c.applyRoute(from, d)
		}
	case msgPublish:
		var pm publishMsg
		if pm, err = decodePublish(m.Body); err == nil {
			c.received.Add(1)
			pk := pm.Packet
			pk.Origin, pk.Created, pk.PacketID = pm.Origin, time.Now().Unix(), 0
			if pm.Expiry > 0 {
				pk.Expiry = pk.Created + int64(pm.Expiry)
			}
			var shared func(string) bool
			if len(pm.Shared) > 0 {
				shared = func(route string) bool { return slices.Contains(pm.Shared, route) }
			}
			c.b.mq.DeliverFromPeer(pk, shared)
		}
	case msgRetained:
		var rm retainedMsg
		if rm, err = decodeRetained(m.Body); err == nil {
			c.applyRetained(rm)
		}
	case msgClaim:
		var cm claimMsg
		if cm, err = decodeClaim(m.Body); err == nil {
			c.answerClaim(from, cm)
		}
	case msgClaimReply:
		var r claimReplyMsg
		if r, err = decodeClaimReply(m.Body); err == nil {
			c.claimAnswered(r)
		}
	default:
		err = fmt.Errorf("unknown message type %d", m.Type)
	}
	if err != nil {
		c.log.Error("bad message from peer ignored", "peer", from, "type", m.Type, "error", err)
	}
}

func (c *clusterNode) setRoutes(from string, rm routesMsg) {
	// Routes are kept even from a node this one has not seen join yet:
	// the link is authenticated, and gossip may simply be behind. They are
	// used once it is a peer, and dropped if gossip says it is gone.
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.remoteSets[from]
	set := make(map[string]struct{}, len(rm.Filters))
	for _, f := range rm.Filters {
		if !mqtt.IsValidFilter(f, false) {
			c.log.Warn("invalid route from peer ignored", "peer", from, "filter", f)
			continue
		}
		set[f] = struct{}{}
		if _, ok := old[f]; !ok {
			c.remote.Subscribe(from, packets.Subscription{Filter: f})
		}
	}
	for f := range old {
		if _, ok := set[f]; !ok {
			c.remote.Unsubscribe(f, from)
		}
	}
	c.remoteCount.Add(int64(len(set) - len(old)))
	c.remoteSets[from] = set
	c.remoteVer[from] = rm.Version
}

func (c *clusterNode) applyRoute(from string, d routeDeltaMsg) {
	c.mu.Lock()
	defer c.mu.Unlock()
	set, ok := c.remoteSets[from]
	if !ok || d.Version <= c.remoteVer[from] {
		return // before the snapshot, or already in it
	}
	c.remoteVer[from] = d.Version
	if !mqtt.IsValidFilter(d.Filter, false) {
		c.log.Warn("invalid route from peer ignored", "peer", from, "filter", d.Filter)
		return
	}
	_, had := set[d.Filter]
	if d.Added && !had {
		set[d.Filter] = struct{}{}
		c.remoteCount.Add(1)
		c.remote.Subscribe(from, packets.Subscription{Filter: d.Filter})
	} else if !d.Added && had {
		delete(set, d.Filter)
		c.remoteCount.Add(-1)
		c.remote.Unsubscribe(d.Filter, from)
	}
}

func (c *clusterNode) applyRetained(m retainedMsg) {
	if strings.HasPrefix(m.Packet.TopicName, "$SYS") || !mqtt.IsValidFilter(m.Packet.TopicName, true) {
		return
	}
	c.retMu.Lock()
	defer c.retMu.Unlock()
	if !c.retMeta[m.Packet.TopicName].newer(m.Stamp, m.Node) {
		return
	}
	c.retMeta[m.Packet.TopicName] = retainStamp{at: m.Stamp, node: m.Node}
	pk := m.Packet
	pk.FixedHeader.Retain = true
	pk.Created = time.Now().Unix()
	if m.Expiry > 0 {
		pk.Expiry = pk.Created + int64(m.Expiry)
	}
	c.b.mq.RetainFromPeer(pk)
}

// OnSessionEstablish runs when a client has authenticated, before mochi
// looks for its session: every peer is told, ends a connection or session
// with the same ID (DISCONNECT 0x8E) and, unless the client starts clean,
// hands the session over, which is installed here for mochi to inherit.
// The CONNECT waits one round trip, at most cluster.claim_timeout.
func (c *clusterNode) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	c.mu.Lock()
	var up []*peer
	for _, p := range c.peers {
		if p.link.Up() {
			up = append(up, p)
		}
	}
	c.mu.Unlock()
	if len(up) == 0 {
		return
	}
	id := c.claimSeq.Add(1)
	ch := make(chan claimReplyMsg, len(up))
	c.claimMu.Lock()
	c.claims[id] = ch
	c.claimMu.Unlock()
	defer func() {
		c.claimMu.Lock()
		delete(c.claims, id)
		c.claimMu.Unlock()
	}()
	body := claimMsg{ID: id, ClientID: cl.ID, Clean: pk.Connect.Clean}.encode()
	sent := 0
	for _, p := range up {
		if p.link.Send(link.Message{Type: msgClaim, Body: body}, false) {
			sent++
		}
	}
	c.claimsSent.Add(1)
	timeout := time.NewTimer(c.cfg.ClaimTimeout)
	defer timeout.Stop()
	for range sent {
		select {
		case r := <-ch:
			if r.Found && !pk.Connect.Clean {
				c.adopt(cl.ID, cl.Properties.ProtocolVersion, r)
			}
		case <-timeout.C:
			c.claimsTimedOut.Add(1)
			c.log.Warn("client ID claim: not every node answered in time; a connection with this ID may still be open elsewhere",
				"client_id", cl.ID, "timeout", c.cfg.ClaimTimeout)
			return
		}
	}
}

func (c *clusterNode) adopt(id string, version byte, r claimReplyMsg) {
	if len(r.Session.Subscriptions) == 0 && len(r.Session.Inflight) == 0 {
		return
	}
	c.b.mq.AdoptSession(id, version, r.Session)
	c.moved.Add(1)
	c.log.Debug("session moved here", "client_id", id, "subscriptions", len(r.Session.Subscriptions), "queued", len(r.Session.Inflight))
}

func (c *clusterNode) answerClaim(from string, m claimMsg) {
	sess, found := c.b.mq.DetachSession(m.ClientID)
	reply := claimReplyMsg{ID: m.ID, ClientID: m.ClientID, Found: found}
	if found && !m.Clean {
		reply.Session = sess
		// PUBLISHes move; a QoS 2 exchange half done (PUBREC/PUBREL state)
		// does not (see third_party/mochi/PATCHES.md, patch 17).
		reply.Session.Inflight = slices.DeleteFunc(sess.Inflight, func(pk packets.Packet) bool { return pk.FixedHeader.Type != packets.Publish })
	}
	if found {
		c.log.Debug("client connected to another node: session ended here", "client_id", m.ClientID, "node", from, "moved", !m.Clean)
	}
	body, err := reply.encode()
	if err != nil {
		c.log.Error("claim answer not sent: cannot encode the session", "client_id", m.ClientID, "error", err)
		return
	}
	c.mu.Lock()
	p := c.peers[from]
	c.mu.Unlock()
	if p == nil || !p.link.Send(link.Message{Type: msgClaimReply, Body: body}, true) {
		c.log.Warn("claim answer not sent: no link to the node", "client_id", m.ClientID, "node", from)
	}
}

func (c *clusterNode) claimAnswered(r claimReplyMsg) {
	c.claimMu.Lock()
	ch, ok := c.claims[r.ID]
	c.claimMu.Unlock()
	if ok {
		ch <- r // buffered for every peer asked
		return
	}
	// The CONNECT stopped waiting: keep a session that moved anyway.
	if r.Found && (len(r.Session.Subscriptions) > 0 || len(r.Session.Inflight) > 0) {
		c.log.Warn("session handed over after its CONNECT stopped waiting: adopted late", "client_id", r.ClientID)
		c.adopt(r.ClientID, 5, r)
	}
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
	c.mu.Lock()
	peers := slices.Collect(maps.Values(c.peers))
	c.mu.Unlock()
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
	c.stopWatch()
	c.mu.Lock()
	peers := slices.Collect(maps.Values(c.peers))
	peers = slices.AppendSeq(peers, maps.Values(c.held))
	c.peers, c.held = map[string]*peer{}, map[string]*peer{}
	c.mu.Unlock()
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
	c.mu.Lock()
	for _, p := range c.peers {
		s.Links = append(s.Links, p.link.Stats())
	}
	for _, p := range c.held {
		st := p.link.Stats()
		st.State = linkStateHeld
		s.Links = append(s.Links, st)
	}
	s.LocalRoutes = len(c.localRoutes)
	for name, set := range c.remoteSets {
		s.RemoteRoutes[name] = len(set)
	}
	c.mu.Unlock()
	sort.Slice(s.Links, func(i, j int) bool { return s.Links[i].Peer < s.Links[j].Peer })
	s.Forwarded, s.ForwardedBytes, s.Received = c.forwarded.Load(), c.forwardedBytes.Load(), c.received.Load()
	s.Claims, s.ClaimTimeouts, s.SessionsMoved = c.claimsSent.Load(), c.claimsTimedOut.Load(), c.moved.Load()
	return s
}

var _ mqtt.Hook = (*clusterNode)(nil)
