package broker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/gorilla/websocket"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestMaxPacketSize: with broker.max_packet_size=1024 the v5 CONNACK
// advertises Maximum Packet Size 1024 (3.2.2.3.6); a 2,000-byte PUBLISH
// gets DISCONNECT 0x95 and the connection closed [MQTT-4.13.1-1] and
// reaches no subscriber, while the other clients stay connected; and the
// broker does not send a client a packet larger than the client's own
// Maximum Packet Size [MQTT-3.1.2-24].
func TestMaxPacketSize(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, func(c *config.Broker) { c.MaxPacketSize = 1024 })
	addr := b.Addr(broker.ListenerTCP)

	sub := v5{testutil.MustV5(t, addr, "mps-sub")}
	sub.sub(t, "mps/#", 1)
	c, ca, err := testutil.DialV5(t, addr, &paho.Connect{ClientID: "mps-pub", CleanStart: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := ca.Properties.MaximumPacketSize; got == nil || *got != 1024 {
		t.Errorf("CONNACK Maximum Packet Size %v, want 1024", deref(got))
	}
	pub := v5{c}
	bystander := newClient(t, "v3", addr, "mps-v3")
	waitConnections(t, b, 3)

	big := dialRaw(t, addr)
	if ca := big.connect(t, &packets.Connect{ClientID: "mps-big", CleanStart: true, KeepAlive: 30}); ca.ReasonCode != 0 {
		t.Fatalf("CONNACK reason 0x%02X", ca.ReasonCode)
	}
	big.send(t, &packets.Publish{Topic: "mps/big", QoS: 1, PacketID: 1, Payload: make([]byte, 2000), Properties: &packets.Properties{}})
	got := big.expectClosed(t)
	if len(got) != 1 || got[0].Type != packets.DISCONNECT || got[0].Content.(*packets.Disconnect).ReasonCode != 0x95 {
		t.Errorf("before closing the connection the broker sent %v, want one DISCONNECT 0x95 (packet too large)", describe(got))
	}

	// The oversized message was refused before it was handled, so it would
	// have been delivered by now; the next message must be this one.
	pub.pub(t, "mps/small", 1, false, []byte("small"))
	expectNext(t, sub, "mps/small", []byte("small"))
	bystander.pub(t, "mps/v3", 1, false, []byte("still here"))
	expectNext(t, sub, "mps/v3", []byte("still here"))
	waitConnections(t, b, 3)

	t.Run("client limit", func(t *testing.T) {
		limit := uint32(512)
		c, _, err := testutil.DialV5(t, addr, &paho.Connect{ClientID: "mps-small", CleanStart: true,
			Properties: &paho.ConnectProperties{MaximumPacketSize: &limit}})
		if err != nil {
			t.Fatal(err)
		}
		small := v5{c}
		small.sub(t, "mps/limit", 0)
		pub.pub(t, "mps/limit", 0, false, make([]byte, 600))
		pub.pub(t, "mps/limit", 0, false, []byte("fits"))
		expectNext(t, small, "mps/limit", []byte("fits"))
	})
}

// describe lists packets for failure messages.
func describe(pks []*packets.ControlPacket) string {
	if len(pks) == 0 {
		return "nothing"
	}
	var s []string
	for _, p := range pks {
		if d, ok := p.Content.(*packets.Disconnect); ok {
			s = append(s, fmt.Sprintf("DISCONNECT 0x%02X", d.ReasonCode))
			continue
		}
		s = append(s, p.PacketType())
	}
	return fmt.Sprint(s)
}

// TestCapacity: with broker.capacity=2 a third client is refused (v5 CONNACK
// 0x97 quota exceeded, v3.1.1 return code 3 server unavailable) and
// counted; a client reconnecting with a connected client's ID takes its
// place; once a client leaves a new one gets in.
func TestCapacity(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, func(c *config.Broker) { c.Capacity = 2 })
	addr := b.Addr(broker.ListenerTCP)
	first := testutil.MustV5(t, addr, "cap-1")
	second, err := testutil.DialV3(t, addr, "cap-2", nil)
	if err != nil {
		t.Fatal(err)
	}
	waitConnections(t, b, 2)

	_, ca, err := testutil.DialV5(t, addr, &paho.Connect{ClientID: "cap-3", CleanStart: true})
	if err == nil || ca == nil || ca.ReasonCode != 0x97 {
		t.Errorf("third v5 client: CONNACK %+v, error %v; want reason 0x97 (quota exceeded)", ca, err)
	}
	_, _, code, err := dialV3(t, "tcp://"+addr, "cap-4", nil)
	if err == nil || code != 3 {
		t.Errorf("third v3 client: return code %d, error %v; want 3 (server unavailable)", code, err)
	}
	if got := b.Stats().RejectedCapacity; got != 2 {
		t.Errorf("connections rejected at capacity = %d, want 2", got)
	}

	// Takeover: the new connection replaces cap-1, it does not add to the load.
	if _, ca, err := testutil.DialV5(t, addr, &paho.Connect{ClientID: "cap-1", CleanStart: true}); err != nil {
		t.Fatalf("reconnect of a connected client at capacity: CONNACK %+v, error %v; want accepted", ca, err)
	}
	select {
	case d := <-first.Disconnects:
		if d.ReasonCode != 0x8E {
			t.Errorf("taken-over client got DISCONNECT 0x%02X, want 0x8E (session taken over)", d.ReasonCode)
		}
	case <-time.After(waitMsg):
		t.Error("taken-over client got no DISCONNECT")
	}
	waitConnections(t, b, 2)

	second.Disconnect(250)
	waitConnections(t, b, 1)
	testutil.MustV5(t, addr, "cap-5")
	if got := b.Stats().RejectedCapacity; got != 2 {
		t.Errorf("connections rejected at capacity = %d, want still 2", got)
	}
}

