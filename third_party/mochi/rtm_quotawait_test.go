// SPDX-License-Identifier: MIT
// rtm patch 131: see PATCHES.md.

package mqtt

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// quotaHoldHook holds the acknowledgement of every PUBLISH to "up" until
// release is closed, and records the payloads published to "up" in order.
type quotaHoldHook struct {
	HookBase
	release chan struct{}
	mu      sync.Mutex
	got     []string
}

func (h *quotaHoldHook) ID() string { return "quotahold" }
func (h *quotaHoldHook) Provides(b byte) bool {
	return b == OnPublishHold || b == OnPublished
}
func (h *quotaHoldHook) OnPublishHold(_ *Client, pk packets.Packet) func() error {
	if pk.TopicName != "up" {
		return nil
	}
	return func() error { <-h.release; return nil }
}
func (h *quotaHoldHook) OnPublished(_ *Client, pk packets.Packet) {
	if pk.TopicName == "up" {
		h.mu.Lock()
		h.got = append(h.got, string(pk.Payload))
		h.mu.Unlock()
	}
}
func (h *quotaHoldHook) published() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.got...)
}

// quotaConn connects a client of protocol version v over real TCP to s and
// reads its CONNACK. Its packets are read into got (closed at EOF).
func quotaConn(t *testing.T, s *Server, id string, v byte) (net.Conn, chan packets.Packet) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	cli, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = cli.Close() })
	srv, ok := <-accepted
	require.True(t, ok)
	go func() { _ = s.EstablishConnection("tcp", srv) }()

	name := []byte("MQTT")
	if v == 3 {
		name = []byte("MQIsdp")
	}
	quotaWrite(t, cli, v, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:     packets.ConnectParams{ProtocolName: name, ClientIdentifier: id, Clean: true, Keepalive: 30},
	})
	got := make(chan packets.Packet, 1024)
	go func() {
		defer close(got)
		r := bufio.NewReader(cli)
		for {
			b0, err := r.ReadByte()
			if err != nil {
				return
			}
			var pk packets.Packet
			_ = pk.FixedHeader.Decode(b0)
			n, _, err := packets.DecodeLength(r)
			if err != nil {
				return
			}
			pk.FixedHeader.Remaining = n
			pk.ProtocolVersion = v
			body := make([]byte, n)
			if _, err := io.ReadFull(r, body); err != nil {
				return
			}
			switch pk.FixedHeader.Type {
			case packets.Puback:
				_ = pk.PubackDecode(body)
			case packets.Disconnect:
				_ = pk.DisconnectDecode(body)
			}
			got <- pk
		}
	}()
	select {
	case pk := <-got:
		require.Equal(t, packets.Connack, pk.FixedHeader.Type)
	case <-time.After(5 * time.Second):
		t.Fatal("no CONNACK")
	}
	return cli, got
}

func quotaWrite(t *testing.T, c net.Conn, v byte, pk packets.Packet) {
	t.Helper()
	buf := new(bytes.Buffer)
	pk.ProtocolVersion = v
	switch pk.FixedHeader.Type {
	case packets.Connect:
		require.NoError(t, pk.ConnectEncode(buf))
	case packets.Publish:
		require.NoError(t, pk.PublishEncode(buf))
	}
	require.NoError(t, c.SetWriteDeadline(time.Now().Add(10*time.Second)))
	_, err := c.Write(buf.Bytes())
	require.NoError(t, err)
}

func quotaPublish(id uint16) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   "up", Payload: []byte(fmt.Sprintf("m%d", id)), PacketID: id,
	}
}

func newQuotaServer(t *testing.T, receiveMax uint16) (*Server, *quotaHoldHook) {
	s, h, _ := newQuotaServerClose(t, receiveMax)
	return s, h
}

// newQuotaServerClose also returns a Close that may be called before the
// test's cleanup calls it.
func newQuotaServerClose(t *testing.T, receiveMax uint16) (*Server, *quotaHoldHook, func() error) {
	cc := NewDefaultServerCapabilities()
	cc.MaximumMessageExpiryInterval = 0
	cc.ReceiveMaximum = receiveMax
	s := New(&Options{Logger: logger, Capabilities: cc})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	h := &quotaHoldHook{release: make(chan struct{})}
	require.NoError(t, s.AddHook(h, nil))
	require.NoError(t, s.Serve())
	closeOnce := sync.OnceValue(s.Close)
	t.Cleanup(func() { _ = closeOnce() })
	return s, h, closeOnce
}

