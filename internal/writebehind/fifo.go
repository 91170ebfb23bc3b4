package writebehind

// fifo is the Writer's memory queue: items buf[head:tail], oldest first.
//
// A slice that is appended to at the back and cut at the front
// (q = q[n:]) reaches the end of its array after about its length in
// items, and append then copies every queued item into a new array: with
// items written as fast as they come, that is an allocation and a copy for
// every batch or so, on the publish path (history capture). fifo reuses
// its array instead: it moves the items to the front when they fill less
// than half of it, and grows (doubling) only when they do not, so a steady
// load allocates nothing once the array fits the backlog.
type fifo[T any] struct {
	buf        []T
	head, tail int
	// keep is the capacity kept when the queue empties; a larger array
	// (grown for a burst) is let go then.
	keep int
}

func (q *fifo[T]) len() int { return q.tail - q.head }

// items are the queued items, oldest first; valid until the next push or
// pop.
func (q *fifo[T]) items() []T { return q.buf[q.head:q.tail] }

func (q *fifo[T]) push(x T) {
	if q.tail == len(q.buf) {
		q.makeRoom()
	}
	q.buf[q.tail] = x
	q.tail++
}

func (q *fifo[T]) makeRoom() {
	n := q.len()
	if q.head > 0 && n <= len(q.buf)/2 {
		copy(q.buf, q.buf[q.head:q.tail])
		clear(q.buf[n:q.tail]) // let the GC have what moved
		q.head, q.tail = 0, n
		return
	}
	nb := make([]T, max(2*len(q.buf), 64, min(q.keep, 1024)))
	copy(nb, q.buf[q.head:q.tail])
	q.buf, q.head, q.tail = nb, 0, n
}

// pop removes the n oldest items.
func (q *fifo[T]) pop(n int) {
	clear(q.buf[q.head : q.head+n]) // let the GC have the items
	q.head += n
	if q.head == q.tail {
		q.head, q.tail = 0, 0
		if len(q.buf) > q.keep {
			q.buf = nil
		}
	}
}

// reset empties the queue and lets its array go (it may be still in use:
// the items were handed over).
func (q *fifo[T]) reset() { q.buf, q.head, q.tail = nil, 0, 0 }
