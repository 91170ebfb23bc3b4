package loadgen

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// Target is one broker address: a transport and where to reach it.
type Target struct {
	Scheme string // tcp, tls, ws or wss
	Host   string // host:port
	Path   string // WebSocket path
}

func (t Target) String() string {
	if t.Scheme == "tcp" {
		return t.Host
	}
	return t.Scheme + "://" + t.Host + t.Path
}

// ParseTarget reads host:port, tcp://host:port, mqtt://, tls://, ssl://,
// mqtts://, ws://host:port[/path] or wss://host:port[/path] (path
// defaults to /mqtt).
func ParseTarget(s string) (Target, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return Target{}, errors.New("empty address")
	}
	if !strings.Contains(s, "://") {
		s = "tcp://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return Target{}, fmt.Errorf("address %q: %w", s, err)
	}
	t := Target{Host: u.Host, Path: u.Path}
	switch u.Scheme {
	case "tcp", "mqtt":
		t.Scheme = "tcp"
	case "tls", "ssl", "mqtts":
		t.Scheme = "tls"
	case "ws", "wss":
		t.Scheme = u.Scheme
		if t.Path == "" {
			t.Path = "/mqtt"
		}
	default:
		return Target{}, fmt.Errorf("address %q: unknown scheme %q (want tcp, tls, ws or wss)", s, u.Scheme)
	}
	host, port, err := net.SplitHostPort(t.Host)
	if err != nil || port == "" {
		return Target{}, fmt.Errorf("address %q: want host:port", s)
	}
	_ = host
	return t, nil
}

// loopback reports whether t's host is a loopback IP address, so source
// addresses can be spread over 127.0.0.0/8.
func (t Target) loopback() bool {
	host, _, _ := net.SplitHostPort(t.Host)
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback() && ip.To4() != nil
}

// dialOpts are a client's connection settings.
type dialOpts struct {
	target     Target
	tls        *tls.Config
	local      net.Addr // source address, nil for the kernel's choice
	connect    connectOpts
	readBuffer int
	// onPublish gets every PUBLISH received (topic and payload valid only
	// during the call), on the client's reader goroutine.
	onPublish func(topic, payload []byte)
	// onAck gets the reason code of each PUBACK (QoS 1) or PUBCOMP/PUBREC
	// failure (QoS 2) that ends a publish.
	onAck func(reason byte)
}

// client is one MQTT connection of the load generator.
type client struct {
	conn    net.Conn
	version byte

	wmu sync.Mutex
	bw  *bufio.Writer

	// ids holds the free packet IDs for publishes: taking one is also the
	// window's semaphore.
	ids     chan uint16
	window  int
	subID   atomic.Uint32
	subacks chan []byte // reason codes of each SUBACK

	opts dialOpts

	done chan struct{} // closed when the reader ends
	err  error         // why the reader ended, set before done closes
	quit atomic.Bool   // Close called: the reader's error is expected
}

// connackTimeout bounds CONNECT → CONNACK for one client, as brokers bound
// how long they wait for a CONNECT.
const connackTimeout = 10 * time.Second

// dial connects and completes CONNECT/CONNACK within ctx. window is the
// number of QoS 1/2 publishes the client keeps in flight, capped by the
// server's Receive Maximum.
func dial(ctx context.Context, o dialOpts, window int) (*client, error) {
	conn, err := dialConn(ctx, o)
	if err != nil {
		return nil, err
	}
	// A server that accepts but never answers (not MQTT, or overloaded)
	// fails this client after connackTimeout, not at the end of setup.
	dl := time.Now().Add(connackTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(dl) {
		dl = d
	}
	_ = conn.SetDeadline(dl)
	c := &client{conn: conn, version: o.connect.version, opts: o, done: make(chan struct{}), subacks: make(chan []byte, 1)}
	c.bw = bufio.NewWriterSize(conn, 4096)
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	if err := c.write(appendConnect(nil, o.connect)); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("%s: send CONNECT: %w", o.target, ctxErr(ctx, err))
	}
	br := bufio.NewReaderSize(conn, max(o.readBuffer, 512))
	pk, buf, err := readPacket(br, nil)
	if err != nil {
		_ = conn.Close()
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s: the server closed the connection after CONNECT (not an MQTT %s broker, or it refused the client)", o.target, versionName(o.connect.version))
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil {
			return nil, fmt.Errorf("%s: no CONNACK within %v of CONNECT (not an MQTT broker, or one too busy to answer)", o.target, connackTimeout)
		}
		return nil, fmt.Errorf("%s: read CONNACK: %w", o.target, ctxErr(ctx, err))
	}
	if pk.typ != typConnack {
		_ = conn.Close()
		return nil, fmt.Errorf("%s: got packet type %d, want CONNACK", o.target, pk.typ)
	}
	ca, err := parseConnack(o.connect.version, pk.body)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("%s: CONNACK: %w", o.target, err)
	}
	if ca.reason != 0 {
		_ = conn.Close()
		return nil, &ConnackError{Target: o.target.String(), Version: o.connect.version, Code: ca.reason}
	}
	_ = conn.SetDeadline(time.Time{})
	if ca.receiveMax > 0 && int(ca.receiveMax) < window {
		window = int(ca.receiveMax)
	}
	c.window = max(window, 1)
	c.ids = make(chan uint16, c.window)
	for i := 1; i <= c.window; i++ {
		c.ids <- uint16(i)
	}
	go c.readLoop(br, buf)
	return c, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

