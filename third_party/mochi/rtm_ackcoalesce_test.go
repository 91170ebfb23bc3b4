// SPDX-License-Identifier: MIT

package mqtt

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// writeCounter counts the writes to a connection (it is not a
// *net.TCPConn, so the client reads and writes it through net.Conn).
type writeCounter struct {
	net.Conn
	writes atomic.Int64
}

func (c *writeCounter) Write(b []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(b)
}

// ackPair starts a v3.1.1 client reading from a loopback TCP connection
// (counted), acknowledging every QoS 1 PUBLISH with a PUBACK, with
// AckCoalesce window. It returns the client's end and the counter.
func ackPair(t *testing.T, window time.Duration) (net.Conn, *Client, *writeCounter) {
	server, client := tcpPair(t)
	wc := &writeCounter{Conn: server}
	s := newServer()
	s.Options.AckCoalesce = window
	cl := s.NewClient(wc, "t", "pub", false)
	cl.ID = "pub"
	cl.Properties.ProtocolVersion = 4
	done := make(chan error, 1)
	go func() {
		done <- cl.Read(func(cl *Client, pk packets.Packet) error {
			if pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Qos != 1 {
				return nil
			}
			return cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
		})
	}()
	t.Cleanup(func() {
		cl.Stop(nil)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("read loop did not end")
		}
	})
	return client, cl, wc
}

// qos1Publish encodes a v3.1.1 QoS 1 PUBLISH with packet id id.
func qos1Publish(t *testing.T, id uint16) []byte {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
		TopicName: "a/b", PacketID: id, Payload: []byte("hello")}
	var b bytes.Buffer
	require.NoError(t, pk.PublishEncode(&b))
	return b.Bytes()
}

// readPubacks reads n PUBACKs from c and checks their ids are 1..n in order.
func readPubacks(t *testing.T, c net.Conn, from, n int) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(30*time.Second)))
	b := make([]byte, 4)
	for i := from; i < from+n; i++ {
		_, err := io.ReadFull(c, b)
		require.NoError(t, err, "PUBACK %d", i)
		require.Equal(t, []byte{packets.Puback << 4, 2}, b[:2], "PUBACK %d", i)
		require.Equal(t, uint16(i), binary.BigEndian.Uint16(b[2:]), "PUBACKs in order")
	}
}

// TestAckCoalesceHighRate (patch 102): a client publishing QoS 1 about a
// millisecond apart, against a 20 ms window, gets its PUBACKs, every one
// and in order, in a fraction of the writes: the first ~30 one by one
// while the average gap falls below the window, the rest several per
// write. Without the patch one write per PUBACK (200).
func TestAckCoalesceHighRate(t *testing.T) {
	client, _, wc := ackPair(t, 20*time.Millisecond)
	const n = 200
	read := make(chan struct{})
	go func() {
		defer close(read)
		readPubacks(t, client, 1, n)
	}()
	for i := 1; i <= n; i++ {
		_, err := client.Write(qos1Publish(t, uint16(i)))
		require.NoError(t, err)
		time.Sleep(time.Millisecond)
	}
	<-read
	require.LessOrEqual(t, wc.writes.Load(), int64(n/2), "writes for %d PUBACKs", n)
}

// TestAckCoalesceStalledClient (patch 102): a client that waits for each
// PUBACK before it publishes again (its rate is high: the round trip) is
// held ackStalls (3) times (holds that end with no next PUBLISH stop the
// delaying for a second), not once per message: at most 4 of 40 PUBACKs
// take over 150 ms against a 200 ms window. Without the stall check (the
// a.off test in ackDelaying removed) most of them wait.
func TestAckCoalesceStalledClient(t *testing.T) {
	client, _, _ := ackPair(t, 200*time.Millisecond)
	slow := 0
	for i := 1; i <= 40; i++ {
		start := time.Now()
		_, err := client.Write(qos1Publish(t, uint16(i)))
		require.NoError(t, err)
		readPubacks(t, client, i, 1)
		if time.Since(start) > 150*time.Millisecond {
			slow++
		}
	}
	require.LessOrEqual(t, slow, ackStalls+1, "PUBACKs that waited for the window")
}

