package mqtt

import (
	"io"
	"sync/atomic"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestRefusedPubrelReturnsReceiveQuota (rtm patch 130): a client's PUBREL
// with a reason code of 0x80 or greater ends its QoS 2 flow [MQTT-4.3.3-9],
// so its PUBLISH no longer counts against the server's Receive Maximum.
// v2.7.9 deleted the flow and kept the unit of receive quota: a client that
// did it Receive Maximum times was disconnected 0x93 at its next QoS 1/2
// PUBLISH.
func TestRefusedPubrelReturnsReceiveQuota(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetReceiveQuota(1)
	s.Clients.Add(cl)
	pk := holdPublish(9, "q2")
	pk.FixedHeader.Qos = 2
	require.NoError(t, s.processPacket(cl, pk)) // PUBREC 9, the unit taken
	require.Equal(t, int32(0), atomic.LoadInt32(&cl.State.Inflight.receiveQuota))
	require.NoError(t, s.processPubrel(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1},
		PacketID: 9, ReasonCode: packets.ErrPacketIdentifierNotFound.Code}))
	require.False(t, cl.inboundHas(9), "the refused flow ended")
	require.Equal(t, int32(1), atomic.LoadInt32(&cl.State.Inflight.receiveQuota), "the refused flow's receive quota was not given back")
	require.NoError(t, s.processPacket(cl, holdPublish(10, "q1")), "a QoS 1 PUBLISH with no other flow open refused")
	require.False(t, cl.Closed())
}
