package writebehind_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/writebehind"
)

// sink records what was written, and can be made to fail or to hold writes.
type sink struct {
	mu      sync.Mutex
	items   []int
	batches []int
	down    atomic.Bool
	gate    chan struct{} // when set, each write waits on it
}

var errDown = errors.New("store down")

func (s *sink) write(ctx context.Context, batch []int) error {
	if g := s.gate; g != nil {
		select {
		case <-g:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if s.down.Load() {
		return errDown
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.items = append(s.items, batch...)
	s.batches = append(s.batches, len(batch))
	return nil
}

func (s *sink) written() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.items)
}

func seq(n int) []int {
	v := make([]int, n)
	for i := range v {
		v[i] = i
	}
	return v
}

func newWriter(t *testing.T, o writebehind.Options[int]) *writebehind.Writer[int] {
	t.Helper()
	o.RetryFirst, o.RetryMax = time.Millisecond, 10*time.Millisecond
	w, err := writebehind.New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = w.Close(ctx)
	})
	return w
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestPutGroupCommitsInOrder(t *testing.T) {
	s := &sink{gate: make(chan struct{})}
	w := newWriter(t, writebehind.Options[int]{Name: "t", Write: s.write, MaxBatch: 100})
	var tickets []writebehind.Ticket
	for i := range 250 {
		tk, err := w.Put(ctx(t), i)
		if err != nil {
			t.Fatal(err)
		}
		tickets = append(tickets, tk)
	}
	// The first write took what was there when it started; the rest
	// gathered behind it while it was held.
	close(s.gate)
	for i, tk := range tickets {
		if err := tk.Wait(ctx(t)); err != nil {
			t.Fatalf("ticket %d: %v", i, err)
		}
	}
	if got := s.written(); !slices.Equal(got, seq(250)) {
		t.Fatalf("written out of order or incomplete: %v", got)
	}
	s.mu.Lock()
	nb := len(s.batches)
	s.mu.Unlock()
	if nb > 4 {
		t.Errorf("%d writes for 250 items in batches of at most 100: not group committed", nb)
	}
	if st := w.Stats(); st.Written != 250 || st.Queued != 0 || st.Dropped != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestTicketWaitsForTheWrite(t *testing.T) {
	s := &sink{gate: make(chan struct{})}
	w := newWriter(t, writebehind.Options[int]{Write: s.write})
	tk, err := w.Put(ctx(t), 7)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := tk.Wait(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ticket settled before its write: %v", err)
	}
	close(s.gate)
	if err := tk.Wait(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, []int{7}) {
		t.Fatalf("written %v", got)
	}
}

func TestRetriesUntilTheStoreAnswers(t *testing.T) {
	s := &sink{}
	s.down.Store(true)
	w := newWriter(t, writebehind.Options[int]{Write: s.write, MaxBatch: 10})
	var last writebehind.Ticket
	for i := range 50 {
		tk, err := w.Put(ctx(t), i)
		if err != nil {
			t.Fatal(err)
		}
		last = tk
	}
	deadline := time.Now().Add(10 * time.Second)
	for w.Stats().Failures < 3 {
		if time.Now().After(deadline) {
			t.Fatal("no retries")
		}
		time.Sleep(time.Millisecond)
	}
	if st := w.Stats(); st.Up || st.LastError == "" {
		t.Errorf("down store not reported: %+v", st)
	}
	s.down.Store(false)
	if err := last.Wait(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, seq(50)) {
		t.Fatalf("after an outage, written %v", got)
	}
	if st := w.Stats(); !st.Up || st.Written != 50 {
		t.Errorf("stats after recovery %+v", st)
	}
}

func TestPermanentErrorDropsTheBatchAndTellsTheTicket(t *testing.T) {
	bad := errors.New("document too large")
	var dropped atomic.Int64
	var calls atomic.Int64
	w := newWriter(t, writebehind.Options[int]{
		Write: func(_ context.Context, b []int) error {
			calls.Add(1)
			if slices.Contains(b, 13) {
				return bad
			}
			return nil
		},
		MaxBatch:  1,
		Permanent: func(err error) bool { return errors.Is(err, bad) },
		OnDrop:    func(items []int, _ error) { dropped.Add(int64(len(items))) },
	})
	t13, _ := w.Put(ctx(t), 13)
	t14, _ := w.Put(ctx(t), 14)
	if err := t13.Wait(ctx(t)); !errors.Is(err, bad) {
		t.Fatalf("dropped item's ticket: %v", err)
	}
	if err := t14.Wait(ctx(t)); err != nil {
		t.Fatalf("next item: %v", err)
	}
	if dropped.Load() != 1 || w.Stats().Dropped != 1 || calls.Load() != 2 {
		t.Fatalf("dropped %d (stats %d), %d calls: a permanent error must not be retried", dropped.Load(), w.Stats().Dropped, calls.Load())
	}
}

func TestPutWaitsForRoom(t *testing.T) {
	s := &sink{gate: make(chan struct{})}
	w := newWriter(t, writebehind.Options[int]{Write: s.write, QueueLen: 4, MaxBatch: 4})
	for i := range 4 {
		if _, err := w.Put(ctx(t), i); err != nil {
			t.Fatal(err)
		}
	}
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := w.Put(short, 4); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Put into a full queue: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := w.Put(ctx(t), 4)
		done <- err
	}()
	close(s.gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, seq(5)) {
		t.Fatalf("written %v", got)
	}
}

