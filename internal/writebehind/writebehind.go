// Package writebehind is rtm's one way of writing to the store from a hot
// path: durable sessions and retained messages (broker) and message history
// (plugins) both go through it.
//
// A caller hands items to a Writer and goes on; one goroutine per Writer
// takes whatever has queued, up to Options.MaxBatch items, and writes them
// with one call of Options.Write (group commit: while a write is in flight
// the next batch gathers, so the batch grows with the load and the store
// sees one round trip per batch instead of one per item). A failed write is
// retried whole, with exponential backoff, until it succeeds, the error is
// permanent (Options.Permanent), or the Writer is closed; Write must
// therefore be idempotent (upserts, inserts keyed by an id with duplicate
// keys ignored).
//
// Items are written in the order they were added. Memory is bounded by
// Options.QueueLen items (and Options.QueueBytes). What happens past that bound is the caller's
// choice:
//
//   - Put waits for room (and returns a Ticket that settles when the item's
//     batch is written), for writes a client's acknowledgement depends on:
//     the caller holds the acknowledgement, so a slow store slows the
//     publisher instead of losing what was acknowledged.
//   - Add never waits: an item that does not fit in memory goes to the
//     Overflow (e.g. a disk spool) and, once something has overflowed, every
//     later item follows it there until the Overflow is empty, so order is
//     kept; an item that fits nowhere is dropped, counted, and reported to
//     Options.OnDrop, so the caller can record the gap. When a write fails,
//     the items in memory move to the Overflow too, in order (when it is
//     empty, or is a FrontOverflow; for a Writer that only Add is used on),
//     so a crash during a store outage loses nothing the Overflow keeps.
package writebehind

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Defaults applied to zero-valued Options fields.
const (
	DefaultMaxBatch   = 256
	DefaultQueueLen   = 8192
	DefaultRetryFirst = 50 * time.Millisecond
	DefaultRetryMax   = 5 * time.Second
)

// ErrClosed is returned for items added after Close began.
var ErrClosed = errors.New("writebehind: writer closed")

// ErrFull is returned by Add for an item that fitted neither in memory nor
// in the Overflow; the item was dropped and counted.
var ErrFull = errors.New("writebehind: queue and overflow full")

// Overflow holds, out of memory, items that Add could not queue. It is used
// by one Writer goroutine for Take and Ack and by callers of Add for Put,
// possibly concurrently: implementations must be safe for that.
type Overflow[T any] interface {
	// Put appends items, in order. It returns ErrFull (or any error) for
	// items it cannot hold; none of them is kept then.
	Put(items []T) error
	// Take returns up to max of the oldest items not yet acknowledged,
	// without removing them; the same items again until Ack.
	Take(max int) ([]T, error)
	// Ack removes the n oldest items (those of the last Take, written).
	Ack(n int) error
	// Len is the number of items held.
	Len() int
}

// ByteTaker is an Overflow whose Take can also stop at a total size of
// the items (Spool.TakeBytes). With Options.QueueBytes, a Writer takes its
// batches from it within that bound, as from its memory queue.
type ByteTaker[T any] interface {
	TakeBytes(max int, maxBytes int64) ([]T, error)
}

// FrontOverflow is an Overflow that can also hold items ahead of those it
// holds. With one, a failed write moves the items in memory to it even
// after others overflowed (they are older), so none waits in memory for
// the store.
type FrontOverflow[T any] interface {
	PutFront(items []T) error
}

