// SPDX-License-Identifier: MIT

package mqtt

import (
	"runtime"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// publishesIn decodes a stream of small v3.1.1 packets written to a client
// (each under 128 bytes) and returns their types and, for PUBLISH, the
// first payload byte.
func publishesIn(t *testing.T, b []byte) (types []byte, payloads []byte) {
	t.Helper()
	for len(b) > 0 {
		require.GreaterOrEqual(t, len(b), 2)
		l := 2 + int(b[1])
		require.Less(t, b[1], byte(0x80), "small packets only")
		require.GreaterOrEqual(t, len(b), l)
		typ := b[0] >> 4
		types = append(types, typ)
		if typ == packets.Publish {
			payloads = append(payloads, b[l-1])
		}
		b = b[l:]
	}
	return types, payloads
}

func coalescingClient(t *testing.T, window time.Duration) (*Server, *Client, *burstConn) {
	s := newServer()
	s.Options.WriteCoalesce = window
	s.Options.ClientNetWriteBufferSize = 1024 // as rtm: smaller direct writes queue behind queued packets
	conn := &burstConn{closed: make(chan struct{})}
	cl := s.NewClient(conn, "t", "sub", false)
	cl.ID = "sub"
	cl.Properties.ProtocolVersion = 4
	t.Cleanup(func() { cl.Stop(nil) })
	return s, cl, conn
}

func publishN(t *testing.T, s *Server, cl *Client, n int, every time.Duration) {
	for i := 0; i < n; i++ {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte{byte(i)}}
		_, err := s.publishToClient(cl, packets.Subscription{Filter: "a/b"}, pk)
		require.NoError(t, err)
		if every > 0 {
			time.Sleep(every)
		}
	}
}

// TestWriteCoalesceHighRate (patch 98): packets queued for a client more
// often than the coalescing window are written together, in order and all
// of them. 100 packets about a millisecond apart against a 1 s window: the
// first is written at once (a new client counts as slow), the rest wait
// for the window and go out in one write. Without the patch each is written
// by a writer of its own as it is queued: about 100 writes.
func TestWriteCoalesceHighRate(t *testing.T) {
	const n = 100
	s, cl, conn := coalescingClient(t, time.Second)
	publishN(t, s, cl, n, time.Millisecond)

	deadline := time.Now().Add(20 * time.Second)
	var calls int
	var all []byte
	for {
		calls, all = conn.written()
		if len(all) >= n*(2+2+3+1) || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	types, payloads := publishesIn(t, all)
	require.Len(t, types, n, "every packet written")
	for i, p := range payloads {
		require.Equal(t, byte(i), p, "packet %d in order", i)
	}
	require.LessOrEqual(t, calls, 10, "write calls for %d packets queued ~1 ms apart, 1 s window", n)
	require.Zero(t, cl.State.outbound.len())
}

// TestWriteCoalesceFlushedOnClose (patch 98): a connection closed while
// its writer waits for the coalescing window gets the waiting packets and
// a DISCONNECT written after them (buffered behind the queue) before it is
// closed; they are not left to a timer that fires after the close.
func TestWriteCoalesceFlushedOnClose(t *testing.T) {
	s, cl, conn := coalescingClient(t, time.Hour)
	publishN(t, s, cl, 5, 0)
	calls, _ := conn.written()
	require.Zero(t, calls, "the writer waits for the window (1 h)")
	require.True(t, cl.State.outbound.waiting)

	require.NoError(t, cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}}))
	cl.Stop(nil)

	_, all := conn.written()
	types, payloads := publishesIn(t, all)
	require.Equal(t, []byte{packets.Publish, packets.Publish, packets.Publish, packets.Publish, packets.Publish, packets.Disconnect}, types)
	require.Equal(t, []byte{0, 1, 2, 3, 4}, payloads)
	require.Zero(t, cl.State.outbound.len())
}

