package pushapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/oklog/ulid/v2"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/pushapi"
)

func TestMain(m *testing.M) { storetest.Main(m) }

const (
	testSecret = "test secret"
	tokenKey   = "test-token-key-0123456789"
	apiKey     = "test-api-key-0123456789"
	apiKey2    = "second-api-key-9876543210"
	waitCond   = 10 * time.Second * raceScale // a state gossip or the store should reach
	waitMsg    = 5 * time.Second * raceScale  // a message in flight
)

// startBroker starts a broker in this process on loopback ports picked by
// the kernel, joined to seed ("" starts a new cluster) with test gossip
// timers, recording devices in st, and stops it when the test ends.
func startBroker(t testing.TB, name, seed string, st *store.Store, mutate func(*broker.Options)) *broker.Broker {
	t.Helper()
	return testcluster.Broker(t, name, seed, func(o *broker.Options) {
		o.Auth.TokenKeys, o.Store = tokenKey, st
		if mutate != nil {
			mutate(o)
		}
	})
}

// startCluster starts n brokers named b0, b1, ... joined to the first, and
// waits until their node links are up.
func startCluster(t testing.TB, n int, st *store.Store) []*broker.Broker {
	t.Helper()
	var bs []*broker.Broker
	seed := ""
	for i := range n {
		b := startBroker(t, fmt.Sprintf("b%d", i), seed, st, nil)
		if seed == "" {
			seed = b.GossipAddr()
		}
		bs = append(bs, b)
	}
	testutil.WaitFor(t, waitCond, func() error {
		for _, b := range bs {
			up := 0
			for _, l := range b.Stats().Cluster.Links {
				if l.State == "up" {
					up++
				}
			}
			if up != n-1 {
				return fmt.Errorf("%s: %d of %d node links up", b.Name(), up, n-1)
			}
		}
		return nil
	})
	return bs
}

// testAPI is a push API under test and an HTTP client for it.
type testAPI struct {
	*pushapi.PushAPI
	t    testing.TB
	base string
	http *http.Client
	logs *testutil.LogBuffer
}

// in returns the push API's client bound to t, for use inside subtest t:
// FailNow must be called from the (sub)test that runs, not its parent.
func (a *testAPI) in(t testing.TB) *testAPI {
	c := *a
	c.t = t
	return &c
}

// startAPI starts a push API named api1 on loopback, joined to seed, on
// store st, and stops it when the test ends. mutate may change the options
// first.
func startAPI(t testing.TB, seed string, st *store.Store, mutate func(*pushapi.Options)) *testAPI {
	t.Helper()
	cfg := config.Defaults().PushAPI
	cfg.Name, cfg.Addr, cfg.APIKeys = "api1", "127.0.0.1:0", apiKey+","+apiKey2
	cc := config.Defaults().Cluster
	cc.GossipAddr, cc.Join, cc.Secret = "127.0.0.1:0", seed, testSecret
	_, logs := testutil.Logger(t)
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test_node", "api1")
	opts := pushapi.Options{Config: cfg, Auth: config.Auth{Devices: "token", TokenKeys: tokenKey, TokenTTL: time.Hour}, AdminKey: testcluster.AdminKey,
		Cluster: cc, GossipTiming: cluster.TimingFast, Store: st, Version: "test", Logger: log}
	if mutate != nil {
		mutate(&opts)
	}
	p, err := pushapi.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("push API shutdown: %v", err)
		}
		logs.Stop()
	})
	return &testAPI{PushAPI: p, t: t, base: "http://" + p.Addr(), logs: logs,
		http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// waitBroker waits until the push API is connected to a broker, and
// returns its name.
func (a *testAPI) waitBroker() string {
	a.t.Helper()
	testutil.WaitFor(a.t, waitCond, func() error {
		if a.Broker() == "" {
			return fmt.Errorf("push API not connected to a broker")
		}
		return nil
	})
	return a.Broker()
}

// response is an HTTP answer.
type response struct {
	status int
	header http.Header
	body   []byte
}

// decode decodes the answer's JSON body into v, failing the test if it is
// not JSON.
func (r response) decode(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("status %d: body %q is not the JSON expected: %v", r.status, r.body, err)
	}
}

// apiError decodes the answer as an error body.
func (r response) apiError(t testing.TB) pushapi.Error {
	t.Helper()
	var e struct {
		Error *pushapi.Error `json:"error"`
	}
	r.decode(t, &e)
	if e.Error == nil || e.Error.Code == "" || e.Error.Message == "" {
		t.Fatalf("status %d: body %s is not an error body {error: {code, message}}", r.status, r.body)
	}
	return *e.Error
}

func (r response) String() string { return fmt.Sprintf("%d %s", r.status, bytes.TrimSpace(r.body)) }

// raw sends a request with the given body (a string or []byte as is,
// anything else as JSON, nil for none) and headers; key "" sends no
// Authorization header.
func (a *testAPI) raw(method, path, key string, body any, header http.Header) response {
	a.t.Helper()
	r, err := a.send(method, path, key, body, header)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	return r
}

