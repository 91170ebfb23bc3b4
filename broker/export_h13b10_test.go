package broker

// SetTestNoSync stops (true) or resumes the node's links following
// gossip (syncPeers), as a watch goroutine that has not handled gossip's
// event yet.
func (b *Broker) SetTestNoSync(on bool) { b.cluster.testNoSync.Store(on) }
