package store

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"golang.org/x/sync/errgroup"
)

// Message buckets on FerretDB (docs/history.md, "On the embedded store").
//
// FerretDB v1 spends ~30-45 µs of CPU on each document it inserts, in the
// process that also runs the broker, whatever the document's size: one
// document per message cost a quarter of a loaded broker's CPU. So on
// FerretDB a node's batch is written as buckets: documents of
// CollHistoryIndex holding the batch's messages, in the log's order (by
// topic, then id), as one binary field of concatenated BSON documents
// (FerretDB stores an array element by element; a binary is one base64
// string), cut at bucketBytes. A batch of 256 small messages is one bucket,
// inserted with its log document in the insert the index made anyway.
//
// A bucket is named by its node, the number of its batch's log document
// and its place c among the batch's buckets ("n" or "n.c", a ref). The
// index holds each id's ref: the log document, through where each bucket
// starts among its ids (bc, bk), and each segment, one per id (r). So a
// page reads its candidates' buckets, a few documents, and a message is
// found by id through its node's log: a binary search on the log's cmax,
// as a page searches a topic's chain.
//
// Buckets are written once and, by the purge only, rewritten without their
// expired messages. A message written twice (a batch retried, a spool
// replayed) is in two buckets under two refs: reads keep one of each id.
// The per-message layout (CollHistory) remains for MongoDB, where an index
// on (topic, _id) answers pages, a TTL index expires messages, and a
// message is its own document; on FerretDB, CollHistory holds what an rtm
// before buckets wrote, still read (ids without a ref) and purged.

// bucketBytes is where a bucket is cut, and bucketTopicBytes from where it
// is cut at the next topic: a page reads whole buckets, which FerretDB
// decodes from JSON (~0.5 ms a 64 KiB bucket), for the messages of one
// topic; a bucket costs the writer FerretDB's ~30-45 µs a document. So a
// topic's messages of a batch are together, in one bucket or a few, with
// other topics' only up to bucketTopicBytes; and buckets stay far below
// FerretDB's 16 MiB.
const (
	bucketBytes      = 256 << 10
	bucketTopicBytes = 8 << 10
)

// writeShortLayout makes buckets hold their messages in the short layout
// (appendBucketMessage), about 40 bytes fewer each on every copy to the
// store. Off in this release: it reads the short layout, but the release
// before it does not (it would read those messages without their topic,
// payload and publisher), and a rolling restart between adjacent releases
// shares one store between both. The next release may write it.
const writeShortLayout = false

type histBucket struct {
	ID    string    `bson:"_id"`
	Node  string    `bson:"node"`
	Count int       `bson:"m"`  // messages
	T0    time.Time `bson:"t0"` // the oldest message's ts
	T1    time.Time `bson:"t1"` // the newest's
	Data  []byte    `bson:"d"`  // the messages, concatenated BSON documents
}

// bucketRef names bucket c of log document n.
func bucketRef(n int64, c int) string {
	r := strconv.FormatInt(n, 10)
	if c > 0 {
		r += "." + strconv.Itoa(c)
	}
	return r
}

// bucketID is a bucket's _id: "b" first, unlike a segment's (a digit), so
// no topic makes one.
func bucketID(node, ref string) string { return "b" + chainKey(node, "") + ref }

type packedBucket struct {
	from, to int // msgs[from:to]
	t0, t1   time.Time
	data     []byte
}

// packBuckets cuts msgs (sorted by topic) into buckets of up to bucketBytes
// (a message larger alone in its own), at a topic's first message once a
// bucket holds bucketTopicBytes. The buckets' data are consecutive in buf
// (appended to it, returned).
func packBuckets(msgs []HistoryMessage, buf []byte) ([]packedBucket, []byte) {
	var out []packedBucket
	var cur packedBucket
	// Encoded straight into buf, sized from the messages so that it
	// rarely grows.
	guess := 0
	for i := range msgs {
		guess += historyBSONSize(&msgs[i])
	}
	buf = slices.Grow(buf[:0], guess)
	from := 0 // where cur's data start in buf
	var ends []int
	for i := range msgs {
		m := &msgs[i]
		start := len(buf)
		if writeShortLayout {
			buf = appendBucketMessage(buf, m)
		} else {
			buf = AppendHistoryBSON(buf, m)
		}
		if start > from && (len(buf)-from > bucketBytes ||
			start-from >= bucketTopicBytes && m.Topic != msgs[i-1].Topic) {
			// m starts the next bucket.
			out = append(out, cur)
			ends = append(ends, start)
			cur = packedBucket{from: i}
			from = start
		}
		cur.to = i + 1
		if cur.t0.IsZero() || m.Time.Before(cur.t0) {
			cur.t0 = m.Time
		}
		if m.Time.After(cur.t1) {
			cur.t1 = m.Time
		}
	}
	if len(buf) > from {
		out = append(out, cur)
		ends = append(ends, len(buf))
	}
	// The data, now that buf no longer moves.
	at := 0
	for c := range out {
		out[c].data = buf[at:ends[c]:ends[c]]
		at = ends[c]
	}
	return out, buf
}

