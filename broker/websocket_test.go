package broker_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt3 "github.com/eclipse/paho.mqtt.golang"
	"github.com/gorilla/websocket"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// wsNetConn presents a client WebSocket as the byte stream an MQTT client
// library expects.
type wsNetConn struct {
	*websocket.Conn
	r  io.Reader
	wm sync.Mutex
}

func (c *wsNetConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			op, r, err := c.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, errors.New("broker sent a non-binary WebSocket frame") // [MQTT-6.0.0-1]
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r, err = nil, nil
			if n == 0 {
				continue
			}
		}
		return n, err
	}
}

func (c *wsNetConn) Write(p []byte) (int, error) {
	c.wm.Lock()
	defer c.wm.Unlock()
	if err := c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsNetConn) SetDeadline(t time.Time) error {
	return errors.Join(c.SetReadDeadline(t), c.SetWriteDeadline(t))
}

// dialWSV5 connects an MQTT 5 client over WebSocket.
func dialWSV5(t testing.TB, url, id string, tlsConf *tls.Config) *testutil.V5 {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, TLSClientConfig: tlsConf, HandshakeTimeout: waitMsg}
	ws, resp, err := d.Dial(url, nil)
	if err != nil {
		t.Fatalf("websocket dial %s: %v", url, err)
	}
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "mqtt" {
		t.Errorf("websocket subprotocol %q, want mqtt [MQTT-6.0.0-4]", got)
	}
	c, _, err := testutil.ConnectV5(t, &wsNetConn{Conn: ws}, &paho.Connect{ClientID: id, CleanStart: true})
	if err != nil {
		t.Fatalf("v5 connect over %s: %v", url, err)
	}
	return c
}

// exchange has every client publish to every other one, so each transport
// is checked in both directions; payloads are large enough to span many
// WebSocket frames and TLS records.
func exchange(t *testing.T, clients map[string]client) {
	t.Helper()
	for name, c := range clients {
		c.sub(t, "x/"+name, 1)
	}
	for from, pub := range clients {
		for to, sub := range clients {
			if from == to {
				continue
			}
			payload := binaryPayload(from + "->" + to)
			for len(payload) < 100<<10 {
				payload = append(payload, payload...)
			}
			pub.pub(t, "x/"+to, 1, false, payload)
			if m := expectNext(t, sub, "x/"+to, payload); m.qos != 1 {
				t.Errorf("%s -> %s: QoS %d, want 1", from, to, m.qos)
			}
		}
	}
}

// TestWebSocket: clients on ws://ADDR/mqtt (v3.1.1 paho.mqtt.golang and v5
// paho.golang over gorilla/websocket) exchange messages with TCP clients.
func TestWebSocket(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	tcp, ws := b.Addr(broker.ListenerTCP), b.Addr(broker.ListenerWS)
	wsV3, _, _, err := dialV3(t, "ws://"+ws+"/mqtt", "ws-v3", nil)
	if err != nil {
		t.Fatalf("v3 over ws://%s/mqtt: %v", ws, err)
	}
	exchange(t, map[string]client{
		"ws-v3":  v3{wsV3},
		"ws-v5":  v5{dialWSV5(t, "ws://"+ws+"/mqtt", "ws-v5", nil)},
		"tcp-v5": newClient(t, "v5", tcp, "tcp-v5"),
		"tcp-v3": newClient(t, "v3", tcp, "tcp-v3"),
	})
}

// TestWebSocketWrongPath: only /mqtt serves MQTT; any other path is an HTTP
// 404, WebSocket upgrade or not.
func TestWebSocketWrongPath(t *testing.T) {
	t.Parallel()
	b, _ := startBroker(t, nil)
	ws := b.Addr(broker.ListenerWS)
	for _, path := range []string{"/", "/other", "/mqtt/x", "/MQTT"} {
		resp, err := http.Get("http://" + ws + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: HTTP %d, want 404", path, resp.StatusCode)
		}
		d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: waitMsg}
		conn, resp, err := d.Dial("ws://"+ws+path, nil)
		if err == nil {
			conn.Close()
			t.Errorf("WebSocket upgrade on %s accepted", path)
			continue
		}
		if resp == nil || resp.StatusCode != http.StatusNotFound {
			t.Errorf("WebSocket upgrade on %s: %v, want HTTP 404", path, err)
		}
	}
	// /mqtt itself answers a plain GET with an error, not a hang.
	resp, err := http.Get("http://" + ws + "/mqtt")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("GET /mqtt without upgrade: HTTP %d, want 400", resp.StatusCode)
	}
}

// TestTLS: with broker.tls_cert/tls_key set, clients reach the broker over
// tls:// and wss://ADDR/mqtt with a certificate they verify, and exchange
// messages with plain TCP clients; a client that does not trust the
// certificate, or speaks plain MQTT to the TLS port, gets no session.
func TestTLS(t *testing.T) {
	t.Parallel()
	certFile, keyFile, pool := testutil.SelfSignedCert(t)
	b, _ := startBroker(t, func(c *config.Broker) { c.TLSCert, c.TLSKey = certFile, keyFile })
	tcp, tlsAddr, wss := b.Addr(broker.ListenerTCP), b.Addr(broker.ListenerTLS), b.Addr(broker.ListenerWSS)
	if tlsAddr == "" || wss == "" {
		t.Fatalf("listeners %v: no tls or wss listener", b.Stats().Listeners)
	}
	trusting := func(o *mqtt3.ClientOptions) { o.SetTLSConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}) }

	tlsV3, _, _, err := dialV3(t, "tls://"+tlsAddr, "tls-v3", trusting)
	if err != nil {
		t.Fatalf("v3 over tls://%s: %v", tlsAddr, err)
	}
	wssV3, _, _, err := dialV3(t, "wss://"+wss+"/mqtt", "wss-v3", trusting)
	if err != nil {
		t.Fatalf("v3 over wss://%s/mqtt: %v", wss, err)
	}
	conn, err := tls.Dial("tcp", tlsAddr, &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	tlsV5, _, err := testutil.ConnectV5(t, conn, &paho.Connect{ClientID: "tls-v5", CleanStart: true})
	if err != nil {
		t.Fatalf("v5 over TLS: %v", err)
	}
	exchange(t, map[string]client{
		"tls-v3": v3{tlsV3},
		"wss-v3": v3{wssV3},
		"tls-v5": v5{tlsV5},
		"wss-v5": v5{dialWSV5(t, "wss://"+wss+"/mqtt", "wss-v5", &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})},
		"tcp-v5": newClient(t, "v5", tcp, "tcp-v5"),
	})

	t.Run("untrusted", func(t *testing.T) {
		_, _, _, err := dialV3(t, "tls://"+tlsAddr, "untrusted", func(o *mqtt3.ClientOptions) {
			o.SetTLSConfig(&tls.Config{RootCAs: x509.NewCertPool(), MinVersion: tls.VersionTLS12})
		})
		if err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Errorf("client without the CA: %v, want a certificate error", err)
		}
	})
	t.Run("plaintext", func(t *testing.T) {
		c, err := net.DialTimeout("tcp", tlsAddr, waitMsg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _, err = testutil.ConnectV5(t, c, &paho.Connect{ClientID: "plaintext", CleanStart: true})
		if err == nil {
			t.Error("plain MQTT CONNECT on the TLS port accepted")
		}
	})
}
