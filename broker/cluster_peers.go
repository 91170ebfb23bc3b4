package broker

import (
	"iter"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rtm-dev/rtm/broker/link"
)

// linkStateHeld is the state ClusterStats gives a link held for a failed
// peer (see peerSet.sync), whatever its connection's state.
const linkStateHeld = "held"

// peer is another broker node and the link to it.
type peer struct {
	name, linkAddr string
	link           *link.Link
	heldUntil      time.Time // while in peerSet.held: when its queue is given up
	// reached: while in peerSet.held, its link reached the peer again, a
	// new process (resendRestarted) or the same one after a partition
	// (resendReached): what is forwarded to it is no longer held for the
	// sessions adopted from it.
	reached atomic.Bool
	resent  atomic.Bool // reached, and what its link held was re-sent
	// handOver: the peer is held, and what its link queued was not yet
	// handed to the sessions adopted from it: should the link deliver
	// that to the same process of the peer instead, they get a copy
	// (cluster_failover.go, resendReached).
	handOver atomic.Bool
	// handed holds the bodies handed over when gossip saw the peer alive
	// again, until its link's next connection: should that reach a new
	// process, which throws them away, they are not re-sent a second time
	// (resendRestarted). The mutex is a leaf.
	handMu sync.Mutex
	handed map[*byte]bool
}

// handedOver records the bodies of msgs as handed over.
func (p *peer) handedOver(msgs []link.Message) {
	p.handMu.Lock()
	defer p.handMu.Unlock()
	for _, m := range msgs {
		if len(m.Body) > 0 {
			if p.handed == nil {
				p.handed = map[*byte]bool{}
			}
			p.handed[&m.Body[0]] = true
		}
	}
}

// notHanded returns msgs without those handed over already, and forgets
// them.
func (p *peer) notHanded(msgs []link.Message) []link.Message {
	p.handMu.Lock()
	defer p.handMu.Unlock()
	if len(p.handed) == 0 {
		return msgs
	}
	out := make([]link.Message, 0, len(msgs))
	for _, m := range msgs {
		if len(m.Body) == 0 || !p.handed[&m.Body[0]] {
			out = append(out, m)
		}
	}
	p.handed = nil
	return out
}

// forgetHanded forgets the bodies handed over: its link reached the same
// process, which gets them (no restart threw them away).
func (p *peer) forgetHanded() {
	p.handMu.Lock()
	p.handed = nil
	p.handMu.Unlock()
}

// reachedPeer is a held peer gossip sees alive again, with the last seq
// (link.Mark) its link queued while it was held.
type reachedPeer struct {
	p    *peer
	mark uint64
}

// peerSet keeps one outgoing link per broker gossip says is alive, and
// holds the links of peers gossip marks failed for cluster.failed_peer_hold
// with what was queued for them (a failed peer may only be suspected).
// It knows nothing of routes: sync tells its caller whose routes to drop.
//
// Its mutex comes after routeTable's and before any link's (see doc.go).
type peerSet struct {
	log  *slog.Logger
	hold time.Duration // cluster.failed_peer_hold
	// dial opens the link to a new peer.
	dial func(name, addr string) *link.Link

	mu    sync.Mutex
	alive map[string]*peer // alive brokers with a link, by name
	held  map[string]*peer // failed brokers whose link keeps what was queued
	// expiring: failed brokers whose held link ran out of
	// cluster.failed_peer_hold and is closing, handing its queue to the
	// sessions adopted so far (resendExpired), until doneExpiring.
	expiring map[string]bool
}

func newPeerSet(log *slog.Logger, hold time.Duration, dial func(name, addr string) *link.Link) *peerSet {
	return &peerSet{log: log, hold: hold, dial: dial, alive: map[string]*peer{}, held: map[string]*peer{}}
}

// syncResult is what the caller of peerSet.sync does next, outside the
// peer set's lock.
type syncResult struct {
	dropRoutes []string      // peers no longer alive: their routes go
	forget     []*peer       // their inbound connection is closed (see syncPeers)
	closing    []*peer       // their link is closed
	reached    []reachedPeer // held peers alive again (cluster_failover.go, resendReached)
	held       []*peer       // peers held from now on
	unheld     []*peer       // held peers alive again, at the same link address
}

