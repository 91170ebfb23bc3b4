package loadgen

import (
	"context"
	"crypto/tls"
)

// ClientOptions configure a Client: the load generator's own MQTT
// connection, for harnesses that need one outside a scenario.
type ClientOptions struct {
	Addr               string // as --addr: host:port, tls://, ws://, wss://
	Version            byte   // V311 or V5 (0: V5)
	ClientID           string
	Username, Password string
	TLS                *tls.Config
	// Inflight is the window of unacknowledged QoS 1/2 publishes (0: 64),
	// capped by the server's Receive Maximum.
	Inflight int
	// OnPublish gets each PUBLISH received, on the client's reader
	// goroutine; topic and payload are valid only during the call.
	OnPublish func(topic, payload []byte)
	// ReadBuffer is the reader's buffer size (0: 64 KiB).
	ReadBuffer int
}

// Client is one MQTT connection with a clean session.
type Client struct{ c *client }

// Dial connects and completes CONNECT/CONNACK.
func Dial(ctx context.Context, o ClientOptions) (*Client, error) {
	t, err := ParseTarget(o.Addr)
	if err != nil {
		return nil, err
	}
	if o.Version == 0 {
		o.Version = V5
	}
	if o.Inflight == 0 {
		o.Inflight = 64
	}
	if o.ReadBuffer == 0 {
		o.ReadBuffer = 64 << 10
	}
	do := dialOpts{target: t, tls: o.TLS, readBuffer: o.ReadBuffer, onPublish: o.OnPublish,
		connect: connectOpts{version: o.Version, clientID: o.ClientID, keepAlive: 60, receiveMax: 65535,
			username: o.Username, hasUser: o.Username != "", password: o.Password, hasPass: o.Password != ""}}
	c, err := dial(ctx, do, o.Inflight)
	if err != nil {
		return nil, err
	}
	return &Client{c: c}, nil
}

// Publish sends one message; at QoS 1 and 2 it first waits for a place in
// the window, not for this message's acknowledgement (see WaitAcks).
func (c *Client) Publish(ctx context.Context, qos byte, topic string, payload []byte) error {
	_, err := c.c.publish(ctx, nil, qos, topic, payload)
	return err
}

// Subscribe subscribes to filter and returns the granted QoS; a refusal is
// an error.
func (c *Client) Subscribe(ctx context.Context, filter string, qos byte) (byte, error) {
	return c.c.subscribe(ctx, filter, qos)
}

// WaitAcks waits until every QoS 1/2 publish is acknowledged, or ctx ends.
func (c *Client) WaitAcks(ctx context.Context) bool { return c.c.waitAcks(ctx) }

// Alive reports whether the connection is up.
func (c *Client) Alive() bool { return c.c.alive() }

// Close sends DISCONNECT and closes the connection.
func (c *Client) Close() { c.c.close() }
