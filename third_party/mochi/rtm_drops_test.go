// SPDX-License-Identifier: MIT
// rtm patch: regression tests for rtm's patches 25-27 to mochi v2.7.9 (a
// refused publish, lost messages reported to hooks), see PATCHES.md.

package mqtt

import (
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// refuseHook refuses every PUBLISH with err and records the hooks of
// patches 26 and 27.
type refuseHook struct {
	HookBase
	err error

	mu      sync.Mutex
	offline []string // client/topic of each OnPublishDroppedOffline
	expired []string // client/packet id/qos of each OnPublishExpired
	qosDrop int      // OnQosDropped calls
}

func (h *refuseHook) ID() string { return "refuse-hook" }
func (h *refuseHook) Provides(b byte) bool {
	return b == OnPublish || b == OnPublishDroppedOffline || b == OnPublishExpired || b == OnQosDropped
}
func (h *refuseHook) OnPublish(_ *Client, pk packets.Packet) (packets.Packet, error) {
	return pk, h.err
}
func (h *refuseHook) OnPublishDroppedOffline(cl *Client, pk packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.offline = append(h.offline, cl.ID+"/"+pk.TopicName)
}
func (h *refuseHook) OnPublishExpired(cl *Client, pk packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.expired = append(h.expired, cl.ID+"/"+string(rune('0'+pk.PacketID))+"/"+string(rune('0'+pk.FixedHeader.Qos)))
}
func (h *refuseHook) OnQosDropped(*Client, packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.qosDrop++
}

// TestPublishRefusedByHook (patch 25): a PUBLISH an OnPublish hook refuses
// is neither delivered nor retained, and the publisher is told: MQTT 5 gets
// PUBACK (QoS 1) or PUBREC (QoS 2) with the hook's reason code (0x80 for an
// error that is not one), MQTT 3.1.1 is disconnected [MQTT-3.3.5-2]. On
// v2.7.9 a QoS 2 refusal got a PUBACK, and an MQTT 3.1.1 publisher, or any
// error that is not a reason code, had its message delivered and
// acknowledged with success.
func TestPublishRefusedByHook(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version byte
		qos     byte
		err     error
		ack     byte // packet type of the answer; 0: the connection is closed
		code    byte
	}{
		{"v5 qos1 quota", 5, 1, packets.ErrQuotaExceeded, packets.Puback, 0x97},
		{"v5 qos2 quota", 5, 2, packets.ErrQuotaExceeded, packets.Pubrec, 0x97},
		{"v5 qos1 plain error", 5, 1, errors.New("link closed"), packets.Puback, 0x80},
		{"v5 qos0", 5, 0, packets.ErrQuotaExceeded, 0, 0},
		{"v3 qos1", 4, 1, packets.ErrQuotaExceeded, 0, 0},
		{"v3 qos2", 4, 2, packets.ErrUnspecifiedError, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer()
			require.NoError(t, s.AddHook(&refuseHook{err: tc.err}, nil))
			sub := s.NewClient(nil, "t", "offline-sub", false)
			sub.Properties.ProtocolVersion = 5
			s.Clients.Add(sub)
			s.Topics.Subscribe(sub.ID, packets.Subscription{Filter: "a/b", Qos: 1})
			sub.State.Subscriptions.Add("a/b", packets.Subscription{Filter: "a/b", Qos: 1})

			cl, r, w := newTestClient()
			cl.Properties.ProtocolVersion = tc.version
			cl.State.Inflight.ResetReceiveQuota(10)
			s.Clients.Add(cl)
			done := make(chan error, 1)
			id := uint16(7)
			if tc.qos == 0 {
				id = 0
			}
			go func() {
				done <- s.processPacket(cl, packets.Packet{
					FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: tc.qos, Retain: true},
					TopicName:   "a/b", Payload: []byte("x"), PacketID: id, ProtocolVersion: tc.version,
				})
				_ = w.Close()
			}()
			hdr, body, err := readRawPacket(r)
			if tc.ack == 0 {
				require.ErrorIs(t, err, io.EOF, "nothing written (got packet type %d)", hdr>>4)
				perr := <-done
				if tc.qos > 0 {
					require.Error(t, perr, "the connection ends")
					require.True(t, cl.Closed(), "the connection is closed")
				} else {
					require.NoError(t, perr)
				}
			} else {
				require.NoError(t, err)
				require.Equal(t, tc.ack, hdr>>4, "answer packet type")
				require.GreaterOrEqual(t, len(body), 3)
				require.Equal(t, tc.code, body[2], "reason code")
				require.NoError(t, <-done)
			}
			require.Zero(t, sub.State.Inflight.Len(), "the refused message reached a subscriber")
			require.Empty(t, s.Topics.Messages("a/b"), "the refused message was retained")
			_ = r.Close()
		})
	}
}

