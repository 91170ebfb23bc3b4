// Command pushapi measures the push API's publish path against a direct
// MQTT client in the same run: one broker, the push API and the embedded
// store in this process, on loopback, with a subscriber draining every
// message.
//
//	go run ./bench/pushapi [-duration 5s] [-concurrency 32]
//
// Runs, each QoS 1 with 64-byte payloads, each bounded by -concurrency
// requests (or publishes) in flight and lasting -duration:
//
//   - rest: POST /v1/messages on keep-alive connections; each answer waits
//     for the broker's PUBACK;
//   - batch: POST /v1/messages/batch with 100 messages per request;
//   - mqtt: a paho.golang MQTT 5 client publishing to the same broker, each
//     publish waiting for its PUBACK.
//
// It prints messages per second and the p50/p99/max latency of a request
// (a publish, for mqtt) as the client sees it.
//
// With -device-reads N it then sends N concurrent GET /v1/devices/{id} (at
// once, over up to 8,000 client connections: the file descriptors of both
// ends live in this process) for 1,000 devices with presence records, and
// prints how many answered 200, the others by status and code, and the
// p50/p99/max latency.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/pushapi"
)

const (
	size     = 64  // payload bytes
	batch    = 100 // messages per batch request
	apiKey   = "bench-api-key-0123456789"
	secret   = "bench secret"
	tokKey   = "bench-token-key-0123456789"
	adminKey = "bench-admin-key-0123456789"
)

