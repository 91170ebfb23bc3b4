package store

import (
	"bytes"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
)

// histSamples are messages with every field set, unset and at its edges.
func histSamples() []HistoryMessage {
	ts := time.Date(2026, 12, 7, 7, 45, 1, 123_000_000, time.UTC)
	return []HistoryMessage{
		{ID: "01JEXAMPLE0000000000000000", Topic: "push/news", Payload: []byte("hello"), QoS: 1, Retain: true,
			Publisher: "api-key", Node: "n1", Time: ts, ContentType: "text/plain",
			User: []UserProperty{{Key: "a", Value: "1"}, {Key: "a", Value: "2"}, {Key: "", Value: ""}}},
		{ID: "x", Topic: "groups/g", Payload: []byte{0, 0xff, 0x80}, QoS: 0, Publisher: "dev", Node: "n2", Time: ts},
		{ID: "y", Topic: "devices/d/inbox", Payload: []byte{}, QoS: 2, Time: time.UnixMilli(0).UTC()},
		{}, // nil payload, zero time
		{ID: "z", Payload: bytes.Repeat([]byte{7}, 70000), QoS: 1 << 40, User: make12()},
	}
}

func make12() []UserProperty {
	var u []UserProperty
	for i := range 12 {
		u = append(u, UserProperty{Key: string(rune('a' + i)), Value: "é"})
	}
	return u
}

// The hand-written encoding is byte for byte bson.Marshal's (which the
// buckets, the spool and MongoDB's documents were written with, and which
// every read decodes), and decodes to the message it encoded both by
// DecodeHistoryBSON and by bson.Unmarshal.
func TestHistoryBSONMatchesMarshal(t *testing.T) {
	for i, m := range histSamples() {
		checkHistoryBSON(t, i, m)
	}
}

func checkHistoryBSON(t *testing.T, i int, m HistoryMessage) {
	t.Helper()
	want, err := bson.Marshal(&m)
	if err != nil {
		t.Fatal(err)
	}
	got := AppendHistoryBSON([]byte("prefix"), &m)
	if !bytes.Equal(got[6:], want) {
		t.Fatalf("message %d: encoding differs from bson.Marshal:\n got %v\nwant %v", i, bson.Raw(got[6:]), bson.Raw(want))
	}
	dec, err := DecodeHistoryBSON(want)
	if err != nil {
		t.Fatalf("message %d: %v", i, err)
	}
	var ref HistoryMessage
	if err := bson.Unmarshal(want, &ref); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(dec, ref) {
		t.Fatalf("message %d: decoded\n %#v\nbson.Unmarshal\n %#v", i, dec, ref)
	}
	m.Time = m.Time.Truncate(time.Millisecond)
	if m.Payload == nil {
		m.Payload = nil
	}
	if !reflect.DeepEqual(dec, m) {
		t.Fatalf("message %d: round trip\n %#v\nwant\n %#v", i, dec, m)
	}
}

// Any message encodes like bson.Marshal and round-trips.
func FuzzHistoryBSONEncode(f *testing.F) {
	f.Add("id", "t/x", []byte("p"), 1, true, "pub", "node", int64(1765000000123), "ct", "k", "v", 2, false)
	f.Add("", "", []byte(nil), 0, false, "", "", int64(0), "", "", "", 0, true)
	f.Fuzz(func(t *testing.T, id, topic string, payload []byte, qos int, retain bool, pub, node string, ms int64, ct, k, v string, nUser int, nilPayload bool) {
		m := HistoryMessage{ID: id, Topic: topic, Payload: payload, QoS: qos, Retain: retain, Publisher: pub, Node: node,
			Time: time.UnixMilli(ms % (1 << 50)).UTC(), ContentType: ct}
		if nilPayload {
			m.Payload = nil
		} else if m.Payload == nil {
			m.Payload = []byte{}
		}
		for range nUser % 20 {
			m.User = append(m.User, UserProperty{Key: k, Value: v})
		}
		checkHistoryBSON(t, 0, m)
	})
}

// On any bytes, DecodeHistoryBSON does not panic, and where both it and
// bson.Unmarshal accept a document they read the same message.
func FuzzHistoryBSONDecode(f *testing.F) {
	for _, m := range histSamples() {
		b, _ := bson.Marshal(&m)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		dec, err := DecodeHistoryBSON(b)
		if err != nil {
			return
		}
		var ref HistoryMessage
		if bson.Unmarshal(b, &ref) != nil {
			return
		}
		if !reflect.DeepEqual(dec, ref) {
			t.Fatalf("decoded\n %#v\nbson.Unmarshal\n %#v", dec, ref)
		}
	})
}