// TestV311PublisherWaitsForHeldAcks (rtm patch 131): an MQTT 3.1.1 (and
// 3.1) client, which has no Receive Maximum, publishing more QoS 1 messages
// than the server's receive maximum while their acknowledgements are held
// (rtm's durability holds them while a peer is unreachable) is not read
// until a held acknowledgement gives a unit of quota back; once the hold
// ends every message is acknowledged, in order, and published once. v2.7.9
// (and rtm before patch 131) disconnected it at the first PUBLISH over the
// limit: a client that reconnects and resends was disconnected again for
// as long as the hold lasted.
func TestV311PublisherWaitsForHeldAcks(t *testing.T) {
	for _, v := range []byte{4, 3} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			const max, n = 8, 20
			s, h := newQuotaServer(t, max)
			cli, got := quotaConn(t, s, "pub", v)
			for i := uint16(1); i <= n; i++ { // the socket buffers take them all
				quotaWrite(t, cli, v, quotaPublish(i))
			}
			// The first max are published (their PUBACKs held); the next
			// one finds the quota at 0.
			require.Eventually(t, func() bool {
				return len(h.published()) == max && (s.Flow.QuotaWaits.Load() == 1 || len(got) > 0 || isClosed(s, "pub"))
			}, 5*time.Second, time.Millisecond)
			require.False(t, isClosed(s, "pub"), "disconnected at the receive maximum while its acknowledgements were held")
			require.Empty(t, got, "nothing is acknowledged while held")
			require.Len(t, h.published(), max, "not read beyond the receive maximum")

			close(h.release)
			for i := uint16(1); i <= n; i++ {
				select {
				case pk, ok := <-got:
					require.True(t, ok, "connection closed before PUBACK %d", i)
					require.Equal(t, packets.Puback, pk.FixedHeader.Type)
					require.Equal(t, i, pk.PacketID, "PUBACKs in PUBLISH order")
				case <-time.After(5 * time.Second):
					t.Fatalf("PUBACK %d not received", i)
				}
			}
			want := make([]string, 0, n)
			for i := 1; i <= n; i++ {
				want = append(want, fmt.Sprintf("m%d", i))
			}
			require.Equal(t, want, h.published(), "each message published once, in order")
			require.False(t, isClosed(s, "pub"))
		})
	}
}

func isClosed(s *Server, id string) bool {
	cl, ok := s.Clients.Get(id)
	return !ok || cl.Closed()
}

// TestV311QuotaWaitEnds (rtm patch 131): the wait of a 3.1.1 publisher at
// receive quota 0 ends, with the disconnect of v2.7.9, after
// receiveQuotaWait, and at once when the server closes: no read loop is
// left behind.
func TestV311QuotaWaitEnds(t *testing.T) {
	t.Run("bound", func(t *testing.T) {
		old := receiveQuotaWait
		receiveQuotaWait = 200 * time.Millisecond
		t.Cleanup(func() { receiveQuotaWait = old })
		s, h := newQuotaServer(t, 2)
		defer close(h.release)
		cli, got := quotaConn(t, s, "pub", 4)
		for i := uint16(1); i <= 3; i++ {
			quotaWrite(t, cli, 4, quotaPublish(i))
		}
		select {
		case pk, ok := <-got:
			require.False(t, ok, "received %s", packets.PacketNames[pk.FixedHeader.Type])
		case <-time.After(5 * time.Second):
			t.Fatal("not disconnected after the bound")
		}
		require.Equal(t, int64(1), s.Flow.QuotaWaits.Load())
		require.Len(t, h.published(), 2)
	})
	t.Run("close", func(t *testing.T) {
		s, h, closeServer := newQuotaServerClose(t, 2)
		defer close(h.release)
		cli, got := quotaConn(t, s, "pub", 4)
		for i := uint16(1); i <= 3; i++ {
			quotaWrite(t, cli, 4, quotaPublish(i))
		}
		require.Eventually(t, func() bool { return s.Flow.QuotaWaits.Load() == 1 }, 5*time.Second, time.Millisecond)
		cl, ok := s.Clients.Get("pub")
		require.True(t, ok)
		closed := make(chan struct{})
		go func() { _ = closeServer(); close(closed) }()
		for range got { // the connection ends
		}
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not return")
		}
		require.ErrorIs(t, cl.StopCause(), packets.ErrServerShuttingDown)
	})
	t.Run("takeover", func(t *testing.T) {
		s, h := newQuotaServer(t, 2)
		defer close(h.release)
		cli, got := quotaConn(t, s, "pub", 4)
		for i := uint16(1); i <= 3; i++ {
			quotaWrite(t, cli, 4, quotaPublish(i))
		}
		require.Eventually(t, func() bool { return s.Flow.QuotaWaits.Load() == 1 }, 5*time.Second, time.Millisecond)
		old, ok := s.Clients.Get("pub")
		require.True(t, ok)
		_, _ = quotaConn(t, s, "pub", 4) // takes the session over
		for range got {
		}
		require.True(t, old.Closed())
	})
}

// TestV5PublisherOverReceiveMaximumDisconnected: patch 131 leaves MQTT 5
// alone: a v5 client was told the Receive Maximum, and exceeding it while
// the acknowledgements are held is still DISCONNECT 0x93 [MQTT-3.3.4-8].
func TestV5PublisherOverReceiveMaximumDisconnected(t *testing.T) {
	s, h := newQuotaServer(t, 2)
	defer close(h.release)
	cli, got := quotaConn(t, s, "pub", 5)
	for i := uint16(1); i <= 3; i++ {
		quotaWrite(t, cli, 5, quotaPublish(i))
	}
	select {
	case pk, ok := <-got:
		require.True(t, ok, "closed without a DISCONNECT")
		require.Equal(t, packets.Disconnect, pk.FixedHeader.Type)
		require.Equal(t, packets.ErrReceiveMaximum.Code, pk.ReasonCode)
	case <-time.After(5 * time.Second):
		t.Fatal("not disconnected")
	}
	require.Equal(t, int64(0), s.Flow.QuotaWaits.Load())
}
