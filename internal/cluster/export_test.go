package cluster

// WaitLeaves waits for the goroutines of every Leave call to end.
func (n *Node) WaitLeaves() { n.leaves.Wait() }
