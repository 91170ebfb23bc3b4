package store

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/oklog/ulid/v2"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
	"golang.org/x/sync/errgroup"
)

// The history index on FerretDB (docs/history.md, "On the embedded store").
//
// FerretDB v1 on SQLite pushes down nothing but `_id` equality, so the
// query of a page (topic, _id range, sorted by _id) reads the whole
// collection. Instead, each node's history writer keeps chains of its
// own in CollHistoryIndex, made of documents read by _id only:
//
//   - its log, "<node>||<n>": one document per batch, the batch's ids by
//     topic;
//   - per topic, segments "<node>|<topic>|<n>": every logWindow batches (a
//     full flush) each topic of those batches gets one, holding its ids
//     (sorted), their min and max, and cmax, the highest id of segments
//     1..n. The log document written with a full flush records it
//     (Flushed): the entries of the log up to there are in the chains.
//
// So a batch of any number of topics costs one index document, and a
// topic one segment per window, not per batch. A page, for each writer
// node (CollHistoryNodes, a few documents), reads the log's window (the
// documents after the last full flush), then the topic's chain: its last
// segment by probing n, walking back from there (a binary search on cmax
// for a before bound); it merges the candidates by id and reads the page's
// messages by _id, in parallel. In that order, a full flush between the
// two reads shows ids twice (removed), never not at all.
//
// Documents are only ever inserted, never updated: FerretDB v1's updates
// are read-modify-write in its own process, and one insert per batch is
// what the writer pays anyway. Each node's chains have a single writer,
// its history writer goroutine, so n needs no coordination; a number
// found taken (a batch retried after a partial failure, a spool replayed
// after a crash, a restart) makes the writer read its state again from the
// store (the log's end and window, each chain's end) and append after it,
// and a page removes the duplicate ids this leaves.
//
// Retention: PurgeHistory deletes the log documents and segments whose
// cmax is older than the cutoff (always a prefix of a chain, cmax only
// grows) and records the first remaining n in "<node>|<topic>|floor", where
// probing starts.

// Collections of the FerretDB history index.
const (
	CollHistoryIndex = "history_index" // each node's log and (node, topic) chains of message ids
	CollHistoryNodes = "history_nodes" // one document per node that wrote history
)

type histSegment struct {
	ID    string   `bson:"_id"`
	Node  string   `bson:"node"`
	Topic string   `bson:"topic"`
	N     int64    `bson:"n"`
	IDs   []string `bson:"ids,omitempty"` // as written before packing; read, never written
	// Packed holds the ids (packStrings): FerretDB stores an array with a
	// type per element and decodes it element by element, so a string
	// costs a fraction of the array, written and read.
	Packed string `bson:"p,omitempty"`
	Min    string `bson:"min"`
	Max    string `bson:"max"`
	CMax   string `bson:"cmax"`
	// CLag is how far (ms) the chain's ids have come out of order up to
	// here: the most any id stood before the cmax of the segments before
	// its own. A node's own ids increase; the push API's come from its
	// clock, and a batch written again repeats older ones.
	CLag int64 `bson:"clag"`
	// Of the log chain (topic ""): the batch's ids by topic, and the last
	// log document whose entries are all in the topics' chains.
	Entries []logEntry `bson:"-"`
	Log     string     `bson:"l,omitempty"` // Entries, packed: topic, count, ids, topic, ...
	Flushed int64      `bson:"f,omitempty"`
	// The bucket of each id (historybucket.go), aligned with IDs once
	// read: "" for an id written in the per-message layout (CollHistory).
	Refs []string `bson:"-"`
	// PackedRefs is Refs as written by a segment.
	PackedRefs string `bson:"r,omitempty"`
	// Of a log document: how many buckets hold its batch (0: the batch
	// is in CollHistory, written before buckets), and where buckets 1...
	// start in the entries' ids taken in order (packed numbers).
	Buckets      int    `bson:"bc,omitempty"`
	BucketStarts string `bson:"bk,omitempty"`
}

// packStrings joins strings as <length>:<string>..., a format any string
// survives.
func packStrings(v []string) string {
	var b strings.Builder
	n := 0
	for _, x := range v {
		n += len(x) + 2 + len(x)/10 // ':' and up to 2 digits for the first 100 bytes of a string, one more each 10x
	}
	b.Grow(n)
	for _, x := range v {
		b.WriteString(strconv.Itoa(len(x)))
		b.WriteByte(':')
		b.WriteString(x)
	}
	return b.String()
}

func unpackStrings(p string) ([]string, error) {
	var out []string
	for p != "" {
		i := strings.IndexByte(p, ':')
		n, err := strconv.Atoi(p[:max(i, 0)])
		if i < 0 || err != nil || n < 0 || n > len(p)-i-1 {
			return nil, errors.New("store: history index: a corrupt packed list")
		}
		out = append(out, p[i+1:i+1+n])
		p = p[i+1+n:]
	}
	return out, nil
}

// packed returns the document as written: ids and entries packed.
func (sg histSegment) packed() *histSegment {
	if len(sg.IDs) > 0 {
		sg.Packed, sg.IDs = packStrings(sg.IDs), nil
	}
	if slices.ContainsFunc(sg.Refs, func(r string) bool { return r != "" }) {
		sg.PackedRefs = packStrings(sg.Refs)
	}
	sg.Refs = nil
	if len(sg.Entries) > 0 {
		n := 0
		for _, e := range sg.Entries {
			n += 2 + len(e.IDs)
		}
		flat := make([]string, 0, n)
		for _, e := range sg.Entries {
			flat = append(flat, e.Topic, strconv.Itoa(len(e.IDs)))
			flat = append(flat, e.IDs...)
		}
		sg.Log, sg.Entries = packStrings(flat), nil
	}
	return &sg
}

