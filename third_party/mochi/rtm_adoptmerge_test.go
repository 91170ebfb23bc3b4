package mqtt

import (
	"sync"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// qosPublishHook records the messages reported to OnQosPublish.
type qosPublishHook struct {
	HookBase
	mu  sync.Mutex
	got []packets.Packet
}

func (h *qosPublishHook) ID() string           { return "qospublish" }
func (h *qosPublishHook) Provides(b byte) bool { return b == OnQosPublish }
func (h *qosPublishHook) OnQosPublish(_ *Client, pk packets.Packet, _ int64, _ int) {
	h.mu.Lock()
	h.got = append(h.got, pk)
	h.mu.Unlock()
}

// TestAdoptSessionMergeRenumbers (rtm patch 126): merged into a session
// that holds messages 1 and 2, the adopted messages 1, 2 and 3 keep their
// order; 3 keeps its ID, 1 and 2 get IDs used by neither session and are
// reported to OnQosPublish under them (a storage hook stores them there).
// A message the session holds under its ID already is not added again.
// Fails on patch 17's merge:
// the adopted 1 and 2 skipped.
func TestAdoptSessionMergeRenumbers(t *testing.T) {
	s := newServer()
	h := new(qosPublishHook)
	require.NoError(t, s.AddHook(h, nil))
	msg := func(id uint16, payload string) packets.Packet {
		return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			PacketID: id, TopicName: "in/dev", Payload: []byte(payload), Origin: "pub", Created: 100}
	}
	sub := []packets.Subscription{{Filter: "in/dev", Qos: 1}}
	s.AdoptSession("dev", 5, Session{Subscriptions: sub, Inflight: []packets.Packet{msg(1, "here1"), msg(2, "here2")}, PacketID: 2})
	moved := Session{Subscriptions: sub, Inflight: []packets.Packet{msg(1, "moved1"), msg(2, "moved2"), msg(3, "moved3")}, PacketID: 3}
	s.AdoptSession("dev", 5, moved)
	// The same message under its ID again (adopted already): nothing more.
	s.AdoptSession("dev", 5, Session{Subscriptions: sub, Inflight: []packets.Packet{msg(1, "here1")}, PacketID: 5})

	cl, ok := s.Clients.Get("dev")
	require.True(t, ok)
	var got []string
	ids := map[uint16]string{}
	for _, pk := range cl.State.Inflight.GetAll(false) {
		got = append(got, string(pk.Payload))
		ids[pk.PacketID] = string(pk.Payload)
	}
	require.Equal(t, []string{"here1", "here2", "moved1", "moved2", "moved3"}, got)
	require.Equal(t, "here1", ids[1])
	require.Equal(t, "here2", ids[2])
	require.Equal(t, "moved3", ids[3])
	require.Equal(t, int64(5), s.Info.Inflight)

	h.mu.Lock()
	defer h.mu.Unlock()
	require.Len(t, h.got, 2, "the renumbered messages are reported under their new IDs")
	for _, pk := range h.got {
		require.Equal(t, string(pk.Payload), ids[pk.PacketID])
		require.Greater(t, pk.PacketID, uint16(3))
	}
}
