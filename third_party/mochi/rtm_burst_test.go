// SPDX-License-Identifier: MIT

package mqtt

import (
	"bytes"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// burstPair starts cl reading from a real TCP connection with handle and
// returns the client side, the encoded QoS 0 PUBLISH it sends, and a func
// that stops cl and waits for its read loop to end.
func burstPair(t *testing.T, handle ReadFn) (client net.Conn, cl *Client, wire []byte, stop func() error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	client, err = net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { client.Close() })
	server, err := ln.Accept()
	require.NoError(t, err)

	s := newServer()
	cl = s.NewClient(server, "t", "pub", false)
	cl.Properties.ProtocolVersion = 5
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 5,
		TopicName: "a/b", Payload: bytes.Repeat([]byte("x"), 64)}
	var b bytes.Buffer
	require.NoError(t, pk.PublishEncode(&b))

	done := make(chan error, 1)
	go func() { done <- cl.Read(handle) }()
	var ended bool
	var rerr error
	stop = func() error {
		if !ended {
			cl.Stop(nil)
			select {
			case rerr = <-done:
			case <-time.After(30 * time.Second):
				t.Fatal("read loop did not end")
			}
			ended = true
		}
		return rerr
	}
	t.Cleanup(func() { _ = stop() })
	return client, cl, b.Bytes(), stop
}

// TestBurstReadsOncePerPacket (patch 109): packets arriving one at a time (a
// publisher at a fixed rate) cost one read(2) each. Before patch 109 the
// read loop left syscall.RawConn.Read after every packet and its next
// RawConn.Read had to read the socket before it could wait (the poller's
// readiness is reset on entry): a read that found it empty, two reads per
// packet (1.9-2.0 measured).
func TestBurstReadsOncePerPacket(t *testing.T) {
	got := make(chan struct{}, 1)
	client, cl, wire, stop := burstPair(t, func(_ *Client, pk packets.Packet) error {
		if pk.TopicName != "a/b" || len(pk.Payload) != 64 {
			t.Errorf("decoded %q %d", pk.TopicName, len(pk.Payload))
		}
		got <- struct{}{}
		return nil
	})
	timeout := time.NewTimer(60 * time.Second)
	defer timeout.Stop()
	const n = 500
	for i := 0; i < n; i++ {
		_, err := client.Write(wire)
		require.NoError(t, err)
		select {
		case <-got:
		case <-timeout.C:
			t.Fatalf("packet %d not read", i)
		}
	}
	_ = stop()
	per := float64(cl.Net.bconn.reads) / n
	t.Logf("%.2f read(2) calls per packet", per)
	// 1 and, now and then, a wake-up for bytes already read (or a burst
	// ending at its deadline on a loaded machine).
	require.Less(t, per, 1.4)
}

// TestBurstHandlerStopsClient (patch 109): a packet's handler that stops its
// client (a DISCONNECT, a protocol error) while the read loop holds the
// descriptor in a burst ends the read loop and closes the connection: Close
// waits for the descriptor's readers, so a synchronous Close there would
// wait for itself.
func TestBurstHandlerStopsClient(t *testing.T) {
	got := make(chan int, 1)
	var count int
	client, _, wire, stop := burstPair(t, func(c *Client, _ packets.Packet) error {
		count++
		if count == 3 { // the first packet is read before a burst, the next ones in it
			c.Stop(nil)
		}
		got <- count
		return nil
	})
	for i := 1; i <= 3; i++ {
		_, err := client.Write(wire)
		require.NoError(t, err)
		select {
		case <-got:
		case <-time.After(30 * time.Second):
			t.Fatalf("packet %d not read", i)
		}
	}
	require.NoError(t, client.SetReadDeadline(time.Now().Add(30*time.Second)))
	_, err := client.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF, "the connection is closed")
	require.NoError(t, stop())
}

// TestBurstStoppedWhileWaitingIsAnError (patch 109): a client stopped from
// elsewhere (a take-over, a kick, the server closing) while its read loop
// waits in a burst ends it with the read's error, as a read loop waiting
// outside one does: the server sends the will for an error, and clears it
// for a clean end (a DISCONNECT).
func TestBurstStoppedWhileWaitingIsAnError(t *testing.T) {
	got := make(chan struct{}, 1)
	client, cl, wire, stop := burstPair(t, func(*Client, packets.Packet) error {
		got <- struct{}{}
		return nil
	})
	for i := 0; i < 3; i++ { // the first packet before the burst, the next in it
		_, err := client.Write(wire)
		require.NoError(t, err)
		select {
		case <-got:
		case <-time.After(30 * time.Second):
			t.Fatalf("packet %d not read", i)
		}
	}
	// Stopped while it handles a packet, the loop ends cleanly, as before
	// the patch: wait until it waits for the socket inside the burst.
	deadline := time.Now().Add(30 * time.Second)
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		waiting := false
		for _, g := range strings.Split(string(buf[:n]), "\n\n") {
			if strings.Contains(g, "[IO wait") && strings.Contains(g, "(*connReader).burst") {
				waiting = true
			}
		}
		if waiting {
			break
		}
		require.True(t, time.Now().Before(deadline), "the read loop never waited in a burst")
		runtime.Gosched()
	}
	_ = cl
	require.Error(t, stop(), "the waiting read fails")
}

// TestBurstKeepsKeepalive (patch 109): a client that goes silent after a
// burst is disconnected by the keepalive deadline counted from its last
// packet (1.5 × keepalive, in whole seconds as v2.7.9 computes it), not
// earlier (the burst's own deadline is 1 s), and the read loop ends.
func TestBurstKeepsKeepalive(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer client.Close()
	server, err := ln.Accept()
	require.NoError(t, err)

	s := newServer()
	cl := s.NewClient(server, "t", "pub", false)
	cl.Properties.ProtocolVersion = 4
	cl.State.Keepalive = 2 // 3 s
	var b bytes.Buffer
	require.NoError(t, (&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}}).PingreqEncode(&b))
	got := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() {
		done <- cl.Read(func(*Client, packets.Packet) error {
			got <- struct{}{}
			return nil
		})
	}()
	defer cl.Stop(nil)
	var last time.Time
	for i := 0; i < 5; i++ {
		if i > 0 {
			time.Sleep(150 * time.Millisecond) // the scenario: the last packet well after the burst began
		}
		last = time.Now()
		_, err := client.Write(b.Bytes())
		require.NoError(t, err)
		select {
		case <-got:
		case <-time.After(30 * time.Second):
			t.Fatalf("packet %d not read", i)
		}
	}
	select {
	case err := <-done:
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		require.GreaterOrEqual(t, time.Since(last), 3*time.Second, "disconnected before 1.5 × keepalive")
	case <-time.After(30 * time.Second):
		t.Fatal("a silent client was not disconnected")
	}
}