// TestWriteCoalesceOnlyForHighRate (patch 98): the decision. A client
// receiving a packet every 10 ms never waits for a 200 µs window; one
// receiving every 20 µs waits once its moving average falls below the
// window, and a push that finds the window over ends the wait (kick).
// Does not build without the patch.
func TestWriteCoalesceOnlyForHighRate(t *testing.T) {
	const window = 200 * time.Microsecond
	q := newOutboundQueue(1000)
	q.coalesce = window
	now := time.Hour
	drain := func() {
		for {
			if _, ok := q.pop(); !ok {
				return
			}
		}
	}
	for i := 0; i < 200; i++ { // 100 packets a second
		now += 10 * time.Millisecond
		ok, start, kick := q.pushAt(&packets.Packet{}, now)
		require.True(t, ok)
		require.True(t, start)
		require.False(t, kick)
		require.False(t, q.coalesceNext, "push %d at 100/s: no wait", i)
		drain()
	}

	waited := -1
	for i := 0; i < 100; i++ { // 50,000 packets a second
		now += 20 * time.Microsecond
		_, start, _ := q.pushAt(&packets.Packet{}, now)
		require.True(t, start, "drained after each push")
		if q.coalesceNext {
			waited = i
			break
		}
		drain()
	}
	require.GreaterOrEqual(t, waited, 0, "a client at 50,000/s waits for the window")
	require.True(t, q.waiting)

	now += window / 2
	_, start, kick := q.pushAt(&packets.Packet{}, now)
	require.False(t, start)
	require.False(t, kick, "within the window")
	now += window / 2
	_, start, kick = q.pushAt(&packets.Packet{}, now)
	require.False(t, start)
	require.True(t, kick, "the window is over: the pusher starts the writer")
	_, _, kick = q.pushAt(&packets.Packet{}, now+time.Microsecond)
	require.False(t, kick, "kicked once")

	// A full batch ends the wait within the window.
	drain()
	now += time.Second
	for i := 0; i < 60; i++ { // back to a high rate: the average falls again
		now += 20 * time.Microsecond
		q.pushAt(&packets.Packet{}, now)
		drain()
	}
	now += 20 * time.Microsecond
	_, start, _ = q.pushAt(&packets.Packet{}, now)
	require.True(t, start)
	require.True(t, q.coalesceNext)
	kicks := 0
	for i := 1; i < coalesceMaxBatch; i++ {
		now += time.Microsecond
		if _, _, kick := q.pushAt(&packets.Packet{}, now); kick {
			kicks++
			require.Equal(t, coalesceMaxBatch, q.len(), "kicked by the push that fills the batch")
		}
	}
	require.Equal(t, 1, kicks)

	q.coalesce = 0 // off: never waits
	drain()
	_, start, _ = q.pushAt(&packets.Packet{}, 0)
	require.True(t, start)
	require.False(t, q.coalesceNext)
}

// TestOutboundQueueReusesRings (patch 99): a queue that fills with a burst
// and drains, again and again (a subscriber of a high-rate stream), takes
// its ring arrays from a pool instead of growing new ones from 4 packets
// each time: 5 allocations per burst of 64 without the patch (4, 8, 16,
// 32, 64). Not under -race, where sync.Pool drops items at random.
func TestOutboundQueueReusesRings(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items under the race detector")
	}
	q := newOutboundQueue(1000)
	pks := make([]packets.Packet, 64)
	burst := func() {
		for i := range pks {
			q.push(&pks[i])
		}
		for i := range pks {
			pk, ok := q.pop()
			if !ok || pk != &pks[i] {
				t.Fatalf("packet %d: got %p, want %p", i, pk, &pks[i])
			}
		}
		if _, ok := q.pop(); ok {
			t.Fatal("queue not empty")
		}
	}
	burst()
	allocs := testing.AllocsPerRun(100, burst)
	require.Less(t, allocs, 0.5, "allocations per burst of 64 packets")
	require.Nil(t, q.buf, "the array is released when drained, as before")
}

// TestPublishYieldsToWriter (patch 100): a packet for a client receiving
// now and then is written before publishToClient returns to its caller
// (a publisher's read loop, which would write its PUBACK and read again
// first), when writer and caller share one P. 20 publishes, 20 ms apart:
// at least 10 were already written when publishToClient returned; about
// none without the patch (the new writer waited for the caller to park).
func TestPublishYieldsToWriter(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	s, cl, conn := coalescingClient(t, 200*time.Microsecond)
	const n = 20
	early := 0
	for i := 0; i < n; i++ {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte{byte(i)}}
		_, err := s.publishToClient(cl, packets.Subscription{Filter: "a/b"}, pk)
		require.NoError(t, err)
		if calls, _ := conn.written(); calls == i+1 {
			early++
		}
		deadline := time.Now().Add(10 * time.Second)
		for calls, _ := conn.written(); calls < i+1; calls, _ = conn.written() {
			require.True(t, time.Now().Before(deadline), "packet %d never written", i)
			time.Sleep(time.Millisecond)
		}
		time.Sleep(20 * time.Millisecond) // a low rate: never coalesced
	}
	require.GreaterOrEqual(t, early, n/2, "packets written before publishToClient returned, of %d", n)
}
