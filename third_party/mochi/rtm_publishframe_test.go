// SPDX-License-Identifier: MIT
// rtm patch 110: processPublish's rare answers out of its frame, see
// PATCHES.md.

package mqtt

import (
	"io"
	"net"
	"sync/atomic"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestPublishStack (patch 110): a connection's goroutine that handled a
// QoS 1 PUBLISH (to one subscriber, through processPacket) holds a stack
// of 16 KB, not 32 KB: processPublish's frame no longer holds the packets
// of its rare answers and of the OnPublish hooks' copies (6.5 KB of
// locals before, 2.7 KB after). The runtime starts goroutines with the
// average stack in use; with 32 KB, nothing is seen.
func TestPublishStack(t *testing.T) {
	const n = 50
	paths := make([]*publishPath, n)
	for i := range paths {
		paths[i] = newPublishPath(1, 1, 4)
	}
	idle := stackPerGoroutine(n, func(int) error { return nil })
	pub := stackPerGoroutine(n, func(i int) error { return paths[i].publish(1) })
	for _, p := range paths {
		p.drain()
		require.GreaterOrEqual(t, p.writes(), int64(2), "the PUBACK and the delivery written")
	}
	t.Logf("stack per goroutine: %d bytes idle, %d bytes having handled a PUBLISH", idle, pub)
	if !raceEnabled { // the race detector's instrumentation grows the frames
		require.LessOrEqual(t, pub, max(idle, 16384)+4096, "handling a PUBLISH grows the goroutine's stack")
	}
}

// TestPublishIDInUseAnswered (patch 110 moved the answer out of
// processPublish): a QoS 2 PUBLISH under a packet ID whose flow still waits
// for its PUBREL is answered with a PUBREC 0x91 (packet identifier in use),
// and with nothing else (it is not handled further), and the flow is kept.
func TestPublishIDInUseAnswered(t *testing.T) {
	s := newServer()
	cl, _, _ := newTestClient()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.receiveQuota = 3
	pk := *packets.TPacketData[packets.Publish].Get(packets.TPublishQos2).Packet
	for i, want := range []byte{packets.CodeSuccess.Code, packets.ErrPacketIdentifierInUse.Code} {
		r, w := net.Pipe()
		cl.Net.Conn = w
		recv := make(chan []byte, 1)
		go func() {
			buf, _ := io.ReadAll(r)
			recv <- buf
		}()
		require.NoError(t, s.processPacket(cl, pk))
		_ = w.Close()
		buf := <-recv
		require.GreaterOrEqual(t, len(buf), 4, "PUBLISH %d: answer %x", i, buf)
		require.Equal(t, byte(packets.Pubrec<<4), buf[0], "PUBLISH %d: answer %x", i, buf)
		require.Len(t, buf, 2+int(buf[1]), "PUBLISH %d: one answer, not %x", i, buf)
		code := packets.CodeSuccess.Code
		if len(buf) > 4 {
			code = buf[4]
		}
		require.Equal(t, want, code, "PUBLISH %d: answer %x", i, buf)
		_, ok := cl.inboundQos().Get(pk.PacketID)
		require.True(t, ok, "the flow waiting for its PUBREL is kept")
		require.Equal(t, int64(1), atomic.LoadInt64(&s.Info.Inflight))
	}
}
