package broker

// BrokersDone reports whether the node counts every live broker done with
// dead's held link (brokersDone).
func (b *Broker) BrokersDone(dead string) bool {
	ok, _ := b.cluster.brokersDone(dead)
	return ok
}
