package mqtt

import (
	"io"
	"sync/atomic"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestTakeoverInflightGauge (rtm patch 125): a session taken over with an
// outbound QoS 1 message, a client's QoS 2 flow and a held QoS 1 PUBACK:
// the new connection gets the message and the QoS 2 flow, not the PUBACK
// (the client publishes it again), and Info.Inflight counts what it holds,
// back to 0 once both complete. v2.7.9 copied all three and left the gauge
// at 0 after the take-over (the old connection's ClearInflights took
// them off, the copies were never counted): -2 at the end.
func TestTakeoverInflightGauge(t *testing.T) {
	s := newServer()
	cl, r, _ := newTestClient()
	cl.ops.info = s.Info // as s.NewClient
	cl.ID = "dev"
	cl.Properties.ProtocolVersion = 5
	cl.Properties.Clean = false
	s.Clients.Add(cl)
	go func() { _, _ = io.Copy(io.Discard, r) }()
	out := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 4, TopicName: "a/b"}
	require.True(t, cl.State.Inflight.Set(out))
	atomic.AddInt64(&s.Info.Inflight, 1)
	q2 := holdPublish(7, "q2")
	q2.FixedHeader.Qos = 2
	require.NoError(t, s.processPublish(cl, q2)) // PUBREC 7 written, its flow open
	held := s.buildAck(8, packets.Puback, 0, packets.Properties{}, packets.CodeSuccess)
	require.True(t, cl.inboundQos().Set(held)) // a PUBACK not written yet (held)
	atomic.AddInt64(&s.Info.Inflight, 1)
	require.Equal(t, int64(3), atomic.LoadInt64(&s.Info.Inflight))

	cl2, r2, w2 := newTestClient()
	defer func() { _ = w2.Close(); _ = r2.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r2) }()
	cl2.ops.info = s.Info
	cl2.ID = "dev"
	cl2.Properties.ProtocolVersion = 5
	require.True(t, s.inheritClientSession(packets.Packet{Connect: packets.ConnectParams{ClientIdentifier: "dev"}}, cl2))
	require.False(t, cl2.inboundHas(8), "the PUBACK not written yet moved to the new connection")
	require.True(t, cl2.inboundHas(7))
	_, ok := cl2.State.Inflight.Get(4)
	require.True(t, ok)
	require.Equal(t, int64(2), atomic.LoadInt64(&s.Info.Inflight), "the gauge after the take-over")

	require.NoError(t, s.processPuback(cl2, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: 4}))
	require.NoError(t, s.processPubrel(cl2, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: 7}))
	require.Equal(t, int64(0), atomic.LoadInt64(&s.Info.Inflight), "the gauge once both flows completed")
}
