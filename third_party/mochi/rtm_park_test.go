// SPDX-License-Identifier: MIT
// rtm patch 86: idle connections are parked. See rtm_park.go, PATCHES.md.

package mqtt

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// parkServer starts a server on 127.0.0.1:0 that parks connections idle for
// idle, with the inline client on (Server.Publish) and a hook counting
// disconnects.
func parkServer(t *testing.T, idle time.Duration) (*Server, string, *atomic.Int64) {
	t.Helper()
	s := New(&Options{Logger: logger, InlineClient: true, IdlePark: idle})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	gone := &countDisconnectsHook{}
	require.NoError(t, s.AddHook(gone, nil))
	l := listeners.NewTCP(listeners.Config{ID: "t", Address: "127.0.0.1:0"})
	require.NoError(t, s.AddListener(l))
	require.NoError(t, s.Serve())
	t.Cleanup(func() {
		select {
		case <-s.done: // the test closed it
		default:
			_ = s.Close()
		}
	})
	return s, l.Address(), &gone.n
}

type countDisconnectsHook struct {
	HookBase
	n atomic.Int64
}

func (h *countDisconnectsHook) ID() string           { return "count-disconnects" }
func (h *countDisconnectsHook) Provides(b byte) bool { return b == OnDisconnect }
func (h *countDisconnectsHook) OnDisconnect(*Client, error, bool) {
	h.n.Add(1)
}

// dialKeepalive connects an MQTT 3.1.1 client with the given keepalive.
func dialKeepalive(t *testing.T, addr, id string, keepalive uint16) *rawClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	c.send(packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        keepalive,
			ClientIdentifier: id,
		},
	})
	typ, _ := c.read()
	require.Equal(t, packets.Connack, typ, "CONNACK")
	return c
}

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	end := time.Now().Add(d)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestParkedConnectionsHaveNoGoroutine: N idle connections are served by no
// goroutine of their own once parked, and each still gets what is
// published to it, answers a PINGREQ, and parks again.
func TestParkedConnectionsHaveNoGoroutine(t *testing.T) {
	const n = 100
	s, addr, _ := parkServer(t, 300*time.Millisecond)
	base := runtime.NumGoroutine()
	cs := make([]*rawClient, n)
	for i := range cs {
		cs[i] = dialRaw(t, addr, fmt.Sprintf("park-%d", i))
		cs[i].subscribe(fmt.Sprintf("park/%d", i))
	}
	waitUntil(t, "all connections parked", 20*time.Second, func() bool { return s.ParkedClients() == n })
	waitUntil(t, "the connections' goroutines to exit", 20*time.Second, func() bool {
		return runtime.NumGoroutine()-base < n/10
	})

	// A publish to a parked subscriber is written (by a writer, patch 12).
	for i, c := range cs {
		require.NoError(t, s.Publish(fmt.Sprintf("park/%d", i), []byte("hello"), false, 0))
		typ, pk := c.read()
		require.Equal(t, packets.Publish, typ, "client %d", i)
		require.Equal(t, "hello", string(pk.Payload))
	}

	// A PINGREQ wakes the connection, is answered, and it parks again.
	for i, c := range cs {
		c.wmu.Lock()
		_, err := c.conn.Write([]byte{packets.Pingreq << 4, 0})
		c.wmu.Unlock()
		require.NoError(t, err)
		typ, _ := c.read()
		require.Equal(t, packets.Pingresp, typ, "client %d", i)
	}
	waitUntil(t, "all connections parked again", 20*time.Second, func() bool { return s.ParkedClients() == n })
	require.Equal(t, int64(n), atomic.LoadInt64(&s.Info.ClientsConnected))
}

// TestParkedConnectionKeepaliveExpires: a parked client that sends nothing
// is disconnected at its keepalive deadline (keepalive 2 s: 3 s), as one
// waited for by its goroutine is.
func TestParkedConnectionKeepaliveExpires(t *testing.T) {
	s, addr, gone := parkServer(t, 200*time.Millisecond)
	c := dialKeepalive(t, addr, "silent", 2)
	start := time.Now()
	waitUntil(t, "the connection parked", 10*time.Second, func() bool { return s.ParkedClients() == 1 })
	_ = c.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := c.r.ReadByte() // the server closes the connection
	require.ErrorIs(t, err, io.EOF)
	require.GreaterOrEqual(t, time.Since(start), 2900*time.Millisecond, "closed before the keepalive deadline")
	waitUntil(t, "the disconnect handled", 10*time.Second, func() bool {
		return gone.Load() == 1 && atomic.LoadInt64(&s.Info.ClientsConnected) == 0
	})
	require.Equal(t, 0, s.ParkedClients())
}

