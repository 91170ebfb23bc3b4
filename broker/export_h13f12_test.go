package broker

import "github.com/rtm-dev/rtm/broker/link"

// HoldRoutesFrom holds back the route snapshots and deltas that the peers
// in from send (and, behind them, everything else from those peers) until
// release closes, as links that have not reached this node yet would.
func (b *Broker) HoldRoutesFrom(from []string, release <-chan struct{}) {
	f := func(peer string, m link.Message) error {
		if m.Type != msgRoutes && m.Type != msgRouteDelta {
			return nil
		}
		for _, name := range from {
			if name == peer {
				<-release
			}
		}
		return nil
	}
	b.cluster.testDeliver.Store(&f)
}

// SimulateStall makes the node find, at its next look, that it did not
// run for a while, as after SIGSTOP and SIGCONT.
func (b *Broker) SimulateStall() {
	g := b.cluster.resume
	g.last.Store(g.now() - int64(10*g.stall))
}

// RoutesStale reports whether the node waits for its peers' routes after
// a stall.
func (b *Broker) RoutesStale() bool { return b.cluster.resume.active.Load() }
