// Package benchkit is what rtm's benchmark harnesses share: the MQTT 5
// client they drive brokers with (paho.golang over a buffered connection,
// so the client does not bound what is measured), delivery tracking, and
// the formatting of their reports.
package benchkit

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

// bufConn gives paho a buffered reader: paho reads each packet with several
// small io.ReadFull calls, one read syscall each on a bare connection, so
// the client rather than the broker would bound the QoS 0 scenarios.
//
// It embeds *net.TCPConn, not net.Conn, on purpose: that promotes the
// TCPConn's unexported writeBuffers method, so paho's net.Buffers writes
// stay one writev per packet, atomic under concurrent publishers. Behind a
// net.Conn interface they would become one write per buffer, and packets
// written from several goroutines would interleave on the wire.
type bufConn struct {
	*net.TCPConn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Options configure one benchmark client.
type Options struct {
	ID string
	// ReceiveMax is the Receive Maximum sent in CONNECT. paho also sizes
	// its inbound channel with it (8 bytes a slot), so clients that expect
	// nothing use a small value. Zero means 65535.
	ReceiveMax uint16
	// OnPublish is called for every PUBLISH received, on paho's routing
	// goroutine; nil means the client expects none.
	OnPublish func(*paho.Publish)
	// ClientErrs counts errors paho reports on the connection after CONNACK.
	ClientErrs *atomic.Int64
}

// Dial connects an MQTT 5 client with a clean session that expires on
// disconnect, and returns it with the server's CONNACK.
func Dial(ctx context.Context, addr string, o Options) (*paho.Client, *paho.Connack, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	cfg := paho.ClientConfig{
		ClientID:      o.ID,
		Conn:          &bufConn{TCPConn: conn.(*net.TCPConn), r: bufio.NewReaderSize(conn, 64<<10)},
		PacketTimeout: 30 * time.Second,
		OnClientError: func(error) {
			if o.ClientErrs != nil {
				o.ClientErrs.Add(1)
			}
		},
	}
	if o.OnPublish != nil {
		f := o.OnPublish
		cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){
			func(pr paho.PublishReceived) (bool, error) { f(pr.Packet); return true, nil },
		}
	} else {
		cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){
			func(paho.PublishReceived) (bool, error) { return true, nil },
		}
	}
	c := paho.NewClient(cfg)
	rm := o.ReceiveMax
	if rm == 0 {
		rm = 65535
	}
	expiry := uint32(0)
	ca, err := c.Connect(ctx, &paho.Connect{
		ClientID:   o.ID,
		KeepAlive:  60,
		CleanStart: true,
		Properties: &paho.ConnectProperties{ReceiveMaximum: &rm, SessionExpiryInterval: &expiry},
	})
	if err != nil {
		_ = conn.Close()
		return nil, ca, fmt.Errorf("connect %s: %w", o.ID, err)
	}
	if ca.ReasonCode != 0 {
		_ = conn.Close()
		return nil, ca, fmt.Errorf("connect %s: reason code %#x", o.ID, ca.ReasonCode)
	}
	return c, ca, nil
}

// Subscribe subscribes c to filter and checks the SUBACK.
func Subscribe(ctx context.Context, c *paho.Client, filter string, qos byte) error {
	sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: qos}}})
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", filter, err)
	}
	if len(sa.Reasons) != 1 || sa.Reasons[0] != qos {
		return fmt.Errorf("subscribe %s: suback reasons %v, want granted QoS %d", filter, sa.Reasons, qos)
	}
	return nil
}

// HangUp sends DISCONNECT (normal, session ends) and closes the connection.
func HangUp(c *paho.Client) {
	if c != nil {
		_ = c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	}
}
