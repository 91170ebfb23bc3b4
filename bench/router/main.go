// Command router measures how fast rtm's router answers and how evenly it
// spreads devices: it starts -brokers idle brokers and one router in this
// process (loopback, ports picked by the kernel, gossip with test timers),
// then -concurrency goroutines ask GET /v1/route over keep-alive HTTP for
// -duration, and it prints decisions per second, p50/p99/max latency as the
// client sees it, and the answers per broker.
//
//	go run ./bench/router [-brokers 3] [-duration 10s] [-concurrency 16]
//
// The devices never connect, so each broker's count of assignments is reset
// by its next load report (every 5 s when idle): the spread shows the
// router's counting between reports, not a steady state. The run is bounded
// (-duration plus 60 s of setup and teardown at most) and stops itself;
// Ctrl-C ends it early.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/router"
)

const secret = "bench secret"

func main() {
	brokers := flag.Int("brokers", 3, "brokers to start")
	duration := flag.Duration("duration", 10*time.Second, "how long to send route requests")
	concurrency := flag.Int("concurrency", 16, "goroutines sending requests, each on its own keep-alive connection")
	flag.Parse()
	if *brokers < 1 || *duration <= 0 || *concurrency < 1 {
		fmt.Fprintln(os.Stderr, "router: -brokers, -duration and -concurrency must be positive")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *duration+60*time.Second)
	defer cancel()
	if err := run(ctx, *brokers, *duration, *concurrency); err != nil {
		fmt.Fprintln(os.Stderr, "router:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, n int, duration time.Duration, concurrency int) error {
	var stops []func(context.Context) error
	defer func() {
		// Router first, then the brokers, each bounded.
		for _, stop := range slices.Backward(stops) {
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := stop(sctx); err != nil {
				fmt.Fprintln(os.Stderr, "shutdown:", err)
			}
			cancel()
		}
	}()

	fmt.Fprintf(os.Stderr, "starting %d brokers and a router\n", n)
	seed := ""
	for i := range n {
		cfg := config.Defaults().Broker
		cfg.NodeName = fmt.Sprintf("b%d", i)
		cfg.MQTTAddr, cfg.WSAddr, cfg.AdminAddr = "127.0.0.1:0", "", "127.0.0.1:0"
		cfg.Capacity = 10_000_000 // the devices never connect: only assignments count
		cc := config.Defaults().Cluster
		cc.GossipAddr, cc.LinkAddr, cc.Join, cc.Secret = "127.0.0.1:0", "127.0.0.1:0", seed, secret
		auth := config.Defaults().Auth
		auth.Devices = "anonymous"
		b, err := broker.New(broker.Options{Config: cfg, Cluster: cc, GossipTiming: cluster.TimingFast,
			Auth: auth, Logger: obs.Discard(), Version: "bench"})
		if err != nil {
			return err
		}
		if err := b.Start(ctx); err != nil {
			return err
		}
		stops = append(stops, b.Shutdown)
		if seed == "" {
			seed = b.Stats().Cluster.Gossip
		}
	}
	rcfg := config.Defaults().Router
	rcfg.Name, rcfg.Addr = "router", "127.0.0.1:0"
	cc := config.Defaults().Cluster
	cc.GossipAddr, cc.Join, cc.Secret = "127.0.0.1:0", seed, secret
	r, err := router.New(router.Options{Config: rcfg, Cluster: cc, GossipTiming: cluster.TimingFast, Version: "bench"})
	if err != nil {
		return err
	}
	if err := r.Start(ctx); err != nil {
		return err
	}
	stops = append(stops, r.Shutdown)
	if err := waitBrokers(ctx, r, n); err != nil {
		return err
	}

	fmt.Fprintf(os.Stderr, "sending route requests from %d goroutines for %v\n", concurrency, duration)
	res := hammer(ctx, "http://"+r.Addr()+"/v1/route?transport=tcp", duration, concurrency)
	res.print(n, concurrency)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return nil
}

// waitBrokers waits until the router sees n alive brokers.
func waitBrokers(ctx context.Context, r *router.Router, n int) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		alive := 0
		for _, b := range r.Nodes() {
			if b.Status == "alive" {
				alive++
			}
		}
		if alive == n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("router sees %d of %d brokers: %w", alive, n, ctx.Err())
		case <-tick.C:
		}
	}
}