// Options configure a Writer. Write is required.
type Options[T any] struct {
	// Name identifies the writer in logs and errors, e.g. "history".
	Name string

	// Write stores a batch, in order. It must be idempotent: after an
	// error the same batch is written again.
	Write func(ctx context.Context, batch []T) error

	// MaxBatch bounds the items of one Write. 0 means DefaultMaxBatch.
	MaxBatch int

	// Linger is how long the writer waits at most for a batch to fill
	// once it holds fewer than MaxBatch items; a batch that fills (or a
	// Flush, or Close) ends the wait. 0 (the default) writes at once:
	// group commit alone batches under load, and a lone item pays no
	// delay.
	Linger time.Duration

	// MinAge, when set, keeps every item in memory at least this long
	// before it is written (unless the writer is closing or a Flush waits):
	// for items that often become unnecessary soon after they are added
	// (Ticket.WaitOr; a Write that skips items found obsolete), so most are
	// never written. It adds MinAge to the wait of every Ticket.
	MinAge time.Duration

	// QueueLen bounds the items held in memory. 0 means DefaultQueueLen.
	QueueLen int

	// QueueBytes, with Size, also bounds the memory queue by the sum of
	// Size of its items, so a queue long enough for a burst of small
	// items cannot hold as many large ones. An item is queued only within
	// both bounds (one item always fits an empty queue); past either, Put
	// waits and Add overflows, as for QueueLen. 0 means no byte bound.
	QueueBytes int64
	// Size is an item's weight against QueueBytes (e.g. its payload and
	// topic length). Required when QueueBytes is set.
	Size func(T) int

	// Overflow, when set, takes what Add cannot queue in memory.
	Overflow Overflow[T]

	// Permanent reports errors that retrying cannot fix (e.g. a document
	// the server refuses): the batch is dropped and reported to OnDrop.
	// nil retries every error.
	Permanent func(error) bool

	// OnDrop is told about items dropped: by Add when memory and the
	// Overflow are full (err is ErrFull), or after a permanent write error.
	// It is called without the writer's locks held, from the goroutine
	// that dropped them; it must not call Add or Put.
	OnDrop func(items []T, err error)

	// RetryFirst and RetryMax shape the exponential backoff between
	// attempts at a failed batch. 0 means DefaultRetryFirst/RetryMax.
	RetryFirst, RetryMax time.Duration

	// Logger receives write failures and recoveries. nil discards.
	Logger *slog.Logger
}

// Stats are a Writer's counters, for metrics and /v1/stats.
type Stats struct {
	Queued     int           // items in memory, not yet written (the batch being written included)
	Overflowed int           // items in the Overflow
	Written    int64         // items written
	Batches    int64         // successful writes
	Dropped    int64         // items dropped (full, or a permanent error)
	Failures   int64         // failed write attempts (each retried unless permanent)
	Up         bool          // the last write attempt succeeded (true before the first)
	LastError  string        // the last failure, while !Up
	LastWrite  time.Duration // duration of the last successful Write
}

// Writer writes items in batches from one goroutine. It is safe for
// concurrent use.
type Writer[T any] struct {
	o   Options[T]
	log *slog.Logger

	mu        sync.Mutex
	queue     fifo[T]             // items in memory, oldest first; written from the front
	sizes     fifo[int32]         // with QueueBytes: Size of each item of queue
	qbytes    int64               // with QueueBytes: sum of sizes
	times     fifo[time.Duration] // with MinAge: when each item of queue was added (since epoch)
	batch     []T                 // the writer's copy of the batch it writes (reused)
	epoch     time.Time
	flushing  int    // Flush calls waiting: MinAge does not apply
	urgent    uint64 // PutNow: items with a lower seq do not wait MinAge
	spilling  bool
	closed    bool
	room      chan struct{} // closed and replaced when queue space frees
	work      chan struct{} // capacity 1: something to write
	cut       chan struct{} // capacity 1, with Linger: a batch filled, or a Flush or Close wants it now
	nextSeq   uint64        // sequence number of the next item put in memory
	committed uint64        // every item with seq < committed is settled
	settled   chan struct{} // closed and replaced when committed moves
	failed    []seqRange    // dropped after a permanent error, for tickets
	forgotTo  uint64        // the end of the dropped ranges failed no longer holds

	written  atomic.Int64
	batches  atomic.Int64
	dropped  atomic.Int64
	failures atomic.Int64
	up       atomic.Bool
	putUsed  atomic.Bool // Put was called: items in memory may have tickets
	lastErr  atomic.Pointer[string]
	lastDur  atomic.Int64

	ctx    context.Context // ends at Close's deadline: stops retries
	cancel context.CancelFunc
	done   chan struct{}
}

type seqRange struct {
	from, to uint64 // [from, to)
	err      error
}

