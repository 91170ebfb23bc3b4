// SPDX-License-Identifier: MIT
// rtm patch 81: hook dispatch asks Provides once per hook and event, see
// PATCHES.md.

package mqtt

import (
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// providesCounter provides only the events in its set and counts how often
// it is asked.
type providesCounter struct {
	HookBase
	id     string
	events map[byte]bool
	asked  atomic.Int64
	calls  atomic.Int64 // OnPublished calls
}

func (h *providesCounter) ID() string { return h.id }
func (h *providesCounter) Provides(b byte) bool {
	h.asked.Add(1)
	return h.events[b]
}
func (h *providesCounter) OnPublished(*Client, packets.Packet) { h.calls.Add(1) }

// TestHookDispatchAsksProvidesOnce (patch 81): hooks that provide none of
// the publish path's events are not asked about them for every message,
// and a hook that provides one is still called, once per message, in the
// order hooks were added.
func TestHookDispatchAsksProvidesOnce(t *testing.T) {
	p := newPublishPath(2, 0, 4)
	var idle []*providesCounter
	for i := 0; i < 7; i++ {
		h := &providesCounter{id: "idle" + strconv.Itoa(i)}
		require.NoError(t, p.s.AddHook(h, nil))
		idle = append(idle, h)
	}
	pub := &providesCounter{id: "published", events: map[byte]bool{OnPublished: true}}
	require.NoError(t, p.s.AddHook(pub, nil))
	for _, h := range idle {
		h.asked.Store(0)
	}
	pub.asked.Store(0)

	const n = 100
	for i := 0; i < n; i++ {
		require.NoError(t, p.publish(i))
	}
	p.drain()
	require.Equal(t, int64(n), pub.calls.Load(), "the providing hook is called for every message")
	for _, h := range idle {
		// v2.7.9: once per event dispatched, 7 per message on this path
		// (700 here); more with real connections (OnPacketRead, ...).
		require.Zero(t, h.asked.Load(), "%s asked Provides while messages were published", h.id)
	}
	require.LessOrEqual(t, pub.asked.Load(), int64(n), "asked at most for its own event")
}
