package broker

import "time"

// RestoreMark is restoreMark: what a node's start does for a session it
// adopted from dead at adoptedAt, within cluster.failed_peer_hold.
func (b *Broker) RestoreMark(id, dead string, adoptedAt time.Time) {
	b.cluster.restoreMark(id, dead, adoptedAt)
}