// New starts a Writer's goroutine. Close stops it.
func New[T any](o Options[T]) (*Writer[T], error) {
	if o.Write == nil {
		return nil, errors.New("writebehind: Options.Write is required")
	}
	if o.MaxBatch < 0 || o.QueueLen < 0 || o.Linger < 0 || o.MinAge < 0 || o.QueueBytes < 0 {
		return nil, fmt.Errorf("writebehind %s: MaxBatch, QueueLen, QueueBytes, Linger and MinAge must not be negative", o.Name)
	}
	if o.QueueBytes > 0 && o.Size == nil {
		return nil, fmt.Errorf("writebehind %s: QueueBytes needs Size", o.Name)
	}
	if o.MaxBatch == 0 {
		o.MaxBatch = DefaultMaxBatch
	}
	if o.QueueLen == 0 {
		o.QueueLen = DefaultQueueLen
	}
	if o.RetryFirst == 0 {
		o.RetryFirst = DefaultRetryFirst
	}
	if o.RetryMax == 0 {
		o.RetryMax = DefaultRetryMax
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &Writer[T]{
		o: o, log: log.With("writer", o.Name),
		room: make(chan struct{}), work: make(chan struct{}, 1), cut: make(chan struct{}, 1), settled: make(chan struct{}),
		ctx: ctx, cancel: cancel, done: make(chan struct{}), epoch: time.Now(),
	}
	w.up.Store(true)
	w.queue, w.sizes, w.times = newFifo[T](o.MaxBatch*4), newFifo[int32](o.MaxBatch*4), newFifo[time.Duration](o.MaxBatch*4)
	if o.Overflow != nil && o.Overflow.Len() > 0 {
		// Left by an earlier process (a spool after a crash): written
		// first, and new items queue behind it.
		w.spilling = true
		w.signal()
	}
	go w.run()
	return w, nil
}

// Ticket settles when its item has been written, or dropped after a
// permanent error.
type Ticket struct {
	w interface {
		wait(context.Context, uint64, <-chan struct{}) error
	}
	seq uint64
}

// Covers reports whether t settles no earlier than o (tickets of one
// writer settle in order).
func (t Ticket) Covers(o Ticket) bool { return t.seq >= o.seq }

// Wait blocks until the item is written (nil), was dropped (the permanent
// error), the writer closed before writing it (ErrClosed), or ctx ends.
func (t Ticket) Wait(ctx context.Context) error {
	if t.w == nil {
		return nil
	}
	return t.w.wait(ctx, t.seq, nil)
}

// WaitOr is Wait that also returns nil, without waiting further, once
// enough is closed: for a caller whose reason to wait for the write can go
// away first (the durable sessions release a publisher's acknowledgement
// once every recipient has acknowledged the message, written or not).
// A nil enough never closes.
func (t Ticket) WaitOr(ctx context.Context, enough <-chan struct{}) error {
	if t.w == nil {
		return nil
	}
	return t.w.wait(ctx, t.seq, enough)
}

// Put queues item in memory, waiting for room while the queue is full or
// items are overflowed, and returns its Ticket. It fails only when ctx ends
// first or the writer is closed.
func (w *Writer[T]) Put(ctx context.Context, item T) (Ticket, error) {
	w.putUsed.Store(true)
	for {
		w.mu.Lock()
		if w.closed {
			w.mu.Unlock()
			return Ticket{}, ErrClosed
		}
		if size, ok := w.fitsLocked(item); ok {
			seq := w.nextSeq
			w.nextSeq++
			w.queue.push(item)
			w.stampLocked(size)
			full := w.queue.len() == w.o.MaxBatch
			w.mu.Unlock()
			w.signal()
			if full {
				w.cutLinger()
			}
			return Ticket{w: w, seq: seq}, nil
		}
		room := w.room
		w.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return Ticket{}, ctx.Err()
		}
	}
}

// PutNow is Put for an item someone waits for now (rtm: a CONNACK held
// until a will is stored): it is written without waiting MinAge, with
// every item queued before it (items are written in order). Items queued
// after it wait theirs, and while a write is in flight the next
// batch still gathers, so a stream of PutNow keeps its group commit.
// Unlike Flush, the writer is hurried only up to the item, not for as
// long as the caller waits.
//
// The items before it lose the rest of their MinAge: an item the caller's
// batch function would skip had it waited (rtm: a message its subscriber
// acknowledged in the meantime, never written) is written. Hurrying only
// the item (and its own client's) would mean writing out of order, and
// the writer's tickets rest on in-order commits (an item is committed
// when every item before it is), so PutNow stays for writes that are rare
// next to the queue's traffic (rtm: one per CONNECT with a will).
func (w *Writer[T]) PutNow(ctx context.Context, item T) (Ticket, error) {
	t, err := w.Put(ctx, item)
	if err != nil || w.o.MinAge == 0 {
		return t, err
	}
	w.mu.Lock()
	w.urgent = max(w.urgent, t.seq+1)
	w.mu.Unlock()
	w.signal()
	return t, nil
}

