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

// encodeRewriter rewrites every PUBLISH it is given to encode (a longer
// topic, a shorter payload) and records what OnPacketSent saw.
type encodeRewriter struct {
	HookBase
	sent atomic.Int64
	last atomic.Value // string: the topic OnPacketSent saw
}

func (h *encodeRewriter) ID() string { return "rewriter" }
func (h *encodeRewriter) Provides(b byte) bool {
	return b == OnPacketEncode || b == OnPacketSent
}
func (h *encodeRewriter) OnPacketEncode(_ *Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Publish {
		pk.TopicName += "/rewritten"
		pk.Payload = pk.Payload[:1]
	}
	return pk
}
func (h *encodeRewriter) OnPacketSent(_ *Client, pk packets.Packet, b []byte) {
	if pk.FixedHeader.Type == packets.Publish { // b is empty after a direct write (patch 70)
		h.sent.Add(1)
		h.last.Store(pk.TopicName)
	}
}

// TestWriterHooksAndHeldBytes (patch 83): the writer encodes its queued
// packet in place and calls OnPacketEncode and OnPacketSent only when a
// hook provides them; what must not change: a hook's rewrite is what is
// written and what OnPacketSent sees, and the bytes counted for a queued
// message are released as counted, even when the hook changed its size
// (the server's total returns to 0).
func TestWriterHooksAndHeldBytes(t *testing.T) {
	p := newPublishPath(2, 0, 4)
	h := new(encodeRewriter)
	require.NoError(t, p.s.AddHook(h, nil))
	const n = 50
	for i := 0; i < n; i++ {
		require.NoError(t, p.publish(i))
		p.drain() // no backlog: flow control never stalls a subscriber (slow under -race)
	}
	require.Equal(t, int64(2*n), h.sent.Load())
	require.Equal(t, "a/b/rewritten", h.last.Load())
	require.Zero(t, p.s.Mem.Queued.Load(), "held bytes released as counted")
	for _, cl := range p.subs {
		require.Zero(t, cl.HeldBytes())
	}
	// 2 bytes fixed header, 2+13 topic, 1 payload byte, per message and subscriber
	require.Equal(t, int64(2*n*(2+2+13+1)), p.conns[1].bytes.Load()+p.conns[2].bytes.Load())
}

// keepSubscribers keeps every result OnSelectSubscribers is given.
type keepSubscribers struct {
	HookBase
	kept []*Subscribers
}

func (h *keepSubscribers) ID() string           { return "keep" }
func (h *keepSubscribers) Provides(b byte) bool { return b == OnSelectSubscribers }
func (h *keepSubscribers) OnSelectSubscribers(subs *Subscribers, _ packets.Packet) *Subscribers {
	h.kept = append(h.kept, subs)
	return subs
}

// TestPublishPathAllocations (patch 84): a message to one subscriber takes
// the topic index's result from a pool: no allocation per message (3
// without the patch, after patch 82); a result given to a hook (shared
// subscriptions) is not reused: the hook may keep it.
func TestPublishPathAllocations(t *testing.T) {
	if !raceEnabled {
		p := newPublishPath(1, 0, 4)
		i := 0
		allocs := testing.AllocsPerRun(2000, func() {
			require.NoError(t, p.publish(i))
			i++
			if i%64 == 0 {
				p.drain()
			}
		})
		p.drain()
		t.Logf("%.1f allocations per message", allocs)
		require.LessOrEqual(t, allocs, 1.0)
	}

	p := newPublishPath(1, 0, 4)
	h := new(keepSubscribers)
	require.NoError(t, p.s.AddHook(h, nil))
	p.s.Topics.Subscribe("sub0", packets.Subscription{Filter: SharePrefix + "/g/a/b"})
	for i := 0; i < 20; i++ {
		require.NoError(t, p.publish(i))
	}
	p.drain()
	require.Len(t, h.kept, 20)
	for _, subs := range h.kept {
		require.Len(t, subs.Shared, 1, "a result a hook was given is left alone")
		require.Contains(t, subs.Subscriptions, "sub0")
	}
}