// The index's documents (buckets, segments, log documents) are encoded by
// hand as bson.Marshal encodes them, so the reflective decoder reads them
// as before.
func TestHistoryIndexBSONMatchesMarshal(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 9, 30, 0, 123456789, time.UTC)
	buckets := []histBucket{
		{ID: "bn|1", Node: "n", Count: 3, T0: t0, T1: t0.Add(time.Second), Data: []byte{1, 2, 3}},
		{ID: "bn|2.1", Node: "n"},
		{ID: "b", Count: 1 << 40, T0: time.Date(1960, 1, 1, 0, 0, 0, 500, time.UTC), Data: []byte{}},
	}
	for i := range buckets {
		want, err := bson.Marshal(&buckets[i])
		if err != nil {
			t.Fatal(err)
		}
		if got := appendBucketBSON([]byte("x"), &buckets[i])[1:]; !bytes.Equal(got, want) {
			t.Fatalf("bucket %d:\n got %v\nwant %v", i, bson.Raw(got), bson.Raw(want))
		}
	}
	segs := []histSegment{
		{ID: "n|t|1", Node: "n", Topic: "t", N: 1, IDs: []string{"a", "b"}, Refs: []string{"1", "1"}, Min: "a", Max: "b", CMax: "b", CLag: 3},
		{ID: "n||7", Node: "n", N: 7, Entries: []logEntry{{Topic: "t", IDs: []string{"a"}}}, Flushed: 7, Buckets: 2, BucketStarts: "1:1", Min: "a", Max: "a"},
		{ID: "n|x|2", Node: "n", Topic: "x", N: 2, Refs: []string{"", ""}},
		{ID: "n|y|3", Node: "n", Topic: "y", N: 3, IDs: []string{"c"}, Buckets: 1 << 40},
		{ID: "n||8", Node: "n", N: 8, Entries: []logEntry{{Topic: "a/b", IDs: []string{"0123456789", "x"}}, {Topic: "", IDs: []string{""}}},
			Refs: []string{"", "12.3"}, Packed: "ignored", Log: "ignored", PackedRefs: "ignored", IDs: []string{"p", "q"}},
		{ID: "n|z|4", Node: "n", Topic: "z", N: 4, Packed: "1:a", Log: "1:t1:11:a", PackedRefs: "1:1"},
	}
	for i := range segs {
		p := segs[i].packed()
		want, err := bson.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendSegmentBSON([]byte("x"), p)[1:]; !bytes.Equal(got, want) {
			t.Fatalf("segment %d:\n got %v\nwant %v", i, bson.Raw(got), bson.Raw(want))
		}
		// Packed while encoded, as the writer does.
		if got := appendPackedSegmentBSON([]byte("x"), &segs[i])[1:]; !bytes.Equal(got, want) {
			t.Fatalf("segment %d packed while encoded:\n got %v\nwant %v", i, bson.Raw(got), bson.Raw(want))
		}
		// Not packed (IDs kept): the array as bson.Marshal writes it.
		q := segs[i]
		q.Entries, q.Refs = nil, nil
		if want, err = bson.Marshal(&q); err != nil {
			t.Fatal(err)
		}
		if got := appendSegmentBSON(nil, &q); !bytes.Equal(got, want) {
			t.Fatalf("segment %d unpacked:\n got %v\nwant %v", i, bson.Raw(got), bson.Raw(want))
		}
	}
}