// TestKeepaliveBounds: a v5 client's keepalive is raised to
// broker.keepalive_min and lowered to broker.keepalive_max (0, "none", is
// lowered too), and the CONNACK says so with Server Keep Alive
// [MQTT-3.2.2-21]; a keepalive within bounds is left alone.
func TestKeepaliveBounds(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, func(c *config.Broker) { c.KeepaliveMin, c.KeepaliveMax = 10*time.Second, 60*time.Second })
	for _, tc := range []struct {
		ask  uint16
		want *uint16
	}{{0, ptr(uint16(60))}, {300, ptr(uint16(60))}, {61, ptr(uint16(60))}, {2, ptr(uint16(10))}, {9, ptr(uint16(10))},
		{10, nil}, {30, nil}, {60, nil}} {
		c := dialRaw(t, b.Addr(broker.ListenerTCP))
		ca := c.connect(t, &packets.Connect{ClientID: fmt.Sprint("ka-", tc.ask), CleanStart: true, KeepAlive: tc.ask})
		if ca.ReasonCode != 0 {
			t.Fatalf("keepalive %d: CONNACK reason 0x%02X", tc.ask, ca.ReasonCode)
		}
		if got := ca.Properties.ServerKeepAlive; (got == nil) != (tc.want == nil) || (got != nil && *got != *tc.want) {
			t.Errorf("keepalive %d: Server Keep Alive %v, want %v", tc.ask, deref(got), deref(tc.want))
		}
		_ = c.Close()
	}
}

// TestDropsWhenSubscriberStopsReading: with max_inflight=10 and
// max_queued=10, a subscriber at QoS 1 stops reading its socket while a
// publisher sends large messages. The publisher is not held back (every
// QoS 1 PUBLISH is acknowledged with success, in time), and every message
// the stuck subscriber did not take is visible: counted once in
// messages_dropped or inflight_dropped, and logged with its client ID. The
// broker still shuts down promptly with the stuck client connected.
//
// In "buffered" the 10 × 64 KiB in flight fit in loopback socket buffers,
// so the broker's writes to the stuck client complete; in "socket-full"
// 10 × 512 KiB exceed them (4 MiB by default), so the broker's writer to the
// stuck client blocks in write(2). At QoS 0 nothing is in flight: the
// client's write queue fills and further messages are dropped.
func TestDropsWhenSubscriberStopsReading(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		qos  byte
		n    int
		size int
	}{
		{"qos1-buffered", 1, 300, 64 << 10},
		{"qos1-socket-full", 1, 50, 512 << 10},
		{"qos0-socket-full", 0, 50, 512 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			testDrops(t, tc.qos, tc.n, tc.size)
		})
	}
}

