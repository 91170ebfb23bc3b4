// SPDX-License-Identifier: MIT
// rtm patch 80: inflight packets are pooled copies, see PATCHES.md.

package mqtt

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestInflightSetDeleteAllocations (patch 80): holding a QoS 1 message
// until its acknowledgement allocates nothing once the pool is warm (1
// allocation of ~900 bytes per message without the patch: the map's
// out-of-line value).
func TestInflightSetDeleteAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items at random under the race detector")
	}
	in := NewInflights()
	in.Set(packets.Packet{PacketID: 1})
	in.Delete(1)
	id := uint16(1)
	allocs := testing.AllocsPerRun(1000, func() {
		in.Set(packets.Packet{PacketID: id, FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}})
		in.Delete(id)
		id = id%100 + 1
	})
	require.Zero(t, allocs)
}

// TestInflightCopiesDoNotAlias (patch 80): what Get, GetAll, NextImmediate
// and Clone return stays as it was when the packet is updated, deleted, or
// its pooled slot is reused for another packet.
func TestInflightCopiesDoNotAlias(t *testing.T) {
	in := NewInflights()
	in.Set(packets.Packet{PacketID: 1, TopicName: "a", Payload: []byte("one")})
	in.Set(packets.Packet{PacketID: 2, TopicName: "b", Expiry: -1})
	got, ok := in.Get(1)
	require.True(t, ok)
	all := in.GetAll(false)
	clone := in.Clone()
	next, ok := in.NextImmediate()
	require.True(t, ok)
	require.Equal(t, uint16(2), next.PacketID)
	require.Equal(t, int64(-1), next.Expiry, "the packet as it was queued")

	in.Set(packets.Packet{PacketID: 1, TopicName: "a2"}) // an update, in place
	require.Equal(t, "a", got.TopicName)
	require.True(t, in.Delete(1))
	require.True(t, in.Delete(2))
	for i := uint16(10); i < 20; i++ { // reuse the slots
		in.Set(packets.Packet{PacketID: i, TopicName: "x"})
	}
	require.Equal(t, "a", got.TopicName)
	require.Equal(t, "one", string(got.Payload))
	require.Len(t, all, 2)
	require.Equal(t, "a", all[0].TopicName)
	require.Equal(t, "b", all[1].TopicName)
	c1, ok := clone.Get(1)
	require.True(t, ok)
	require.Equal(t, "a", c1.TopicName)
	c2, ok := clone.Get(2)
	require.True(t, ok)
	require.Equal(t, int64(-1), c2.Expiry, "the clone is not changed by NextImmediate on the original")
	require.Equal(t, 2, clone.Len())
	sent, ok := in.Get(15)
	require.True(t, ok)
	require.Equal(t, "x", sent.TopicName)
	require.Equal(t, uint16(15), sent.PacketID)
	require.Empty(t, sent.Payload, "a reused slot carries nothing of its previous packet")
}