// sortIDRefs keeps one of each id in order, whether its input is sorted
// (its common case, taken without a sort), sorted with repeats, or not.
func TestSortIDRefs(t *testing.T) {
	r := func(ids ...string) []idRef {
		var v []idRef
		for _, id := range ids {
			v = append(v, idRef{id: id, ref: "b" + id})
		}
		return v
	}
	for _, c := range []struct{ in, want []idRef }{
		{r("a", "b", "c"), r("a", "b", "c")},
		{r("a", "b", "b", "c"), r("a", "b", "c")},
		{r("c", "a", "b", "a"), r("a", "b", "c")},
		{r(), r()},
	} {
		if got := sortIDRefs(slices.Clone(c.in)); !slices.Equal(got, c.want) {
			t.Errorf("sortIDRefs(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

// A bucket holds its messages in the short layout (one-letter names, no
// node: the bucket's), a good part smaller than the long one; a bucket's
// decoding reads both layouts, each message to what was written (an old
// bucket's messages keep their own node).
func TestBucketMessagesShortLayout(t *testing.T) {
	for i, m := range histSamples() {
		long := AppendHistoryBSON(nil, &m)
		short := appendBucketMessage(nil, &m)
		if i == 0 && len(long)-len(short) < 40 {
			t.Errorf("short layout %d bytes, long %d: want at least 40 fewer", len(short), len(long))
		}
		got, err := decodeBucket(slices.Concat(short, long), "bn", nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 {
			t.Fatalf("sample %d: %d messages, want the id once: %v", i, len(got), got)
		}
		want := m
		if want.Node == "" {
			want.Node = "bn"
		}
		if g := got[m.ID]; !reflect.DeepEqual(normal(g), normal(want)) {
			t.Fatalf("sample %d, both layouts:\n got %+v\nwant %+v", i, g, want)
		}
		for _, doc := range [][]byte{short, long} {
			got, err := decodeBucket(doc, "bn", nil)
			if err != nil {
				t.Fatal(err)
			}
			want := m
			if bytes.Equal(doc, short) || want.Node == "" {
				want.Node = "bn"
			}
			if g := got[m.ID]; !reflect.DeepEqual(normal(g), normal(want)) {
				t.Fatalf("sample %d:\n got %+v\nwant %+v", i, g, want)
			}
		}
	}
}

// normal is m as a decoding returns it (milliseconds).
func normal(m HistoryMessage) HistoryMessage {
	m.Time = m.Time.Truncate(time.Millisecond)
	return m
}

// Encoding a batch for the store (its buckets and its log document, as
// indexNodeBatch does with its reused buffers) allocates a few slices a
// batch, none a message: the packed id lists were built as strings (two
// copies of every id and a list of them) before they were copied into the
// document.
func TestBatchEncodingAllocations(t *testing.T) {
	const n = 1024
	msgs := make([]HistoryMessage, n)
	ids := make([]string, n)
	at := time.Now()
	for i := range msgs {
		ids[i] = fmt.Sprintf("01JEXAMPLE%016d", i)
		msgs[i] = HistoryMessage{ID: ids[i], Topic: "bench/t", Payload: make([]byte, 64), QoS: 1, Publisher: "on-3-1234567890", Node: "on", Time: at}
	}
	logDoc := histSegment{ID: "n||1", Node: "on", N: 1, Entries: []logEntry{{Topic: "bench/t", IDs: ids}}, Min: ids[0], Max: ids[n-1], CMax: ids[n-1]}
	var data, raw []byte
	encode := func() {
		var bks []packedBucket
		bks, data = packBuckets(msgs, data)
		raw = raw[:0]
		for c, b := range bks {
			raw = appendBucketBSON(raw, &histBucket{ID: "bon|1." + strconv.Itoa(c), Node: "on", Count: b.to - b.from, T0: b.t0, T1: b.t1, Data: b.data})
		}
		raw = appendPackedSegmentBSON(raw, &logDoc)
	}
	encode() // the buffers grow to the batch's size once
	if allocs := testing.AllocsPerRun(20, encode); allocs > 4 {
		t.Errorf("%.0f allocations to encode a batch of %d messages, want at most 4", allocs, n)
	}
}

// Buckets hold their messages as the release before this one reads them
// (bson.Unmarshal's reading, which its decoder matched): during a rolling
// restart brokers of both releases read what the others wrote.
func TestBucketsReadableByThePreviousRelease(t *testing.T) {
	msgs := slices.Clone(histSamples())
	bks, _ := packBuckets(msgs, nil)
	var docs []bson.Raw
	for _, b := range bks {
		d, err := bucketDocs(b.data)
		if err != nil {
			t.Fatal(err)
		}
		docs = append(docs, d...)
	}
	if len(docs) != len(msgs) {
		t.Fatalf("%d documents in the buckets, want %d", len(docs), len(msgs))
	}
	for i, d := range docs {
		var got HistoryMessage
		if err := bson.Unmarshal(d, &got); err != nil {
			t.Fatal(err)
		}
		if want := normal(msgs[i]); !reflect.DeepEqual(normal(got), want) {
			t.Fatalf("message %d as the previous release reads it:\n got %+v\nwant %+v", i, got, want)
		}
	}
}
