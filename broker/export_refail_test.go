package broker

// AdoptedMarksOf returns client id's marks, oldest first, each as its
// node, followed by " done" once every broker was done with it.
func (b *Broker) AdoptedMarksOf(id string) []string {
	a := &b.cluster.adopted
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, m := range a.by[id] {
		s := m.from
		if m.done {
			s += " done"
		}
		out = append(out, s)
	}
	return out
}