// Add queues item without waiting: in memory, else in the Overflow. It
// returns ErrFull when the item fitted in neither (it was dropped, counted
// and reported to OnDrop), or ErrClosed.
func (w *Writer[T]) Add(item T) error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return ErrClosed
	}
	if size, ok := w.fitsLocked(item); ok {
		w.nextSeq++
		w.queue.push(item)
		w.stampLocked(size)
		full := w.queue.len() == w.o.MaxBatch
		w.mu.Unlock()
		w.signal()
		if full {
			w.cutLinger()
		}
		return nil
	}
	var err error
	if w.o.Overflow == nil {
		err = ErrFull
	} else if err = w.o.Overflow.Put([]T{item}); err == nil {
		w.spilling = true
	}
	w.mu.Unlock()
	if err != nil {
		w.dropped.Add(1)
		if w.o.OnDrop != nil {
			w.o.OnDrop([]T{item}, ErrFull)
		}
		return fmt.Errorf("%w: %w", ErrFull, err)
	}
	w.signal()
	return nil
}

// Flush waits until every item added before the call is written (or
// dropped), items in the Overflow included, or ctx ends. Items wait no
// MinAge while a Flush does.
func (w *Writer[T]) Flush(ctx context.Context) error {
	w.mu.Lock()
	target := w.nextSeq
	w.flushing++
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.flushing--
		w.mu.Unlock()
	}()
	w.signal()
	w.cutLinger()
	return w.reached(ctx, target)
}

// Barrier stands for every item added before it was taken: its Wait
// returns once they are written, items in the Overflow included. Unlike
// Flush it does not hurry the writer (they still wait MinAge), and a
// caller that gives up waiting can wait again later for the same items
// rather than for a target that moves with every new item.
//
// Unlike Flush, a Barrier does not count an item dropped (a permanent
// error, or lost at Close) as done: a caller that tells someone else the
// items are safe (the broker's node link) must not say so for an item that
// was never written. Its Wait then reports ErrDropped.
type Barrier struct {
	w interface {
		reached(context.Context, uint64) error
		droppedIn(from, to uint64) error
	}
	from, target uint64
}

// ErrDropped is returned by Barrier.Wait when an item it stands for was
// dropped instead of written; it wraps the reason.
var ErrDropped = errors.New("writebehind: item dropped, not written")

// Barrier returns a Barrier for every item added so far that is not
// settled yet (and, on a closed Writer, for all items: a Close that lost
// items fails every later Barrier).
func (w *Writer[T]) Barrier() Barrier {
	w.mu.Lock()
	defer w.mu.Unlock()
	from := w.committed
	if w.closed {
		from = 0
	}
	return Barrier{w: w, from: from, target: w.nextSeq}
}

// Wait blocks until the Barrier's items are written (nil), one of them
// was dropped (ErrDropped), the writer closed first (ErrClosed), or ctx
// ends.
func (b Barrier) Wait(ctx context.Context) error {
	if b.w == nil {
		return nil
	}
	if err := b.w.reached(ctx, b.target); err != nil {
		return err
	}
	return b.w.droppedIn(b.from, b.target)
}

// droppedIn reports (ErrDropped) whether an item with a seq in [from, to)
// was dropped. Ranges forgotten (the last 64 are kept) count as dropped
// if they may overlap.
func (w *Writer[T]) droppedIn(from, to uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.forgotTo > from {
		return fmt.Errorf("%w: items between %d and %d", ErrDropped, from, w.forgotTo)
	}
	for _, r := range w.failed {
		if r.from < to && r.to > from {
			return fmt.Errorf("%w: %w", ErrDropped, r.err)
		}
	}
	return nil
}

// reached waits until every item before target is settled and the
// Overflow drained (see Flush and Barrier).
func (w *Writer[T]) reached(ctx context.Context, target uint64) error {
	for {
		w.mu.Lock()
		done := w.committed >= target && !w.spilling
		settled := w.settled
		w.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-settled:
		case <-ctx.Done():
			return ctx.Err()
		case <-w.done:
			return ErrClosed
		}
	}
}