// bucketDocs splits a bucket's data into its messages' documents.
func bucketDocs(d []byte) ([]bson.Raw, error) {
	var out []bson.Raw
	for len(d) > 0 {
		if len(d) < 5 {
			return nil, errors.New("store: history bucket: corrupt data")
		}
		n := int(binary.LittleEndian.Uint32(d))
		if n < 5 || n > len(d) {
			return nil, errors.New("store: history bucket: corrupt data")
		}
		out = append(out, bson.Raw(d[:n]))
		d = d[n:]
	}
	return out, nil
}

// bucketMessages reads a bucket and returns those of its messages whose ids
// are in want (all if want is nil), by id; nil if the bucket is gone
// (purged).
func (s *Store) bucketMessages(ctx context.Context, node, ref string, want map[string]bool) (map[string]HistoryMessage, error) {
	ms, _, err := s.bucketMessagesT0(ctx, node, ref, want)
	return ms, err
}

// bucketMessagesT0 is bucketMessages, with the bucket's oldest message's
// time (zero if the bucket is gone).
func (s *Store) bucketMessagesT0(ctx context.Context, node, ref string, want map[string]bool) (map[string]HistoryMessage, time.Time, error) {
	var b histBucket
	err := s.db.Collection(CollHistoryIndex).FindOne(ctx, bson.D{{Key: "_id", Value: bucketID(node, ref)}}).Decode(&b)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil, time.Time{}, nil
	}
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("store: history bucket: %w", err)
	}
	ms, err := decodeBucket(b.Data, b.Node, want)
	return ms, b.T0, err
}

// decodeBucket reads a bucket's messages (those in want; all if nil) of
// either layout: node is the bucket's, for those without theirs.
func decodeBucket(data []byte, node string, want map[string]bool) (map[string]HistoryMessage, error) {
	docs, err := bucketDocs(data)
	if err != nil {
		return nil, err
	}
	out := make(map[string]HistoryMessage, min(len(docs), len(want)+1))
	for _, d := range docs {
		id, ok := d.Lookup("_id").StringValueOK()
		if !ok || (want != nil && !want[id]) {
			continue
		}
		m, err := DecodeHistoryBSON(d)
		if err != nil {
			return nil, fmt.Errorf("store: history bucket: %w", err)
		}
		if m.Node == "" {
			m.Node = node
		}
		out[id] = m
	}
	return out, nil
}

// histCand is a page's candidate: an id, its writer node and its bucket.
type histCand struct{ id, node, ref string }