func main() {
	duration := flag.Duration("duration", 5*time.Second, "length of each run")
	concurrency := flag.Int("concurrency", 32, "requests (or MQTT publishes) in flight")
	deviceReads := flag.Int("device-reads", 0, "then send this many concurrent GET /v1/devices/{id} (0: none)")
	flag.Parse()
	if *duration <= 0 || *concurrency < 1 || *concurrency > 1024 {
		fmt.Fprintln(os.Stderr, "pushapi: -duration must be positive, -concurrency 1-1024")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 3**duration+2*time.Minute)
	defer cancel()
	if *deviceReads < 0 || *deviceReads > 100000 {
		fmt.Fprintln(os.Stderr, "pushapi: -device-reads 0-100000")
		os.Exit(2)
	}
	if err := run(ctx, *duration, *concurrency, *deviceReads); err != nil {
		fmt.Fprintln(os.Stderr, "pushapi:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, duration time.Duration, concurrency, deviceReads int) error {
	var stops []func(context.Context) error
	defer func() {
		for _, stop := range slices.Backward(stops) {
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := stop(sctx); err != nil {
				fmt.Fprintln(os.Stderr, "shutdown:", err)
			}
			cancel()
		}
	}()
	dir, err := os.MkdirTemp("", "rtm-bench-pushapi-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	benchkit.Logf("starting the embedded store, a broker and the push API")
	st, err := store.Open(ctx, store.Options{Database: "bench", DataDir: dir})
	if err != nil {
		return err
	}
	stops = append(stops, st.Close)
	auth := config.Auth{Devices: "anonymous", TokenKeys: tokKey, TokenTTL: time.Hour}
	cfg := config.Defaults().Broker
	cfg.NodeName, cfg.MQTTAddr, cfg.WSAddr, cfg.AdminAddr = "b0", "127.0.0.1:0", "", "127.0.0.1:0"
	cfg.AdminKeys = adminKey
	cc := config.Defaults().Cluster
	cc.GossipAddr, cc.LinkAddr, cc.Secret = "127.0.0.1:0", "127.0.0.1:0", secret
	b, err := broker.New(broker.Options{Config: cfg, Cluster: cc, GossipTiming: cluster.TimingFast, Auth: auth,
		Store: st, Logger: obs.Discard(), Version: "bench"})
	if err != nil {
		return err
	}
	if err := b.Start(ctx); err != nil {
		return err
	}
	stops = append(stops, b.Shutdown)
	pcfg := config.Defaults().PushAPI
	pcfg.Name, pcfg.Addr, pcfg.APIKeys = "pushapi", "127.0.0.1:0", apiKey
	pcc := config.Defaults().Cluster
	pcc.GossipAddr, pcc.Join, pcc.Secret = "127.0.0.1:0", b.GossipAddr(), secret
	p, err := pushapi.New(pushapi.Options{Config: pcfg, Auth: auth, AdminKey: adminKey, Cluster: pcc, GossipTiming: cluster.TimingFast,
		Store: st, Logger: obs.Discard(), Version: "bench"})
	if err != nil {
		return err
	}
	if err := p.Start(ctx); err != nil {
		return err
	}
	stops = append(stops, p.Shutdown)
	if err := waitReady(ctx, p); err != nil {
		return err
	}

	mqttAddr := b.Addr(broker.ListenerTCP)
	var received atomic.Int64
	sink, _, err := benchkit.Dial(ctx, mqttAddr, benchkit.Options{ID: "sink", OnPublish: func(*paho.Publish) { received.Add(1) }})
	if err != nil {
		return err
	}
	defer benchkit.HangUp(sink)
	if err := benchkit.Subscribe(ctx, sink, "load/#", 0); err != nil {
		return err
	}
	pub, _, err := benchkit.Dial(ctx, mqttAddr, benchkit.Options{ID: "direct", ReceiveMax: 16})
	if err != nil {
		return err
	}
	defer benchkit.HangUp(pub)

	tr := &http.Transport{MaxIdleConnsPerHost: concurrency * 2, MaxConnsPerHost: concurrency * 2}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	base := "http://" + p.Addr()
	post := func(path string, body []byte) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(body))
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

	fmt.Printf("push API load: 1 broker, embedded store, payload %d B, QoS 1, concurrency %d, %v per run, GOMAXPROCS %d, load average %s\n",
		size, concurrency, duration, runtime.GOMAXPROCS(0), benchkit.Loadavg())
	fmt.Printf("%-26s %12s %10s %10s %10s %7s\n", "run", "messages/s", "p50", "p99", "max", "errors")
	for _, r := range []struct {
		name  string
		perOp int
		op    func() error
	}{
		{"rest POST /v1/messages", 1, func() error { return post("/v1/messages", one) }},
		{fmt.Sprintf("rest batch of %d", batch), batch, func() error { return post("/v1/messages/batch", many) }},
		{"mqtt publish (paho)", 1, func() error {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			_, err := pub.Publish(pctx, &paho.Publish{Topic: "load/mqtt", QoS: 1, Payload: []byte(payload)})
			return err
		}},
	} {
		benchkit.Logf("run: %s", r.name)
		fmt.Println(measure(duration, concurrency, r.perOp, r.op).line(r.name))
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	fmt.Printf("subscriber received %d messages\n", received.Load())
	if deviceReads > 0 {
		return readDevices(ctx, st, base, deviceReads)
	}
	return nil
}

// readDevices sends n concurrent GET /v1/devices/{id} and prints the
// outcome.
func readDevices(ctx context.Context, st *store.Store, base string, n int) error {
	const devices = 1000
	var ups []store.PresenceUpdate
	for i := range devices {
		ups = append(ups, store.PresenceUpdate{ClientID: fmt.Sprintf("dev-%d", i), Online: true, Node: "b0", Conn: "bench", At: time.Now()})
	}
	if err := st.WritePresence(ctx, ups); err != nil {
		return err
	}
	conns := min(n, 8000)
	tr := &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 2 * time.Minute}
	var (
		mu        sync.Mutex
		wg        sync.WaitGroup
		outcomes  = map[string]int{}
		latencies []time.Duration
	)
	benchkit.Logf("run: %d concurrent GET /v1/devices/{id}", n)
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			t := time.Now()
			outcome := ""
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/v1/devices/dev-%d", base, i%devices), nil)
			req.Header.Set("Authorization", "Bearer "+apiKey)
			res, err := client.Do(req)
			if err != nil {
				outcome = "transport error"
			} else {
				var e struct{ Error struct{ Code string } }
				_ = json.NewDecoder(res.Body).Decode(&e)
				res.Body.Close()
				outcome = strings.TrimSpace(fmt.Sprintf("%d %s", res.StatusCode, e.Error.Code))
			}
			took := time.Since(t)
			mu.Lock()
			outcomes[outcome]++
			latencies = append(latencies, took)
			mu.Unlock()
		})
	}
	wg.Wait()
	wall := time.Since(start)
	slices.Sort(latencies)
	q := func(p float64) time.Duration {
		return latencies[min(len(latencies)-1, int(p*float64(len(latencies))))].Round(time.Millisecond)
	}
	fmt.Printf("%d concurrent GET /v1/devices/{id} (%d client connections), load average %s: %d answered 200 (%.1f %%) in %v; p50 %v p99 %v max %v; by outcome %v\n",
		n, conns, benchkit.Loadavg(), outcomes["200"], 100*float64(outcomes["200"])/float64(n), wall.Round(time.Millisecond), q(0.5), q(0.99), q(1), outcomes)
	return nil
}

// waitReady waits until the push API is connected to the broker.
func waitReady(ctx context.Context, p *pushapi.PushAPI) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for p.Broker() == "" {
		select {
		case <-ctx.Done():
			return errors.New("the push API did not connect to the broker within 30s")
		case <-time.After(20 * time.Millisecond): // polling interval
		}
	}
	return nil
}

// result is one measurement.
type result struct {
	messages, errors int
	elapsed          time.Duration
	latencies        []time.Duration
}

func (r result) line(name string) string {
	slices.Sort(r.latencies)
	q := func(p float64) time.Duration {
		if len(r.latencies) == 0 {
			return 0
		}
		return r.latencies[min(len(r.latencies)-1, int(p*float64(len(r.latencies))))].Round(time.Microsecond)
	}
	return fmt.Sprintf("%-26s %12s %10v %10v %10v %7d", name, benchkit.Num(float64(r.messages)/r.elapsed.Seconds()), q(0.5), q(0.99), q(1), r.errors)
}

// measure runs op from concurrency goroutines for d; each successful op
// counts perOp messages.
func measure(d time.Duration, concurrency, perOp int, op func() error) result {
	var (
		mu  sync.Mutex
		all result
		wg  sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(d)
	for range concurrency {
		wg.Go(func() {
			var mine result
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
		})
	}
	wg.Wait()
	all.elapsed = time.Since(start)
	return all
}
