package store

// HistoryIndexReads is how many documents of the history index this store
// has read from the server.
func (s *Store) HistoryIndexReads() int64 {
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	return s.hidx.reads
}

// HistoryLogWindow is how many batches a node's history log holds before
// a full flush.
const HistoryLogWindow = logWindow
