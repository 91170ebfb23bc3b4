package store_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/oklog/ulid/v2"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
)

// nodeMsgs makes n messages of node on topics, ids increasing as a
// broker's do, stamped at.
func nodeMsgs(node string, n int, at time.Time, topic func(i int) string) []store.HistoryMessage {
	ent := ulid.Monotonic(rand.Reader, 0)
	out := make([]store.HistoryMessage, n)
	for i := range out {
		out[i] = store.HistoryMessage{ID: ulid.MustNew(ulid.Timestamp(at), ent).String(), Topic: topic(i),
			Payload: []byte(fmt.Sprintf("%s-%d", node, i)), QoS: 1, Publisher: "c", Node: node, Time: at.UTC().Truncate(time.Millisecond)}
	}
	return out
}

// walk pages through topic newest first, limit a page, and returns the ids.
func walk(t *testing.T, s *store.Store, q store.HistoryQuery) []string {
	t.Helper()
	ctx := context.Background()
	var ids []string
	for {
		page, err := s.History(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range page {
			if m.Topic != q.Topic {
				t.Fatalf("message %s of topic %q in a page of %q", m.ID, m.Topic, q.Topic)
			}
			ids = append(ids, m.ID)
		}
		if len(page) < q.Limit {
			return ids
		}
		q.Before = page[len(page)-1].ID
	}
}

func idsOf(msgs []store.HistoryMessage, topic string) []string {
	var out []string
	for _, m := range msgs {
		if m.Topic == topic {
			out = append(out, m.ID)
		}
	}
	slices.Sort(out)
	slices.Reverse(out)
	return out
}

func wantIDs(t *testing.T, what string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("%s: got %d ids, want %d (newest first, each once)\ngot  %v\nwant %v", what, len(got), len(want), got, want)
	}
}

// Two writer nodes insert batches while a reader walks pages by cursor:
// each walk is newest first, holds no message twice and none of another
// topic, and misses none written before it started; at the end a walk
// returns exactly what was written.
func TestHistoryIndexPagesAcrossNodesWhileInserting(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	topic := func(i int) string {
		if i%3 == 0 {
			return "hot"
		}
		return fmt.Sprintf("t/%d", i%5)
	}
	var mu sync.Mutex
	var written []store.HistoryMessage
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for _, node := range []string{"n1", "n2"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 12 {
				batch := nodeMsgs(node, 25, time.Now(), topic)
				if err := s.InsertHistory(ctx, batch); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				written = append(written, batch...)
				mu.Unlock()
			}
		}()
	}
	walks := 0
	for done := false; !done; {
		select {
		case err := <-errs:
			t.Fatal(err)
		default:
		}
		mu.Lock()
		before := slices.Clone(written)
		mu.Unlock()
		got := walk(t, s, store.HistoryQuery{Topic: "hot", Limit: 7})
		walks++
		if !slices.IsSortedFunc(got, func(a, b string) int { return -compare(a, b) }) || len(slices.Compact(slices.Clone(got))) != len(got) {
			t.Fatalf("walk %d not strictly newest first: %v", walks, got)
		}
		for _, id := range idsOf(before, "hot") {
			if len(got) > 0 && id < got[0] && !slices.Contains(got, id) {
				t.Fatalf("walk %d misses %s, written before it started", walks, id)
			}
		}
		mu.Lock()
		done = len(written) == 2*12*25
		mu.Unlock()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d walks while inserting", walks)
	wantIDs(t, "final walk", walk(t, s, store.HistoryQuery{Topic: "hot", Limit: 7}), idsOf(written, "hot"))
	wantIDs(t, "other topic", walk(t, s, store.HistoryQuery{Topic: "t/1", Limit: 1000}), idsOf(written, "t/1"))

	// Bounds: ids strictly between after and before, newest first.
	all := idsOf(written, "hot")
	page, err := s.History(ctx, store.HistoryQuery{Topic: "hot", Before: all[10], After: all[30], Limit: 5})
	if err != nil {
		t.Fatal(err)
	}
	var pids []string
	for _, m := range page {
		pids = append(pids, m.ID)
	}
	wantIDs(t, "before/after page", pids, all[11:16])
	wantIDs(t, "before/after walk", walk(t, s, store.HistoryQuery{Topic: "hot", Before: all[10], After: all[30], Limit: 6}), all[11:30])
	wantIDs(t, "after only", walk(t, s, store.HistoryQuery{Topic: "hot", After: all[5], Limit: 4}), all[:5])
}