func TestAddWithoutOverflowDropsAndCounts(t *testing.T) {
	s := &sink{gate: make(chan struct{})}
	var reported []int
	var mu sync.Mutex
	w := newWriter(t, writebehind.Options[int]{Write: s.write, QueueLen: 10, MaxBatch: 10,
		OnDrop: func(items []int, err error) {
			if !errors.Is(err, writebehind.ErrFull) {
				t.Errorf("drop reason %v", err)
			}
			mu.Lock()
			reported = append(reported, items...)
			mu.Unlock()
		}})
	// The writer may take the first item into a held write at once; so
	// the queue holds 10 or 11 before the first drop.
	full := 0
	for i := range 30 {
		if err := w.Add(i); errors.Is(err, writebehind.ErrFull) {
			full++
		} else if err != nil {
			t.Fatal(err)
		}
	}
	close(s.gate)
	if err := w.Flush(ctx(t)); err != nil {
		t.Fatal(err)
	}
	got := s.written()
	mu.Lock()
	defer mu.Unlock()
	if len(got)+len(reported) != 30 || int64(full) != w.Stats().Dropped || len(reported) != full {
		t.Fatalf("written %d + reported dropped %d != 30 (ErrFull %d, stats %d)", len(got), len(reported), full, w.Stats().Dropped)
	}
	if full < 19 {
		t.Fatalf("only %d dropped past a queue of 10", full)
	}
}

// memOverflow is an Overflow in memory with a bound, standing in for a
// spool file (the spool has its own tests).
type memOverflow struct {
	mu    sync.Mutex
	items []int
	max   int
}

func (m *memOverflow) Put(items []int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.items)+len(items) > m.max {
		return writebehind.ErrFull
	}
	m.items = append(m.items, items...)
	return nil
}

func (m *memOverflow) Take(n int) ([]int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.items[:min(n, len(m.items))]), nil
}

func (m *memOverflow) Ack(n int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.items = m.items[n:]
	return nil
}

func (m *memOverflow) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.items)
}

func TestOverflowKeepsOrderThroughAnOutage(t *testing.T) {
	s := &sink{}
	s.down.Store(true)
	ov := &memOverflow{max: 1000}
	w := newWriter(t, writebehind.Options[int]{Write: s.write, QueueLen: 8, MaxBatch: 8, Overflow: ov})
	for i := range 500 {
		if err := w.Add(i); err != nil {
			t.Fatalf("add %d: %v", i, err)
		}
	}
	if ov.Len() < 490 {
		t.Fatalf("overflow holds %d", ov.Len())
	}
	// A gap in the store's availability must not let a new item jump the
	// queue into memory ahead of overflowed ones.
	s.down.Store(false)
	for i := 500; i < 600; i++ {
		if err := w.Add(i); err != nil {
			t.Fatalf("add %d: %v", i, err)
		}
	}
	if err := w.Flush(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, seq(600)) {
		t.Fatalf("written out of order: first differences in %v", got[:min(len(got), 40)])
	}
	if ov.Len() != 0 || w.Stats().Overflowed != 0 {
		t.Fatal("overflow not drained")
	}
}

func TestOverflowFromAnEarlierProcessIsWrittenFirst(t *testing.T) {
	s := &sink{}
	ov := &memOverflow{max: 100, items: []int{0, 1, 2}}
	w := newWriter(t, writebehind.Options[int]{Write: s.write, Overflow: ov})
	if err := w.Add(3); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, seq(4)) {
		t.Fatalf("written %v", got)
	}
}

