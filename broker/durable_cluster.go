package broker

// seedRetained records who set a topic's retained message and when, for a
// message restored from the store at start, so the node's link snapshots
// carry the store's stamp and peers keep whichever change is latest.
// (The cluster code's one entry point for durability; see durable.go.)
func (c *clusterNode) seedRetained(topic string, at int64, node string) {
	c.retMu.Lock()
	defer c.retMu.Unlock()
	if c.retMeta[topic].newer(at, node) {
		c.retMeta[topic] = retainStamp{at: at, node: node}
	}
}