// Close stops accepting items, writes what it holds until ctx ends, then
// stops retrying and returns. Items still in memory then are lost (counted
// in Stats.Dropped); items in the Overflow stay there for the next process.
func (w *Writer[T]) Close(ctx context.Context) error {
	w.mu.Lock()
	already := w.closed
	w.closed = true
	close(w.room)
	w.room = make(chan struct{})
	w.mu.Unlock()
	if !already {
		w.signal()
		w.cutLinger()
	}
	var err error
	select {
	case <-w.idle():
	case <-ctx.Done():
		err = fmt.Errorf("writebehind %s: %d items unwritten at close: %w", w.o.Name, w.Stats().Queued, ctx.Err())
	}
	w.cancel()
	<-w.done
	return err
}

// idle is closed once the writer holds nothing to write (memory and
// overflow empty) after Close.
func (w *Writer[T]) idle() <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		for {
			w.mu.Lock()
			empty := w.queue.len() == 0 && !w.spilling
			settled := w.settled
			w.mu.Unlock()
			if empty {
				return
			}
			select {
			case <-settled:
			case <-w.done:
				return
			}
		}
	}()
	return ch
}

// fitsLocked reports whether item may be queued in memory now (nothing
// overflowed, and within QueueLen and QueueBytes), and its Size. w.mu is
// held.
func (w *Writer[T]) fitsLocked(item T) (int, bool) {
	if w.spilling || w.queue.len() >= w.o.QueueLen {
		return 0, false
	}
	if w.o.QueueBytes == 0 {
		return 0, true
	}
	size := w.o.Size(item)
	return size, w.queue.len() == 0 || w.qbytes+int64(size) <= w.o.QueueBytes
}

// stampLocked records when the item just appended was added, and its
// size. w.mu is held.
func (w *Writer[T]) stampLocked(size int) {
	if w.o.MinAge > 0 {
		w.times.push(time.Since(w.epoch))
	}
	if w.o.QueueBytes > 0 {
		w.sizes.push(int32(min(size, 1<<31-1)))
		w.qbytes += int64(size)
	}
}

// ripe is how many items from the front of the queue may be written now
// (at most MaxBatch), and how long until the first of the others may.
// w.mu is held.
func (w *Writer[T]) ripeLocked() (int, time.Duration) {
	n := min(w.queue.len(), w.o.MaxBatch)
	if w.o.MinAge == 0 || w.closed || w.flushing > 0 || n == 0 {
		return n, 0
	}
	cut := time.Since(w.epoch) - w.o.MinAge
	ripe := sort.Search(n, func(i int) bool { return w.times.at(i) >= cut+1 })
	if w.urgent > w.committed {
		// The memory queue's front item has seq committed.
		ripe = max(ripe, min(n, int(w.urgent-w.committed)))
	}
	if ripe == 0 {
		return 0, w.times.at(0) - cut
	}
	return ripe, 0
}

// Stats returns the writer's counters.
func (w *Writer[T]) Stats() Stats {
	w.mu.Lock()
	q := w.queue.len()
	w.mu.Unlock()
	s := Stats{
		Queued:    q,
		Written:   w.written.Load(),
		Batches:   w.batches.Load(),
		Dropped:   w.dropped.Load(),
		Failures:  w.failures.Load(),
		Up:        w.up.Load(),
		LastWrite: time.Duration(w.lastDur.Load()),
	}
	if w.o.Overflow != nil {
		s.Overflowed = w.o.Overflow.Len()
	}
	if p := w.lastErr.Load(); p != nil && !s.Up {
		s.LastError = *p
	}
	return s
}

func (w *Writer[T]) signal() {
	select {
	case w.work <- struct{}{}:
	default:
	}
}

// cutLinger ends the writer's wait for a batch to fill, if it waits.
func (w *Writer[T]) cutLinger() {
	select {
	case w.cut <- struct{}{}:
	default:
	}
}

func (w *Writer[T]) wait(ctx context.Context, seq uint64, enough <-chan struct{}) error {
	for {
		w.mu.Lock()
		if seq < w.committed {
			err := w.failedErr(seq)
			w.mu.Unlock()
			return err
		}
		settled := w.settled
		w.mu.Unlock()
		select {
		case <-settled:
		case <-enough:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-w.done:
			w.mu.Lock()
			defer w.mu.Unlock()
			if seq < w.committed {
				return w.failedErr(seq)
			}
			return ErrClosed
		}
	}
}

// failedErr is the permanent error that dropped seq, if any. w.mu is held.
func (w *Writer[T]) failedErr(seq uint64) error {
	for _, r := range w.failed {
		if seq >= r.from && seq < r.to {
			return r.err
		}
	}
	return nil
}

