package broker

// HeardHeldDone reports whether the node heard from say it is done with
// dead's held link (heldDone) in dead's current failure.
func (b *Broker) HeardHeldDone(dead, from string) bool {
	h := &b.cluster.heldDone
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.done[dead][from]
}