// TestParkedConnectionClosedByClient: a parked client that closes its
// connection is noticed (disconnect handled, will sent) without waiting for
// its keepalive.
func TestParkedConnectionClosedByClient(t *testing.T) {
	s, addr, gone := parkServer(t, 200*time.Millisecond)
	watcher := dialRaw(t, addr, "watcher")
	watcher.subscribe("will/#")
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	require.NoError(t, err)
	c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	c.send(packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        600,
			ClientIdentifier: "leaver",
			WillFlag:         true,
			WillTopic:        "will/leaver",
			WillPayload:      []byte("gone"),
		},
	})
	typ, _ := c.read()
	require.Equal(t, packets.Connack, typ)
	waitUntil(t, "both connections parked", 10*time.Second, func() bool { return s.ParkedClients() == 2 })
	require.NoError(t, conn.Close())
	typ, pk := watcher.read()
	require.Equal(t, packets.Publish, typ, "will")
	require.Equal(t, "gone", string(pk.Payload))
	waitUntil(t, "the disconnect handled", 10*time.Second, func() bool {
		return gone.Load() == 1 && atomic.LoadInt64(&s.Info.ClientsConnected) == 1
	})
}

// TestParkedConnectionsStoppedByServer: stopping a parked client (here a
// takeover by the same client id) and closing the server with parked
// clients end them; Close does not hang on the parked ones.
func TestParkedConnectionsStoppedByServer(t *testing.T) {
	s, addr, gone := parkServer(t, 200*time.Millisecond)
	old := dialRaw(t, addr, "same")
	waitUntil(t, "parked", 10*time.Second, func() bool { return s.ParkedClients() == 1 })
	_ = dialRaw(t, addr, "same") // takes the session over: the parked one is stopped
	_ = old.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := io.Copy(io.Discard, old.r)
	require.NoError(t, err, "the taken-over connection is closed")
	waitUntil(t, "the taken-over client's disconnect handled", 10*time.Second, func() bool { return gone.Load() == 1 })
	for i := 0; i < 5; i++ {
		_ = dialRaw(t, addr, fmt.Sprintf("other-%d", i))
	}
	waitUntil(t, "parked", 10*time.Second, func() bool { return s.ParkedClients() == 6 })
	closed := make(chan struct{})
	go func() { _ = s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Close hangs with parked clients")
	}
	require.Equal(t, int64(7), gone.Load())
	require.Equal(t, 0, s.ParkedClients())
}

// TestParkedClientStoppedSendsWill: a parked client stopped by the server
// with an error (rtm: its token expired) ends as one whose goroutine was
// waiting: its will is published.
func TestParkedClientStoppedSendsWill(t *testing.T) {
	s, addr, gone := parkServer(t, 200*time.Millisecond)
	watcher := dialRaw(t, addr, "watcher")
	watcher.subscribe("will/#")
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	c := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	c.send(packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        600,
			ClientIdentifier: "kicked",
			WillFlag:         true,
			WillTopic:        "will/kicked",
			WillPayload:      []byte("kicked"),
		},
	})
	typ, _ := c.read()
	require.Equal(t, packets.Connack, typ)
	waitUntil(t, "both connections parked", 10*time.Second, func() bool { return s.ParkedClients() == 2 })
	cl, ok := s.Clients.Get("kicked")
	require.True(t, ok)
	cl.Stop(packets.ErrMaxConnectTime)
	typ, pk := watcher.read()
	require.Equal(t, packets.Publish, typ, "will")
	require.Equal(t, "kicked", string(pk.Payload))
	waitUntil(t, "the disconnect handled", 10*time.Second, func() bool { return gone.Load() == 1 })
}