func (w *Writer[T]) run() {
	defer close(w.done)
	for {
		select {
		case <-w.work:
		case <-w.ctx.Done():
			w.loseQueued()
			return
		}
		for w.writeOne() {
		}
		w.mu.Lock()
		stop := w.closed && w.queue.len() == 0 && !w.spilling
		w.mu.Unlock()
		if stop {
			return
		}
	}
}

// writeOne writes one batch, from memory (older items) or else the
// Overflow, and reports whether there may be more.
func (w *Writer[T]) writeOne() bool {
	if w.o.Linger > 0 {
		// A cut from before is spent: the batch it was about is written
		// or about to be. One that comes after this (the MaxBatch-th item,
		// a Flush, Close) stays in the channel and ends the wait below.
		select {
		case <-w.cut:
		default:
		}
		w.mu.Lock()
		short := w.queue.len() > 0 && w.queue.len() < w.o.MaxBatch && !w.closed && w.flushing == 0
		w.mu.Unlock()
		if short {
			// A full batch goes at once: with a fixed wait, batches were
			// as large as what the wait gathered (10 ms at 20,000 a second:
			// 200 items), and a publish rate slowed by anything made each
			// item's share of a write's fixed cost larger.
			t := time.NewTimer(w.o.Linger)
			select {
			case <-t.C:
			case <-w.cut:
			case <-w.ctx.Done():
			}
			t.Stop()
		}
	}
	w.mu.Lock()
	n, wait := w.ripeLocked()
	for n == 0 && wait > 0 {
		w.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-w.work: // a Flush, or Close: ripeLocked says
		case <-w.ctx.Done():
			t.Stop()
			return false
		}
		t.Stop()
		w.mu.Lock()
		n, wait = w.ripeLocked()
	}
	// A copy: Add may move the queue's items while the batch is written
	// (fifo), and the items stay queued until it is.
	w.batch = w.queue.appendTo(w.batch[:0], n)
	batch := w.batch[:n:n]
	defer clear(batch) // let the GC have the items
	first := w.committed
	spilling := w.spilling
	w.mu.Unlock()

	fromOverflow := false
	if n == 0 {
		if !spilling {
			return false
		}
		var err error
		if bt, ok := w.o.Overflow.(ByteTaker[T]); ok && w.o.QueueBytes > 0 {
			batch, err = bt.TakeBytes(w.o.MaxBatch, w.o.QueueBytes)
		} else {
			batch, err = w.o.Overflow.Take(w.o.MaxBatch)
		}
		if err != nil || len(batch) == 0 {
			if err != nil {
				w.log.Error("read overflow; retrying", "err", err)
				t := time.NewTimer(w.o.RetryMax)
				defer t.Stop()
				select {
				case <-t.C:
					return true
				case <-w.ctx.Done():
					return false
				}
			}
			w.mu.Lock()
			// Empty: new items queue in memory again.
			w.spilling = w.o.Overflow.Len() > 0
			w.broadcastLocked()
			w.mu.Unlock()
			return w.spillingNow()
		}
		fromOverflow = true
	}

	// Items only Add queued (no ticket waits on them) go to the Overflow
	// once the store fails, so a crash during an outage loses none of them.
	spillable := !fromOverflow && w.o.Overflow != nil && !w.putUsed.Load()
	err := w.writeWithRetry(batch, spillable)
	if errors.Is(err, errSpill) {
		if w.spillQueue() {
			return true // written from the Overflow, in order
		}
		err = w.writeWithRetry(batch, false)
	}
	if err != nil && w.ctx.Err() != nil && !w.permanent(err) {
		return false // closing: what is left is lost or stays in the overflow
	}
	var dropErr error
	if err != nil {
		dropErr = err
		w.dropped.Add(int64(len(batch)))
		if w.o.OnDrop != nil {
			w.o.OnDrop(batch, err)
		}
	} else {
		w.written.Add(int64(len(batch)))
	}
	if fromOverflow {
		if err := w.o.Overflow.Ack(len(batch)); err != nil {
			w.log.Error("acknowledge overflow", "err", err)
		}
		w.mu.Lock()
		w.broadcastLocked()
		w.mu.Unlock()
		return true
	}
	w.mu.Lock()
	w.queue.pop(n)
	if w.o.MinAge > 0 {
		w.times.pop(n)
	}
	if w.o.QueueBytes > 0 {
		for i := range n {
			w.qbytes -= int64(w.sizes.at(i))
		}
		w.sizes.pop(n)
		if w.sizes.len() == 0 {
			w.qbytes = 0
		}
	}
	w.committed = first + uint64(n)
	if dropErr != nil {
		w.recordFailedLocked(seqRange{from: first, to: w.committed, err: dropErr})
	}
	w.broadcastLocked()
	w.mu.Unlock()
	return true
}

