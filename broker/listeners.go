package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// connectTimeout bounds the WebSocket handshake and its HTTP request. The
// time from there to a read CONNECT is bounded by broker.connect_timeout,
// which mochi applies (fork patch 44: mochi.MemoryLimits.ConnectTimeout,
// covering the CONNECT's body too; a deadline set here was extended by the
// body deadline of patch 43).
const connectTimeout = 10 * time.Second

// streamListener serves MQTT over an already bound net.Listener (TCP or
// TLS). We bind sockets ourselves, before the mochi server starts, so that
// port 0 is resolved and Addr works as soon as Start returns.
type streamListener struct {
	id    string
	ln    net.Listener
	log   *slog.Logger
	close sync.Once
}

func (l *streamListener) ID() string                  { return l.id }
func (l *streamListener) Address() string             { return l.ln.Addr().String() }
func (l *streamListener) Protocol() string            { return l.id }
func (l *streamListener) Init(log *slog.Logger) error { l.log = log; return nil }

func (l *streamListener) Serve(establish listeners.EstablishFn) {
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			return // closed
		}
		go func() {
			if err := establish(l.id, conn); err != nil && !expectedClose(err) {
				l.log.Debug("connection ended", "listener", l.id, "remote", conn.RemoteAddr().String(), "error", err)
			}
		}()
	}
}

// Close stops accepting first, then disconnects this listener's clients.
func (l *streamListener) Close(closeClients listeners.CloseFn) {
	l.close.Do(func() {
		_ = l.ln.Close()
		closeClients(l.id)
	})
}

// wsListener serves MQTT over WebSocket on path /mqtt ([MQTT-6.0.0-*]: binary
// frames, subprotocol "mqtt").
type wsListener struct {
	id       string
	ln       net.Listener
	log      *slog.Logger
	srv      *http.Server
	upgrader websocket.Upgrader
	close    sync.Once
	est      listeners.EstablishFn
}

func newWSListener(id string, ln net.Listener) *wsListener {
	l := &wsListener{id: id, ln: ln}
	l.upgrader = websocket.Upgrader{
		Subprotocols:    []string{"mqtt", "mqttv3.1"},
		ReadBufferSize:  1024,
		WriteBufferSize: 1024,
		// Devices and browser apps connect from any origin; authentication is
		// by MQTT credentials, not cookies, so there is nothing to forge.
		CheckOrigin:      func(*http.Request) bool { return true },
		HandshakeTimeout: connectTimeout,
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/mqtt", l.handle)
	l.srv = &http.Server{Handler: mux, ReadHeaderTimeout: connectTimeout}
	return l
}

func (l *wsListener) ID() string                  { return l.id }
func (l *wsListener) Address() string             { return l.ln.Addr().String() }
func (l *wsListener) Protocol() string            { return l.id }
func (l *wsListener) Init(log *slog.Logger) error { l.log = log; return nil }

func (l *wsListener) Serve(establish listeners.EstablishFn) {
	l.est = establish
	if err := l.srv.Serve(l.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		l.log.Error("websocket listener stopped", "listener", l.id, "error", err)
	}
}

func (l *wsListener) handle(w http.ResponseWriter, r *http.Request) {
	c, err := l.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader has answered with an HTTP error
	}
	defer c.Close()
	conn := &wsConn{Conn: c.UnderlyingConn(), ws: c}
	if err := l.est(l.id, conn); err != nil && !expectedClose(err) {
		l.log.Debug("connection ended", "listener", l.id, "remote", r.RemoteAddr, "error", err)
	}
}

func (l *wsListener) Close(closeClients listeners.CloseFn) {
	l.close.Do(func() {
		// Shutdown stops accepting; hijacked WebSocket connections are
		// ours to close, which closeClients does with a DISCONNECT.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = l.srv.Shutdown(ctx)
		closeClients(l.id)
	})
}

// wsConn presents a WebSocket as a byte stream: MQTT packets may span
// frames and frames may hold several packets [MQTT-6.0.0-2, -3].
type wsConn struct {
	net.Conn
	ws *websocket.Conn
	r  io.Reader
	wm sync.Mutex
}

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			op, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, errors.New("websocket: MQTT needs binary frames") // [MQTT-6.0.0-1]
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.wm.Lock()
	defer c.wm.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) Close() error { return c.ws.Close() }

// expectedClose reports errors that mean only "the client went away".
func expectedClose(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrUnexpectedEOF) ||
		websocket.IsCloseError(err, websocket.CloseNormalClosure, websocket.CloseGoingAway, websocket.CloseNoStatusReceived)
}

func listen(addr string, tlsConf *tls.Config) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	if tlsConf != nil {
		ln = tls.NewListener(ln, tlsConf)
	}
	return ln, nil
}

var (
	_ listeners.Listener = (*streamListener)(nil)
	_ listeners.Listener = (*wsListener)(nil)
)