// readCandidates reads the messages of cands: those with a ref from their
// buckets, each bucket once, the others from CollHistory by id; a message
// not found (purged) is left out. An id its bucket lacks though the purge
// kept the bucket's messages of its time (a ref an rtm before ordered
// inserts could leave: a log document naming another attempt's bucket)
// is looked up by id, through its other refs. The result follows cands'
// order.
func (s *Store) readCandidates(ctx context.Context, topic string, cands []histCand) ([]HistoryMessage, error) {
	type bkey struct{ node, ref string }
	want := map[bkey]map[string]bool{}
	for _, c := range cands {
		if c.ref == "" {
			continue
		}
		k := bkey{c.node, c.ref}
		if want[k] == nil {
			want[k] = map[string]bool{}
		}
		want[k][c.id] = true
	}
	var mu sync.Mutex
	found := map[string]HistoryMessage{}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	var astray []string
	for k, ids := range want {
		g.Go(func() error {
			ms, t0, err := s.bucketMessagesT0(gctx, k.node, k.ref, ids)
			mu.Lock()
			defer mu.Unlock()
			for id, m := range ms {
				found[id] = m
			}
			if t0.IsZero() {
				return err // purged whole
			}
			for id := range ids {
				if _, ok := ms[id]; !ok && idMillis(id) >= t0.UnixMilli() {
					astray = append(astray, id)
				}
			}
			return err
		})
	}
	for _, c := range cands {
		if c.ref != "" {
			continue
		}
		g.Go(func() error {
			m, err := s.historyDoc(gctx, c.id)
			if errors.Is(err, ErrNotFound) {
				return nil
			}
			mu.Lock()
			found[c.id] = m
			mu.Unlock()
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, id := range astray {
		g.Go(func() error {
			m, err := s.bucketedByID(gctx, id)
			if errors.Is(err, ErrNotFound) {
				return nil
			}
			mu.Lock()
			found[id] = m
			mu.Unlock()
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	var out []HistoryMessage
	for _, c := range cands {
		if m, ok := found[c.id]; ok && m.Topic == topic {
			out = append(out, m)
		}
	}
	return out, nil
}

// bucketedByID finds a message written in buckets: for each writer node, in
// parallel, the log documents that may hold its id, then its bucket.
func (s *Store) bucketedByID(ctx context.Context, id string) (HistoryMessage, error) {
	nodes, err := s.historyNodes(ctx)
	if err != nil {
		return HistoryMessage{}, err
	}
	var (
		mu    sync.Mutex
		found *HistoryMessage
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, node := range nodes {
		g.Go(func() error {
			return s.logRefsOf(gctx, node, id, func(refs []string) (bool, error) {
				for _, ref := range refs {
					ms, err := s.bucketMessages(gctx, node, ref, map[string]bool{id: true})
					if err != nil {
						return false, err
					}
					if m, ok := ms[id]; ok {
						mu.Lock()
						found = &m
						mu.Unlock()
						return true, nil
					}
				}
				return false, nil
			})
		})
	}
	if err := g.Wait(); err != nil {
		return HistoryMessage{}, err
	}
	if found == nil {
		return HistoryMessage{}, ErrNotFound
	}
	return *found, nil
}

// logRefsOf passes hold the buckets node's log lists id in, each log
// document's in turn, until hold finds id in one: a bucket that lacks it
// (purged, or named by a document an rtm before ordered inserts wrote for
// another attempt's bucket) sends it on to the next. The log's cmax only
// grows, so the first document that may hold id is the first whose cmax
// reaches it (a binary search); the last is the last whose previous cmax
// stands within the log's lag of id (ids written out of order).
func (s *Store) logRefsOf(ctx context.Context, node, id string, hold func(refs []string) (bool, error)) error {
	first, _, err := s.firstSegment(ctx, node, logTopic)
	if err != nil || first == nil {
		return err
	}
	last, err := s.lastSegment(ctx, node, logTopic, first)
	if err != nil || last.CMax < id {
		return err
	}
	lo, hi := first.N-1, last.N // cmax(lo) < id <= cmax(hi)
	if first.CMax >= id {
		hi = first.N
	}
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		cmax, ok, err := s.segmentCMax(ctx, node, logTopic, mid)
		if err != nil {
			return err
		}
		if !ok || cmax < id { // purged meanwhile: older
			lo = mid
		} else {
			hi = mid
		}
	}
	// An id of document n stands at most the lag before the cmax of the
	// documents before it.
	bound := lagged(id, min(last.CLag, lateSlack))
	prev := ""
	for n := hi; n <= last.N && prev <= bound; n++ {
		sg, err := s.segment(ctx, node, logTopic, n)
		if err != nil {
			return err
		}
		if sg == nil {
			continue
		}
		prev = sg.CMax
		if ok, err := holdIn(sg, id, hold); ok || err != nil {
			return err
		}
	}
	if last.CLag > lateSlack {
		return s.lateRefsOf(ctx, node, id, hold)
	}
	return nil
}

// holdIn passes hold the refs log document sg lists id under, if any.
func holdIn(sg *histSegment, id string, hold func(refs []string) (bool, error)) (bool, error) {
	var refs []string
	for _, e := range sg.Entries {
		if i, ok := slices.BinarySearch(e.IDs, id); ok && e.Refs[i] != "" {
			refs = append(refs, e.Refs[i])
		}
	}
	if len(refs) == 0 {
		return false, nil
	}
	return hold(refs)
}

// lateSlack is how far (ms) ids may stand below the log's cmax and be
// found by reading on from where the log's cmax reaches them. Ids further
// behind (a spool replayed after an outage: as old as the outage is long)
// would make every lookup of an id of that time, found or not, read on
// through the log documents written meanwhile; their batch instead
// leaves a pointer per second of their ids, "l<node>|<second>|<k>",
// holding the log document's number, which a lookup probes.
const lateSlack = 2000

type latePointer struct {
	ID   string `bson:"_id"`
	N    int64  `bson:"ln"`
	LMax string `bson:"lmax"` // the highest id it points to, for the purge
}

func lateID(node string, sec int64, k int) string {
	return "l" + chainKey(node, "") + strconv.FormatInt(sec, 10) + "|" + strconv.Itoa(k)
}

// latePointers returns the pointers a batch (ids sorted) written to log
// document n needs: for each second of its ids that stand more than
// lateSlack below cmax, one at the first number free for that second.
func (s *Store) latePointers(ctx context.Context, node, cmax string, ids []string, n int64) ([]any, error) {
	if cmax == "" || idMillis(ids[0]) >= idMillis(cmax)-lateSlack {
		return nil, nil
	}
	bySec := map[int64]string{} // second: its highest late id
	var secs []int64
	for _, id := range ids {
		ms := idMillis(id)
		if ms >= idMillis(cmax)-lateSlack {
			break
		}
		if _, ok := bySec[ms/1000]; !ok {
			secs = append(secs, ms/1000)
		}
		bySec[ms/1000] = id
	}
	var out []any
	for _, sec := range secs {
		for k := 0; ; k++ {
			err := s.db.Collection(CollHistoryIndex).FindOne(ctx, bson.D{{Key: "_id", Value: lateID(node, sec, k)}}).Err()
			if errors.Is(err, mongo.ErrNoDocuments) {
				out = append(out, &latePointer{ID: lateID(node, sec, k), N: n, LMax: bySec[sec]})
				break
			}
			if err != nil {
				return nil, fmt.Errorf("store: history index: %w", err)
			}
		}
	}
	return out, nil
}

// lateRefsOf finds id through the late pointers of its second: each names
// a log document to look in (a pointer left by a failed attempt names one
// that does not hold id, and is passed over).
func (s *Store) lateRefsOf(ctx context.Context, node, id string, hold func(refs []string) (bool, error)) error {
	sec := idMillis(id) / 1000
	for k := 0; ; k++ {
		var p latePointer
		err := s.db.Collection(CollHistoryIndex).FindOne(ctx, bson.D{{Key: "_id", Value: lateID(node, sec, k)}}).Decode(&p)
		s.hidx.mu.Lock()
		s.hidx.reads++
		s.hidx.mu.Unlock()
		if errors.Is(err, mongo.ErrNoDocuments) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("store: history index: %w", err)
		}
		sg, err := s.segment(ctx, node, logTopic, p.N)
		if err != nil {
			return err
		}
		if sg == nil {
			continue
		}
		if ok, err := holdIn(sg, id, hold); ok || err != nil {
			return err
		}
	}
}

// trimBucket rewrites a bucket without its messages older than cutoff.
func (s *Store) trimBucket(ctx context.Context, id string, cutoff time.Time) (int64, error) {
	coll := s.db.Collection(CollHistoryIndex)
	var b histBucket
	err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&b)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("store: purge history buckets: %w", err)
	}
	docs, err := bucketDocs(b.Data)
	if err != nil {
		return 0, err
	}
	kept := histBucket{ID: b.ID, Node: b.Node}
	for _, d := range docs {
		ts, ok := d.Lookup("s").TimeOK() // appendBucketMessage's
		if !ok {
			ts, ok = d.Lookup("ts").TimeOK() // written before it
		}
		if ok && ts.Before(cutoff) {
			continue
		}
		t := ts
		if kept.T0.IsZero() || t.Before(kept.T0) {
			kept.T0 = t
		}
		if t.After(kept.T1) {
			kept.T1 = t
		}
		kept.Data = append(kept.Data, d...)
		kept.Count++
	}
	if kept.Count == len(docs) {
		return 0, nil
	}
	if kept.Count == 0 {
		_, err = coll.DeleteOne(ctx, bson.D{{Key: "_id", Value: id}})
	} else {
		_, err = coll.ReplaceOne(ctx, bson.D{{Key: "_id", Value: id}}, &kept)
	}
	if err != nil {
		return 0, fmt.Errorf("store: purge history buckets: %w", err)
	}
	return int64(len(docs) - kept.Count), nil
}

// AllHistory returns every stored message once, oldest first, reading the
// whole history: for tests and diagnostics, not for serving.
func (s *Store) AllHistory(ctx context.Context) ([]HistoryMessage, error) {
	cur, err := s.db.Collection(CollHistory).Find(ctx, bson.D{})
	if err != nil {
		return nil, fmt.Errorf("store: all history: %w", err)
	}
	var out []HistoryMessage
	if err := cur.All(ctx, &out); err != nil {
		return nil, fmt.Errorf("store: all history: %w", err)
	}
	if idx, err := s.useHistoryIndex(ctx); err != nil {
		return nil, err
	} else if idx {
		cur, err := s.db.Collection(CollHistoryIndex).Find(ctx, bson.D{{Key: "d", Value: bson.D{{Key: "$exists", Value: true}}}})
		if err != nil {
			return nil, fmt.Errorf("store: all history: %w", err)
		}
		var bs []histBucket
		if err := cur.All(ctx, &bs); err != nil {
			return nil, fmt.Errorf("store: all history: %w", err)
		}
		for _, b := range bs {
			ms, err := decodeBucket(b.Data, b.Node, nil)
			if err != nil {
				return nil, err
			}
			for _, m := range ms {
				out = append(out, m)
			}
		}
	}
	slices.SortFunc(out, func(a, b HistoryMessage) int { return cmp.Compare(a.ID, b.ID) })
	return slices.CompactFunc(out, func(a, b HistoryMessage) bool { return a.ID == b.ID }), nil
}