func testDrops(t *testing.T, qos byte, n, size int) {
	const maxInflight, maxQueued = 10, 10
	b, logs := startBrokerLevel(t, slog.LevelInfo, func(c *config.Broker) { c.MaxInflight, c.MaxQueued = maxInflight, maxQueued })
	addr := b.Addr(broker.ListenerTCP)

	stuck := dialRaw(t, addr)
	_ = stuck.Conn.(*net.TCPConn).SetReadBuffer(4096) // fill up sooner
	if ca := stuck.connect(t, &packets.Connect{ClientID: "stuck", CleanStart: true, KeepAlive: 60}); ca.ReasonCode != 0 {
		t.Fatalf("CONNACK reason 0x%02X", ca.ReasonCode)
	}
	stuck.send(t, &packets.Subscribe{PacketID: 1, Properties: &packets.Properties{},
		Subscriptions: []packets.SubOptions{{Topic: "flood", QoS: 1}}})
	if p, err := stuck.read(waitMsg); err != nil || p.Type != packets.SUBACK || p.Content.(*packets.Suback).Reasons[0] != 1 {
		t.Fatalf("SUBACK: %v %v", p, err)
	}
	// From here on nothing reads the stuck client's socket.

	pub := testutil.MustV5(t, addr, "flooder")
	payload := bytes.Repeat([]byte{0xA5}, size)
	start := time.Now()
	for i := 0; i < n; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
		resp, err := pub.Publish(ctx, &paho.Publish{Topic: "flood", QoS: qos, Payload: payload})
		cancel()
		if err != nil {
			t.Fatalf("publish %d of %d: %v: the stuck subscriber holds the publisher back", i+1, n, err)
		}
		if qos > 0 && resp.ReasonCode != 0 {
			t.Fatalf("publish %d: PUBACK reason 0x%02X, want success", i+1, resp.ReasonCode)
		}
	}
	t.Logf("%d × %d KiB published at QoS %d in %v; %d bytes written to clients", n, size>>10, qos, time.Since(start), b.Stats().BytesSent)

	// 10 messages of 512 KiB exceed broker.max_queued_bytes (4 MiB): those
	// drops are counted as queue_bytes.
	bytesDropped := func(st broker.Stats) int64 {
		q := fmt.Sprint(qos)
		return st.DroppedByReason["queue_bytes"][q] + st.DroppedByReason["memory_budget"][q]
	}
	testutil.WaitFor(t, waitCond, func() error {
		st := b.Stats()
		if qos == 0 {
			// Written, waiting in the write queue (at most max_queued, plus
			// one being written) or dropped.
			dropped := st.MessagesDropped["0"] + bytesDropped(st)
			if dropped == 0 || st.MessagesSent+dropped > int64(n) || st.MessagesSent+dropped < int64(n-maxQueued-1) {
				return fmt.Errorf("sent %d + dropped %d = %d, want %d less at most %d queued, with drops > 0",
					st.MessagesSent, dropped, st.MessagesSent+dropped, n, maxQueued+1)
			}
			return nil
		}
		// Held for the stuck client (in flight, at most max_inflight of
		// them) or counted as dropped, once.
		dropped := st.MessagesDropped["1"] + st.InflightDropped + bytesDropped(st)
		if dropped == 0 || st.Inflight+dropped != int64(n) || st.Inflight > maxInflight {
			return fmt.Errorf("in flight %d (at most %d) + dropped %d (messages_dropped[1] %d, inflight_dropped %d) = %d, want %d with drops > 0",
				st.Inflight, maxInflight, dropped, st.MessagesDropped["1"], st.InflightDropped, st.Inflight+dropped, n)
		}
		return nil
	})
	// The per-reason breakdown adds up to the same drops.
	st := b.Stats()
	if got := st.DroppedByReason["queue_full"][fmt.Sprint(qos)]; got != st.MessagesDropped[fmt.Sprint(qos)] {
		t.Errorf("messages_dropped_by_reason.queue_full[%d] = %d, messages_dropped[%d] = %d", qos, got, qos, st.MessagesDropped[fmt.Sprint(qos)])
	}
	if got := st.DroppedByReason["session_full"]["1"] + st.DroppedByReason["packet_ids"]["1"]; got != st.InflightDropped {
		t.Errorf("messages_dropped_by_reason session_full+packet_ids at QoS 1 = %d, inflight_dropped = %d", got, st.InflightDropped)
	}
	// The first drop of a client is logged as it happens, with its reason.
	if !logs.Contains("client_id=stuck", "dropped", "reason=") {
		t.Error(`no log line with "client_id=stuck", "dropped" and "reason=": the drops are not attributed to the client`)
	}

	ctx, cancel := context.WithTimeout(context.Background(), waitCond)
	defer cancel()
	start = time.Now()
	if err := b.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown with a client that stopped reading: %v after %v", err, time.Since(start))
	}
}

