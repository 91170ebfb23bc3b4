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

// willPublishHook leaves the client "skipped" out of every will
// (OnWillPublish) and records the wills reported to OnWillSent.
type willPublishHook struct {
	willSentHook
}

func (h *willPublishHook) ID() string { return "will-publish" }

func (h *willPublishHook) Provides(b byte) bool { return b == OnWillPublish || b == OnWillSent }

func (h *willPublishHook) OnWillPublish(cl *Client, pk packets.Packet) packets.Packet {
	pk.Exclude = func(id string) bool { return id == "skipped" }
	return pk
}

// TestWillPublishHookBeforeLocalDelivery (rtm patch 28): the packet an
// OnWillPublish hook returns is the will published here, immediate or
// delayed: a client it excludes gets neither will, another subscriber gets
// both, and OnWillSent sees the hook's packet.
func TestWillPublishHookBeforeLocalDelivery(t *testing.T) {
	s := newServer()
	h := new(willPublishHook)
	require.NoError(t, s.AddHook(h, nil))
	mk := func(id string) chan packets.Packet {
		cl, r, w := newTestClient()
		t.Cleanup(func() { _ = w.Close(); _ = r.Close() })
		cl.ID = id
		cl.Properties.ProtocolVersion = 5
		s.Clients.Add(cl)
		got := make(chan packets.Packet, 10)
		go func() {
			for {
				typ, body, err := readRawPacket(r)
				if err != nil {
					return
				}
				if typ>>4 == packets.Publish {
					pk := packets.Packet{ProtocolVersion: 5}
					_ = pk.FixedHeader.Decode(typ)
					_ = pk.PublishDecode(body)
					got <- pk
				}
			}
		}()
		return got
	}
	keptGot, skippedGot := mk("kept"), mk("skipped")
	s.Topics.Subscribe("kept", packets.Subscription{Filter: "status/#"})
	s.Topics.Subscribe("skipped", packets.Subscription{Filter: "status/#"})

	now, _, _ := newTestClient()
	now.ID = "now"
	now.Properties.Will = Will{Flag: 1, TopicName: "status/now", Payload: []byte("now")}
	later, _, _ := newTestClient()
	later.ID = "later"
	later.Properties.Will = Will{Flag: 1, TopicName: "status/later", Payload: []byte("later"), WillDelayInterval: 5}
	s.sendLWT(now)
	s.sendLWT(later)
	s.sendDelayedLWT(time.Now().Unix() + 10)

	for _, want := range []string{"now", "later"} {
		require.Equal(t, want, string((<-keptGot).Payload))
	}
	// Then a message nobody excludes: the first the excluded client gets.
	s.publishToSubscribers(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "status/x", Payload: []byte("after")})
	require.Equal(t, "after", string((<-skippedGot).Payload), "the excluded client got a will")

	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(t, []string{"now", "later"}, h.ids)
	for _, pk := range h.sent {
		require.NotNil(t, pk.Exclude, "OnWillSent got the will without the hook's change")
	}
}
