package store_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
)

// bucketStore opens a store that writes history in buckets, or skips.
func bucketStore(t *testing.T) *store.Store {
	t.Helper()
	s := storetest.Open(t)
	if on, err := s.HistoryInBuckets(context.Background()); err != nil {
		t.Fatal(err)
	} else if !on {
		t.Skip("the server keeps one document per message (not FerretDB)")
	}
	return s
}

func countDocs(t *testing.T, s *store.Store, coll string) int64 {
	t.Helper()
	n, err := s.DB().Collection(coll).CountDocuments(context.Background(), bson.D{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// wantByID reads every message by id and compares it with what was
// written, field by field.
func wantByID(t *testing.T, s *store.Store, msgs []store.HistoryMessage) {
	t.Helper()
	for _, w := range msgs {
		m, err := s.HistoryByID(context.Background(), w.ID)
		if err != nil {
			t.Fatalf("message %s by id: %v", w.ID, err)
		}
		if m.ID != w.ID || m.Topic != w.Topic || !bytes.Equal(m.Payload, w.Payload) || m.Node != w.Node ||
			m.Publisher != w.Publisher || !m.Time.Equal(w.Time) || m.QoS != w.QoS || m.ContentType != w.ContentType ||
			!slices.Equal(m.User, w.User) {
			t.Fatalf("message %s by id: %+v, want %+v", w.ID, m, w)
		}
	}
}

// On FerretDB a batch costs a few documents, not one per message: each
// document inserted costs FerretDB ~30-45 µs of the broker's CPU. Pages
// and lookups by id find every message, fields and binary payload intact.
func TestHistoryBucketsFewDocumentsPerBatch(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	const batches, per = 3, 200
	var all []store.HistoryMessage
	at := time.Now().Add(-time.Minute)
	for i := range batches {
		b := nodeMsgs("n1", per, at.Add(time.Duration(i)*time.Second), func(j int) string { return fmt.Sprintf("t/%d", j%10) })
		for j := range b {
			b[j].Payload = []byte{0xff, 0x00, byte(j), byte(i)} // not UTF-8
			b[j].User = []store.UserProperty{{Key: "k", Value: fmt.Sprint(j)}}
			b[j].ContentType = "application/octet-stream"
		}
		all = append(all, b...)
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	// A log document and a few buckets per batch (no full flush yet):
	// about 38 KiB of messages a batch, cut at a topic past 8 KiB.
	if n := countDocs(t, s, store.CollHistory); n != 0 {
		t.Fatalf("%d documents of one message each", n)
	}
	if docs, most := countDocs(t, s, store.CollHistoryIndex), int64(batches*(1+6)); docs > most {
		t.Fatalf("%d documents for %d batches of %d messages, want at most %d", docs, batches, per, most)
	}
	for _, tp := range []string{"t/0", "t/9"} {
		wantIDs(t, tp, walk(t, s, store.HistoryQuery{Topic: tp, Limit: 7}), idsOf(all, tp))
	}
	wantByID(t, s, every(all, 37))
}

func every(msgs []store.HistoryMessage, n int) []store.HistoryMessage {
	var out []store.HistoryMessage
	for i := 0; i < len(msgs); i += n {
		out = append(out, msgs[i])
	}
	return out
}

// A batch larger than a bucket is cut into several: each message is found
// in its own, by page (across the log and, after a full flush, the
// segments) and by id.
func TestHistoryBucketsCutLargeBatches(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	s.SetHistoryLogWindow(2)
	big := bytes.Repeat([]byte{0xfe}, store.HistoryBucketBytes/3)
	var all []store.HistoryMessage
	for i := range 3 { // the second batch flushes the window
		b := nodeMsgs("n1", 8, time.Now().Add(time.Duration(i-10)*time.Second), func(j int) string { return []string{"a", "b"}[j%2] })
		for j := range b {
			b[j].Payload = append(slices.Clone(big), byte(j), byte(i))
		}
		all = append(all, b...)
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	if n := countDocs(t, s, store.CollHistoryIndex); n < 3*3 {
		t.Fatalf("%d index documents: the batches of %d bytes were not cut", n, 8*len(big))
	}
	for _, tp := range []string{"a", "b"} {
		wantIDs(t, tp, walk(t, s, store.HistoryQuery{Topic: tp, Limit: 3}), idsOf(all, tp))
	}
	wantByID(t, s, all)
}

// Messages written again in other batches (a spool replayed by another
// process after a crash, a batch retried) are stored twice and read once:
// by page, by id and in AllHistory.
func TestHistoryBucketsReplayReadOnce(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	s.SetHistoryLogWindow(3)
	msgs := nodeMsgs("n1", 60, time.Now().Add(-time.Minute), func(j int) string { return []string{"a", "b", "c"}[j%3] })
	for i := 0; i < 40; i += 10 {
		if err := s.InsertHistory(ctx, msgs[i:i+10]); err != nil {
			t.Fatal(err)
		}
	}
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	for i := 25; i < 60; i += 7 { // other boundaries, overlapping
		if err := s2.InsertHistory(ctx, msgs[i:min(i+7, 60)]); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.InsertHistory(ctx, msgs[30:45]); err != nil {
		t.Fatal(err)
	}
	for _, st := range []*store.Store{s, s2} {
		for _, tp := range []string{"a", "b", "c"} {
			wantIDs(t, tp, walk(t, st, store.HistoryQuery{Topic: tp, Limit: 4}), idsOf(msgs, tp))
		}
	}
	all, err := s.AllHistory(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != len(msgs) {
		t.Fatalf("AllHistory: %d messages, want %d", len(all), len(msgs))
	}
	wantByID(t, s2, msgs)
}

// The purge removes expired messages only: a bucket holding messages on
// both sides of the cutoff is rewritten without the old ones, a bucket of
// old ones deleted; the rest is read as before, by page and by id.
func TestHistoryBucketsPurgeSpanningCutoff(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	now := time.Now()
	old := nodeMsgs("n1", 6, now.Add(-3*time.Hour), func(j int) string { return "a" })
	if err := s.InsertHistory(ctx, old); err != nil { // a bucket of old ones only
		t.Fatal(err)
	}
	// One batch, one bucket, on both sides of the cutoff.
	topic := func(j int) string { return []string{"a", "b"}[j%2] }
	span := slices.Concat(nodeMsgs("n1", 4, now.Add(-2*time.Hour), topic), nodeMsgs("n1", 6, now, topic))
	if err := s.InsertHistory(ctx, span); err != nil {
		t.Fatal(err)
	}
	n, err := s.PurgeHistory(ctx, now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if n != 6+4 {
		t.Fatalf("purged %d messages, want %d", n, 6+4)
	}
	kept := span[4:]
	all, err := s.AllHistory(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := idsOf(all, "a"); !slices.Equal(got, idsOf(kept, "a")) {
		t.Fatalf("after the purge, topic a holds %v, want %v", got, idsOf(kept, "a"))
	}
	wantIDs(t, "a", walk(t, s, store.HistoryQuery{Topic: "a", Limit: 2}), idsOf(kept, "a"))
	wantIDs(t, "b", walk(t, s, store.HistoryQuery{Topic: "b", Limit: 2}), idsOf(kept, "b"))
	wantByID(t, s, kept)
	for _, m := range slices.Concat(old, span[:4]) {
		if _, err := s.HistoryByID(ctx, m.ID); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("purged message %s by id: %v, want not found", m.ID, err)
		}
	}
}

// Ids written long after their time (a spool replayed after an outage) are
// found by id through their batch's late pointers, and a lookup of an id
// that does not exist reads a few index documents, not the log written
// since the replayed ids' time.
func TestHistoryBucketsByIDAfterALateReplay(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	s.SetHistoryLogWindow(4)
	now := time.Now()
	topic := func(j int) string { return []string{"a", "b"}[j%2] }
	write := func(st *store.Store, from, n int, at time.Time) []store.HistoryMessage {
		var out []store.HistoryMessage
		for i := range n {
			b := nodeMsgs("n1", 3, at.Add(time.Duration(from+i)*time.Millisecond), topic)
			if err := st.InsertHistory(ctx, b); err != nil {
				t.Fatal(err)
			}
			out = append(out, b...)
		}
		return out
	}
	before := write(s, 0, 30, now)
	late := write(s, 0, 3, now.Add(-10*time.Minute)) // the replay
	after := write(s, 30, 30, now)

	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	wantByID(t, s2, slices.Concat(late, every(before, 7), every(after, 7)))
	for _, tp := range []string{"a", "b"} {
		wantIDs(t, tp, walk(t, s2, store.HistoryQuery{Topic: tp, Limit: 5}), idsOf(slices.Concat(before, late, after), tp))
	}
	s3, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close(ctx)
	missing := nodeMsgs("n1", 1, now.Add(-10*time.Minute+time.Millisecond), topic)[0].ID
	if _, err := s3.HistoryByID(ctx, missing); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("an id never written: %v, want not found", err)
	}
	if n := s3.HistoryIndexReads(); n > 25 {
		t.Fatalf("looking up an id never written read %d index documents of a log of %d", n, 63)
	}
}

// A bucket left by an attempt that failed before its log document (another
// process's, in one insert each) takes the number the next batch would
// use: that batch must not be listed under a bucket that holds other
// messages, or its messages are not found by id and pages may skip them.
func TestHistoryBucketsLeftByAFailedAttemptAreNotTaken(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	now := time.Now()
	topic := func(int) string { return "a" }
	first := nodeMsgs("n1", 3, now, topic)
	if err := s.InsertHistory(ctx, first); err != nil {
		t.Fatal(err)
	}
	// Bucket 2.0, as a failed attempt leaves it: another message, and no
	// log document 2.
	other := nodeMsgs("n1", 1, now.Add(time.Millisecond), topic)[0]
	data, err := bson.Marshal(other)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.DB().Collection(store.CollHistoryIndex).InsertOne(ctx, bson.D{{Key: "_id", Value: store.HistoryBucketID("n1", 2, 0)},
		{Key: "node", Value: "n1"}, {Key: "m", Value: 1}, {Key: "t0", Value: other.Time}, {Key: "t1", Value: other.Time},
		{Key: "d", Value: data}}); err != nil {
		t.Fatal(err)
	}
	second := nodeMsgs("n1", 3, now.Add(2*time.Millisecond), topic)
	if err := s.InsertHistory(ctx, second); err != nil {
		t.Fatal(err)
	}
	third := nodeMsgs("n1", 3, now.Add(3*time.Millisecond), topic)
	if err := s.InsertHistory(ctx, third); err != nil {
		t.Fatal(err)
	}
	// Node n2's first number taken: its empty log document has no cmax
	// to carry, and the purge must move the log's floor past it.
	if _, err := s.DB().Collection(store.CollHistoryIndex).InsertOne(ctx, bson.D{{Key: "_id", Value: store.HistoryBucketID("n2", 1, 0)},
		{Key: "node", Value: "n2"}, {Key: "m", Value: 1}, {Key: "t0", Value: other.Time}, {Key: "t1", Value: other.Time},
		{Key: "d", Value: data}}); err != nil {
		t.Fatal(err)
	}
	n2 := nodeMsgs("n2", 3, now.Add(4*time.Millisecond), func(int) string { return "b" })
	if err := s.InsertHistory(ctx, n2); err != nil {
		t.Fatal(err)
	}
	all := slices.Concat(first, second, third)
	for _, purge := range []bool{false, true} {
		if purge {
			if _, err := s.PurgeHistory(ctx, now.Add(-time.Hour)); err != nil {
				t.Fatal(err)
			}
		}
		s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
		if err != nil {
			t.Fatal(err)
		}
		defer s2.Close(ctx)
		wantByID(t, s2, slices.Concat(all, n2))
		wantIDs(t, "a", walk(t, s2, store.HistoryQuery{Topic: "a", Limit: 2}), idsOf(all, "a"))
		wantIDs(t, "b", walk(t, s2, store.HistoryQuery{Topic: "b", Limit: 2}), idsOf(n2, "b"))
	}
	more := nodeMsgs("n2", 2, now.Add(5*time.Millisecond), func(int) string { return "b" })
	if err := s.InsertHistory(ctx, more); err != nil {
		t.Fatal(err)
	}
	wantIDs(t, "b", walk(t, s, store.HistoryQuery{Topic: "b", Limit: 2}), idsOf(slices.Concat(n2, more), "b"))
}

// A purge whose cutoff falls inside a second keeps that second's late
// pointers together: a lookup probes them in order and stops at the first
// missing, so deleting the first (its ids expired) would hide the live
// ids the next one points to.
func TestHistoryBucketsPurgeKeepsASecondsLatePointers(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	now := time.Now()
	sec := now.Add(-10 * time.Minute).Truncate(time.Second)
	topic := func(int) string { return "a" }
	recent := nodeMsgs("n1", 3, now, topic)
	expired := nodeMsgs("n1", 2, sec.Add(100*time.Millisecond), topic) // a replay: late pointer 0 of sec
	live := nodeMsgs("n1", 2, sec.Add(900*time.Millisecond), topic)    // another: late pointer 1 of sec
	for _, b := range [][]store.HistoryMessage{recent, expired, live} {
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.PurgeHistory(ctx, sec.Add(500*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close(ctx)
	wantByID(t, s2, slices.Concat(recent, live))
	for _, m := range expired {
		if _, err := s2.HistoryByID(ctx, m.ID); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("message %s, expired: %v, want not found", m.ID, err)
		}
	}
	wantIDs(t, "a", walk(t, s2, store.HistoryQuery{Topic: "a", Limit: 2}), idsOf(slices.Concat(recent, live), "a"))
}

// A log document an rtm before ordered inserts could write names a bucket
// that holds another attempt's messages, while the batch's retry holds
// them under the next: reads find each message through its other ref,
// not skip it.
func TestHistoryBucketsReadPastABucketLackingAnID(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	now := time.Now()
	topic := func(int) string { return "a" }
	first := nodeMsgs("n1", 3, now, topic)
	batch := nodeMsgs("n1", 3, now.Add(2*time.Millisecond), topic)
	for _, b := range [][]store.HistoryMessage{first, batch, batch} { // log documents 1, 2 and 3
		if err := s.InsertHistory(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	other := nodeMsgs("n1", 1, now.Add(time.Millisecond), topic)[0]
	data, err := bson.Marshal(other)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.DB().Collection(store.CollHistoryIndex).ReplaceOne(ctx, bson.D{{Key: "_id", Value: store.HistoryBucketID("n1", 2, 0)}},
		bson.D{{Key: "node", Value: "n1"}, {Key: "m", Value: 1}, {Key: "t0", Value: other.Time}, {Key: "t1", Value: other.Time},
			{Key: "d", Value: data}}); err != nil {
		t.Fatal(err)
	}
	for range 3 { // pages keep one ref of an id, either
		s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
		if err != nil {
			t.Fatal(err)
		}
		wantIDs(t, "a", walk(t, s2, store.HistoryQuery{Topic: "a", Limit: 2}), idsOf(slices.Concat(first, batch), "a"))
		wantByID(t, s2, slices.Concat(first, batch))
		s2.Close(ctx)
	}
}

// Buckets written before the short layout (each message with long names
// and its node) are still read by page and by id, and purged, beside
// buckets of the short one.
func TestHistoryBucketsOfTheLongLayout(t *testing.T) {
	s := bucketStore(t)
	ctx := context.Background()
	now := time.Now()
	topic := func(int) string { return "a" }
	old := slices.Concat(nodeMsgs("n1", 3, now.Add(-2*time.Hour), topic), nodeMsgs("n1", 3, now.Add(-time.Minute), topic))
	for i := range old {
		old[i].User = []store.UserProperty{{Key: "k", Value: fmt.Sprint(i)}}
		old[i].ContentType, old[i].Retain = "text/plain", i%2 == 0
	}
	if err := s.InsertHistory(ctx, old); err != nil { // log document 1, one bucket
		t.Fatal(err)
	}
	// That bucket as an rtm before the short layout wrote it.
	var data []byte
	for i := range old {
		b, err := bson.Marshal(old[i])
		if err != nil {
			t.Fatal(err)
		}
		data = append(data, b...)
	}
	if _, err := s.DB().Collection(store.CollHistoryIndex).ReplaceOne(ctx, bson.D{{Key: "_id", Value: store.HistoryBucketID("n1", 1, 0)}},
		bson.D{{Key: "node", Value: "n1"}, {Key: "m", Value: len(old)}, {Key: "t0", Value: old[0].Time}, {Key: "t1", Value: old[len(old)-1].Time},
			{Key: "d", Value: data}}); err != nil {
		t.Fatal(err)
	}
	newer := nodeMsgs("n1", 3, now, topic)
	if err := s.InsertHistory(ctx, newer); err != nil {
		t.Fatal(err)
	}
	all := slices.Concat(old, newer)
	wantIDs(t, "a", walk(t, s, store.HistoryQuery{Topic: "a", Limit: 2}), idsOf(all, "a"))
	wantByID(t, s, all)
	if n, err := s.PurgeHistory(ctx, now.Add(-time.Hour)); err != nil || n != 3 {
		t.Fatalf("purged %d messages (%v), want the 3 older than an hour", n, err)
	}
	wantIDs(t, "a", walk(t, s, store.HistoryQuery{Topic: "a", Limit: 2}), idsOf(all[3:], "a"))
	wantByID(t, s, all[3:])
}
