package broker

// MovesOut is the number of session moves out of this node under way.
func (b *Broker) MovesOut() int {
	out, _ := b.cluster.moves.count()
	return out
}