func versionName(v byte) string {
	if v == V5 {
		return "5"
	}
	return "3.1.1"
}

// ConnackError is a CONNACK that refused the connection.
type ConnackError struct {
	Target  string
	Version byte
	Code    byte
}

func (e *ConnackError) Error() string {
	return fmt.Sprintf("%s: CONNACK refused the connection: %s", e.Target, reasonText(e.Version, e.Code))
}

func reasonText(version, code byte) string {
	if version != V5 {
		names := map[byte]string{1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
			4: "bad user name or password", 5: "not authorized"}
		if n, ok := names[code]; ok {
			return fmt.Sprintf("return code %d (%s)", code, n)
		}
		return fmt.Sprintf("return code %d", code)
	}
	names := map[byte]string{0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error", 0x84: "unsupported protocol version",
		0x85: "client identifier not valid", 0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
		0x89: "server busy", 0x8A: "banned", 0x97: "quota exceeded", 0x9F: "connection rate exceeded"}
	if n, ok := names[code]; ok {
		return fmt.Sprintf("reason code %#x (%s)", code, n)
	}
	return fmt.Sprintf("reason code %#x", code)
}

func dialConn(ctx context.Context, o dialOpts) (net.Conn, error) {
	d := &net.Dialer{LocalAddr: o.local}
	switch o.target.Scheme {
	case "tcp":
		c, err := d.DialContext(ctx, "tcp", o.target.Host)
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", o.target, err)
		}
		return c, nil
	case "tls":
		td := &tls.Dialer{NetDialer: d, Config: o.tls}
		c, err := td.DialContext(ctx, "tcp", o.target.Host)
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", o.target, err)
		}
		return c, nil
	case "ws", "wss":
		wd := websocket.Dialer{
			NetDialContext:  d.DialContext,
			TLSClientConfig: o.tls,
			Subprotocols:    []string{"mqtt"},
			ReadBufferSize:  max(o.readBuffer, 512),
			WriteBufferSize: 4096,
		}
		u := url.URL{Scheme: o.target.Scheme, Host: o.target.Host, Path: o.target.Path}
		ws, resp, err := wd.DialContext(ctx, u.String(), nil)
		if resp != nil && resp.Body != nil {
			_ = resp.Body.Close()
		}
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", o.target, err)
		}
		return &wsConn{Conn: ws}, nil
	}
	return nil, fmt.Errorf("unknown transport %q", o.target.Scheme)
}

// write sends b at once (one flush).
func (c *client) write(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.bw.Write(b); err != nil {
		return err
	}
	return c.bw.Flush()
}

func (c *client) readLoop(br *bufio.Reader, buf []byte) {
	err := c.read(br, buf)
	if c.quit.Load() {
		err = nil
	}
	c.err = err
	close(c.done)
	_ = c.conn.Close()
}

func (c *client) read(br *bufio.Reader, buf []byte) error {
	var out []byte // acknowledgements, flushed once nothing more is buffered
	for {
		pk, nb, err := readPacket(br, buf)
		buf = nb
		if err != nil {
			return err
		}
		switch pk.typ {
		case typPublish:
			qos := (pk.flags >> 1) & 3
			topic, id, payload, err := parsePublish(c.version, pk.flags, pk.body)
			if err != nil {
				return fmt.Errorf("PUBLISH: %w", err)
			}
			if c.opts.onPublish != nil {
				c.opts.onPublish(topic, payload)
			}
			switch qos {
			case 1:
				out = appendAck(out, typPuback, id)
			case 2:
				out = appendAck(out, typPubrec, id)
			}
		case typPubrel:
			id, _, err := parseAck(pk.body)
			if err != nil {
				return fmt.Errorf("PUBREL: %w", err)
			}
			out = appendAck(out, typPubcomp, id)
		case typPuback, typPubcomp:
			id, rc, err := parseAck(pk.body)
			if err != nil {
				return fmt.Errorf("acknowledgement: %w", err)
			}
			if c.opts.onAck != nil {
				c.opts.onAck(rc)
			}
			c.release(id)
		case typPubrec:
			id, rc, err := parseAck(pk.body)
			if err != nil {
				return fmt.Errorf("PUBREC: %w", err)
			}
			if rc >= 0x80 {
				if c.opts.onAck != nil {
					c.opts.onAck(rc)
				}
				c.release(id)
			} else {
				out = appendAck(out, typPubrel, id)
			}
		case typSuback:
			_, codes, err := parseSuback(c.version, pk.body)
			if err != nil {
				return fmt.Errorf("SUBACK: %w", err)
			}
			select {
			case c.subacks <- append([]byte(nil), codes...):
			default:
			}
		case typPingresp:
		case typDisconnect:
			rc := byte(0)
			if len(pk.body) > 0 {
				rc = pk.body[0]
			}
			return fmt.Errorf("the server sent DISCONNECT, %s", reasonText(V5, rc))
		default:
			return fmt.Errorf("unexpected packet type %d", pk.typ)
		}
		if len(out) > 0 && br.Buffered() == 0 {
			if err := c.write(out); err != nil {
				return err
			}
			out = out[:0]
		}
	}
}

