package broker

import (
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// routeTable is the cluster's routing state as one node holds it: the
// filters its own clients subscribe to (versioned, sent to peers as a
// snapshot and then as deltas), the filters every peer subscribes to (its
// remote index, the peer's name standing for the client ID), and the
// round-robin counters of share groups spread over peers.
//
// It knows nothing of links: callers send what it returns. Its mutex is
// taken before peerSet's (see the lock order in doc.go), so that a route
// change and the peers it is sent to are one atomic step.
type routeTable struct {
	log *slog.Logger

	// remote has its own lock: Subscribers is read without mu.
	remote *mqtt.TopicsIndex

	mu        sync.Mutex
	local     map[string]struct{}            // filters local clients subscribe to (and share groups)
	localVer  uint64                         // bumped by every local route change
	sets      map[string]map[string]struct{} // peer → its routes, as held in remote
	ver       map[string]uint64              // peer → version of its routes held
	shareNext map[string]uint64              // share route → round-robin counter
	// pins keeps local filters while a session holding them moves away
	// (cluster_relay.go): their removal waits, in dropDue, until unpinned.
	pins    map[string]int
	dropDue map[string]bool
	// released: failed peers whose held link was released once their
	// sessions were adopted (cluster_failover.go), until they send routes
	// again. A forward that read such a peer's routes just before they
	// went does not count it missed.
	released map[string]bool
	// inc: peer → the incarnation of the process its routes held are of
	// (its inbound link's when the snapshot came; 0: not known). A link
	// that reaches another process of the peer must not take them for its
	// (cluster_forward.go, routesOfGoneLocked).
	inc map[string]uint64

	count atomic.Int64 // routes held in remote, all peers
}

func newRouteTable(log *slog.Logger) *routeTable {
	return &routeTable{
		log:       log,
		remote:    mqtt.NewTopicsIndex(),
		local:     map[string]struct{}{},
		sets:      map[string]map[string]struct{}{},
		ver:       map[string]uint64{},
		inc:       map[string]uint64{},
		shareNext: map[string]uint64{},
		pins:      map[string]int{},
		dropDue:   map[string]bool{},
	}
}

// pin keeps filters in the local routes until unpinned: a removal of one
// meanwhile waits (see cluster_relay.go).
func (r *routeTable) pin(filters []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range filters {
		r.pins[f]++
	}
}

// pinnedLocked reports whether a local route change must wait: a removal
// of a pinned filter (remembered, and done by unpinLocked). mu is held.
func (r *routeTable) pinnedLocked(filter string, added bool) bool {
	if added {
		delete(r.dropDue, filter)
		return false
	}
	if r.pins[filter] > 0 {
		r.dropDue[filter] = true
		return true
	}
	return false
}

// unpinLocked releases pins on filters and returns those whose removal
// came due meanwhile. mu is held.
func (r *routeTable) unpinLocked(filters []string) (due []string) {
	for _, f := range filters {
		if r.pins[f]--; r.pins[f] > 0 {
			continue
		}
		delete(r.pins, f)
		if r.dropDue[f] {
			delete(r.dropDue, f)
			due = append(due, f)
		}
	}
	return due
}

// localChangedLocked records a local route added or removed and returns
// the delta to send every linked peer. mu is held.
func (r *routeTable) localChangedLocked(filter string, added bool) routeDeltaMsg {
	r.localVer++
	if added {
		r.local[filter] = struct{}{}
	} else {
		delete(r.local, filter)
	}
	return routeDeltaMsg{Version: r.localVer, Added: added, Filter: filter}
}

// localSnapshot is every local route at the current version.
func (r *routeTable) localSnapshot() routesMsg {
	r.mu.Lock()
	defer r.mu.Unlock()
	return routesMsg{Version: r.localVer, Filters: slices.Sorted(maps.Keys(r.local))}
}

// hasLocalLocked reports whether a local client subscribes to route. mu is held.
func (r *routeTable) hasLocalLocked(route string) bool {
	_, ok := r.local[route]
	return ok
}

// nextShareLocked returns the round-robin counter of a share route and
// advances it. mu is held.
func (r *routeTable) nextShareLocked(route string) uint64 {
	n := r.shareNext[route]
	r.shareNext[route] = n + 1
	return n
}

// subscribers names the peers whose routes match topic.
func (r *routeTable) subscribers(topic string) *mqtt.Subscribers {
	return r.remote.Subscribers(topic)
}

// set replaces every route of peer from with a snapshot sent by its
// process inc (0: not known).
func (r *routeTable) set(from string, rm routesMsg, inc uint64) {
	// Routes are kept even from a node this one has not seen join yet:
	// the link is authenticated, and gossip may simply be behind. They are
	// used once it is a peer, and dropped if gossip says it is gone.
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.released, from)
	old := r.sets[from]
	set := make(map[string]struct{}, len(rm.Filters))
	for _, f := range rm.Filters {
		if !mqtt.IsValidFilter(f, false) {
			r.log.Warn("invalid route from peer ignored", "peer", from, "filter", f)
			continue
		}
		set[f] = struct{}{}
		if _, ok := old[f]; !ok {
			r.remote.Subscribe(from, packets.Subscription{Filter: f})
		}
	}
	for f := range old {
		if _, ok := set[f]; !ok {
			r.remote.Unsubscribe(f, from)
		}
	}
	r.count.Add(int64(len(set) - len(old)))
	r.sets[from] = set
	r.ver[from] = rm.Version
	r.inc[from] = inc
}

