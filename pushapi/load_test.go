package pushapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/store/storetest"
)

// TestLoad measures the push API's publish path against a direct MQTT client
// in the same run, on one in-process broker with a subscriber draining
// every message. It runs only when RTM_PUSHAPI_LOAD is set:
//
//	RTM_PUSHAPI_LOAD=1 go test -run TestLoad -v ./pushapi/
//
// RTM_PUSHAPI_LOAD_DURATION (default 5s) is the length of each run,
// RTM_PUSHAPI_LOAD_CONCURRENCY (default 32) the requests (or MQTT
// publishes) in flight, which bounds the load. Runs, each QoS 1 with 64-byte
// payloads:
//
//   - rest: POST /v1/messages, one request per worker at a time on
//     keep-alive connections; each answer waits for the broker's PUBACK;
//   - batch: POST /v1/messages/batch with 100 messages per request;
//   - mqtt: a paho.golang MQTT 5 client publishing to the same broker, each
//     publish waiting for its PUBACK.
//
// It logs messages per second and the p50/p99/max latency of a request (a
// publish for mqtt) as the client sees it. Use a build without -race.
func TestLoad(t *testing.T) {
	if os.Getenv("RTM_PUSHAPI_LOAD") == "" {
		t.Skip("set RTM_PUSHAPI_LOAD=1 to measure")
	}
	duration := 5 * time.Second
	if v := os.Getenv("RTM_PUSHAPI_LOAD_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("RTM_PUSHAPI_LOAD_DURATION=%q: want a positive duration", v)
		}
		duration = d
	}
	concurrency := 32
	if v := os.Getenv("RTM_PUSHAPI_LOAD_CONCURRENCY"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1024 {
			t.Fatalf("RTM_PUSHAPI_LOAD_CONCURRENCY=%q: want 1-1024", v)
		}
		concurrency = n
	}
	const size, batch = 64, 100

	st := storetest.Open(t)
	b := startCluster(t, 1, st)[0]
	api := startAPI(t, b.GossipAddr(), st, nil)
	api.waitBroker()

	var received atomic.Int64
	sink := loadClient(t, b.Addr(broker.ListenerTCP), "sink", func(paho.PublishReceived) (bool, error) {
		received.Add(1)
		return true, nil
	})
	if _, err := sink.Subscribe(context.Background(), &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "load/#", QoS: 0}}}); err != nil {
		t.Fatal(err)
	}

	tr := &http.Transport{MaxIdleConnsPerHost: concurrency * 2, MaxConnsPerHost: concurrency * 2}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	post := func(path string, body []byte) error {
		req, err := http.NewRequest(http.MethodPost, api.base+path, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+apiKey)
		res, err := client.Do(req)
		if err != nil {
			return err
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		if res.StatusCode != http.StatusOK || bytes.Contains(b, []byte(`"error"`)) {
			return fmt.Errorf("status %d: %.200s", res.StatusCode, b)
		}
		return nil
	}
	payload := strings.Repeat("x", size)
	one, _ := json.Marshal(map[string]any{"topic": "load/rest", "payload": payload, "qos": 1})
	msgs := make([]map[string]any, batch)
	for i := range msgs {
		msgs[i] = map[string]any{"topic": "load/batch", "payload": payload, "qos": 1}
	}
	many, _ := json.Marshal(map[string]any{"messages": msgs})
	pub := loadClient(t, b.Addr(broker.ListenerTCP), "direct", nil)

	lines := []string{fmt.Sprintf("push API load: 1 broker, embedded store, payload %d B, QoS 1, concurrency %d, %v per run, GOMAXPROCS %d",
		size, concurrency, duration, runtime.GOMAXPROCS(0)),
		fmt.Sprintf("%-26s %12s %10s %10s %10s %7s", "run", "messages/s", "p50", "p99", "max", "errors")}
	for _, run := range []struct {
		name  string
		perOp int
		op    func() error
	}{
		{"rest POST /v1/messages", 1, func() error { return post("/v1/messages", one) }},
		{fmt.Sprintf("rest batch of %d", batch), batch, func() error { return post("/v1/messages/batch", many) }},
		{"mqtt publish (paho)", 1, func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := pub.Publish(ctx, &paho.Publish{Topic: "load/mqtt", QoS: 1, Payload: []byte(payload)})
			return err
		}},
	} {
		lines = append(lines, measure(duration, concurrency, run.perOp, run.op).line(run.name))
	}
	lines = append(lines, fmt.Sprintf("subscriber received %d messages", received.Load()))
	t.Log("\n" + strings.Join(lines, "\n"))
}

// loadResult is one measurement.
type loadResult struct {
	messages, errors int
	elapsed          time.Duration
	latencies        []time.Duration
}

func (r loadResult) line(name string) string {
	slices.Sort(r.latencies)
	q := func(p float64) time.Duration {
		if len(r.latencies) == 0 {
			return 0
		}
		return r.latencies[min(len(r.latencies)-1, int(p*float64(len(r.latencies))))].Round(time.Microsecond)
	}
	return fmt.Sprintf("%-26s %12.0f %10v %10v %10v %7d", name, float64(r.messages)/r.elapsed.Seconds(), q(0.5), q(0.99), q(1), r.errors)
}

// measure runs op from concurrency goroutines for d; each successful op
// counts perOp messages.
func measure(d time.Duration, concurrency, perOp int, op func() error) loadResult {
	var (
		mu  sync.Mutex
		all loadResult
		wg  sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(d)
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine loadResult
			for time.Now().Before(end) {
				t := time.Now()
				if err := op(); err != nil {
					mine.errors++
					continue
				}
				mine.latencies = append(mine.latencies, time.Since(t))
				mine.messages += perOp
			}
			mu.Lock()
			all.messages += mine.messages
			all.errors += mine.errors
			all.latencies = append(all.latencies, mine.latencies...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	all.elapsed = time.Since(start)
	return all
}

// loadClient connects a plain paho MQTT 5 client (testutil.V5 queues every
// message, which a load run would fill).
func loadClient(t testing.TB, addr, id string, onPublish func(paho.PublishReceived) (bool, error)) *paho.Client {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	cfg := paho.ClientConfig{ClientID: id, Conn: conn}
	if onPublish != nil {
		cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){onPublish}
	}
	c := paho.NewClient(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	return c
}
