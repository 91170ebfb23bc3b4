package broker

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
