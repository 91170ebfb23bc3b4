package broker

import "github.com/rtm-dev/rtm/broker/link"

// LockRoutesForTest takes the cluster's route table lock and returns its
// release: whatever needs it on this node waits meanwhile (review rv12a).
func (b *Broker) LockRoutesForTest() (unlock func()) {
	b.cluster.routes.mu.Lock()
	return b.cluster.routes.mu.Unlock
}

// HeldLinkIncarnation returns the peer incarnation the held link to peer
// reached (0: no held link), without the route table's lock.
func (b *Broker) HeldLinkIncarnation(peer string) uint64 {
	p := b.cluster.peers.getHeld(peer)
	if p == nil {
		return 0
	}
	return p.link.PeerIncarnation()
}

// DropRoutesFrom makes this node ignore the route messages from peer
// until stop is closed (review rv12a).
func (b *Broker) DropRoutesFrom(peer string, stop <-chan struct{}) {
	f := func(from string, m link.Message) error {
		select {
		case <-stop:
			return nil
		default:
		}
		if from == peer && (m.Type == msgRoutes || m.Type == msgRouteDelta) {
			return errDropped
		}
		return nil
	}
	b.cluster.testDeliver.Store(&f)
}

// HandOverRecords returns how many hand-over records this node keeps.
func (b *Broker) HandOverRecords() int { return int(b.cluster.handOvers.n.Load()) }
