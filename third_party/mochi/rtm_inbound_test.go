// SPDX-License-Identifier: MIT
// rtm patches 94 and 95: see PATCHES.md.

package mqtt

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// rtmPipeConnect connects a v5 client (clean start false, a session that
// outlives the connection) to s over net.Pipe: a client that reads only
// when the test reads. done receives EstablishConnection's result.
func rtmPipeConnect(t *testing.T, s *Server, id string) (cli net.Conn, r *bufio.Reader, done chan error) {
	t.Helper()
	srv, cli := net.Pipe()
	done = make(chan error, 1)
	go func() { done <- s.EstablishConnection("tcp", srv) }()
	rtmWrite(t, cli, packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 5,
		Connect:         packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: id},
		Properties:      packets.Properties{SessionExpiryInterval: 3600, SessionExpiryIntervalFlag: true},
	})
	return cli, bufio.NewReader(cli), done
}

func rtmWrite(t *testing.T, c net.Conn, pk packets.Packet) {
	t.Helper()
	buf := new(bytes.Buffer)
	pk.ProtocolVersion = 5
	switch pk.FixedHeader.Type {
	case packets.Connect:
		require.NoError(t, pk.ConnectEncode(buf))
	case packets.Publish:
		require.NoError(t, pk.PublishEncode(buf))
	case packets.Pubrel:
		require.NoError(t, pk.PubrelEncode(buf))
	}
	require.NoError(t, c.SetWriteDeadline(time.Now().Add(10*time.Second)))
	_, err := c.Write(buf.Bytes())
	require.NoError(t, err)
}

// rtmRead reads the next packet the client receives (type, id, payload).
func rtmRead(t *testing.T, c net.Conn, r *bufio.Reader) packets.Packet {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	b0, err := r.ReadByte()
	require.NoError(t, err)
	var pk packets.Packet
	require.NoError(t, pk.FixedHeader.Decode(b0))
	n, _, err := packets.DecodeLength(r)
	require.NoError(t, err)
	pk.FixedHeader.Remaining = n
	pk.ProtocolVersion = 5
	body := make([]byte, n)
	_, err = io.ReadFull(r, body)
	require.NoError(t, err)
	switch pk.FixedHeader.Type {
	case packets.Publish:
		require.NoError(t, pk.PublishDecode(body))
	case packets.Puback:
		require.NoError(t, pk.PubackDecode(body))
	case packets.Pubrec:
		require.NoError(t, pk.PubrecDecode(body))
	case packets.Pubcomp:
		require.NoError(t, pk.PubcompDecode(body))
	}
	return pk
}

// rtmOfflineSession leaves an offline session for id on s, subscribed to
// filter at QoS 1, holding n unacknowledged messages (ids 1..n).
func rtmOfflineSession(s *Server, id, filter string, n int) {
	old := s.NewClient(nil, "tcp", id, false)
	old.Properties.ProtocolVersion = 5
	old.Stop(packets.CodeDisconnect)
	s.Clients.Add(old)
	sub := packets.Subscription{Filter: filter, Qos: 1}
	s.Topics.Subscribe(id, sub)
	old.State.Subscriptions.Add(sub.Filter, sub)
	for i := 1; i <= n; i++ {
		old.State.Inflight.Set(packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName:   filter, PacketID: uint16(i), Payload: []byte{'m', byte('0' + i)},
		})
	}
}

// TestInboundIDDoesNotTouchOutboundMessage (patch 94): a device's own QoS
// 1 and QoS 2 PUBLISHes with the packet id of a message the server sent it
// and it has not acknowledged leave that message in its session: it is
// resent when the device reconnects.
func TestInboundIDDoesNotTouchOutboundMessage(t *testing.T) {
	cc := NewDefaultServerCapabilities() // newServer's receive maximum 0 refuses every QoS 1 PUBLISH
	cc.MaximumMessageExpiryInterval = 0
	s := New(&Options{Logger: logger, Capabilities: cc})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	defer s.Close()
	rtmOfflineSession(s, "dev", "down", 1)

	cli, r, done := rtmPipeConnect(t, s, "dev")
	require.Equal(t, packets.Connack, rtmRead(t, cli, r).FixedHeader.Type)
	resent := rtmRead(t, cli, r)
	require.Equal(t, packets.Publish, resent.FixedHeader.Type)
	require.Equal(t, uint16(1), resent.PacketID)

	// Not acknowledged; the device publishes with its own id 1.
	rtmWrite(t, cli, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "up", PacketID: 1, Payload: []byte("a")})
	require.Equal(t, packets.Puback, rtmRead(t, cli, r).FixedHeader.Type)
	rtmWrite(t, cli, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, TopicName: "up", PacketID: 1, Payload: []byte("b")})
	require.Equal(t, packets.Pubrec, rtmRead(t, cli, r).FixedHeader.Type)
	_ = cli.Close()
	<-done

	cli, r, done = rtmPipeConnect(t, s, "dev")
	defer func() { _ = cli.Close(); <-done }()
	require.Equal(t, packets.Connack, rtmRead(t, cli, r).FixedHeader.Type)
	for {
		pk := rtmRead(t, cli, r) // fails at its deadline if the message is not resent
		if pk.FixedHeader.Type == packets.Publish {
			require.Equal(t, uint16(1), pk.PacketID)
			require.Equal(t, "m1", string(pk.Payload), "the outbound message is resent")
			require.True(t, pk.FixedHeader.Dup)
			break
		}
	}
}