// unpack undoes packed after a read.
func (sg *histSegment) unpack() error {
	if sg.Packed != "" {
		ids, err := unpackStrings(sg.Packed)
		if err != nil {
			return err
		}
		sg.IDs, sg.Packed = ids, ""
	}
	sg.Refs = make([]string, len(sg.IDs))
	if sg.PackedRefs != "" {
		refs, err := unpackStrings(sg.PackedRefs)
		if err != nil || len(refs) != len(sg.IDs) {
			return errors.New("store: history index: corrupt bucket references")
		}
		sg.Refs, sg.PackedRefs = refs, ""
	}
	if sg.Log != "" {
		flat, err := unpackStrings(sg.Log)
		if err != nil {
			return err
		}
		for len(flat) >= 2 {
			n, err := strconv.Atoi(flat[1])
			if err != nil || n < 0 || n > len(flat)-2 {
				return errors.New("store: history index: a corrupt log entry")
			}
			sg.Entries = append(sg.Entries, logEntry{Topic: flat[0], IDs: flat[2 : 2+n : 2+n], Refs: make([]string, n)})
			flat = flat[2+n:]
		}
		sg.Log = ""
	}
	if sg.Buckets > 0 {
		starts, err := unpackStrings(sg.BucketStarts)
		if err != nil || len(starts) != sg.Buckets-1 {
			return errors.New("store: history index: corrupt bucket starts")
		}
		refs := make([]string, sg.Buckets)
		next := make([]int, sg.Buckets) // where bucket c starts
		for c := range refs {
			refs[c] = bucketRef(sg.N, c)
			if c > 0 {
				if next[c], err = strconv.Atoi(starts[c-1]); err != nil {
					return errors.New("store: history index: corrupt bucket starts")
				}
			}
		}
		i, c := 0, 0
		for _, e := range sg.Entries {
			for j := range e.IDs {
				for c+1 < len(next) && i >= next[c+1] {
					c++
				}
				e.Refs[j] = refs[c]
				i++
			}
		}
		sg.BucketStarts = ""
	}
	return nil
}

// size is how many ids the document holds, for the cache's bound.
func (sg *histSegment) size() int {
	n := len(sg.IDs)
	for _, e := range sg.Entries {
		n += len(e.IDs) + 1
	}
	return n
}

type logEntry struct {
	Topic string
	IDs   []string
	Refs  []string // aligned with IDs: each id's bucket
}

// idRef is an id and its bucket ("": in CollHistory).
type idRef struct{ id, ref string }

// sortIDRefs sorts by id and keeps one of each id.
func sortIDRefs(v []idRef) []idRef {
	// Mostly already in order (a window, then a batch of newer ids):
	// one pass instead of a sort.
	if slices.IsSortedFunc(v, func(a, b idRef) int {
		// a follows b: strictly greater, or it is out of order (an
		// equal id too: it must be compacted).
		if a.id <= b.id {
			return -1
		}
		return 1
	}) {
		return v
	}
	slices.SortFunc(v, func(a, b idRef) int { return cmp.Compare(a.id, b.id) })
	return slices.CompactFunc(v, func(a, b idRef) bool { return a.id == b.id })
}

type chainState struct {
	n    int64
	cmax string
	clag int64
}

// idMillis is the time part of an id, 0 if it is not one.
func idMillis(id string) int64 {
	u, err := ulid.ParseStrict(id)
	if err != nil {
		return 0
	}
	return int64(u.Time())
}

// lagOf is how far ids (sorted) stand before cmax, in ms.
func lagOf(cmax string, ids []string) int64 {
	if cmax == "" || ids[0] >= cmax {
		return 0
	}
	return max(0, idMillis(cmax)-idMillis(ids[0]))
}

// histIndex is the Store's state for the index: whether the server needs
// it, and each chain's last segment as this process wrote it.
type histIndex struct {
	mu     sync.Mutex
	probed bool
	on     bool
	nodes  map[string]bool // registered in CollHistoryNodes; true: by this process, new
	chains map[string]chainState
	logs   map[string]*nodeLog // by node
	window int64               // logWindow unless a test sets it
	// windowIDs is logWindowIDs unless a test sets it.
	windowIDs int
	// seen is the last segment of each chain a page found, where the next
	// page starts probing: a page then reads 2 segments to find the end,
	// not 2·log2(n).
	seen map[string]int64

	// Pages read through caches: without them a page on a chain of 1,000
	// segments read ~15 of them (the floor, the first, the end, a binary
	// search, the walk) before its messages, each a round trip and a full
	// decode on FerretDB (it applies projections after decoding).
	//
	// segs holds segments as read, ids included: they are never changed
	// once inserted, only deleted by a purge, so a copy stays true until
	// then. A copy outliving a purge by another process lists ids whose
	// messages are gone, which the page skips when it reads them by id (and
	// ids are ULIDs: never reused). Never a negative answer: a segment not
	// found is asked for again. Bounded by segIDs, the ids held, evicting
	// at random.
	segs   map[string]*histSegment
	segIDs int
	// floors caches each chain's floor for floorTTL; a stale one is safe:
	// lower than the truth, it leads to purged segments, which read as
	// missing (or as copies whose messages are gone); firstSegment asks
	// again before it calls a chain empty.
	floors map[string]floorEntry
	// nodeList is the writer nodes last read from CollHistoryNodes; a page
	// starts on them while it reads the list again.
	nodeList []string
	reads    int64 // documents of CollHistoryIndex read from the server, for tests
	// cmaxes holds the cmax of log documents a lookup by id probed without
	// reading them whole (segmentCMax); never changed once written, like
	// segs. Cleared when it holds cmaxCacheLen.
	cmaxes map[string]string
	probes int64 // cmax probes read from the server, for tests
}

// cmaxCacheLen bounds cmaxes (~100 bytes an entry).
const cmaxCacheLen = 1 << 14

type floorEntry struct {
	n  int64
	at time.Time
}

// segCacheIDs bounds the segment cache: ids of ~45 bytes, ~12 MiB.
const segCacheIDs = 1 << 18

// floorTTL bounds how long a page trusts a floor it read.
const floorTTL = 10 * time.Second