func (c *client) release(id uint16) {
	if id == 0 || int(id) > c.window {
		return
	}
	select {
	case c.ids <- id:
	default: // an ID never taken: a broker bug, not ours to crash on
	}
}

// publish sends one PUBLISH. For QoS 1 and 2 it first waits for a free
// place in the window, so at most window publishes are unacknowledged.
func (c *client) publish(ctx context.Context, scratch []byte, qos byte, topic string, payload []byte) ([]byte, error) {
	var id uint16
	if qos > 0 {
		select {
		case id = <-c.ids:
		case <-ctx.Done():
			return scratch, ctx.Err()
		case <-c.done:
			return scratch, c.closedErr()
		}
	}
	scratch = appendPublish(scratch[:0], c.version, qos, id, topic, payload)
	if err := c.write(scratch); err != nil {
		return scratch, c.closedErrOr(err)
	}
	return scratch, nil
}

// waitAcks waits until every QoS 1/2 publish was acknowledged, or ctx ends.
func (c *client) waitAcks(ctx context.Context) bool {
	for {
		if len(c.ids) == c.window {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-c.done:
			return false
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// subscribe subscribes to filter and returns the granted QoS, or an error
// for a refusal (reason code 0x80 or more).
func (c *client) subscribe(ctx context.Context, filter string, qos byte) (byte, error) {
	id := uint16(c.subID.Add(1))
	if id == 0 {
		id = uint16(c.subID.Add(1))
	}
	if err := c.write(appendSubscribe(nil, c.version, id, filter, qos)); err != nil {
		return 0, c.closedErrOr(err)
	}
	select {
	case codes := <-c.subacks:
		if len(codes) != 1 {
			return 0, fmt.Errorf("subscribe %s: SUBACK with %d reason codes, want 1", filter, len(codes))
		}
		if codes[0] >= 0x80 {
			return 0, fmt.Errorf("subscribe %s: refused, %s", filter, reasonText(c.version, codes[0]))
		}
		return codes[0], nil
	case <-c.done:
		return 0, c.closedErr()
	case <-ctx.Done():
		return 0, fmt.Errorf("subscribe %s: no SUBACK: %w", filter, ctx.Err())
	}
}

func (c *client) ping() error { return c.write([]byte{typPingreq << 4, 0}) }

func (c *client) closedErr() error {
	<-c.done
	if c.err != nil {
		return fmt.Errorf("connection lost: %w", c.err)
	}
	return errors.New("connection closed")
}

func (c *client) closedErrOr(err error) error {
	select {
	case <-c.done:
		return c.closedErr()
	default:
		return err
	}
}

// alive reports whether the connection is still up.
func (c *client) alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// close sends DISCONNECT (normal) and closes the connection.
func (c *client) close() {
	c.quit.Store(true)
	// A broker that stopped reading must not hold the DISCONNECT's write:
	// closing the connection ends it.
	t := time.AfterFunc(2*time.Second, func() { _ = c.conn.Close() })
	defer t.Stop()
	_ = c.write([]byte{typDisconnect << 4, 0})
	_ = c.conn.Close()
	<-c.done
}

// wsConn carries MQTT over WebSocket binary messages (MQTT 5 section 6).
type wsConn struct {
	*websocket.Conn
	r   io.Reader
	wmu sync.Mutex
}

func (w *wsConn) Read(p []byte) (int, error) {
	for {
		if w.r == nil {
			_, r, err := w.NextReader()
			if err != nil {
				return 0, err
			}
			w.r = r
		}
		n, err := w.r.Read(p)
		if errors.Is(err, io.EOF) {
			w.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (w *wsConn) Write(p []byte) (int, error) {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	if err := w.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// SetWriteDeadline sets the deadline on the underlying connection:
// gorilla's own setter is not safe beside a write in progress, which is
// the write the deadline is for (a broker that stopped reading).
func (w *wsConn) SetWriteDeadline(t time.Time) error {
	return w.UnderlyingConn().SetWriteDeadline(t)
}

func (w *wsConn) SetDeadline(t time.Time) error {
	_ = w.SetReadDeadline(t)
	return w.SetWriteDeadline(t)
}
