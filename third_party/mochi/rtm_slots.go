// SPDX-License-Identifier: MIT
// rtm patch 106: per-connection values of hooks, see PATCHES.md.

package mqtt

import (
	"sync/atomic"
	"unsafe"
)

// clientSlots is how many ClientSlots a process can reserve. Each costs 8
// bytes on every Client; two keep the Client in its 896-byte size class.
const clientSlots = 2

var clientSlotsTaken atomic.Int32

// ClientSlot is a place on every Client for one hook's value of type T, for
// state a hook keeps per connection (an identity, a timer). v2.7.9 left a
// hook a map keyed by *Client for that: with a sync.Map about 130 bytes per
// connection and per map, and a lookup for every event; a slot is a pointer
// on the Client, read with one atomic load, and goes away with it.
//
// Slots are few and reserved for the process's lifetime: reserve one in a
// package-level variable, not per hook instance. The value belongs to one
// connection (one Client), like a map keyed by *Client: a session taken over
// by a new connection starts with empty slots.
type ClientSlot[T any] struct{ i int }

// NewClientSlot reserves a slot. It panics when all clientSlots are taken.
func NewClientSlot[T any]() ClientSlot[T] {
	i := clientSlotsTaken.Add(1) - 1
	if i >= clientSlots {
		panic("mqtt: all ClientSlots are taken")
	}
	return ClientSlot[T]{i: int(i)}
}

// Load returns cl's value, nil if none.
func (s ClientSlot[T]) Load(cl *Client) *T {
	return (*T)(atomic.LoadPointer(&cl.slots[s.i]))
}

// Store sets cl's value (nil clears it).
func (s ClientSlot[T]) Store(cl *Client, v *T) {
	atomic.StorePointer(&cl.slots[s.i], unsafe.Pointer(v))
}

// Swap sets cl's value and returns the previous one.
func (s ClientSlot[T]) Swap(cl *Client, v *T) *T {
	return (*T)(atomic.SwapPointer(&cl.slots[s.i], unsafe.Pointer(v)))
}

// CompareAndSwap sets cl's value to v if it is old.
func (s ClientSlot[T]) CompareAndSwap(cl *Client, old, v *T) bool {
	return atomic.CompareAndSwapPointer(&cl.slots[s.i], unsafe.Pointer(old), unsafe.Pointer(v))
}