func chainKey(node, topic string) string {
	// Length-prefixed: node names and topics may hold any separator.
	return strconv.Itoa(len(node)) + ":" + node + "|" + topic
}

func segID(node, topic string, n int64) string {
	return chainKey(node, topic) + "|" + strconv.FormatInt(n, 10)
}

func floorID(node, topic string) string { return chainKey(node, topic) + "|floor" }

// useHistoryIndex reports whether pages go through the index: FerretDB.
// An error (the server did not answer) is not a no: a batch written
// without its segments would be missing from pages for good.
func (s *Store) useHistoryIndex(ctx context.Context) (bool, error) {
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	if !s.hidx.probed {
		on := s.embedded != nil
		if !on {
			var bi bson.M
			if err := s.db.RunCommand(ctx, bson.D{{Key: "buildInfo", Value: 1}}).Decode(&bi); err != nil {
				return false, fmt.Errorf("store: buildInfo: %w", err)
			}
			_, on = bi["ferretdbVersion"]
		}
		s.hidx.on, s.hidx.probed = on, true
		s.hidx.nodes, s.hidx.chains, s.hidx.seen = map[string]bool{}, map[string]chainState{}, map[string]int64{}
		s.hidx.segs, s.hidx.floors, s.hidx.logs = map[string]*histSegment{}, map[string]floorEntry{}, map[string]*nodeLog{}
		s.hidx.cmaxes = map[string]string{}
	}
	return s.hidx.on, nil
}

// logWindow is how many batches a node's log holds before their entries
// are written to the topics' chains (a full flush): a page reads up to
// this many log documents (cached once read), and a batch of T topics
// costs T segments only once every logWindow batches.
const logWindow = 32

// logWindowIDs bounds a window in ids as well: a full flush comes once
// this many are pending, before logWindow batches if batches are large.
// So a segment holds at most this many ids (plus one batch's) whatever
// history.batch_size is, and a page reads a window of about this many,
// as with logWindow batches of 1,024 (before session 10's larger
// batches).
const logWindowIDs = logWindow * 1024

// logTopic names a node's log chain: MQTT topics are never empty.
const logTopic = ""

// nodeLog is the writer's state of a node's log: the entries written since
// the last full flush, by topic.
type nodeLog struct {
	n, flushed int64
	cmax       string
	clag       int64
	pending    map[string][]idRef
	npending   int // ids in pending
}

// indexHistory writes a batch on FerretDB: for each writer node, its
// messages in buckets (historybucket.go), one log document holding the
// batch's ids by topic, and every logWindow batches the segments of every
// topic of the window (a full flush), in one insert (one transaction on
// FerretDB; ordered, the buckets first and the log document last, since
// FerretDB falls back to one insert each when a document is taken).
func (s *Store) indexHistory(ctx context.Context, msgs []HistoryMessage) error {
	if !slices.ContainsFunc(msgs, func(m HistoryMessage) bool { return m.Node != msgs[0].Node }) {
		// A node's own writer: one node.
		if inLogOrder(msgs) {
			// One topic's, as ids are made: indexNodeBatch leaves it as it
			// is, so no copy (a large one: a message is ~170 bytes).
			return s.indexNodeBatch(ctx, msgs[0].Node, msgs)
		}
		// A copy, sorted in place.
		sorted := historyScratch.Get().(*historyBufs)
		defer historyScratch.Put(sorted)
		sorted.msgs = append(sorted.msgs[:0], msgs...)
		defer clear(sorted.msgs)
		return s.indexNodeBatch(ctx, msgs[0].Node, sorted.msgs)
	}
	var nodes []string
	byNode := map[string][]HistoryMessage{}
	for _, m := range msgs {
		if byNode[m.Node] == nil {
			nodes = append(nodes, m.Node)
		}
		byNode[m.Node] = append(byNode[m.Node], m)
	}
	for _, node := range nodes {
		if err := s.indexNodeBatch(ctx, node, byNode[node]); err != nil {
			return err
		}
	}
	return nil
}

// historyBufs are a history batch's scratch buffers, reused: a batch's
// copy, its buckets' data and its documents were most of what the writer
// allocated (garbage the publishers' goroutines help collect).
type historyBufs struct {
	msgs       []HistoryMessage
	data, docs []byte
	// A batch's refs, its ids by topic and sorted, and its entries: views
	// of these while the batch is indexed (pending and the documents
	// copy what they keep).
	refs, ids, all []string
	entries        []idRef
}

var historyScratch = sync.Pool{New: func() any { return new(historyBufs) }}

// byTopicID is the log's order of a batch: by topic, then id.
func byTopicID(a, b HistoryMessage) int {
	return cmp.Or(cmp.Compare(a.Topic, b.Topic), cmp.Compare(a.ID, b.ID))
}

// inLogOrder reports msgs in the log's order, each once: indexNodeBatch
// then changes nothing in them.
func inLogOrder(msgs []HistoryMessage) bool {
	for i := 1; i < len(msgs); i++ {
		if byTopicID(msgs[i-1], msgs[i]) >= 0 {
			return false
		}
	}
	return true
}

