package writebehind_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/writebehind"
)

func intSpool(t testing.TB, dir string, maxBytes, segBytes int64) *writebehind.Spool[int] {
	t.Helper()
	s, err := writebehind.OpenSpool(writebehind.SpoolOptions[int]{
		Dir: dir, MaxBytes: maxBytes, SegmentBytes: segBytes,
		Encode: func(dst []byte, v int) []byte { return strconv.AppendInt(dst, int64(v), 10) },
		Decode: func(b []byte) (int, error) { return strconv.Atoi(string(b)) },
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func takeAll(t testing.TB, s *writebehind.Spool[int], batch int) []int {
	t.Helper()
	var all []int
	for s.Len() > 0 {
		got, err := s.Take(batch)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) == 0 {
			t.Fatalf("Take returned nothing with Len %d", s.Len())
		}
		all = append(all, got...)
		if err := s.Ack(len(got)); err != nil {
			t.Fatal(err)
		}
	}
	return all
}

func segments(t testing.TB, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*.seg"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Items put, partly acknowledged, survive a reopen in order, exactly once,
// across segment files; acknowledged segments are deleted.
func TestSpoolReplaysWhatWasNotAcknowledged(t *testing.T) {
	dir := t.TempDir()
	s := intSpool(t, dir, 1<<20, 256) // small segments: many files
	for i := range 1000 {
		if err := s.Put([]int{i}); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(segments(t, dir)); n < 10 {
		t.Fatalf("%d segment files, want many", n)
	}
	got, err := s.Take(300)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, seq(300)) {
		t.Fatalf("Take = %v...", got[:10])
	}
	// The same again until acknowledged.
	again, _ := s.Take(300)
	if !slices.Equal(again, got) {
		t.Fatal("a second Take before Ack returned other items")
	}
	if err := s.Ack(300); err != nil {
		t.Fatal(err)
	}
	before := len(segments(t, dir))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = intSpool(t, dir, 1<<20, 256)
	if s.Len() != 700 {
		t.Fatalf("Len after reopen = %d, want 700", s.Len())
	}
	rest := takeAll(t, s, 64)
	if want := seq(1000)[300:]; !slices.Equal(rest, want) {
		t.Fatalf("replayed %d items, first %v, want 300..999 once each", len(rest), rest[:min(5, len(rest))])
	}
	if before >= 40 {
		t.Fatalf("%d segments left after acknowledging 300 of 1000: acknowledged ones not deleted", before)
	}
	if n := len(segments(t, dir)); n != 0 {
		t.Fatalf("%d segment files left once everything was acknowledged", n)
	}
	if s.Bytes() != 0 {
		t.Fatalf("Bytes = %d when empty", s.Bytes())
	}
	// And it keeps working after being emptied, across a reopen.
	if err := s.Put([]int{7, 8}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = intSpool(t, dir, 1<<20, 256)
	defer s.Close()
	if got := takeAll(t, s, 10); !slices.Equal(got, []int{7, 8}) {
		t.Fatalf("after emptying and reopening: %v", got)
	}
}

// A crash in the middle of a write leaves a torn record at the end of the
// last segment: it is cut, not replayed, and the spool goes on after it.
func TestSpoolCutsATornTail(t *testing.T) {
	for _, tc := range []struct {
		name string
		tail func(f *os.File)
	}{
		{"header cut short", func(f *os.File) { f.Write([]byte{5, 0, 0}) }},
		{"payload cut short", func(f *os.File) {
			f.Write(writebehind.AppendRecord(nil, []byte("12345"))[:10])
		}},
		{"checksum mismatch", func(f *os.File) {
			r := writebehind.AppendRecord(nil, []byte("12345"))
			r[len(r)-1] ^= 0xff
			f.Write(r)
		}},
		{"impossible length", func(f *os.File) {
			var h [8]byte
			binary.LittleEndian.PutUint32(h[:4], 0xfffffff0)
			f.Write(h[:])
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := intSpool(t, dir, 1<<20, 1<<20)
			if err := s.Put(seq(10)); err != nil {
				t.Fatal(err)
			}
			s.Close()
			segs := segments(t, dir)
			if len(segs) != 1 {
				t.Fatalf("%d segments", len(segs))
			}
			st, _ := os.Stat(segs[0])
			whole := st.Size()
			f, err := os.OpenFile(segs[0], os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				t.Fatal(err)
			}
			tc.tail(f)
			f.Close()

			s = intSpool(t, dir, 1<<20, 1<<20)
			defer s.Close()
			if s.Len() != 10 {
				t.Fatalf("Len = %d after a torn tail, want the 10 whole records", s.Len())
			}
			if st, _ := os.Stat(segs[0]); st.Size() != whole {
				t.Fatalf("segment is %d bytes, want it cut at the tear (%d)", st.Size(), whole)
			}
			if s.Cut() == 0 {
				t.Fatal("Cut = 0: the tear was not reported")
			}
			if err := s.Put([]int{10, 11}); err != nil {
				t.Fatal(err)
			}
			if got := takeAll(t, s, 5); !slices.Equal(got, seq(12)) {
				t.Fatalf("got %v, want 0..11", got)
			}
		})
	}
}

// Put refuses past MaxBytes, all or nothing, and room comes back with
// acknowledgements.
func TestSpoolIsBounded(t *testing.T) {
	s := intSpool(t, t.TempDir(), 100, 0) // records of 1 digit: 9 bytes each
	defer s.Close()
	if err := s.Put(seq(11)); err != nil { // 10×9 + 10 = 100 bytes
		t.Fatal(err)
	}
	if err := s.Put([]int{1}); !errors.Is(err, writebehind.ErrFull) {
		t.Fatalf("Put past MaxBytes = %v, want ErrFull", err)
	}
	if s.Len() != 11 || s.Bytes() != 100 {
		t.Fatalf("Len %d Bytes %d, want 11 and 100", s.Len(), s.Bytes())
	}
	got, _ := s.Take(2)
	if err := s.Ack(len(got)); err != nil {
		t.Fatal(err)
	}
	if err := s.Put([]int{1, 2}); err != nil {
		t.Fatalf("Put after acknowledgements freed room: %v", err)
	}
}

// An intact record that cannot be decoded is skipped, not retried forever.
func TestSpoolSkipsUndecodableRecords(t *testing.T) {
	dir := t.TempDir()
	s := intSpool(t, dir, 1<<20, 0)
	if err := s.Put([]int{1}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	seg := segments(t, dir)[0]
	f, _ := os.OpenFile(seg, os.O_WRONLY|os.O_APPEND, 0)
	f.Write(writebehind.AppendRecord(nil, []byte("not a number")))
	f.Write(writebehind.AppendRecord(nil, []byte("2")))
	f.Close()
	s = intSpool(t, dir, 1<<20, 0)
	defer s.Close()
	if got := takeAll(t, s, 10); !slices.Equal(got, []int{1, 2}) {
		t.Fatalf("got %v", got)
	}
	if s.Skipped() != 1 {
		t.Fatalf("Skipped = %d", s.Skipped())
	}
}

// Through a Writer: an outage overflows to the spool, in order, and
// everything is written once when the store returns.
func TestSpoolUnderAWriterThroughAnOutage(t *testing.T) {
	sp := intSpool(t, t.TempDir(), 1<<20, 1024)
	defer sp.Close()
	s := &sink{}
	s.down.Store(true)
	w := newWriter(t, writebehind.Options[int]{Write: s.write, QueueLen: 50, MaxBatch: 64, Overflow: sp})
	for i := range 3000 {
		if err := w.Add(i); err != nil {
			t.Fatal(err)
		}
	}
	if sp.Len() == 0 {
		t.Fatal("nothing overflowed to the spool")
	}
	s.down.Store(false)
	if err := w.Flush(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, seq(3000)) {
		t.Fatalf("written %d items, want 0..2999 in order once each", len(got))
	}
	if sp.Len() != 0 || sp.Bytes() != 0 {
		t.Fatalf("spool holds %d items, %d bytes after the flush", sp.Len(), sp.Bytes())
	}
}

// FuzzReadRecord: no input makes the reader panic or accept a record whose
// checksum does not match; whole records before garbage are all read.
func FuzzReadRecord(f *testing.F) {
	f.Add([]byte{}, []byte("hello"))
	f.Add(writebehind.AppendRecord(nil, []byte("x")), []byte{1, 2, 3})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, []byte("tail"))
	f.Fuzz(func(t *testing.T, garbage, payload []byte) {
		var buf bytes.Buffer
		buf.Write(writebehind.AppendRecord(nil, payload))
		buf.Write(garbage)
		r := bytes.NewReader(buf.Bytes())
		got, n, err := writebehind.ReadRecord(r, nil)
		if err != nil || !bytes.Equal(got, payload) || n != 8+len(payload) {
			t.Fatalf("first, whole record: %q, %d, %v", got, n, err)
		}
		for {
			p, n, err := writebehind.ReadRecord(r, nil)
			if err != nil {
				return
			}
			if !bytes.Equal(writebehind.AppendRecord(nil, p), buf.Bytes()[buf.Len()-r.Len()-n:buf.Len()-r.Len()]) {
				t.Fatal("accepted a record that does not re-encode to its bytes")
			}
		}
	})
}

// FuzzSpoolOpen: whatever follows whole records in a segment, a reopened
// spool holds those records first, and never garbage.
func FuzzSpoolOpen(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0})
	f.Add(writebehind.AppendRecord(nil, []byte("42")))
	f.Fuzz(func(t *testing.T, tail []byte) {
		dir := t.TempDir()
		s := intSpool(t, dir, 1<<20, 1<<20)
		if err := s.Put([]int{1, 2, 3}); err != nil {
			t.Fatal(err)
		}
		s.Close()
		seg := segments(t, dir)[0]
		fh, _ := os.OpenFile(seg, os.O_WRONLY|os.O_APPEND, 0)
		fh.Write(tail)
		fh.Close()
		s = intSpool(t, dir, 1<<20, 1<<20)
		defer s.Close()
		got, err := s.Take(1 << 20)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) < 3 || !slices.Equal(got[:3], []int{1, 2, 3}) {
			t.Fatalf("got %v, want 1 2 3 first", got)
		}
		_ = s.Ack(len(got))
	})
}

// When the store fails, what Add queued in memory moves to the spool, so a
// crash during the outage (here: a Close that gives up at once, which
// loses what memory holds, as kill -9 would) loses none of it. Before,
// up to QueueLen acknowledged items waited in memory for the store.
func TestOutageMovesMemoryToTheSpool(t *testing.T) {
	dir := t.TempDir()
	sp := intSpool(t, dir, 1<<20, 0)
	s := &sink{}
	s.down.Store(true)
	w, err := writebehind.New(writebehind.Options[int]{Write: s.write, QueueLen: 1000, Overflow: sp,
		RetryFirst: time.Millisecond, RetryMax: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if err := w.Add(i); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for sp.Len() != 100 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if err := w.Add(100); err != nil { // after the move: behind the others
		t.Fatal(err)
	}
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	_ = w.Close(gone)
	sp.Close()

	sp = intSpool(t, dir, 1<<20, 0)
	defer sp.Close()
	if got := takeAll(t, sp, 1000); !slices.Equal(got, seq(101)) {
		t.Fatalf("after the crash the spool holds %d items, want 0..100 in order", len(got))
	}
}

// A store that hangs before it fails: memory fills and later items
// overflow first; when the write fails, memory goes to the spool ahead of
// them, so a crash then loses nothing and the order holds.
func TestOutageAfterOverflowMovesMemoryAhead(t *testing.T) {
	dir := t.TempDir()
	sp := intSpool(t, dir, 1<<20, 0)
	s := &sink{gate: make(chan struct{})}
	w, err := writebehind.New(writebehind.Options[int]{Write: s.write, QueueLen: 10, MaxBatch: 4, Overflow: sp,
		RetryFirst: time.Millisecond, RetryMax: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if err := w.Add(i); err != nil {
			t.Fatal(err)
		}
	}
	if sp.Len() != 90 {
		t.Fatalf("spool holds %d, want the 90 that did not fit in memory", sp.Len())
	}
	s.down.Store(true)
	close(s.gate) // the hung write fails now
	deadline := time.Now().Add(10 * time.Second)
	for sp.Len() != 100 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	_ = w.Close(gone)
	sp.Close()

	sp = intSpool(t, dir, 1<<20, 0)
	defer sp.Close()
	if got := takeAll(t, sp, 1000); !slices.Equal(got, seq(100)) {
		t.Fatalf("after the crash the spool holds %d items (%v...), want 0..99 in order", len(got), got[:min(len(got), 12)])
	}
}

// TakeBytes keeps a batch within its byte bound (one record at least),
// across segments, and the next Take goes on with the record it left.
func TestSpoolTakeBytes(t *testing.T) {
	s := intSpool(t, t.TempDir(), 1<<20, 64) // a few records a segment
	defer s.Close()
	items := make([]int, 100)
	for i := range items {
		items[i] = 100 + i // 3 digits: 11 bytes a record with its header
	}
	if err := s.Put(items); err != nil {
		t.Fatal(err)
	}
	got, err := s.TakeBytes(1000, 60)
	if err != nil || !slices.Equal(got, items[:5]) {
		t.Fatalf("TakeBytes(1000, 60) = %v, %v; want the 5 records within 60 bytes", got, err)
	}
	if got, _ := s.TakeBytes(1000, 5); !slices.Equal(got, items[:1]) {
		t.Fatalf("TakeBytes(1000, 5) = %v, want one record however large", got)
	}
	if err := s.Ack(1); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.TakeBytes(3, 1<<20); !slices.Equal(got, items[1:4]) {
		t.Fatalf("TakeBytes(3, 1 MiB) = %v, want the count bound first", got)
	}
	if got, _ := s.TakeBytes(1000, 0); !slices.Equal(got, items[1:]) {
		t.Fatalf("TakeBytes(1000, 0) returned %d records, want all 99 left (no byte bound)", len(got))
	}
}
