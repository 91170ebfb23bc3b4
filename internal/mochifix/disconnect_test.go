package mochifix_test

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestShutdownDisconnectPerProtocol: when the broker shuts down, an MQTT 5
// client gets DISCONNECT 0x8B (server shutting down) before its connection
// closes, and an MQTT 3.1.1 client sees its connection closed with no bytes
// at all: MQTT 3.1.1 has no server-to-client DISCONNECT (3.14), and v2.7.9
// sent it one.
func TestShutdownDisconnectPerProtocol(t *testing.T) {
	s, addr, _ := startBroker(t, nil)

	dial := func(connect []byte) net.Conn {
		t.Helper()
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(connect); err != nil {
			t.Fatal(err)
		}
		hdr := make([]byte, 2)
		if _, err := io.ReadFull(c, hdr); err != nil || hdr[0] != packets.Connack<<4 {
			t.Fatalf("CONNACK: % x, %v", hdr, err)
		}
		if _, err := io.ReadFull(c, make([]byte, hdr[1])); err != nil {
			t.Fatal(err)
		}
		return c
	}
	v3 := dial(v311Connect("shutdown-v3"))
	v5 := dial(v5Connect("shutdown-v5"))

	closeServer(s)

	rest := func(c net.Conn) []byte {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			t.Errorf("reading until the connection closes: %v", err)
		}
		return b
	}
	if b := rest(v3); len(b) != 0 {
		t.Errorf("MQTT 3.1.1 client received % x before the close, want nothing (no DISCONNECT in 3.1.1)", b)
	}
	if b := rest(v5); len(b) < 3 || !bytes.Equal(b[:1], []byte{packets.Disconnect << 4}) || b[2] != packets.ErrServerShuttingDown.Code {
		t.Errorf("MQTT 5 client received % x before the close, want DISCONNECT 0x8B", b)
	}
}