// send is raw without the testing.TB, for any goroutine.
func (a *testAPI) send(method, path, key string, body any, header http.Header) (response, error) {
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return response{}, err
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, a.base+path, rd)
	if err != nil {
		return response{}, err
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	res, err := a.http.Do(req)
	if err != nil {
		return response{}, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return response{}, err
	}
	return response{status: res.StatusCode, header: res.Header, body: b}, nil
}

// do sends an authenticated request.
func (a *testAPI) do(method, path string, body any) response {
	a.t.Helper()
	return a.raw(method, path, apiKey, body, nil)
}

// expect sends an authenticated request, fails the test unless the status
// is want, and decodes the answer into out (if not nil).
func (a *testAPI) expect(method, path string, body any, want int, out any) response {
	a.t.Helper()
	r := a.do(method, path, body)
	if r.status != want {
		a.t.Fatalf("%s %s: %s, want status %d", method, path, r, want)
	}
	if out != nil {
		r.decode(a.t, out)
	}
	return r
}

// expectError sends an authenticated request and fails the test unless it
// gets the error status and code.
func (a *testAPI) expectError(method, path string, body any, status int, code string) pushapi.Error {
	a.t.Helper()
	r := a.do(method, path, body)
	if r.status != status {
		a.t.Fatalf("%s %s: %s, want %d %s", method, path, r, status, code)
	}
	e := r.apiError(a.t)
	if e.Code != code {
		a.t.Fatalf("%s %s: %s, want code %s", method, path, r, code)
	}
	return e
}

// publish POSTs a message to /v1/messages and fails the test unless it is
// published.
func (a *testAPI) publish(msg map[string]any) pushapi.Published {
	a.t.Helper()
	var p pushapi.Published
	a.expect(http.MethodPost, "/v1/messages", msg, http.StatusOK, &p)
	return p
}

// device returns GET /v1/devices/{id}, or the status if it is not 200.
func (a *testAPI) device(id string) (pushapi.Device, response) {
	a.t.Helper()
	var d pushapi.Device
	r := a.do(http.MethodGet, "/v1/devices/"+id, nil)
	if r.status == http.StatusOK {
		r.decode(a.t, &d)
	}
	return d, r
}

// waitPresence waits until GET /v1/devices/{id} says online (on node, if
// not "").
func (a *testAPI) waitPresence(id string, online bool, node string) pushapi.Device {
	a.t.Helper()
	var d pushapi.Device
	testutil.WaitFor(a.t, waitCond, func() error {
		var r response
		d, r = a.device(id)
		if r.status != http.StatusOK {
			return fmt.Errorf("GET /v1/devices/%s: %s, want 200 with online=%t (the broker records presence)", id, r, online)
		}
		if d.Online != online || (node != "" && (d.Node == nil || *d.Node != node)) {
			return fmt.Errorf("device %s: online=%t node=%v, want online=%t node=%q", id, d.Online, strp(d.Node), online, node)
		}
		return nil
	})
	return d
}

func strp(s *string) string {
	if s == nil {
		return "<null>"
	}
	return *s
}

// messageID returns the rtm-message-id user property of m.
func messageID(m *paho.Publish) string {
	if m.Properties == nil {
		return ""
	}
	return m.Properties.User.Get("rtm-message-id")
}

// nextOn waits for the next message of c on topic, skipping others.
func nextOn(t testing.TB, c *testutil.V5, topic string) *paho.Publish {
	t.Helper()
	deadline := time.After(waitMsg)
	for {
		select {
		case m := <-c.Messages:
			if m.Topic == topic {
				return m
			}
		case <-deadline:
			t.Fatalf("client %s: no message on %s within %v", c.ClientID(), topic, waitMsg)
			return nil
		}
	}
}

// other returns the broker of bs not called name.
func other(bs []*broker.Broker, name string) *broker.Broker {
	for _, b := range bs {
		if b.Name() != name {
			return b
		}
	}
	return nil
}

// byName returns the broker of bs called name.
func byName(bs []*broker.Broker, name string) *broker.Broker {
	for _, b := range bs {
		if b.Name() == name {
			return b
		}
	}
	return nil
}

// waitRoutes waits until broker b knows that a client on peer subscribes
// to something (its routes of peer reach n).
func waitRoutes(t testing.TB, b *broker.Broker, peer string, n int) {
	t.Helper()
	testutil.WaitFor(t, waitCond, func() error {
		if got := b.Stats().Cluster.RemoteRoutes[peer]; got < n {
			return fmt.Errorf("%s holds %d routes of %s, want %d", b.Name(), got, peer, n)
		}
		return nil
	})
}

func ptr[T any](v T) *T { return &v }

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// seedHistory stores one message per payload on topic, as a broker's
// history capture would, oldest first.
func seedHistory(t testing.TB, st *store.Store, topic string, payloads ...[]byte) []store.HistoryMessage {
	t.Helper()
	var msgs []store.HistoryMessage
	for _, p := range payloads {
		now := time.Now().UTC().Truncate(time.Millisecond)
		msgs = append(msgs, store.HistoryMessage{ID: ulid.Make().String(), Topic: topic, Payload: p, QoS: 1,
			Publisher: "seed", Node: "n1", Time: now, User: []store.UserProperty{{Key: "k", Value: "v"}}})
	}
	if err := st.InsertHistory(context.Background(), msgs); err != nil {
		t.Fatal(err)
	}
	return msgs
}
