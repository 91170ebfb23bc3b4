package broker

// AdoptedMarks is the number of sessions on the node marked adopted from
// a failed node (cluster_failover.go).
func (b *Broker) AdoptedMarks() int { return int(b.cluster.adopted.n.Load()) }