// TestPublishRefusalLoggedAtDebug (patch 25): a reason code returned by an
// OnPublish hook is the hook's answer, logged at debug level; v2.7.9 logged
// an error per refused message. Other errors are still errors.
func TestPublishRefusalLoggedAtDebug(t *testing.T) {
	for _, tc := range []struct {
		err       error
		wantError bool
	}{{packets.ErrQuotaExceeded, false}, {errors.New("broken"), true}} {
		logs := new(safeBuffer)
		s := New(&Options{Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))})
		require.NoError(t, s.AddHook(&refuseHook{err: tc.err}, nil))
		cl, r, w := newTestClient()
		cl.Properties.ProtocolVersion = 5
		go func() { _, _ = io.Copy(io.Discard, r) }()
		_, err := s.hooks.OnPublish(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "a/b"})
		require.ErrorIs(t, err, tc.err)
		require.Equal(t, tc.wantError, strings.Contains(logs.String(), "level=ERROR"), "%v: logs %q", tc.err, logs.String())
		_ = w.Close()
		_ = r.Close()
	}
}

// TestOfflineQos0CallsHook (patch 26): a QoS 0 message for a client that
// is not connected is reported to OnPublishDroppedOffline; a QoS 1 one is
// kept in its session and is not. v2.7.9 called no hook.
func TestOfflineQos0CallsHook(t *testing.T) {
	s := newServer()
	h := &refuseHook{}
	require.NoError(t, s.AddHook(h, nil))
	cl := s.NewClient(nil, "t", "offline", false)
	cl.Properties.ProtocolVersion = 5
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "a/b"}

	_, err := s.publishToClient(cl, packets.Subscription{Filter: "a/b", Qos: 0}, pk)
	require.ErrorIs(t, err, packets.CodeDisconnect)
	_, err = s.publishToClient(cl, packets.Subscription{Filter: "a/b", Qos: 1}, pk)
	require.ErrorIs(t, err, packets.CodeDisconnect)

	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(t, []string{"offline/a/b"}, h.offline, "one QoS 0 drop reported, the QoS 1 message kept")
	require.Equal(t, 1, cl.State.Inflight.Len())
}

// TestExpiredInflightCallsHook (patch 27): a message held for a client
// that expires is reported to OnPublishExpired with the held packet, and
// to OnQosDropped once; v2.7.9 had no such hook and called OnQosDropped
// twice, the second time with only the packet ID.
func TestExpiredInflightCallsHook(t *testing.T) {
	s := newServer()
	h := &refuseHook{}
	require.NoError(t, s.AddHook(h, nil))
	cl := s.NewClient(nil, "t", "held", false)
	cl.Properties.ProtocolVersion = 5
	s.Clients.Add(cl)
	now := time.Now().Unix()
	cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, PacketID: 3,
		ProtocolVersion: 5, Created: now - 10, Expiry: now - 1})
	cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 4,
		ProtocolVersion: 5, Created: now - 10, Expiry: now + 100})

	s.clearExpiredInflights(now)

	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(t, []string{"held/3/2"}, h.expired)
	require.Equal(t, 1, h.qosDrop, "OnQosDropped once per expired message")
	require.Equal(t, 1, cl.State.Inflight.Len())
}
