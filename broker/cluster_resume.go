package broker

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/rtm-dev/rtm/internal/cluster"
)

// A node that did not run for a while (SIGSTOP, a frozen cgroup; a paused VM only if the monotonic clock counts it, not verified) may have been
// declared failed by its peers meanwhile: they adopted its sessions, and
// those of a node that died in that time, and their route changes wait in
// links they hold, or closed, for it. When it runs again it still holds
// the routes it had, and what its clients publish would go by them: to a
// node that is gone, or to none, while the sessions moved to another
// node whose routes it has not got. A message so forwarded is
// acknowledged once the link it went to is held, and handed on as a held
// copy that the moved sessions, whose marks went while this node was
// stopped, skip: lost, not counted (bench/chaos -faults mix, session 11).
//
// So the node watches its own clock: a tick every resumeTick, and a gap
// between two ticks longer than stall (three probe intervals: less than
// any peer takes to declare a node failed, as gossip's suspicion alone
// lasts at least that long) means it did not run. It then closes every
// inbound link (each peer redials at once and opens with its whole route
// table, and a peer that held its link for this node hands what it held
// over as on any reconnect), and every publish of a local client (and
// every will) waits before its routes are read until each peer its links
// or its gossip count alive sent its routes again, at most freshMax; then
// it goes by what is there. Nothing is dropped by the wait. The check is made by the
// publish itself too, not only by the tick: after SIGCONT a client's
// read loop can run before the watch does.

// resumeGuard is that watch's state. Its mutex is a leaf.
type resumeGuard struct {
	base     time.Time     // origin of last, monotonic
	last     atomic.Int64  // ns since base at the last tick
	stall    time.Duration // a longer gap between ticks is a stall
	freshMax time.Duration // bounds a wait for the peers' routes
	active   atomic.Bool   // a wait is under way

	mu       sync.Mutex
	seen     int64                // the last tick before the stall that began the wait
	since    time.Time            // when the wait began
	fresh    chan struct{}        // closed when it ends
	snapshot map[string]time.Time // peer → when its last route table came
}

// newResumeGuard sets the stall bound from the gossip probe interval.
//
// With the tests' fast timers it is 2 s rather than three of their 250 ms
// probes: every node of a test runs in one process, which -race on a
// loaded machine starves for most of a second at times (seen: two nodes
// of one test took themselves for stopped at once), and a stall is only
// ever simulated there (SimulateStall).
func newResumeGuard(probe time.Duration, timing cluster.Timing, redialMax time.Duration) *resumeGuard {
	if probe <= 0 {
		probe = time.Second // memberlist's LAN profile
	}
	g := &resumeGuard{base: time.Now(), stall: 3 * probe, snapshot: map[string]time.Time{}}
	if timing == cluster.TimingFast {
		g.stall = 2 * time.Second
	}
	g.freshMax = g.stall + redialMax
	return g
}

// now is the time since base, in ns.
func (g *resumeGuard) now() int64 { return int64(time.Since(g.base)) }

// stalled returns the last tick, and whether it is older than stall.
func (g *resumeGuard) stalled() (int64, bool) {
	last := g.last.Load()
	return last, time.Duration(g.now()-last) > g.stall
}

// resumeTick is the watch's period.
func (g *resumeGuard) resumeTick() time.Duration { return g.stall / 5 }

// resumeWatch ticks until the node stops: a gap is a stall (beginResume),
// and a wait under way ends once the routes are fresh or at freshMax.
func (c *clusterNode) resumeWatch() {
	defer c.wg.Done()
	g := c.resume
	t := time.NewTicker(g.resumeTick())
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		now := g.now()
		if prev := g.last.Swap(now); time.Duration(now-prev) > g.stall {
			c.beginResume(prev, time.Duration(now-prev))
		}
		if g.active.Load() {
			c.resumeFreshCheck()
		}
	}
}

// beginResume begins the wait for the peers' routes after the stall that
// followed the tick seen (once per stall: the watch and a publish may
// both find it).
func (c *clusterNode) beginResume(seen int64, gap time.Duration) {
	g := c.resume
	g.mu.Lock()
	if g.seen == seen || g.active.Load() {
		g.mu.Unlock()
		return
	}
	g.seen = seen
	g.since = time.Now()
	g.fresh = make(chan struct{})
	g.active.Store(true)
	g.mu.Unlock()
	c.log.Warn("node did not run for a while (stopped, or starved): its peers may have declared it failed; publishes wait until every live peer has sent its routes again",
		"gap", gap.Round(time.Millisecond), "at_most", g.freshMax)
	// Each peer redials and opens with its whole route table.
	for name := range c.links.Stats().Peers {
		c.links.Forget(name)
	}
}

// resumeSnapshot records that peer's route table came, and ends a wait
// whose routes are all fresh now.
func (c *clusterNode) resumeSnapshot(peer string) {
	g := c.resume
	g.mu.Lock()
	g.snapshot[peer] = time.Now()
	g.mu.Unlock()
	if g.active.Load() {
		c.resumeFreshCheck()
	}
}

// resumeFreshCheck ends the wait under way once every peer that the
// links count alive, or gossip does now, sent its routes since it began,
// or at freshMax. A peer gossip declared failed, and the links hold, is
// not waited for (its routes are the failover's), unless gossip sees it
// alive again: this node's own gossip, stopped with its probes in flight,
// may declare a live peer failed as it resumes, until the peer refutes
// it, and what is forwarded to a held peer goes by its routes too.
func (c *clusterNode) resumeFreshCheck() {
	want := map[string]bool{}
	for _, p := range c.peers.aliveList() {
		want[p.name] = true
	}
	for _, m := range c.members() {
		if m.Name != c.node.Name() && m.Status == cluster.StatusAlive && m.Tags.Role == cluster.RoleBroker && m.Tags.Link != "" {
			want[m.Name] = true
		}
	}
	g := c.resume
	g.mu.Lock()
	if !g.active.Load() {
		g.mu.Unlock()
		return
	}
	var missing []string
	for name := range want {
		if !g.snapshot[name].After(g.since) {
			missing = append(missing, name)
		}
	}
	waited := time.Since(g.since)
	if len(missing) > 0 && waited < g.freshMax {
		g.mu.Unlock()
		return
	}
	close(g.fresh)
	g.active.Store(false)
	g.mu.Unlock()
	if len(missing) > 0 {
		slices.Sort(missing)
		c.log.Warn("publishes go on without the routes of some peers after a stall", "waited", waited.Round(time.Millisecond), "peers", missing)
		return
	}
	c.log.Info("routes fresh again after a stall: publishes go on", "waited", waited.Round(time.Millisecond))
}

// awaitFreshRoutes is called by a forward before it reads the routes:
// after a stall it waits (pub, nil for a will, first writes out the
// acknowledgements it holds back) until the routes are fresh, at most
// freshMax from the stall's discovery.
func (c *clusterNode) awaitFreshRoutes(pub *mqtt.Client) {
	g := c.resume
	if seen, stalled := g.stalled(); stalled {
		c.beginResume(seen, time.Duration(g.now()-seen))
	}
	if !g.active.Load() {
		return
	}
	g.mu.Lock()
	ch, end := g.fresh, g.since.Add(g.freshMax)
	active := g.active.Load()
	g.mu.Unlock()
	if !active {
		return
	}
	if pub != nil {
		pub.FlushHeld()
	}
	t := time.NewTimer(time.Until(end))
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
		c.resumeFreshCheck() // ends it, should the watch not run
	case <-c.stop:
	}
}
