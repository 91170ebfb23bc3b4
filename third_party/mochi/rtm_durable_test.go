package mqtt

import (
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// holdHook holds the acknowledgement of PUBLISHes whose payload is "hold"
// until release is closed.
type holdHook struct {
	HookBase
	release chan struct{}
	err     error
}

func (h *holdHook) ID() string           { return "hold" }
func (h *holdHook) Provides(b byte) bool { return b == OnPublishHold }
func (h *holdHook) OnPublishHold(_ *Client, pk packets.Packet) func() error {
	if string(pk.Payload) != "hold" {
		return nil
	}
	return func() error {
		<-h.release
		return h.err
	}
}

// readAcks reads n packets from r and returns their packet IDs.
func readAcks(t *testing.T, r io.Reader, n int, out chan<- uint16) {
	t.Helper()
	for i := 0; i < n; i++ {
		fh := new(packets.FixedHeader)
		b := make([]byte, 1)
		if _, err := io.ReadFull(r, b); err != nil {
			close(out)
			return
		}
		_ = fh.Decode(b[0])
		if _, err := io.ReadFull(r, b); err != nil { // remaining length (< 128 here)
			close(out)
			return
		}
		body := make([]byte, b[0])
		if _, err := io.ReadFull(r, body); err != nil {
			close(out)
			return
		}
		out <- uint16(body[0])<<8 | uint16(body[1])
	}
}

func holdPublish(id uint16, payload string) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   "a/b", Payload: []byte(payload), PacketID: id,
	}
}

// TestPublishHoldKeepsAckOrder (rtm patch 54): an OnPublishHold hook holds
// a PUBLISH's PUBACK without blocking the client's next PUBLISH, and a
// PUBACK that is not held waits behind a held one (acknowledgements in
// PUBLISH order). Fails on v2.7.9, which has no such hook and acknowledges
// at once.
func TestPublishHoldKeepsAckOrder(t *testing.T) {
	s := newServer()
	h := &holdHook{release: make(chan struct{})}
	require.NoError(t, s.AddHook(h, nil))
	cl, r, _ := newTestClient()
	cl.Properties.ProtocolVersion = 4
	s.Clients.Add(cl)

	acks := make(chan uint16, 3)
	go readAcks(t, r, 3, acks)
	require.NoError(t, s.processPublish(cl, holdPublish(1, "hold")))
	require.NoError(t, s.processPublish(cl, holdPublish(2, "free")))
	select {
	case id := <-acks:
		t.Fatalf("PUBACK %d sent while the first PUBLISH's acknowledgement is held", id)
	case <-time.After(100 * time.Millisecond):
	}
	close(h.release)
	require.NoError(t, s.processPublish(cl, holdPublish(3, "free")))
	var got []uint16
	for i := 0; i < 3; i++ {
		select {
		case id := <-acks:
			got = append(got, id)
		case <-time.After(5 * time.Second):
			t.Fatalf("acks so far %v", got)
		}
	}
	require.Equal(t, []uint16{1, 2, 3}, got)
	require.Eventually(t, func() bool { _, ok := cl.State.Inflight.Get(1); return !ok }, 5*time.Second, time.Millisecond)
}

// TestPublishHoldFailureClosesWithoutAck (rtm patch 54): a hold that fails
// ends the connection without the acknowledgement.
func TestPublishHoldFailureClosesWithoutAck(t *testing.T) {
	s := newServer()
	h := &holdHook{release: make(chan struct{}), err: errors.New("store closed")}
	close(h.release)
	require.NoError(t, s.AddHook(h, nil))
	cl, r, _ := newTestClient()
	s.Clients.Add(cl)
	var wg sync.WaitGroup
	wg.Add(1)
	acks := make(chan uint16, 1)
	go func() { defer wg.Done(); readAcks(t, r, 1, acks) }()
	require.NoError(t, s.processPublish(cl, holdPublish(1, "hold")))
	require.Eventually(t, cl.Closed, 5*time.Second, time.Millisecond)
	_ = r.Close()
	wg.Wait()
	_, ok := <-acks
	require.False(t, ok, "no PUBACK after a failed hold")
}

