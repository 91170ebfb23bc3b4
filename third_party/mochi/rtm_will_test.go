package mqtt

import (
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// willSentHook records the wills reported to OnWillSent.
type willSentHook struct {
	HookBase
	mu   sync.Mutex
	sent []packets.Packet
	ids  []string
}

func (h *willSentHook) ID() string { return "will-sent" }

func (h *willSentHook) Provides(b byte) bool { return b == OnWillSent }

func (h *willSentHook) OnWillSent(cl *Client, pk packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sent = append(h.sent, pk)
	h.ids = append(h.ids, cl.ID)
}

// TestDelayedWillOfGoneClient (rtm patch 46): a delayed will whose client
// is gone when the delay passes (its session ended first) is retained and
// reported to OnWillSent, as an immediate will is; a delayed will of a
// client still known is too, and its will is cleared.
func TestDelayedWillOfGoneClient(t *testing.T) {
	s := newServer()
	h := new(willSentHook)
	require.NoError(t, s.AddHook(h, nil))

	gone, _, _ := newTestClient()
	gone.ID = "gone"
	gone.Properties.Will = Will{Flag: 1, TopicName: "status/gone", Payload: []byte("bye"), Retain: true, WillDelayInterval: 5}
	kept, _, _ := newTestClient()
	kept.ID = "kept"
	kept.Properties.Will = Will{Flag: 1, TopicName: "status/kept", Payload: []byte("bye"), WillDelayInterval: 5}
	s.Clients.Add(kept) // an offline session still held

	s.sendLWT(gone)
	s.sendLWT(kept)
	require.Equal(t, 2, s.loop.willDelayed.Len())
	s.sendDelayedLWT(time.Now().Unix() + 10)
	require.Equal(t, 0, s.loop.willDelayed.Len())

	h.mu.Lock()
	defer h.mu.Unlock()
	require.ElementsMatch(t, []string{"gone", "kept"}, h.ids)
	for _, pk := range h.sent {
		require.Equal(t, []byte("bye"), pk.Payload)
	}
	r := s.Topics.Messages("status/gone")
	require.Len(t, r, 1, "the delayed retained will of a gone client is retained")
	require.Equal(t, []byte("bye"), r[0].Payload)
	require.Equal(t, uint32(0), kept.Properties.Will.Flag)
}