func TestCloseGivesUpAtItsDeadline(t *testing.T) {
	s := &sink{}
	s.down.Store(true)
	o := writebehind.Options[int]{Write: s.write, RetryFirst: time.Millisecond, RetryMax: 5 * time.Millisecond}
	w, err := writebehind.New(o)
	if err != nil {
		t.Fatal(err)
	}
	tk, err := w.Put(ctx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := w.Close(short); err == nil {
		t.Fatal("Close with an unwritable item reported success")
	}
	if err := tk.Wait(ctx(t)); !errors.Is(err, writebehind.ErrClosed) {
		t.Fatalf("ticket of an item lost at close: %v", err)
	}
	if st := w.Stats(); st.Dropped != 1 {
		t.Fatalf("lost item not counted: %+v", st)
	}
	if _, err := w.Put(ctx(t), 2); !errors.Is(err, writebehind.ErrClosed) {
		t.Fatalf("Put after Close: %v", err)
	}
}

func TestCloseWritesWhatItHolds(t *testing.T) {
	s := &sink{}
	w, err := writebehind.New(writebehind.Options[int]{Write: s.write, MaxBatch: 7})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if err := w.Add(i); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, seq(100)) {
		t.Fatalf("written %v", got)
	}
}

// TestMinAge: an item stays in memory at least MinAge before it is
// written, so a Write can skip those that became unnecessary meanwhile;
// a Flush and a Close write at once rather than waiting it out.
func TestMinAge(t *testing.T) {
	s := &sink{}
	const minAge = 300 * time.Millisecond
	w := newWriter(t, writebehind.Options[int]{Write: s.write, MinAge: minAge})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	tk, err := w.Put(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := tk.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < minAge {
		t.Errorf("item written after %v, before its MinAge %v", took, minAge)
	}

	// An hour's MinAge: only the Flush can have written it.
	s2 := &sink{}
	w2 := newWriter(t, writebehind.Options[int]{Write: s2.write, MinAge: time.Hour})
	if err := w2.Add(2); err != nil {
		t.Fatal(err)
	}
	if err := w2.Flush(ctx); err != nil {
		t.Fatalf("Flush with MinAge 1h: %v", err)
	}
	if got := s2.written(); !slices.Equal(got, []int{2}) {
		t.Fatalf("after Flush: written %v, want [2]", got)
	}
	if err := w2.Add(3); err != nil {
		t.Fatal(err)
	}
	if err := w2.Close(ctx); err != nil {
		t.Fatalf("Close with MinAge 1h: %v", err)
	}
	if got := s2.written(); !slices.Equal(got, []int{2, 3}) {
		t.Fatalf("after Close: written %v, want [2 3]", got)
	}
}

// TestWaitOr: a ticket's wait ends, successfully, when its other reason
// closes while the item is still unwritten; an open one waits for the write.
func TestWaitOr(t *testing.T) {
	s := &sink{gate: make(chan struct{})}
	w := newWriter(t, writebehind.Options[int]{Write: s.write})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tk, err := w.Put(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	enough := make(chan struct{})
	close(enough)
	if err := tk.WaitOr(ctx, enough); err != nil {
		t.Fatalf("WaitOr with its channel closed, write held: %v", err)
	}
	if got := s.written(); len(got) != 0 {
		t.Fatalf("written %v while the gate is shut", got)
	}
	done := make(chan error, 1)
	go func() { done <- tk.WaitOr(ctx, make(chan struct{})) }()
	close(s.gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, []int{1}) {
		t.Fatalf("written %v, want [1]", got)
	}
}

func TestTicketCovers(t *testing.T) {
	w := newWriter(t, writebehind.Options[int]{Write: (&sink{}).write})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := w.Put(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := w.Put(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	if !b.Covers(a) || a.Covers(b) || !a.Covers(a) {
		t.Fatalf("b covers a %v, a covers b %v, a covers a %v; want true, false, true", b.Covers(a), a.Covers(b), a.Covers(a))
	}
}

// TestBarrier: a Barrier waits for the items added before it was taken and
// not for later ones, however often it is waited on, and it leaves MinAge
// alone (a Flush writes at once). The durable link barrier relies on both:
// it keeps waiting for the same items across retries under sustained load,
// and does not turn off the coalescing window of the node's writes.
func TestBarrier(t *testing.T) {
	c := ctx(t)
	release := make(chan struct{})
	var mu sync.Mutex
	var written []int
	write := func(ctx context.Context, batch []int) error {
		if batch[0] >= 10 { // the items added after the barrier: held
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		mu.Lock()
		written = append(written, batch...)
		mu.Unlock()
		return nil
	}
	w := newWriter(t, writebehind.Options[int]{Write: write, MaxBatch: 1})
	for i := range 10 {
		if err := w.Add(i); err != nil {
			t.Fatal(err)
		}
	}
	b := w.Barrier()
	for i := 10; i < 20; i++ {
		if err := w.Add(i); err != nil {
			t.Fatal(err)
		}
	}
	// A first wait that gives up, as the link's does, then a second one.
	short, cancel := context.WithTimeout(c, time.Millisecond)
	_ = b.Wait(short)
	cancel()
	if err := b.Wait(c); err != nil {
		t.Fatalf("Barrier.Wait with the later items held: %v", err)
	}
	mu.Lock()
	got := slices.Clone(written)
	mu.Unlock()
	if !slices.Equal(got, seq(10)) {
		t.Fatalf("when the barrier was reached: written %v, want %v", got, seq(10))
	}
	close(release)

	s := &sink{}
	const minAge = 300 * time.Millisecond
	w2 := newWriter(t, writebehind.Options[int]{Write: s.write, MinAge: minAge})
	start := time.Now()
	if err := w2.Add(1); err != nil {
		t.Fatal(err)
	}
	if err := w2.Barrier().Wait(c); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < minAge {
		t.Errorf("with a barrier waiting, the item was written after %v, before its MinAge %v", took, minAge)
	}
	if got := s.written(); !slices.Equal(got, []int{1}) {
		t.Fatalf("written %v, want [1]", got)
	}
}

// TestBarrierReportsDroppedItems: a Barrier over an item the store refused
// permanently, or one lost at Close, does not report it written (the node
// link would acknowledge a message never stored); a Barrier over items all
// written after the drop does.
func TestBarrierReportsDroppedItems(t *testing.T) {
	c := ctx(t)
	bad := errors.New("document too large")
	gate := make(chan struct{})
	w := newWriter(t, writebehind.Options[int]{
		Write: func(ctx context.Context, b []int) error {
			if b[0] == 1 {
				select { // the barrier is taken while 1 is still queued
				case <-gate:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			if slices.Contains(b, 2) {
				return bad
			}
			return nil
		},
		MaxBatch:  1,
		Permanent: func(err error) bool { return errors.Is(err, bad) },
	})
	for i := 1; i <= 3; i++ {
		if _, err := w.Put(c, i); err != nil {
			t.Fatal(err)
		}
	}
	b := w.Barrier()
	close(gate)
	if err := b.Wait(c); !errors.Is(err, writebehind.ErrDropped) || !errors.Is(err, bad) {
		t.Fatalf("Barrier over an item dropped after a permanent error: %v, want ErrDropped (%v)", err, bad)
	}
	if _, err := w.Put(c, 4); err != nil {
		t.Fatal(err)
	}
	if err := w.Barrier().Wait(c); err != nil {
		t.Fatalf("Barrier over items written after the drop: %v", err)
	}

	// Lost at Close: the store never answers.
	w2, err := writebehind.New(writebehind.Options[int]{
		Write: func(ctx context.Context, _ []int) error { <-ctx.Done(); return ctx.Err() },
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w2.Put(c, 1); err != nil {
		t.Fatal(err)
	}
	b2 := w2.Barrier()
	short, cancel := context.WithTimeout(c, 50*time.Millisecond)
	defer cancel()
	_ = w2.Close(short)
	if err := b2.Wait(c); err == nil {
		t.Fatal("Barrier over an item lost at Close: nil, want an error")
	}
	if err := w2.Barrier().Wait(c); err == nil {
		t.Fatal("Barrier taken after Close lost an item: nil, want an error")
	}
}

// A queue bounded in bytes overflows at the byte bound, long before the
// item bound, and writes everything in order afterwards; an item larger
// than the bound still fits an empty queue.
func TestQueueBytesOverflows(t *testing.T) {
	s := &sink{gate: make(chan struct{})}
	ov := &memOverflow{max: 1000}
	w := newWriter(t, writebehind.Options[int]{Write: s.write, QueueLen: 1000, MaxBatch: 4,
		QueueBytes: 100, Size: func(i int) int {
			if i == 0 {
				return 500 // over the bound alone
			}
			return 10
		}, Overflow: ov})
	if err := w.Add(0); err != nil {
		t.Fatal(err)
	}
	if ov.Len() != 0 {
		t.Fatal("an item over QueueBytes did not fit the empty queue")
	}
	for i := 1; i < 200; i++ {
		if err := w.Add(i); err != nil {
			t.Fatalf("add %d: %v", i, err)
		}
	}
	// Item 0 (500, held in memory until the gated write returns) fills
	// the bound: everything after it overflows.
	if st := w.Stats(); st.Queued != 1 || ov.Len() != 199 {
		t.Fatalf("queued %d, overflowed %d; want 1 and 199 (the byte bound)", st.Queued, ov.Len())
	}
	close(s.gate)
	if err := w.Flush(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, seq(200)) {
		t.Fatalf("written out of order: %v", got[:min(len(got), 40)])
	}
	// Drained: the byte count went back to zero, so small items queue in
	// memory again (10 of 10 bytes fit 100).
	for i := 200; i < 210; i++ {
		if err := w.Add(i); err != nil {
			t.Fatal(err)
		}
	}
	if ov.Len() != 0 {
		t.Fatalf("after draining, %d of 10 small items overflowed", ov.Len())
	}
}

// TestPutNow: an item put with PutNow is written without waiting MinAge,
// with every item queued before it (order), but not those queued after
// it; and PutNow calls made while a write is in flight share the next
// batch (group commit).
func TestPutNow(t *testing.T) {
	s := &sink{}
	w := newWriter(t, writebehind.Options[int]{Write: s.write, MinAge: time.Hour})
	c := ctx(t)
	if _, err := w.Put(c, 1); err != nil {
		t.Fatal(err)
	}
	tk, err := w.PutNow(c, 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Put(c, 3); err != nil {
		t.Fatal(err)
	}
	if err := tk.Wait(c); err != nil {
		t.Fatal(err)
	}
	if got := s.written(); !slices.Equal(got, []int{1, 2}) {
		t.Fatalf("after PutNow's ticket: written %v, want [1 2] (3 waits its MinAge of an hour)", got)
	}

	g := &sink{gate: make(chan struct{})}
	w2 := newWriter(t, writebehind.Options[int]{Write: g.write, MinAge: time.Hour})
	first, err := w2.PutNow(c, 10)
	if err != nil {
		t.Fatal(err)
	}
	// Whatever prefix the writer took first is held at the gate: the
	// rest gathers behind it, into one more batch.
	var tks []writebehind.Ticket
	for i := range 5 {
		tk, err := w2.PutNow(c, 11+i)
		if err != nil {
			t.Fatal(err)
		}
		tks = append(tks, tk)
	}
	close(g.gate)
	if err := first.Wait(c); err != nil {
		t.Fatal(err)
	}
	for _, tk := range tks {
		if err := tk.Wait(c); err != nil {
			t.Fatal(err)
		}
	}
	g.mu.Lock()
	batches := slices.Clone(g.batches)
	g.mu.Unlock()
	if len(batches) > 2 || !slices.Equal(g.written(), []int{10, 11, 12, 13, 14, 15}) {
		t.Fatalf("6 PutNow, 5 of them while a write was held: batches %v, written %v; want at most 2 batches, in order", batches, g.written())
	}
}

// TestLingerEndsWhenTheBatchFills: a writer that lingers for a batch to
// fill writes it as soon as it is full, and a Flush or Close does not wait
// out the linger either. With a fixed wait, batches were only as large as
// what the wait gathered, so a slower publish rate made every item's share
// of a write's fixed cost larger (history capture's cost per message).
func TestLingerEndsWhenTheBatchFills(t *testing.T) {
	const linger = time.Minute // far beyond every deadline below
	s := &sink{}
	w := newWriter(t, writebehind.Options[int]{Write: s.write, MaxBatch: 10, Linger: linger})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	add := func(from, to int) {
		for i := from; i < to; i++ {
			if err := w.Add(i); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A Flush does not wait out the linger.
	add(0, 5)
	if err := w.Flush(ctx); err != nil {
		t.Fatalf("Flush with a %v linger: %v", linger, err)
	}
	// The writer is idle: the first of these wakes it to a short batch,
	// which it writes once the tenth item fills it.
	add(5, 15)
	deadline := time.Now().Add(20 * time.Second)
	for len(s.written()) < 15 {
		if time.Now().After(deadline) {
			t.Fatalf("a full batch not written within 20 s (linger %v): %d items written", linger, len(s.written()))
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Nor does Close wait it out.
	add(15, 17)
	if err := w.Close(ctx); err != nil {
		t.Fatalf("Close with a %v linger: %v", linger, err)
	}
	if got := s.written(); !slices.Equal(got, seq(17)) {
		t.Fatalf("written %v, want 0..16 in order", got)
	}
	s.mu.Lock()
	batches := slices.Clone(s.batches)
	s.mu.Unlock()
	if !slices.Equal(batches, []int{5, 10, 2}) {
		t.Fatalf("batches %v, want [5 10 2]", batches)
	}
}