// ofOtherProcessLocked reports whether the routes held of peer are of
// another process than peerInc, the one its link reaches now (a restart:
// the new process's snapshot has not arrived yet). mu is held.
func (r *routeTable) ofOtherProcessLocked(peer string, peerInc uint64) bool {
	inc := r.inc[peer]
	return inc != 0 && peerInc != 0 && inc != peerInc
}

// apply applies one route delta of peer from, unless the snapshot held
// already covers it.
func (r *routeTable) apply(from string, d routeDeltaMsg) {
	r.mu.Lock()
	defer r.mu.Unlock()
	set, ok := r.sets[from]
	if !ok || d.Version <= r.ver[from] {
		return // before the snapshot, or already in it
	}
	r.ver[from] = d.Version
	if !mqtt.IsValidFilter(d.Filter, false) {
		r.log.Warn("invalid route from peer ignored", "peer", from, "filter", d.Filter)
		return
	}
	_, had := set[d.Filter]
	if d.Added && !had {
		set[d.Filter] = struct{}{}
		r.count.Add(1)
		r.remote.Subscribe(from, packets.Subscription{Filter: d.Filter})
	} else if !d.Added && had {
		delete(set, d.Filter)
		r.count.Add(-1)
		r.remote.Unsubscribe(d.Filter, from)
	}
}

// dropLocked forgets every route of a peer. mu is held.
func (r *routeTable) dropLocked(name string) {
	for f := range r.sets[name] {
		r.remote.Unsubscribe(f, name)
	}
	r.count.Add(-int64(len(r.sets[name])))
	delete(r.sets, name)
	delete(r.ver, name)
	delete(r.inc, name)
}

// releaseLocked drops the routes of the failed peer name, whose held link
// is released. mu is held.
func (r *routeTable) releaseLocked(name string) {
	if r.released == nil {
		r.released = map[string]bool{}
	}
	r.released[name] = true
	r.dropLocked(name)
}

// releasedLocked reports whether name's held link was released (and it
// sent no routes since). mu is held.
func (r *routeTable) releasedLocked(name string) bool {
	return r.released[name]
}

// hasRemoteLocked reports whether peer's routes include route. mu is held.
func (r *routeTable) hasRemoteLocked(peer, route string) bool {
	_, ok := r.sets[peer][route]
	return ok
}

// peersLocked yields the names of the peers whose routes are held. mu is held.
func (r *routeTable) peersLocked() []string {
	return slices.Collect(maps.Keys(r.sets))
}

// stats returns the number of local routes and of each peer's routes.
func (r *routeTable) stats() (local int, remote map[string]int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	remote = make(map[string]int, len(r.sets))
	for name, set := range r.sets {
		remote[name] = len(set)
	}
	return len(r.local), remote
}