func compare(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// A batch written again (a retry after a failure) and a spool replayed by
// a new process (a new Store, knowing nothing of the chains) leave every
// message in pages exactly once; later batches are found after them.
func TestHistoryIndexRewriteAndReplayKeepEachMessageOnce(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	topic := func(i int) string { return []string{"a", "b"}[i%2] }
	b1 := nodeMsgs("n1", 40, time.Now().Add(-time.Minute), topic)
	b2 := nodeMsgs("n1", 40, time.Now().Add(-30*time.Second), topic)
	for _, b := range [][]store.HistoryMessage{b1, b2, b2, b1} {
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	all := slices.Concat(b1, b2)
	wantIDs(t, "after a rewrite", walk(t, s, store.HistoryQuery{Topic: "a", Limit: 9}), idsOf(all, "a"))

	// Another process (same database, same node): its first batch replays
	// b2, then writes b3.
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	b3 := nodeMsgs("n1", 40, time.Now(), topic)
	for _, b := range [][]store.HistoryMessage{b2, b3} {
		if err := s2.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	// The first process's view of the chain is now stale: its next batch
	// finds the segment number taken and appends after it.
	b4 := nodeMsgs("n1", 40, time.Now().Add(time.Second), topic)
	if err := s.InsertHistory(ctx, b4); err != nil {
		t.Fatal(err)
	}
	all = slices.Concat(all, b3, b4)
	for _, st := range []*store.Store{s, s2} {
		wantIDs(t, "after a replay", walk(t, st, store.HistoryQuery{Topic: "a", Limit: 9}), idsOf(all, "a"))
		wantIDs(t, "after a replay, b", walk(t, st, store.HistoryQuery{Topic: "b", Limit: 1000}), idsOf(all, "b"))
	}
}

// Purging deletes the index segments of expired messages with them; pages
// list what is left, and writing goes on after the purged part, in this
// process and in a new one, also for a chain purged whole.
func TestHistoryIndexPurge(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	const window = 4
	s.SetHistoryLogWindow(window)
	old := time.Now().Add(-2 * time.Hour)
	// A log window of old batches: the last one writes the topics'
	// segments.
	for i := range window {
		b := nodeMsgs("n1", 20, old.Add(time.Duration(i)*time.Second), func(int) string { return "a" })
		b = append(b, nodeMsgs("n1", 5, old.Add(time.Duration(i)*time.Minute), func(int) string { return "gone" })...)
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	fresh := nodeMsgs("n1", 20, time.Now(), func(int) string { return "a" })
	if err := s.InsertHistory(ctx, fresh); err != nil {
		t.Fatal(err)
	}
	segs := func() int64 {
		n, err := s.DB().Collection(store.CollHistoryIndex).CountDocuments(ctx, bson.D{{Key: "cmax", Value: bson.D{{Key: "$exists", Value: true}}}})
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	// The window's log documents, a segment for each topic, the fresh
	// batch's log document.
	if n, want := segs(), int64(window+2+1); n != want {
		t.Fatalf("%d index documents before the purge, want %d", n, want)
	}
	if _, err := s.PurgeHistory(ctx, time.Now().Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	if n := segs(); n != 1 {
		t.Fatalf("%d index documents after the purge, want 1 (the fresh batch's)", n)
	}
	wantIDs(t, "after the purge", walk(t, s, store.HistoryQuery{Topic: "a", Limit: 7}), idsOf(fresh, "a"))
	wantIDs(t, "purged topic", walk(t, s, store.HistoryQuery{Topic: "gone", Limit: 7}), nil)

	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	more := nodeMsgs("n1", 10, time.Now().Add(time.Second), func(i int) string { return []string{"a", "gone"}[i%2] })
	if err := s2.InsertHistory(ctx, more); err != nil {
		t.Fatal(err)
	}
	wantIDs(t, "written after the purge", walk(t, s, store.HistoryQuery{Topic: "a", Limit: 7}), idsOf(slices.Concat(fresh, more), "a"))
	wantIDs(t, "purged whole, written again", walk(t, s, store.HistoryQuery{Topic: "gone", Limit: 2}), idsOf(more, "gone"))
}

// Ids a node writes out of order (the push API's come from its own clock;
// a late batch) are found by bounded pages and walks all the same.
func TestHistoryIndexOutOfOrderIDs(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	now := time.Now()
	var all []store.HistoryMessage
	for i := range 6 {
		b := nodeMsgs("n1", 10, now.Add(time.Duration(i)*time.Second), func(int) string { return "a" })
		if i == 4 {
			// Made 30 s earlier, written now: older than everything above.
			b = append(b, nodeMsgs("n1", 3, now.Add(-30*time.Second), func(int) string { return "a" })...)
		}
		all = append(all, b...)
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	want := idsOf(all, "a")
	wantIDs(t, "walk", walk(t, s, store.HistoryQuery{Topic: "a", Limit: 4}), want)
	for _, i := range []int{5, 40, 55, 57} {
		page, err := s.History(ctx, store.HistoryQuery{Topic: "a", Before: want[i], Limit: 3})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, m := range page {
			got = append(got, m.ID)
		}
		wantIDs(t, fmt.Sprintf("before #%d", i), got, want[i+1:min(i+4, len(want))])
	}
}

// Pages read the index through caches: once a chain has been walked, a page
// from any cursor reads about one index document (the probe for a new end
// of the chain) before its messages, not the floor, the first segment and
// a binary search over the chain.
func TestHistoryIndexPagesReadFewSegments(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	s.SetHistoryLogWindow(4)
	var all []store.HistoryMessage
	at := time.Now().Add(-time.Hour)
	for i := range 24 {
		b := nodeMsgs("n1", 6, at.Add(time.Duration(i)*time.Second), func(j int) string { return []string{"a", "b", "c"}[j%3] })
		all = append(all, b...)
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	want := idsOf(all, "a")
	wantIDs(t, "walk", walk(t, s, store.HistoryQuery{Topic: "a", Limit: 5}), want)
	before := s.HistoryIndexReads()
	const pages = 20
	for i := range pages {
		c := (i * 37) % (len(want) - 4)
		page, err := s.History(ctx, store.HistoryQuery{Topic: "a", Before: want[c], Limit: 3})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, m := range page {
			got = append(got, m.ID)
		}
		wantIDs(t, fmt.Sprintf("page before #%d", c), got, want[c+1:c+4])
	}
	// Each page probes for a new end of the node's log and of the topic's
	// chain.
	if n := s.HistoryIndexReads() - before; n > 3*pages {
		t.Fatalf("%d pages read %d index documents from the server, want at most %d", pages, n, 3*pages)
	}
}

// A purge by another process leaves this one's caches stale: its pages
// still list exactly the messages left, and new ones written after.
func TestHistoryIndexPagesAfterAnotherProcessPurges(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	old := time.Now().Add(-2 * time.Hour)
	for i := range 6 {
		b := nodeMsgs("n1", 8, old.Add(time.Duration(i)*time.Minute), func(int) string { return "a" })
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	fresh := nodeMsgs("n1", 8, time.Now(), func(int) string { return "a" })
	if err := s.InsertHistory(ctx, fresh); err != nil {
		t.Fatal(err)
	}
	reader, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close(ctx)
	if got := walk(t, reader, store.HistoryQuery{Topic: "a", Limit: 5}); len(got) != 7*8 {
		t.Fatalf("walk before the purge: %d messages, want %d", len(got), 7*8)
	}
	if _, err := s.PurgeHistory(ctx, time.Now().Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	wantIDs(t, "after another process purged", walk(t, reader, store.HistoryQuery{Topic: "a", Limit: 5}), idsOf(fresh, "a"))
	more := nodeMsgs("n1", 4, time.Now().Add(time.Second), func(int) string { return "a" })
	if err := s.InsertHistory(ctx, more); err != nil {
		t.Fatal(err)
	}
	wantIDs(t, "written after the purge", walk(t, reader, store.HistoryQuery{Topic: "a", Limit: 5}), idsOf(slices.Concat(fresh, more), "a"))
}

// A batch of many topics costs one index document, not one per topic:
// its ids go to the node's log, and only once every window of batches to
// each topic's chain. Every topic's pages list exactly its messages, from
// the log, from the chains, and from both.
func TestHistoryIndexManyTopicsOneLogDocumentPerBatch(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	const window = 4
	s.SetHistoryLogWindow(window)
	const topics, batches = 50, 2*window + 3
	var all []store.HistoryMessage
	at := time.Now().Add(-time.Minute)
	for i := range batches {
		b := nodeMsgs("n1", topics, at.Add(time.Duration(i)*time.Millisecond), func(j int) string { return fmt.Sprintf("d/%d", j) })
		all = append(all, b...)
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
		if i == 2 {
			wantIDs(t, "from the log", walk(t, s, store.HistoryQuery{Topic: "d/7", Limit: 2}), idsOf(all, "d/7"))
		}
	}
	n, err := s.DB().Collection(store.CollHistoryIndex).CountDocuments(ctx, bson.D{})
	if err != nil {
		t.Fatal(err)
	}
	// One log document and one bucket per batch, one segment per topic at
	// each of the two full flushes.
	if want := int64(2*batches + 2*topics); n != want {
		t.Fatalf("%d index documents for %d batches of %d topics, want %d", n, batches, topics, want)
	}
	for _, tp := range []string{"d/0", "d/7", "d/49"} {
		wantIDs(t, tp, walk(t, s, store.HistoryQuery{Topic: tp, Limit: 3}), idsOf(all, tp))
	}
	want := idsOf(all, "d/7")
	page, err := s.History(ctx, store.HistoryQuery{Topic: "d/7", Before: want[2], After: want[len(want)-3], Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range page {
		got = append(got, m.ID)
	}
	wantIDs(t, "bounded, across the log and the chain", got, want[3:len(want)-3])
}

// A writer process that restarts (a new Store) takes over the entries of
// its node's log not yet in the chains: pages after its next full flush
// list every message once, read by either process, while a reader pages
// throughout.
func TestHistoryIndexLogSurvivesARestartAcrossFlushes(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	const window = 4
	s.SetHistoryLogWindow(window)
	topic := func(i int) string { return []string{"a", "b", "c"}[i%3] }
	var all []store.HistoryMessage
	write := func(st *store.Store, n int) {
		for range n {
			b := nodeMsgs("n1", 6, time.Now(), topic)
			if err := st.InsertHistory(ctx, b); err != nil {
				t.Fatal(err)
			}
			all = append(all, b...)
			got := walk(t, s, store.HistoryQuery{Topic: "a", Limit: 20})
			wantIDs(t, fmt.Sprintf("walk after %d batches", len(all)/6), got, idsOf(all, "a"))
		}
	}
	// Two full flushes, then one batch in the log's window.
	write(s, 2*window+1)
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	s2.SetHistoryLogWindow(window)
	// The new process's first full flush must write that batch too.
	write(s2, 2*window+1)
	for _, st := range []*store.Store{s, s2} {
		for _, tp := range []string{"a", "b", "c"} {
			wantIDs(t, "final "+tp, walk(t, st, store.HistoryQuery{Topic: tp, Limit: 7}), idsOf(all, tp))
		}
	}
}

// Large batches make a full flush by the ids pending, not only every
// window of batches: a segment then holds about as many ids whatever
// history.batch_size is (a page reads whole segments). A process that
// restarts counts the ids its log's window already holds.
func TestHistoryIndexFullFlushByIDs(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	s.SetHistoryLogWindow(32)
	const windowIDs = 50
	s.SetHistoryLogWindowIDs(windowIDs)
	topic := func(i int) string { return []string{"a", "b"}[i%2] }
	segs := func() []string {
		cur, err := s.DB().Collection(store.CollHistoryIndex).Find(ctx, bson.D{{Key: "cmax", Value: bson.D{{Key: "$exists", Value: true}}}})
		if err != nil {
			t.Fatal(err)
		}
		var docs []struct {
			ID string `bson:"_id"`
		}
		if err := cur.All(ctx, &docs); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, d := range docs {
			// Segments of the topics' chains ("<len>:n1|<topic>|k"), not
			// the log's documents ("<len>:n1||k").
			if _, rest, _ := strings.Cut(d.ID, ":"); !strings.HasPrefix(rest, "n1||") {
				out = append(out, rest)
			}
		}
		slices.Sort(out)
		return out
	}
	var all []store.HistoryMessage
	write := func(st *store.Store) {
		b := nodeMsgs("n1", 20, time.Now(), topic)
		if err := st.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
		all = append(all, b...)
	}
	write(s)
	write(s)
	if got := segs(); len(got) != 0 {
		t.Fatalf("segments after 40 ids of a window of %d: %v, want none", windowIDs, got)
	}
	write(s) // 60 ids: a full flush
	if got, want := segs(), []string{"n1|a|1", "n1|b|1"}; !slices.Equal(got, want) {
		t.Fatalf("segments after 60 ids of a window of %d: %v, want %v", windowIDs, got, want)
	}
	write(s)
	write(s)
	// A new process takes over the window's 40 ids: its first batch
	// flushes.
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	s2.SetHistoryLogWindow(32)
	s2.SetHistoryLogWindowIDs(windowIDs)
	write(s2)
	if got, want := segs(), []string{"n1|a|1", "n1|a|2", "n1|b|1", "n1|b|2"}; !slices.Equal(got, want) {
		t.Fatalf("segments after a restart with 40 ids pending and a batch of 20: %v, want %v", got, want)
	}
	for _, st := range []*store.Store{s, s2} {
		for _, tp := range []string{"a", "b"} {
			wantIDs(t, "pages "+tp, walk(t, st, store.HistoryQuery{Topic: tp, Limit: 7}), idsOf(all, tp))
		}
	}
}

// A lookup by id finds the log document that may hold the id by a binary
// search on cmax, reading that field of the documents it probes, not
// their ids (a log document of a batch of 4,096 holds ~110 KB of them),
// and the probes are cached; it reads whole only the documents that may
// hold the id.
func TestHistoryByIDProbesTheLogByCMax(t *testing.T) {
	s := storetest.Open(t)
	ctx := context.Background()
	s.SetHistoryLogWindow(4)
	var all []store.HistoryMessage
	for i := range 40 {
		b := nodeMsgs("n1", 5, time.Now().Add(time.Duration(i-40)*5*time.Second), func(int) string { return "a" })
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
		all = append(all, b...)
	}
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	lookup := func(m store.HistoryMessage) int64 {
		t.Helper()
		r0 := s2.HistoryIndexReads()
		got, err := s2.HistoryByID(ctx, m.ID)
		if err != nil || got.ID != m.ID || string(got.Payload) != string(m.Payload) {
			t.Fatalf("HistoryByID(%s) = %+v, %v", m.ID, got, err)
		}
		return s2.HistoryIndexReads() - r0
	}
	first := lookup(all[12])
	if s2.HistoryIndexProbes() == 0 {
		t.Fatal("no cmax probes: the binary search read whole log documents")
	}
	// The chain's ends and the document holding the id, read whole; the
	// binary search's documents probed (then cached).
	t.Logf("first lookup: %d documents read whole, %d probes", first, s2.HistoryIndexProbes())
	if first > 16 {
		t.Fatalf("first lookup read %d index documents whole", first)
	}
	p := s2.HistoryIndexProbes()
	for _, m := range []store.HistoryMessage{all[13], all[11]} {
		lookup(m)
	}
	if s2.HistoryIndexProbes() != p {
		t.Fatalf("lookups in the same document probed %d times more: the probes are not cached", s2.HistoryIndexProbes()-p)
	}
}