// TestScheduleWillAndStopTime (rtm patch 53): a will restored with a
// session is published once its time passes unless the client connects,
// and a restored session's expiry counts from the time it went offline.
func TestScheduleWillAndStopTime(t *testing.T) {
	s := newServer()
	hk := new(willSentHook)
	require.NoError(t, s.AddHook(hk, nil))
	s.AdoptSession("w1", 5, Session{Expiry: 60, ExpirySet: true})
	cl, ok := s.Clients.Get("w1")
	require.True(t, ok)
	cl.SetStopTime(1000)
	require.Equal(t, int64(1000), cl.StopTime())
	s.clearExpiredClients(time.Now().Unix())
	_, ok = s.Clients.Get("w1")
	require.False(t, ok, "a session offline since 1970 has expired")

	now := time.Now().Unix()
	s.ScheduleWill("w2", Will{Flag: 1, TopicName: "status/w2", Payload: []byte("gone")}, now+5)
	s.sendDelayedLWT(now + 1)
	require.Empty(t, hk.ids, "not before its time")
	s.sendDelayedLWT(now + 6)
	require.Equal(t, []string{"w2"}, hk.ids)
}

// qosHook records the packets reported to OnQosPublish.
type qosHook struct {
	HookBase
	mu  sync.Mutex
	got []packets.Packet
}

func (h *qosHook) ID() string           { return "qos" }
func (h *qosHook) Provides(b byte) bool { return b == OnQosPublish }
func (h *qosHook) OnQosPublish(_ *Client, pk packets.Packet, _ int64, _ int) {
	h.mu.Lock()
	h.got = append(h.got, pk)
	h.mu.Unlock()
}

// TestPubrecReportsPubrelToOnQosPublish (rtm patch 39): when a client's
// PUBREC moves an outbound QoS 2 message to its PUBREL step, OnQosPublish
// is told (the PUBREL, before it is sent), so a storage hook can restore
// the session with the PUBREL instead of the PUBLISH [MQTT-4.3.3-6].
func TestPubrecReportsPubrelToOnQosPublish(t *testing.T) {
	s := newServer()
	h := &qosHook{}
	require.NoError(t, s.AddHook(h, nil))
	cl, r, w := newTestClient()
	defer func() { _ = w.Close(); _ = r.Close() }()
	go func() { _, _ = io.Copy(io.Discard, r) }()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, PacketID: 7, TopicName: "a/b"})

	require.NoError(t, s.processPubrec(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: 7}))
	h.mu.Lock()
	defer h.mu.Unlock()
	require.Len(t, h.got, 1)
	require.Equal(t, packets.Pubrel, h.got[0].FixedHeader.Type)
	require.Equal(t, uint16(7), h.got[0].PacketID)
}

// TestQos0PublishAllowedAtReceiveMaximum (rtm patch 122): a client whose
// every QoS 1/2 slot waits for its acknowledgement may still send QoS 0:
// Receive Maximum counts QoS 1 and 2 PUBLISHes only [MQTT-3.3.4-9]. v2.7.9
// disconnected it with 0x93, which rtm's held acknowledgements (patch 54)
// made frequent: the push API's QoS 0 publishes behind QoS 1 ones.
func TestQos0PublishAllowedAtReceiveMaximum(t *testing.T) {
	s := newServer()
	_ = s.Serve()
	defer s.Close()
	cl, r, _ := newTestClient()
	go func() { _, _ = io.Copy(io.Discard, r) }() // a refusal writes a DISCONNECT: never block on it
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetReceiveQuota(0)
	s.Clients.Add(cl)
	pk := *packets.TPacketData[packets.Publish].Get(packets.TPublishBasic).Packet
	require.Equal(t, byte(0), pk.FixedHeader.Qos)
	require.NoError(t, s.processPacket(cl, pk))
}