// TestResendDoesNotBlockDeliveries (patch 95): while a reconnecting
// device does not read its socket, so the resend of its session blocks,
// a message delivered to it (here from a peer node) is queued without
// waiting, and follows the resent messages once the device reads.
func TestResendDoesNotBlockDeliveries(t *testing.T) {
	const n = 20
	s := newServer()
	defer s.Close()
	rtmOfflineSession(s, "dev", "down", n)

	cli, r, done := rtmPipeConnect(t, s, "dev")
	defer func() { _ = cli.Close(); <-done }()
	require.Equal(t, packets.Connack, rtmRead(t, cli, r).FixedHeader.Type, "the CONNACK comes first")
	// The device reads nothing more: the resend is blocked in its first write.

	delivered := make(chan struct{})
	go func() {
		defer close(delivered)
		s.DeliverFromPeer(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "down", Payload: []byte("new")}, nil)
	}()
	select {
	case <-delivered:
	case <-time.After(10 * time.Second):
		require.Fail(t, "a delivery waited for the blocked resend")
	}

	for i := 1; i <= n; i++ {
		pk := rtmRead(t, cli, r)
		require.Equal(t, packets.Publish, pk.FixedHeader.Type)
		require.True(t, pk.FixedHeader.Dup, "resent first")
		require.Equal(t, string([]byte{'m', byte('0' + i)}), string(pk.Payload))
	}
	pk := rtmRead(t, cli, r)
	require.Equal(t, "new", string(pk.Payload), "the delivery follows the resend")
	require.False(t, pk.FixedHeader.Dup)
}

// TestSubscribeIDOfOutboundMessage (patch 94): a SUBSCRIBE and an
// UNSUBSCRIBE with the packet id of a message the server has in flight to
// the client succeed: the ids of the two directions are separate.
func TestSubscribeIDOfOutboundMessage(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.Set(packets.Packet{PacketID: 15, FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}})

	sub := *packets.TPacketData[packets.Subscribe].Get(packets.TSubscribeMqtt5).Packet
	sub.PacketID = 15
	unsub := *packets.TPacketData[packets.Unsubscribe].Get(packets.TUnsubscribeMqtt5).Packet
	unsub.PacketID = 15
	go func() {
		require.NoError(t, s.processPacket(cl, sub))
		require.NoError(t, s.processPacket(cl, unsub))
		_ = w.Close()
	}()
	c := r
	rd := bufio.NewReader(c)
	suback := rtmReadRaw(t, c, rd)
	require.Equal(t, packets.Suback, suback.FixedHeader.Type)
	for _, code := range suback.ReasonCodes {
		require.Less(t, code, packets.ErrUnspecifiedError.Code, "SUBACK refuses a filter: 0x%x", code)
	}
	unsuback := rtmReadRaw(t, c, rd)
	require.Equal(t, packets.Unsuback, unsuback.FixedHeader.Type)
	for _, code := range unsuback.ReasonCodes {
		require.Less(t, code, packets.ErrUnspecifiedError.Code, "UNSUBACK refuses a filter: 0x%x", code)
	}
}

// rtmReadRaw is rtmRead for SUBACK and UNSUBACK.
func rtmReadRaw(t *testing.T, c net.Conn, r *bufio.Reader) packets.Packet {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	b0, err := r.ReadByte()
	require.NoError(t, err)
	var pk packets.Packet
	require.NoError(t, pk.FixedHeader.Decode(b0))
	n, _, err := packets.DecodeLength(r)
	require.NoError(t, err)
	pk.FixedHeader.Remaining = n
	pk.ProtocolVersion = 5
	body := make([]byte, n)
	_, err = io.ReadFull(r, body)
	require.NoError(t, err)
	switch pk.FixedHeader.Type {
	case packets.Suback:
		require.NoError(t, pk.SubackDecode(body))
	case packets.Unsuback:
		require.NoError(t, pk.UnsubackDecode(body))
	}
	return pk
}
