package broker

// SetTestForwardQueued calls f each time a local publish's forward queued
// it for a peer, before the next peer; nil removes it.
func (b *Broker) SetTestForwardQueued(f func(topic, peer string)) {
	if f == nil {
		b.cluster.testForwardQueued.Store(nil)
		return
	}
	b.cluster.testForwardQueued.Store(&f)
}