// indexNodeBatch writes one node's batch. It sorts msgs in place (not when
// inLogOrder).
func (s *Store) indexNodeBatch(ctx context.Context, node string, msgs []HistoryMessage) error {
	// The batch in the log's order: by topic, then id; an id once.
	if !inLogOrder(msgs) {
		if !slices.IsSortedFunc(msgs, byTopicID) {
			slices.SortFunc(msgs, byTopicID)
		}
		msgs = slices.CompactFunc(msgs, func(a, b HistoryMessage) bool { return a.ID == b.ID && a.Topic == b.Topic })
	}
	scratch := historyScratch.Get().(*historyBufs)
	defer func() {
		// The ids may go: the GC has them.
		clear(scratch.refs)
		clear(scratch.ids)
		clear(scratch.all)
		clear(scratch.entries)
		historyScratch.Put(scratch)
	}()
	var bks []packedBucket
	bks, scratch.data = packBuckets(msgs, scratch.data)
	// msgs are sorted by topic: each topic's messages are a range.
	var topics []string
	batch := map[string][2]int{} // topic: its messages' range in msgs
	for i := 0; i < len(msgs); {
		j := i + 1
		for j < len(msgs) && msgs[j].Topic == msgs[i].Topic {
			j++
		}
		topics = append(topics, msgs[i].Topic)
		batch[msgs[i].Topic] = [2]int{i, j}
		i = j
	}
	coll := s.db.Collection(CollHistoryIndex)
	for attempt := 0; ; attempt++ {
		lg, err := s.loadNodeLog(ctx, node)
		if err != nil {
			return err
		}
		logDoc := histSegment{Node: node, Topic: logTopic, N: lg.n + 1, Flushed: lg.flushed, CMax: lg.cmax, CLag: lg.clag}
		logDoc.ID = segID(node, logTopic, logDoc.N)
		// Each message's bucket, now that the batch has its number.
		refs := slices.Grow(scratch.refs[:0], len(msgs))[:len(msgs)]
		scratch.refs = refs
		for c, b := range bks {
			ref := bucketRef(logDoc.N, c)
			for i := b.from; i < b.to; i++ {
				refs[i] = ref
			}
		}
		// msgs are in the log's order: each topic's ids and entries are a
		// range of one slice each.
		ids := slices.Grow(scratch.ids[:0], len(msgs))[:len(msgs)]
		flat := slices.Grow(scratch.entries[:0], len(msgs))[:len(msgs)]
		scratch.ids, scratch.entries = ids, flat
		for i := range msgs {
			ids[i], flat[i] = msgs[i].ID, idRef{msgs[i].ID, refs[i]}
		}
		entries := make(map[string][]idRef, len(topics))
		all := append(scratch.all[:0], ids...) // the batch's ids, sorted
		scratch.all = all
		logDoc.Entries = make([]logEntry, 0, len(topics))
		for _, t := range topics {
			r := batch[t]
			e := logEntry{Topic: t, IDs: ids[r[0]:r[1]:r[1]]}
			entries[t] = flat[r[0]:r[1]:r[1]]
			logDoc.Entries = append(logDoc.Entries, e)
			if logDoc.Min == "" || e.IDs[0] < logDoc.Min {
				logDoc.Min = e.IDs[0]
			}
			logDoc.Max = max(logDoc.Max, e.IDs[len(e.IDs)-1])
		}
		slices.Sort(all)
		logDoc.CLag = max(logDoc.CLag, lagOf(lg.cmax, all))
		logDoc.CMax = max(logDoc.CMax, logDoc.Max)
		logDoc.Buckets = len(bks)
		var starts []string
		for _, b := range bks[1:] {
			starts = append(starts, strconv.Itoa(b.from))
		}
		logDoc.BucketStarts = packStrings(starts)
		var segs []histSegment
		s.hidx.mu.Lock()
		window := cmp.Or(s.hidx.window, logWindow)
		windowIDs := cmp.Or(s.hidx.windowIDs, logWindowIDs)
		s.hidx.mu.Unlock()
		full := logDoc.N-lg.flushed >= window || lg.npending+len(msgs) >= windowIDs
		if full {
			merged := map[string][]idRef{}
			var ts []string
			for t, v := range lg.pending {
				// A copy: pending stays as it is should the insert fail.
				merged[t] = append(make([]idRef, 0, len(v)+len(entries[t])), v...)
				ts = append(ts, t)
			}
			for _, t := range topics {
				if merged[t] == nil {
					ts = append(ts, t)
				}
				merged[t] = append(merged[t], entries[t]...)
			}
			slices.Sort(ts)
			// Each chain's end: known to this process, or (after a restart)
			// probed, some reads a topic: in parallel.
			states := make([]chainState, len(ts))
			g, gctx := errgroup.WithContext(ctx)
			g.SetLimit(8)
			for i, t := range ts {
				g.Go(func() (err error) {
					states[i], err = s.chainState(gctx, node, t)
					return err
				})
			}
			if err := g.Wait(); err != nil {
				return err
			}
			for i, t := range ts {
				v := sortIDRefs(merged[t])
				ids, rs := make([]string, len(v)), make([]string, len(v))
				for j, x := range v {
					ids[j], rs[j] = x.id, x.ref
				}
				st := states[i]
				sg := histSegment{Node: node, Topic: t, N: st.n + 1, IDs: ids, Refs: rs, Min: ids[0], Max: ids[len(ids)-1],
					CMax: max(st.cmax, ids[len(ids)-1]), CLag: max(st.clag, lagOf(st.cmax, ids))}
				sg.ID = segID(node, t, sg.N)
				segs = append(segs, sg)
			}
			// The log document keeps its entries: finding a message by id
			// searches the log (historybucket.go).
			logDoc.Flushed = logDoc.N
		}
		// Buckets first, the log document last, in an ordered insert:
		// should FerretDB fall back to one insert each, it stops at the
		// first taken _id, so no log document or segment is written
		// naming buckets that hold another attempt's messages.
		// Encoded by hand into one buffer (the driver copies them into
		// its message): the reflective encoder copied each bucket's data
		// twice more.
		raw := slices.Grow(scratch.docs[:0], len(scratch.data)+len(bks)*128+len(all)*40+512)
		var ends []int
		for c, b := range bks {
			raw = appendBucketBSON(raw, &histBucket{ID: bucketID(node, bucketRef(logDoc.N, c)), Node: node, Count: b.to - b.from,
				T0: b.t0, T1: b.t1, Data: b.data})
			ends = append(ends, len(raw))
		}
		for i := range segs {
			raw = appendPackedSegmentBSON(raw, &segs[i])
			ends = append(ends, len(raw))
		}
		late, err := s.latePointers(ctx, node, lg.cmax, all, logDoc.N)
		if err != nil {
			return err
		}
		raw = appendPackedSegmentBSON(raw, &logDoc)
		ends = append(ends, len(raw))
		scratch.docs = raw
		docs := make([]any, 0, len(ends)+len(late))
		at := 0
		for _, e := range ends[:len(ends)-1] {
			docs = append(docs, bson.Raw(raw[at:e:e]))
			at = e
		}
		docs = append(docs, late...)
		docs = append(docs, bson.Raw(raw[at:]))
		_, err = coll.InsertMany(ctx, docs, options.InsertMany().SetOrdered(true))
		if err == nil {
			s.hidx.mu.Lock()
			for _, sg := range segs {
				s.hidx.chains[chainKey(node, sg.Topic)] = chainState{n: sg.N, cmax: sg.CMax, clag: sg.CLag}
			}
			s.hidx.chains[chainKey(node, logTopic)] = chainState{n: logDoc.N, cmax: logDoc.CMax, clag: logDoc.CLag}
			lg.n, lg.cmax, lg.clag, lg.flushed = logDoc.N, logDoc.CMax, logDoc.CLag, logDoc.Flushed
			if full {
				lg.pending, lg.npending = map[string][]idRef{}, 0
			} else {
				for _, t := range topics {
					p := lg.pending[t]
					if p == nil {
						// Sized for the window at this batch's rate: it grows
						// until the next full flush.
						p = make([]idRef, 0, min(int(window-(logDoc.N-lg.flushed))*len(entries[t]), windowIDs))
					}
					lg.pending[t] = append(p, entries[t]...)
				}
				lg.npending += len(msgs)
			}
			s.hidx.mu.Unlock()
			return nil
		}
		// Any number taken (a log document, a segment or a bucket) sends
		// the whole batch to a new one: a bucket left by another writer
		// must not stand for this batch's.
		if !onlyDuplicates(err) || attempt >= 3 {
			return fmt.Errorf("store: history index: %w", err)
		}
		if err := s.skipOrphanBuckets(ctx, err, len(bks), node, lg); err != nil {
			return err
		}
		// A document number taken: another process wrote this node's
		// index (a spool replayed at a restart), or an earlier attempt
		// of this batch did. Forget what this process knows of the node
		// and read it again from the store: the log's end, its window
		// (with the other writer's entries) and each chain's end.
		s.hidx.mu.Lock()
		delete(s.hidx.logs, node)
		for k := range s.hidx.chains {
			if strings.HasPrefix(k, chainKey(node, "")) {
				delete(s.hidx.chains, k)
			}
		}
		s.hidx.nodes[node] = false
		s.hidx.mu.Unlock()
	}
}