type result struct {
	elapsed   time.Duration
	latencies []time.Duration // of the 200 answers
	byNode    map[string]int
	byStatus  map[int]int
	errors    int
	firstErr  error
}

// hammer sends GET url from concurrency goroutines until duration passes.
func hammer(ctx context.Context, url string, duration time.Duration, concurrency int) result {
	tr := &http.Transport{MaxIdleConnsPerHost: concurrency, MaxConnsPerHost: concurrency}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	ctx, cancel := context.WithTimeout(ctx, duration)
	defer cancel()

	res := result{byNode: map[string]int{}, byStatus: map[int]int{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Go(func() {
			lat := make([]time.Duration, 0, 1<<16)
			byNode, byStatus := map[string]int{}, map[int]int{}
			errs := 0
			var firstErr error
			for ctx.Err() == nil {
				t0 := time.Now()
				node, status, err := ask(ctx, client, url)
				d := time.Since(t0)
				switch {
				case err != nil && ctx.Err() != nil:
					// cut off by the end of the run
				case err != nil:
					errs++
					if firstErr == nil {
						firstErr = err
					}
				case status == http.StatusOK:
					lat = append(lat, d)
					byNode[node]++
					byStatus[status]++
				default:
					byStatus[status]++
				}
			}
			mu.Lock()
			defer mu.Unlock()
			res.latencies = append(res.latencies, lat...)
			for k, v := range byNode {
				res.byNode[k] += v
			}
			for k, v := range byStatus {
				res.byStatus[k] += v
			}
			res.errors += errs
			if res.firstErr == nil {
				res.firstErr = firstErr
			}
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

func ask(ctx context.Context, client *http.Client, url string) (node string, status int, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", 0, err
	}
	res, err := client.Do(req)
	if err != nil {
		return "", 0, err
	}
	defer res.Body.Close()
	var rt router.Route
	if err := json.NewDecoder(res.Body).Decode(&rt); err != nil {
		return "", res.StatusCode, err
	}
	if res.StatusCode == http.StatusOK && rt.Node == "" {
		return "", res.StatusCode, errors.New("200 without a node")
	}
	return rt.Node, res.StatusCode, nil
}

func (r result) print(brokers, concurrency int) {
	ok := len(r.latencies)
	fmt.Printf("router: %d brokers, %d goroutines, %v\n", brokers, concurrency, r.elapsed.Round(time.Millisecond))
	fmt.Printf("  decisions:  %d (%.0f/s)\n", ok, float64(ok)/r.elapsed.Seconds())
	var other []string
	for s, c := range r.byStatus {
		if s != http.StatusOK {
			other = append(other, fmt.Sprintf("%d: %d", s, c))
		}
	}
	if len(other) > 0 || r.errors > 0 {
		sort.Strings(other)
		fmt.Printf("  not 200:    %v, transport errors %d (first: %v)\n", other, r.errors, r.firstErr)
	}
	if ok == 0 {
		return
	}
	slices.Sort(r.latencies)
	q := func(p float64) time.Duration { return r.latencies[min(ok-1, int(p*float64(ok)))] }
	fmt.Printf("  latency:    p50 %v  p99 %v  max %v\n", q(0.50), q(0.99), r.latencies[ok-1])
	fmt.Printf("  per broker:")
	names := make([]string, 0, len(r.byNode))
	for name := range r.byNode {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Printf("  %s %d (%.1f%%)", name, r.byNode[name], 100*float64(r.byNode[name])/float64(ok))
	}
	fmt.Println()
}