// recordFailedLocked keeps the last 64 dropped ranges, for tickets and
// barriers, and how far the forgotten ones reached. w.mu is held.
func (w *Writer[T]) recordFailedLocked(r seqRange) {
	w.failed = append(w.failed, r)
	if n := len(w.failed) - 64; n > 0 {
		w.forgotTo = max(w.forgotTo, w.failed[n-1].to)
		w.failed = w.failed[n:]
	}
}

func (w *Writer[T]) spillingNow() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.spilling || w.queue.len() > 0
}

// broadcastLocked wakes Put, Flush and ticket waiters. w.mu is held.
func (w *Writer[T]) broadcastLocked() {
	close(w.settled)
	w.settled = make(chan struct{})
	close(w.room)
	w.room = make(chan struct{})
}

func (w *Writer[T]) permanent(err error) bool {
	return w.o.Permanent != nil && w.o.Permanent(err)
}

// errSpill asks writeOne to move the queue to the Overflow.
var errSpill = errors.New("writebehind: spill to the overflow")

// spillQueue moves every item in memory to the Overflow after a failed
// write: behind nothing if it is empty (later items follow them there),
// else ahead of what it holds (FrontOverflow). It reports whether it did.
func (w *Writer[T]) spillQueue() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.queue.len() == 0 {
		return false
	}
	put := w.o.Overflow.Put
	if w.spilling {
		// The Overflow holds newer items: memory goes ahead of them, or
		// stays (and is written first).
		fo, ok := w.o.Overflow.(FrontOverflow[T])
		if !ok {
			return false
		}
		put = fo.PutFront
	}
	if err := put(w.queue.appendTo(nil, w.queue.len())); err != nil {
		return false
	}
	w.committed += uint64(w.queue.len())
	w.resetLocked()
	w.spilling = true
	w.broadcastLocked()
	return true
}

func (w *Writer[T]) writeWithRetry(batch []T, spillable bool) error {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = w.o.RetryFirst
	b.MaxInterval = w.o.RetryMax
	b.Reset()
	for {
		start := time.Now()
		err := w.o.Write(w.ctx, batch)
		if err == nil {
			w.lastDur.Store(int64(time.Since(start)))
			w.batches.Add(1)
			if !w.up.Swap(true) {
				w.log.Info("store writes resumed", "items", len(batch))
			}
			return nil
		}
		w.failures.Add(1)
		msg := err.Error()
		w.lastErr.Store(&msg)
		if w.permanent(err) {
			w.log.Error("store refused a batch; dropped", "items", len(batch), "err", err)
			return err
		}
		if w.up.Swap(false) {
			w.log.Warn("store write failed; retrying with backoff", "items", len(batch), "err", err)
		}
		if spillable {
			return errSpill
		}
		t := time.NewTimer(b.NextBackOff())
		select {
		case <-t.C:
		case <-w.ctx.Done():
			t.Stop()
			return w.ctx.Err()
		}
	}
}

// resetLocked empties the memory queue. w.mu is held.
func (w *Writer[T]) resetLocked() {
	w.queue.reset()
	w.times.reset()
	w.sizes.reset()
	w.qbytes = 0
}

// loseQueued counts the items left in memory when Close gave up.
func (w *Writer[T]) loseQueued() {
	w.mu.Lock()
	lost := w.queue.appendTo(nil, w.queue.len())
	w.resetLocked()
	if len(lost) > 0 {
		w.recordFailedLocked(seqRange{from: w.committed, to: w.committed + uint64(len(lost)), err: ErrClosed})
	}
	w.committed += uint64(len(lost))
	w.broadcastLocked()
	w.mu.Unlock()
	if len(lost) == 0 {
		return
	}
	w.dropped.Add(int64(len(lost)))
	if w.o.OnDrop != nil {
		w.o.OnDrop(lost, ErrClosed)
	}
}