// TestAckCoalesceFlushedOnStop (patch 102): acknowledgements held for a
// window that has not ended (1 h) are written when the client is stopped,
// before its connection closes; without the flush in FlushHeld they are
// lost with it.
func TestAckCoalesceFlushedOnStop(t *testing.T) {
	client, cl, wc := ackPair(t, time.Hour)
	const n = 20
	for i := 1; i <= n; i++ {
		_, err := client.Write(qos1Publish(t, uint16(i)))
		require.NoError(t, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for cl.State.Inflight.Len() > 0 || atomic.LoadInt64(&cl.ops.info.PacketsSent) < n {
		require.True(t, time.Now().Before(deadline), "PUBACKs encoded")
		time.Sleep(time.Millisecond)
	}
	require.Less(t, wc.writes.Load(), int64(n), "held, not written one by one")
	cl.Stop(nil)
	readPubacks(t, client, 1, n)
}

// rawAckPair is ackPair over the connection itself, not a counting
// wrapper: the raw system-call path production uses (rawWritable). slow,
// if not zero, is a packet id whose handling takes 40 ms (a large
// fan-out, a preempted read loop).
func rawAckPair(t *testing.T, window time.Duration, slow uint16) (net.Conn, *Client) {
	server, client := tcpPair(t)
	s := newServer()
	s.Options.AckCoalesce = window
	cl := s.NewClient(server, "t", "pub", false)
	cl.ID = "pub"
	cl.Properties.ProtocolVersion = 4
	require.True(t, cl.rawWritable(), "a TCP connection takes the raw path")
	done := make(chan error, 1)
	go func() {
		done <- cl.Read(func(cl *Client, pk packets.Packet) error {
			if pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Qos != 1 {
				return nil
			}
			if slow != 0 && pk.PacketID == slow {
				time.Sleep(2 * window)
			}
			return cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
		})
	}()
	t.Cleanup(func() {
		cl.Stop(nil)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("read loop did not end")
		}
	})
	return client, cl
}

// publishSteadily writes QoS 1 PUBLISHes 1..n about a millisecond apart.
func publishSteadily(t *testing.T, c net.Conn, n int) {
	t.Helper()
	for i := 1; i <= n; i++ {
		_, err := c.Write(qos1Publish(t, uint16(i)))
		require.NoError(t, err)
		time.Sleep(time.Millisecond)
	}
}

// readPubacksWithin is readPubacks with a deadline of d for all of them.
func readPubacksWithin(t *testing.T, c net.Conn, n int, d time.Duration) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(d)))
	b := make([]byte, 4)
	for i := 1; i <= n; i++ {
		_, err := io.ReadFull(c, b)
		require.NoError(t, err, "PUBACK %d of %d within %v of the last PUBLISH", i, n, d)
		require.Equal(t, []byte{packets.Puback << 4, 2}, b[:2], "PUBACK %d", i)
		require.Equal(t, uint16(i), binary.BigEndian.Uint16(b[2:]), "PUBACKs in order")
	}
}

// TestAckCoalesceRawTCP (patch 102): over a plain TCP connection (the
// raw write path, which ackPair's counting wrapper bypasses) a client
// publishing QoS 1 about a millisecond apart, its acknowledgements held
// (20 ms window), gets all of them, in order, soon after its last PUBLISH,
// without sending anything more.
func TestAckCoalesceRawTCP(t *testing.T) {
	client, cl := rawAckPair(t, 20*time.Millisecond, 0)
	const n = 200
	publishSteadily(t, client, n)
	readPubacksWithin(t, client, n, 5*time.Second)
	require.EqualValues(t, n, atomic.LoadInt64(&cl.ops.info.PacketsSent))
}

// TestAckCoalesceTimerRearmed (patch 102): a steady publisher's last
// PUBLISH is handled slowly (two windows): the window's timer runs while
// the read loop handles it and leaves the held acknowledgements to it;
// releaseAcks, after the packet, keeps them (by the packet's arrival the
// window is not over), so it must arm the timer again. The client, waiting
// for its PUBACKs (its in-flight window full), sends nothing more. Before
// the fix the last few PUBACKs were never written.
func TestAckCoalesceTimerRearmed(t *testing.T) {
	const n = 100
	client, _ := rawAckPair(t, 20*time.Millisecond, n)
	publishSteadily(t, client, n)
	readPubacksWithin(t, client, n, 5*time.Second)
}

// TestAckCoalesceStopEndsBlockedWrite (patch 102): a client publishing
// QoS 1 (its PUBACKs held) that also subscribes stops reading; a delivery
// larger than the socket buffers blocks in the write of outbuf (the held
// PUBACKs, then the PUBLISH) under cl.Lock. Stop (a take-over, a kick,
// the server closing) must close the connection at once (the write's
// deadline is closeFlushTimeout): before the fix it waited in FlushHeld
// for cl.Lock as long as the write.
func TestAckCoalesceStopEndsBlockedWrite(t *testing.T) {
	client, cl := rawAckPair(t, time.Hour, 0)
	for i := 1; i <= 5; i++ {
		_, err := client.Write(qos1Publish(t, uint16(i)))
		require.NoError(t, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for cl.State.Inflight.Len() > 0 || atomic.LoadInt64(&cl.ops.info.PacketsSent) < 5 {
		require.True(t, time.Now().Before(deadline), "PUBACKs encoded")
		time.Sleep(time.Millisecond)
	}
	require.NotZero(t, cl.Net.acks.Load().since.Load(), "PUBACKs held")
	wrote := make(chan error, 1)
	go func() {
		wrote <- cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: make([]byte, 32<<20)})
	}()
	for cl.TryLock() { // until the delivery's write holds the lock, blocked on the full socket
		cl.Unlock()
		require.True(t, time.Now().Before(deadline), "the delivery's write holds cl.Lock")
		time.Sleep(time.Millisecond)
	}
	stopped := make(chan struct{})
	go func() { cl.Stop(nil); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second): // it takes closeFlushTimeout (10 ms)
		t.Fatal("Stop blocked on a write to a full socket: the connection is never closed")
	}
	select {
	case err := <-wrote:
		require.Error(t, err, "the blocked delivery fails with the connection")
	case <-time.After(20 * time.Second):
		t.Fatal("the blocked write did not end")
	}
}
