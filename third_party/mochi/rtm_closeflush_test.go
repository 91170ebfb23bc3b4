// SPDX-License-Identifier: MIT

package mqtt

import (
	"bytes"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestWriteCoalesceKickSmallLimit (patch 103): with a queue limit of 8, a
// coalescing writer's wait ends when 4 packets are queued (half the limit),
// not at 64, which such a queue never holds: the rest of a burst within
// the window would have been dropped at the limit while the writer waited.
func TestWriteCoalesceKickSmallLimit(t *testing.T) {
	const window = time.Hour
	q := newOutboundQueue(8)
	q.coalesce = window
	now := time.Hour
	_, start, _ := q.pushAt(&packets.Packet{}, now)
	require.True(t, start)
	require.True(t, q.coalesceNext, "a new client counts as slow against a 1 h window")
	kickedAt := 0
	for i := 2; i <= 8; i++ {
		now += time.Microsecond
		ok, _, kick := q.pushAt(&packets.Packet{}, now)
		require.True(t, ok, "push %d", i)
		if kick {
			require.Zero(t, kickedAt, "kicked once")
			kickedAt = i
		}
	}
	require.Equal(t, 4, kickedAt, "the wait ends at half the limit")
}

// TestCloseFlushBoundedTotal (patch 103): once the server closes, the
// clients it stops one after another share one bound for writing what
// their coalescing writers wait with to full sockets (closeFlushTotal),
// instead of each waiting its own (closeFlushTimeout): 20 such clients
// with a 100 ms bound each and 200 ms in all stop in well under 1.2 s;
// without the patch they take over 2 s.
func TestCloseFlushBoundedTotal(t *testing.T) {
	defer func(a, b time.Duration) { closeFlushTimeout, closeFlushTotal = a, b }(closeFlushTimeout, closeFlushTotal)
	closeFlushTimeout, closeFlushTotal = 100*time.Millisecond, 200*time.Millisecond
	s := newServer()
	s.Options.WriteCoalesce = time.Hour
	payload := bytes.Repeat([]byte("x"), 32<<10)
	var cls []*Client
	for i := 0; i < 20; i++ {
		server, _ := tcpPair(t) // the client end never reads
		require.NoError(t, server.(*net.TCPConn).SetWriteBuffer(8<<10))
		cl := s.NewClient(server, "t", "sub", false)
		cl.Properties.ProtocolVersion = 4
		for j := 0; j < 40; j++ { // 1.3 MB, below the 64-packet kick: the writer waits for its 1 h window
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: payload}
			_, err := s.publishToClient(cl, packets.Subscription{Filter: "a/b"}, pk)
			require.NoError(t, err)
		}
		require.True(t, cl.State.outbound.waiting)
		cls = append(cls, cl)
	}
	s.beginCloseFlush()
	start := time.Now()
	for _, cl := range cls {
		cl.Stop(nil)
	}
	require.Less(t, time.Since(start), 1200*time.Millisecond, "20 clients stopped, 200 ms for all their flushes")
}
