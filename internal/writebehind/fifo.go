package writebehind

import "unsafe"

// fifo is the Writer's memory queue: a ring of items, oldest first.
//
// It was a slice appended to at the back and cut at the front (q = q[n:]):
// that reaches the end of its array after about its length in items, and
// append then copies every queued item into a new array, and an emptied
// queue started again from nothing. With items written about as fast as
// they come, that was an allocation and a copy every batch or so, on the
// publish path (history capture). A ring grows (doubling) only when the
// backlog does, and keeps its array when it empties, unless the array is
// larger than keep items and the backlog since the last time it emptied
// used less than a quarter of it: after a burst, once the load is small
// again, not after each of a series of similar bursts.
type fifo[T any] struct {
	buf  []T // len(buf) is 0 or a power of two
	head int // index of the oldest item
	n    int // items held
	keep int // see above; set by newFifo
	high int // most items held since the queue last emptied
}

// newFifo keeps an array of at least minKeep items, and of 1 MiB of items
// in any case.
func newFifo[T any](minKeep int) fifo[T] {
	var zero T
	return fifo[T]{keep: max(minKeep, (1<<20)/max(int(unsafe.Sizeof(zero)), 1))}
}

func (q *fifo[T]) len() int { return q.n }

// at is the i-th oldest item.
func (q *fifo[T]) at(i int) T { return q.buf[(q.head+i)&(len(q.buf)-1)] }

func (q *fifo[T]) push(x T) {
	if q.n == len(q.buf) {
		q.grow()
	}
	q.buf[(q.head+q.n)&(len(q.buf)-1)] = x
	q.n++
	q.high = max(q.high, q.n)
}

func (q *fifo[T]) grow() {
	nb := make([]T, max(2*len(q.buf), 64))
	q.copyTo(nb, q.n)
	q.buf, q.head = nb, 0
}

// copyTo copies the n oldest items to dst.
func (q *fifo[T]) copyTo(dst []T, n int) {
	if n == 0 {
		return
	}
	end := q.head + n
	if end <= len(q.buf) {
		copy(dst, q.buf[q.head:end])
		return
	}
	k := copy(dst, q.buf[q.head:])
	copy(dst[k:n], q.buf[:end-len(q.buf)])
}

// appendTo appends the n oldest items to dst.
func (q *fifo[T]) appendTo(dst []T, n int) []T {
	l := len(dst)
	if cap(dst)-l < n {
		nd := make([]T, l, l+n)
		copy(nd, dst)
		dst = nd
	}
	dst = dst[:l+n]
	q.copyTo(dst[l:], n)
	return dst
}

// pop removes the n oldest items.
func (q *fifo[T]) pop(n int) {
	if n == 0 {
		return
	}
	// Let the GC have the items.
	if end := q.head + n; end <= len(q.buf) {
		clear(q.buf[q.head:end])
	} else {
		clear(q.buf[q.head:])
		clear(q.buf[:end-len(q.buf)])
	}
	q.head = (q.head + n) & (len(q.buf) - 1)
	q.n -= n
	if q.n == 0 {
		q.head = 0
		if len(q.buf) > q.keep && q.high < len(q.buf)/4 {
			q.buf = nil
		}
		q.high = 0
	}
}

// reset empties the queue and lets its array go (the items may have been
// handed over).
func (q *fifo[T]) reset() { q.buf, q.head, q.n, q.high = nil, 0, 0, 0 }