// skipOrphanBuckets handles an insert that failed at one of its buckets
// (the first nb documents): a bucket of that number is left by an attempt
// that failed before its log document (FerretDB writes one insert
// atomically, so a log document's buckets appear with it, or, inserting
// one each after a failure, without it). Its number would stay taken
// with no log document, and the log must have no gaps: an empty log
// document takes it, its cmax the log's before (only grows, and not ""
// so the purge moves the floor past it). The bucket's messages stay
// where a failed attempt's segments may name them, and were written
// again by their batch's retry.
func (s *Store) skipOrphanBuckets(ctx context.Context, err error, nb int, node string, lg *nodeLog) error {
	var bwe mongo.BulkWriteException
	if !errors.As(err, &bwe) || len(bwe.WriteErrors) == 0 || bwe.WriteErrors[0].Index >= nb {
		return nil
	}
	empty := histSegment{ID: segID(node, logTopic, lg.n+1), Node: node, Topic: logTopic, N: lg.n + 1, Flushed: lg.flushed,
		CMax: max(lg.cmax, ulid.ULID{}.String()), CLag: lg.clag}
	_, err = s.db.Collection(CollHistoryIndex).InsertOne(ctx, empty.packed())
	if err != nil && !mongo.IsDuplicateKeyError(err) {
		return fmt.Errorf("store: history index: %w", err)
	}
	return nil
}

// loadNodeLog returns this process's state of node's log, read from the
// store the first time: the log's end, and the entries of its window.
func (s *Store) loadNodeLog(ctx context.Context, node string) (*nodeLog, error) {
	s.hidx.mu.Lock()
	lg := s.hidx.logs[node]
	s.hidx.mu.Unlock()
	if lg != nil {
		return lg, nil
	}
	st, err := s.chainState(ctx, node, logTopic)
	if err != nil {
		return nil, err
	}
	lg = &nodeLog{n: st.n, cmax: st.cmax, clag: st.clag, flushed: st.n, pending: map[string][]idRef{}}
	if st.n > 0 {
		last, err := s.segment(ctx, node, logTopic, st.n)
		if err != nil {
			return nil, err
		}
		if last != nil {
			lg.flushed = last.Flushed
		}
		win, err := s.logWindowEntries(ctx, node, last, lg.flushed)
		if err != nil {
			return nil, err
		}
		for _, e := range win {
			for i, id := range e.IDs {
				lg.pending[e.Topic] = append(lg.pending[e.Topic], idRef{id, e.Refs[i]})
			}
			lg.npending += len(e.IDs)
		}
	}
	s.hidx.mu.Lock()
	s.hidx.logs[node] = lg
	s.hidx.mu.Unlock()
	return lg, nil
}

