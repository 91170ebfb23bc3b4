package store

import "context"

// HistoryIndexReads is how many documents of the history index this store
// has read from the server.
func (s *Store) HistoryIndexReads() int64 {
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	return s.hidx.reads
}

// HistoryIndexProbes is how many cmax probes of the history index (a
// field of a document, not the document) this store read from the server.
func (s *Store) HistoryIndexProbes() int64 {
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	return s.hidx.probes
}

// SetHistoryLogWindow sets how many batches a node's history log holds
// before a full flush (logWindow unless set): tests cross flushes in few
// batches.
func (s *Store) SetHistoryLogWindow(n int64) {
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	s.hidx.window = n
}

// SetHistoryLogWindowIDs sets how many ids pending in a node's history
// log make a full flush (logWindowIDs unless set).
func (s *Store) SetHistoryLogWindowIDs(n int) {
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	s.hidx.windowIDs = n
}

// HistoryInBuckets reports whether this store writes history in buckets
// (FerretDB).
func (s *Store) HistoryInBuckets(ctx context.Context) (bool, error) {
	return s.useHistoryIndex(ctx)
}

// HistoryBucketBytes is where a bucket is cut.
const HistoryBucketBytes = bucketBytes

// HistoryBucketID is the _id of bucket c of node's log document n.
func HistoryBucketID(node string, n int64, c int) string { return bucketID(node, bucketRef(n, c)) }

// SetTestAfterPresenceRead calls f in WritePresence after it read the
// connections recorded (FerretDB), before it writes.
func (s *Store) SetTestAfterPresenceRead(f func()) { s.testAfterConns = f }

// WriteHistoryPerMessage makes this store write history one document a
// message, as on MongoDB, even on FerretDB.
func (s *Store) WriteHistoryPerMessage() {
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	s.hidx.probed, s.hidx.on = true, false
}