// sync makes the links follow membership: want holds the alive brokers
// (name → link address), failed the ones gossip marks failed.
func (s *peerSet) sync(want map[string]string, failed map[string]bool, now time.Time) syncResult {
	var res syncResult
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, p := range s.alive {
		if addr, ok := want[name]; !ok || addr != p.linkAddr {
			delete(s.alive, name)
			res.dropRoutes = append(res.dropRoutes, name)
			res.forget = append(res.forget, p)
			if !ok && failed[name] && s.hold > 0 {
				p.heldUntil = now.Add(s.hold)
				p.reached.Store(false)
				p.resent.Store(false)
				p.handOver.Store(true)
				s.held[name] = p
				res.held = append(res.held, p)
				s.log.Info("peer failed: its routes are dropped; what was queued for it is kept in case it comes back",
					"peer", name, "queued", p.link.Stats().QueueLen, "hold", s.hold)
			} else {
				res.closing = append(res.closing, p)
			}
		}
	}
	for name, p := range s.held {
		addr, alive := want[name]
		switch {
		case alive && addr == p.linkAddr:
			delete(s.held, name)
			s.alive[name] = p
			res.unheld = append(res.unheld, p)
			// What its link queued while held goes to the peer: the
			// sessions adopted from it get a copy (resendReached).
			// What is queued from now on is not held: they get their
			// direct copies.
			if p.handOver.Swap(false) {
				res.reached = append(res.reached, reachedPeer{p, p.link.Mark()})
			}
			s.log.Info("failed peer alive again: its link resends what was queued", "peer", name, "queued", p.link.Stats().QueueLen)
		case alive || !failed[name] || now.After(p.heldUntil):
			delete(s.held, name)
			if !alive && failed[name] {
				if s.expiring == nil {
					s.expiring = map[string]bool{}
				}
				s.expiring[name] = true
			}
			if (alive || !failed[name]) && p.handOver.Swap(false) {
				// Back at another link address (a new process), or gone
				// from gossip (it left, or was reaped): the link closes
				// with its queue, which the sessions adopted from it get
				// first, as above (an expired hold hands it over as it
				// closes: resendExpired).
				res.reached = append(res.reached, reachedPeer{p, p.link.Mark()})
			}
			res.closing = append(res.closing, p)
		}
	}
	for name, addr := range want {
		if _, ok := s.alive[name]; ok {
			continue
		}
		s.alive[name] = &peer{name: name, linkAddr: addr, link: s.dial(name, addr)}
		s.log.Info("peer added", "peer", name, "link", addr)
	}
	return res
}

// isExpiring reports whether name's held link ran out of its hold and is
// still closing (see expiring).
func (s *peerSet) isExpiring(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.expiring[name]
}

// doneExpiring records that name's expired held link is closed, its queue
// handed over.
func (s *peerSet) doneExpiring(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.expiring, name)
}

// isAlive reports whether name is an alive peer with a link.
func (s *peerSet) isAlive(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.alive[name]
	return ok
}

// get returns the alive peer name, or nil.
func (s *peerSet) get(name string) *peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.alive[name]
}

// getHeld returns the held peer name, or nil.
func (s *peerSet) getHeld(name string) *peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.held[name]
}

// getLinked returns the peer name, alive or held, or nil.
func (s *peerSet) getLinked(name string) *peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.alive[name]; p != nil {
		return p
	}
	return s.held[name]
}

// releaseHeld removes the held peer name and returns it, or nil.
func (s *peerSet) releaseHeld(name string) *peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.held[name]
	delete(s.held, name)
	return p
}

// up returns the alive peers whose link is connected now.
func (s *peerSet) up() []*peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	var up []*peer
	for _, p := range s.alive {
		if p.link.Up() {
			up = append(up, p)
		}
	}
	return up
}

// aliveList returns the alive peers.
func (s *peerSet) aliveList() []*peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Collect(maps.Values(s.alive))
}

// linkedLocked yields every peer with a link: alive ones and held ones.
// Route and retained updates go to held peers too: a peer marked failed
// while its link stays connected gets no snapshot when it heals, so an
// update skipped during the suspicion would be missing for good. mu is held.
func (s *peerSet) linkedLocked() iter.Seq[*peer] {
	return func(yield func(*peer) bool) {
		for _, set := range []map[string]*peer{s.alive, s.held} {
			for _, p := range set {
				if !yield(p) {
					return
				}
			}
		}
	}
}

// takeAll empties the set and returns every peer it held, alive and held.
func (s *peerSet) takeAll() []*peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	peers := slices.Collect(maps.Values(s.alive))
	peers = slices.AppendSeq(peers, maps.Values(s.held))
	s.alive, s.held = map[string]*peer{}, map[string]*peer{}
	return peers
}

// linkStats returns the stats of every link, held ones marked so.
func (s *peerSet) linkStats() []link.LinkStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []link.LinkStats
	for _, p := range s.alive {
		out = append(out, p.link.Stats())
	}
	for _, p := range s.held {
		st := p.link.Stats()
		st.State = linkStateHeld
		out = append(out, st)
	}
	return out
}

// expectIncarnation tells the outbound link of the live peer name that
// the peer now runs as process inc (deliver: the routes of a restarted
// peer, on its own connection here), so the link does not keep the old
// process's queue and identity while it waits out its redial backoff
// (link.Link.ExpectIncarnation). A peer whose earlier link is still held
// is left to the failover's hand-over (resendRestarted).
func (c *clusterNode) expectIncarnation(name string, inc uint64) {
	c.peers.mu.Lock()
	p, held := c.peers.alive[name], c.peers.held[name] != nil
	c.peers.mu.Unlock()
	if p != nil && !held {
		p.link.ExpectIncarnation(inc)
	}
}