// logWindowEntries returns the entries of the log documents after flushed
// up to last (which is given), read in parallel. A document missing was
// purged: its messages have expired.
func (s *Store) logWindowEntries(ctx context.Context, node string, last *histSegment, flushed int64) ([]logEntry, error) {
	if last == nil || last.N <= flushed {
		return nil, nil
	}
	docs := make([]*histSegment, last.N-flushed)
	docs[len(docs)-1] = last
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i := range len(docs) - 1 {
		g.Go(func() (err error) {
			docs[i], err = s.segment(gctx, node, logTopic, flushed+1+int64(i))
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	var out []logEntry
	for _, d := range docs {
		if d != nil {
			out = append(out, d.Entries...)
		}
	}
	return out, nil
}

// chainState returns the last segment of a chain: known to this process,
// none for a node it registered itself, else probed.
func (s *Store) chainState(ctx context.Context, node, topic string) (chainState, error) {
	k := chainKey(node, topic)
	s.hidx.mu.Lock()
	st, ok := s.hidx.chains[k]
	fresh, known := s.hidx.nodes[node]
	s.hidx.mu.Unlock()
	if ok {
		return st, nil
	}
	if !known {
		_, err := s.db.Collection(CollHistoryNodes).InsertOne(ctx, bson.D{{Key: "_id", Value: node}})
		switch {
		case err == nil:
			fresh = true
		case mongo.IsDuplicateKeyError(err):
		default:
			return st, fmt.Errorf("store: history nodes: %w", err)
		}
		s.hidx.mu.Lock()
		s.hidx.nodes[node] = fresh
		s.hidx.mu.Unlock()
	}
	if fresh {
		return chainState{}, nil
	}
	first, floor, err := s.firstSegment(ctx, node, topic)
	if err != nil {
		return chainState{}, err
	}
	if first == nil { // empty, or purged whole: continue after the floor
		return chainState{n: max(floor-1, 0)}, nil
	}
	last, err := s.lastSegment(ctx, node, topic, first)
	if err != nil {
		return chainState{}, err
	}
	return chainState{n: last.N, cmax: last.CMax, clag: last.CLag}, nil
}

// segment reads segment n of a chain, from the cache if it holds it; nil
// if there is none. The result is shared: callers must not change it.
func (s *Store) segment(ctx context.Context, node, topic string, n int64) (*histSegment, error) {
	id := segID(node, topic, n)
	s.hidx.mu.Lock()
	sg := s.hidx.segs[id]
	s.hidx.mu.Unlock()
	if sg != nil {
		return sg, nil
	}
	sg = new(histSegment)
	err := s.db.Collection(CollHistoryIndex).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(sg)
	s.hidx.mu.Lock()
	s.hidx.reads++
	s.hidx.mu.Unlock()
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil, nil
	}
	if err == nil {
		err = sg.unpack()
	}
	if err != nil {
		return nil, fmt.Errorf("store: history index: %w", err)
	}
	s.cacheSegment(sg)
	return sg, nil
}

// segmentCMax returns the cmax of segment n of a chain, false if it is
// missing, reading only that field: a binary search on cmax needs nothing
// else, and a log document of a large batch holds thousands of ids the
// reader would decode (FerretDB still reads the whole document).
func (s *Store) segmentCMax(ctx context.Context, node, topic string, n int64) (string, bool, error) {
	id := segID(node, topic, n)
	s.hidx.mu.Lock()
	if sg := s.hidx.segs[id]; sg != nil {
		s.hidx.mu.Unlock()
		return sg.CMax, true, nil
	}
	if c, ok := s.hidx.cmaxes[id]; ok {
		s.hidx.mu.Unlock()
		return c, true, nil
	}
	s.hidx.mu.Unlock()
	var head struct {
		CMax string `bson:"cmax"`
	}
	err := s.db.Collection(CollHistoryIndex).FindOne(ctx, bson.D{{Key: "_id", Value: id}},
		options.FindOne().SetProjection(bson.D{{Key: "cmax", Value: 1}})).Decode(&head)
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	s.hidx.probes++
	if errors.Is(err, mongo.ErrNoDocuments) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("store: history index: %w", err)
	}
	if len(s.hidx.cmaxes) >= cmaxCacheLen {
		clear(s.hidx.cmaxes)
	}
	s.hidx.cmaxes[id] = head.CMax
	return head.CMax, true, nil
}

func (s *Store) cacheSegment(sg *histSegment) {
	s.hidx.mu.Lock()
	defer s.hidx.mu.Unlock()
	if _, ok := s.hidx.segs[sg.ID]; ok || sg.size() > segCacheIDs/4 {
		return
	}
	for id, old := range s.hidx.segs { // random order: random eviction
		if s.hidx.segIDs+sg.size() <= segCacheIDs {
			break
		}
		delete(s.hidx.segs, id)
		s.hidx.segIDs -= old.size()
	}
	s.hidx.segs[sg.ID] = sg
	s.hidx.segIDs += sg.size()
}

// floor returns a chain's floor (0: never purged), cached for floorTTL
// unless fresh.
func (s *Store) floor(ctx context.Context, node, topic string, fresh bool) (int64, error) {
	k := chainKey(node, topic)
	s.hidx.mu.Lock()
	f, ok := s.hidx.floors[k]
	s.hidx.mu.Unlock()
	if ok && !fresh && time.Since(f.at) < floorTTL {
		return f.n, nil
	}
	var fl struct {
		N int64 `bson:"n"`
	}
	at := time.Now()
	err := s.db.Collection(CollHistoryIndex).FindOne(ctx, bson.D{{Key: "_id", Value: floorID(node, topic)}}).Decode(&fl)
	s.hidx.mu.Lock()
	s.hidx.reads++
	s.hidx.mu.Unlock()
	if err != nil && !errors.Is(err, mongo.ErrNoDocuments) {
		return 0, fmt.Errorf("store: history index: %w", err)
	}
	s.hidx.mu.Lock()
	s.hidx.floors[k] = floorEntry{n: fl.N, at: at}
	s.hidx.mu.Unlock()
	return fl.N, nil
}

// firstSegment finds the chain's first segment and its floor: the floor
// (1 if it was never purged) or, if a purge raced and left the floor
// behind, the first found probing forward. nil: an empty chain.
func (s *Store) firstSegment(ctx context.Context, node, topic string) (*histSegment, int64, error) {
	for _, fresh := range []bool{false, true} {
		fl, err := s.floor(ctx, node, topic, fresh)
		if err != nil {
			return nil, 0, err
		}
		base := max(fl, 1)
		for step := int64(0); step < 1<<16; step = max(1, step*2) {
			sg, err := s.segment(ctx, node, topic, base+step)
			if err != nil || sg != nil {
				return sg, base, err
			}
			if fl == 0 {
				break // never purged: segment 1 is the first
			}
		}
		if fresh {
			return nil, base, nil
		}
		// Nothing found from a floor that may be stale: read it again.
	}
	panic("unreachable")
}

// lastSegment finds the chain's last segment from its first: exponential
// probing, then a binary search.
func (s *Store) lastSegment(ctx context.Context, node, topic string, first *histSegment) (*histSegment, error) {
	lo := first
	k := chainKey(node, topic)
	s.hidx.mu.Lock()
	hint := max(s.hidx.seen[k], s.hidx.chains[k].n)
	s.hidx.mu.Unlock()
	if hint > lo.N {
		sg, err := s.segment(ctx, node, topic, hint)
		if err != nil {
			return nil, err
		}
		if sg != nil {
			lo = sg
		}
	}
	defer func() {
		s.hidx.mu.Lock()
		s.hidx.seen[k] = lo.N
		s.hidx.mu.Unlock()
	}()
	var hi int64 // the first n known not to exist
	for step := int64(1); ; step *= 2 {
		sg, err := s.segment(ctx, node, topic, lo.N+step)
		if err != nil {
			return nil, err
		}
		if sg == nil {
			hi = lo.N + step
			break
		}
		lo = sg
	}
	for hi-lo.N > 1 {
		mid := lo.N + (hi-lo.N)/2
		sg, err := s.segment(ctx, node, topic, mid)
		if err != nil {
			return nil, err
		}
		if sg == nil {
			hi = mid
		} else {
			lo = sg
		}
	}
	return lo, nil
}

// nodeCandidates returns up to limit ids of topic written by node that
// meet q's bounds, newest first, with their buckets.
func (s *Store) nodeCandidates(ctx context.Context, node string, q HistoryQuery, limit int) ([]histCand, error) {
	// The log's window first, the topic's chain after: a full flush
	// between the two reads then shows its ids twice (removed below),
	// never not at all.
	var out []histCand
	newestFirst := func() {
		slices.SortFunc(out, func(a, b histCand) int { return cmp.Compare(b.id, a.id) })
		out = slices.CompactFunc(out, func(a, b histCand) bool { return a.id == b.id })
	}
	win, err := s.logWindowNow(ctx, node)
	if err != nil {
		return nil, err
	}
	for _, e := range win {
		if e.Topic != q.Topic {
			continue
		}
		for i, id := range e.IDs {
			if (q.Before == "" || id < q.Before) && (q.After == "" || id > q.After) {
				out = append(out, histCand{id, node, e.Refs[i]})
			}
		}
	}
	newestFirst()
	first, _, err := s.firstSegment(ctx, node, q.Topic)
	if err != nil || first == nil {
		return out[:min(len(out), limit)], err
	}
	last, err := s.lastSegment(ctx, node, q.Topic, first)
	if err != nil {
		return nil, err
	}
	start := last.N
	if q.Before != "" {
		// The first segment whose cmax passes the bound plus the chain's
		// lag: an id below the bound in a later segment would stand
		// further than the lag before the cmax of the segments before it.
		bound := lagged(q.Before, last.CLag)
		lo, hi := first.N-1, last.N+1 // cmax(lo) <= bound < cmax(hi)
		if first.CMax > bound {
			hi = first.N
		} else {
			lo = first.N
		}
		if last.CMax <= bound {
			lo = last.N
		}
		for hi-lo > 1 {
			mid := lo + (hi-lo)/2
			sg, err := s.segment(ctx, node, q.Topic, mid)
			if err != nil {
				return nil, err
			}
			if sg == nil { // purged meanwhile
				lo = mid
				continue
			}
			if sg.CMax <= bound {
				lo = mid
			} else {
				hi = mid
			}
		}
		start = min(hi, last.N)
	}
	const ahead = 4 // segments read at once, walking back
	for n := start; n >= first.N; {
		segs := make([]*histSegment, min(ahead, n-first.N+1))
		g, gctx := errgroup.WithContext(ctx)
		for i := range segs {
			g.Go(func() (err error) {
				segs[i], err = s.segment(gctx, node, q.Topic, n-int64(i))
				return err
			})
		}
		if err := g.Wait(); err != nil {
			return nil, err
		}
		n -= int64(len(segs))
		for _, sg := range segs {
			if sg == nil {
				return out[:min(len(out), limit)], nil // purged meanwhile
			}
			if len(out) >= limit && sg.CMax < out[limit-1].id {
				return out[:limit], nil // nothing here or before is newer than what we have
			}
			if q.After != "" && sg.CMax <= q.After {
				return out[:min(len(out), limit)], nil
			}
			for i, id := range sg.IDs {
				if (q.Before == "" || id < q.Before) && (q.After == "" || id > q.After) {
					out = append(out, histCand{id, node, sg.Refs[i]})
				}
			}
			newestFirst()
		}
	}
	return out[:min(len(out), limit)], nil
}

// logWindowNow returns the entries of node's log not yet in the topics'
// chains, as the store holds them now.
func (s *Store) logWindowNow(ctx context.Context, node string) ([]logEntry, error) {
	first, _, err := s.firstSegment(ctx, node, logTopic)
	if err != nil || first == nil {
		return nil, err
	}
	last, err := s.lastSegment(ctx, node, logTopic, first)
	if err != nil {
		return nil, err
	}
	return s.logWindowEntries(ctx, node, last, last.Flushed)
}

// lagged returns the highest id of the millisecond lag ms after id's.
func lagged(id string, lag int64) string {
	var b ulid.ULID
	_ = b.SetTime(uint64(idMillis(id) + lag))
	_ = b.SetEntropy([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	return b.String()
}

// indexedHistory answers a page through the index.
func (s *Store) indexedHistory(ctx context.Context, q HistoryQuery) ([]HistoryMessage, error) {
	// A few more than the page: messages purged before their segment are
	// skipped.
	want := q.Limit + 8
	var (
		mu      sync.Mutex
		per     [][]histCand
		started = map[string]bool{}
	)
	g, gctx := errgroup.WithContext(ctx)
	start := func(nodes []string) {
		for _, nd := range nodes {
			if started[nd] {
				continue
			}
			started[nd] = true
			g.Go(func() error {
				ids, err := s.nodeCandidates(gctx, nd, q, want)
				mu.Lock()
				per = append(per, ids)
				mu.Unlock()
				return err
			})
		}
	}
	// The nodes known from the last page start at once; the list is read
	// again meanwhile (a node may have written its first batch since).
	s.hidx.mu.Lock()
	known := s.hidx.nodeList
	s.hidx.mu.Unlock()
	start(known)
	nodes, err := s.historyNodes(gctx)
	if err != nil {
		_ = g.Wait()
		return nil, err
	}
	s.hidx.mu.Lock()
	s.hidx.nodeList = nodes
	s.hidx.mu.Unlock()
	start(nodes)
	if err := g.Wait(); err != nil {
		return nil, err
	}
	cands := slices.Concat(per...)
	slices.SortFunc(cands, func(a, b histCand) int { return cmp.Compare(b.id, a.id) })
	cands = slices.CompactFunc(cands, func(a, b histCand) bool { return a.id == b.id })
	var out []HistoryMessage
	for len(cands) > 0 && len(out) < q.Limit {
		chunk := cands[:min(len(cands), q.Limit-len(out))]
		cands = cands[len(chunk):]
		got, err := s.readCandidates(ctx, q.Topic, chunk)
		if err != nil {
			return nil, err
		}
		out = append(out, got...)
	}
	return out, nil
}

func (s *Store) historyNodes(ctx context.Context) ([]string, error) {
	cur, err := s.db.Collection(CollHistoryNodes).Find(ctx, bson.D{})
	if err != nil {
		return nil, fmt.Errorf("store: history nodes: %w", err)
	}
	var docs []struct {
		ID string `bson:"_id"`
	}
	if err := cur.All(ctx, &docs); err != nil {
		return nil, fmt.Errorf("store: history nodes: %w", err)
	}
	nodes := make([]string, len(docs))
	for i, d := range docs {
		nodes[i] = d.ID
	}
	return nodes, nil
}

// purgeHistoryIndex deletes the segments and log documents whose ids are
// all older than cutoff, moving each chain's floor past them, and the
// buckets whose messages all are, rewriting those holding some
// (historybucket.go). It returns how many messages it removed. FerretDB
// reads the whole collection for either, so in two passes: one finds, one
// deletes.
func (s *Store) purgeHistoryIndex(ctx context.Context, cutoff time.Time) (int64, error) {
	var c ulid.ULID
	_ = c.SetTime(uint64(max(cutoff.UnixMilli(), 0)))
	oldSeg := bson.D{{Key: "cmax", Value: bson.D{{Key: "$lt", Value: c.String()}}}}
	// A second's late pointers go together, once the whole second is
	// before cutoff: a lookup probes them in order and stops at the first
	// missing (lateRefsOf), and each holds the highest id it points to, in
	// its second.
	var cs ulid.ULID
	_ = cs.SetTime(uint64(max(cutoff.UnixMilli(), 0) / 1000 * 1000))
	oldLate := bson.D{{Key: "lmax", Value: bson.D{{Key: "$lt", Value: cs.String()}}}}
	coll := s.db.Collection(CollHistoryIndex)
	cur, err := coll.Find(ctx, bson.D{{Key: "$or", Value: bson.A{oldSeg, bson.D{{Key: "t0", Value: bson.D{{Key: "$lt", Value: cutoff}}}}}}},
		options.Find().SetProjection(bson.D{{Key: "node", Value: 1}, {Key: "topic", Value: 1}, {Key: "n", Value: 1},
			{Key: "cmax", Value: 1}, {Key: "t1", Value: 1}, {Key: "m", Value: 1}}))
	if err != nil {
		return 0, fmt.Errorf("store: purge history index: %w", err)
	}
	var docs []struct {
		ID    string    `bson:"_id"`
		Node  string    `bson:"node"`
		Topic string    `bson:"topic"`
		N     int64     `bson:"n"`
		CMax  string    `bson:"cmax"`
		T1    time.Time `bson:"t1"`
		Count int64     `bson:"m"`
	}
	if err := cur.All(ctx, &docs); err != nil {
		return 0, fmt.Errorf("store: purge history index: %w", err)
	}
	floors := map[string]histSegment{}
	var removed int64
	var spanning []string
	for _, d := range docs {
		switch {
		case d.CMax != "": // a segment or log document
			k := chainKey(d.Node, d.Topic)
			if d.N >= floors[k].N {
				floors[k] = histSegment{Node: d.Node, Topic: d.Topic, N: d.N}
			}
		case d.T1.Before(cutoff): // a bucket, expired whole
			removed += d.Count
		default:
			spanning = append(spanning, d.ID)
		}
	}
	// Floors first: a page probing meanwhile starts past what is deleted.
	for _, sg := range floors {
		_, err := coll.ReplaceOne(ctx, bson.D{{Key: "_id", Value: floorID(sg.Node, sg.Topic)}},
			bson.D{{Key: "n", Value: sg.N + 1}}, options.Replace().SetUpsert(true))
		if err != nil {
			return removed, fmt.Errorf("store: purge history index: %w", err)
		}
	}
	for _, id := range spanning {
		n, err := s.trimBucket(ctx, id, cutoff)
		if err != nil {
			return removed, err
		}
		removed += n
	}
	if _, err := coll.DeleteMany(ctx, bson.D{{Key: "$or", Value: bson.A{oldSeg, oldLate, bson.D{{Key: "t1", Value: bson.D{{Key: "$lt", Value: cutoff}}}}}}}); err != nil {
		return removed, fmt.Errorf("store: purge history index: %w", err)
	}
	s.hidx.mu.Lock()
	clear(s.hidx.segs)
	clear(s.hidx.floors)
	s.hidx.segIDs = 0
	s.hidx.mu.Unlock()
	return removed, nil
}