// TestDropsAtByteBounds (issue 12 item 6): a subscriber that stops reading
// holds at most broker.max_queued_bytes, and all clients together at most
// broker.max_queued_bytes_total (half of it for clients already holding
// messages); the rest is dropped and counted by reason (queue_bytes,
// memory_budget) and logged with the client ID. The publisher is paced
// once, then every QoS 1 publish is acknowledged.
func TestDropsAtByteBounds(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		reason       string
		client, node int
	}{
		{"queue_bytes", 512 << 10, 256 << 20},
		{"memory_budget", 1 << 20, 1 << 20}, // stuck clients get half of the node's budget first
	} {
		t.Run(tc.reason, func(t *testing.T) {
			t.Parallel()
			b, logs := startBrokerLevel(t, slog.LevelInfo, func(c *config.Broker) {
				c.MaxQueuedBytes, c.MaxQueuedBytesTotal = tc.client, tc.node
			})
			addr := b.Addr(broker.ListenerTCP)
			stuck := dialRaw(t, addr)
			_ = stuck.Conn.(*net.TCPConn).SetReadBuffer(4096)
			if ca := stuck.connect(t, &packets.Connect{ClientID: "stuck", CleanStart: true, KeepAlive: 60}); ca.ReasonCode != 0 {
				t.Fatalf("CONNACK reason 0x%02X", ca.ReasonCode)
			}
			stuck.send(t, &packets.Subscribe{PacketID: 1, Properties: &packets.Properties{},
				Subscriptions: []packets.SubOptions{{Topic: "flood", QoS: 1}}})
			if p, err := stuck.read(waitMsg); err != nil || p.Type != packets.SUBACK {
				t.Fatalf("SUBACK: %v %v", p, err)
			}
			pub := testutil.MustV5(t, addr, "flooder")
			const n, size = 60, 128 << 10
			payload := bytes.Repeat([]byte{0xA5}, size)
			for i := 0; i < n; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), waitMsg)
				resp, err := pub.Publish(ctx, &paho.Publish{Topic: "flood", QoS: 1, Payload: payload})
				cancel()
				if err != nil || resp.ReasonCode != 0 {
					t.Fatalf("publish %d: %v %+v", i, err, resp)
				}
			}
			// Every message is held for the stuck client or counted as
			// dropped, never both, never neither. Info.Inflight (Stats.Inflight)
			// also counts, for a moment after the PUBACK has been written, the
			// publisher's own QoS 1 acknowledgement (mochi keeps it in the
			// publisher's session from receipt until its PUBACK is written),
			// so it can read one high right after Publish returns: poll until
			// it counts held messages only. Each held message costs the same
			// bytes in QueuedBytes (an acknowledgement costs none), so
			// QueuedBytes says exactly how many are held, and a transient
			// acknowledgement cannot mask a message that was lost uncounted.
			const msgBytes = size + int64(len("flood"))
			limit := int64(tc.client)
			if tc.reason == "memory_budget" {
				limit = int64(tc.node / 2)
			}
			var st broker.Stats
			testutil.WaitFor(t, waitCond, func() error {
				st = b.Stats()
				held, d := st.Memory.QueuedBytes/msgBytes, st.DroppedByReason[tc.reason]["1"]
				if st.Memory.QueuedBytes%msgBytes != 0 || st.Inflight != held || d == 0 || held+d != n {
					return fmt.Errorf("in flight %d, held %d (%d bytes) + dropped (%s) %d, want in flight = held and held + dropped = %d with drops > 0: %v",
						st.Inflight, held, st.Memory.QueuedBytes, tc.reason, d, n, st.DroppedByReason)
				}
				return nil
			})
			t.Logf("queued %d bytes (limit %d), dropped %v", st.Memory.QueuedBytes, limit, st.DroppedByReason[tc.reason])
			if st.Memory.QueuedBytes > limit+size {
				t.Errorf("queued %d bytes, over %d", st.Memory.QueuedBytes, limit)
			}
			if !logs.Contains("client_id=stuck", "reason="+tc.reason) {
				t.Errorf("no log line with the client ID and reason=%s", tc.reason)
			}
		})
	}
}

// TestConnectBoundsOnListeners (issue 12 item 7): a connection that sends
// nothing (TCP or WebSocket), or half a CONNECT, is closed after
// broker.connect_timeout, and a CONNECT over broker.max_connect_size at its
// header.
func TestConnectBoundsOnListeners(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, func(c *config.Broker) { c.ConnectTimeout = time.Second })
	for _, tc := range []struct {
		name string
		send []byte
	}{
		{"silent", nil},
		{"half a CONNECT", []byte{0x10, 100, 0, 4, 'M'}},
		{"CONNECT over max_connect_size", []byte{0x10, 0x80, 0x80, 0x08}}, // 128 KiB declared
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", b.Addr(broker.ListenerTCP), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := conn.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			_ = conn.SetReadDeadline(time.Now().Add(waitCond))
			if n, err := conn.Read(make([]byte, 16)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("read %d bytes, %v: the connection is still open after %v", n, err, time.Since(start))
			}
		})
	}
	t.Run("silent WebSocket", func(t *testing.T) {
		d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: waitMsg}
		conn, _, err := d.Dial("ws://"+b.Addr(broker.ListenerWS)+"/mqtt", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		start := time.Now()
		_ = conn.SetReadDeadline(time.Now().Add(waitCond))
		if _, _, err := conn.ReadMessage(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("%v: the connection is still open after %v", err, time.Since(start))
		}
	})
}
