// Command cluster measures what a user pays for rtm's cluster: one
// publisher on node a and one subscriber on node b ("cross node"), against
// the same pair both on node a ("same node"), in one run, on the same two
// brokers: QoS 0 throughput, QoS 1 throughput, and QoS 1 latency at a
// fixed rate.
//
// It builds ./cmd/rtm from the working tree and starts, as child processes
// on loopback, one `rtm store` and two `rtm broker` nodes sharing it, b
// joining a. The placements alternate within each round (same node first
// in odd rounds, cross node first in even ones) so they share the
// machine's noise; the report gives medians over the rounds, the
// cross/same ratio of the medians and the latency cross-node forwarding
// adds, with every lost or dropped message and the link's counters.
//
// Run it from the repository root:
//
//	go run ./bench/cluster            # full run, about 3 minutes on 2 cores
//	go run ./bench/cluster -quick     # small sizes, 1 round: a smoke test
//
// The Markdown report goes to stdout, progress to stderr. Every run is
// bounded by -timeout; the children are stopped by PID (SIGTERM, then
// SIGKILL) and the temporary directory removed at the end, on error and on
// SIGINT/SIGTERM (a second Ctrl-C aborts at once).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

type config struct {
	params
	rounds      int
	warmup      bool
	rtmBin      string
	keep        bool
	maxQueued   int
	maxInflight int
	linkTLS     string
}

func parseFlags() (config, error) {
	var c config
	var quick bool
	flag.IntVar(&c.rounds, "rounds", 5, "rounds; each runs every scenario once in each placement")
	flag.BoolVar(&c.warmup, "warmup", true, "run every scenario in each placement once at a tenth of its size before measuring")
	flag.IntVar(&c.size, "size", 64, "payload bytes of every message (at least 16)")
	flag.IntVar(&c.msgs, "msgs", 100000, "QoS 0 throughput: messages")
	flag.IntVar(&c.qos1Msgs, "qos1-msgs", 50000, "QoS 1 throughput: messages")
	flag.IntVar(&c.window, "window", 100, "QoS 1 publishes in flight (throughput); senders in the latency scenario")
	flag.IntVar(&c.rate, "rate", 1000, "latency: QoS 1 messages per second")
	flag.DurationVar(&c.duration, "duration", 5*time.Second, "latency: how long to send")
	flag.DurationVar(&c.timeout, "timeout", 60*time.Second, "bound on one run of one scenario (latency: plus -duration)")
	flag.DurationVar(&c.idle, "idle", 3*time.Second, "a run ends as lossy after this long without a delivery once sending is done")
	flag.StringVar(&c.rtmBin, "rtm", "", "rtm binary; empty builds ./cmd/rtm of the working tree into the temporary directory")
	flag.IntVar(&c.maxQueued, "max-queued", 65535, "broker.max_queued of both nodes (RTM_BROKER_MAX_QUEUED); its default 1000 drops QoS 0 at the first burst")
	flag.IntVar(&c.maxInflight, "max-inflight", 65535, "broker.max_inflight of both nodes, their Receive Maximum (RTM_BROKER_MAX_INFLIGHT); its default 128 is near -window")
	flag.StringVar(&c.linkTLS, "link-tls", "auto", "cluster.link_tls of both nodes (RTM_CLUSTER_LINK_TLS): auto (TLS keyed by the cluster secret) or off (plaintext), to measure what link TLS costs")
	flag.BoolVar(&c.keep, "keep", false, "keep the temporary directory (store and broker logs)")
	flag.BoolVar(&quick, "quick", false, "small sizes, 1 round, no warm-up: a smoke test (under a minute)")
	flag.Parse()
	if quick {
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, v := range map[string]string{"rounds": "1", "warmup": "false", "msgs": "10000", "qos1-msgs": "5000", "duration": "1s"} {
			if !set[name] {
				_ = flag.Set(name, v)
			}
		}
	}
	var errs []error
	for _, f := range []struct {
		name string
		v    int
	}{{"rounds", c.rounds}, {"msgs", c.msgs}, {"qos1-msgs", c.qos1Msgs}, {"window", c.window}, {"rate", c.rate}} {
		if f.v < 1 {
			errs = append(errs, fmt.Errorf("-%s %d: want at least 1", f.name, f.v))
		}
	}
	if c.linkTLS != "auto" && c.linkTLS != "off" {
		errs = append(errs, fmt.Errorf("-link-tls %q: want auto or off", c.linkTLS))
	}
	if c.size < 16 || c.size > 1<<20 {
		errs = append(errs, fmt.Errorf("-size %d: want 16 to 1048576 (the payload carries a sequence number and a send time)", c.size))
	}
	if c.duration <= 0 || c.timeout <= 0 || c.idle <= 0 {
		errs = append(errs, fmt.Errorf("-duration %s, -timeout %s, -idle %s: want all positive", c.duration, c.timeout, c.idle))
	}
	if c.rate > int(time.Second) {
		errs = append(errs, fmt.Errorf("-rate %d: want at most 1e9", c.rate))
	}
	return c, errors.Join(errs...)
}

func main() {
	cfg, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		stop() // a second signal now kills the harness; Pdeathsig takes the children along
		benchkit.Logf("interrupted: stopping (Ctrl-C again to abort at once)")
	}()
	if err := run(ctx, cfg); err != nil {
		benchkit.Logf("error: %v", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config) (err error) {
	began := time.Now()
	env := collectEnv(cfg)
	dir, err := os.MkdirTemp("", "rtm-cluster-")
	if err != nil {
		return err
	}
	c := &pair{}
	defer func() {
		c.stop()
		if err != nil {
			printLogTails(dir, 20)
		}
		if cfg.keep {
			benchkit.Logf("temporary directory kept: %s", dir)
		} else if rerr := os.RemoveAll(dir); rerr != nil {
			benchkit.Logf("remove %s: %v", dir, rerr)
		}
	}()

	bin := cfg.rtmBin
	if bin == "" {
		if bin, err = buildRTM(ctx, dir); err != nil {
			return err
		}
	}
	var storeURI string
	if c.store, storeURI, err = startStore(ctx, dir, bin); err != nil {
		return err
	}
	nodeEnv := []string{
		"RTM_AUTH_DEVICES=anonymous", // the clients have no tokens; ACLs still apply
		"RTM_BROKER_ADMIN_KEYS=" + adminKey,
		"RTM_CLUSTER_LINK_TLS=" + cfg.linkTLS,
		"RTM_BROKER_MAX_QUEUED=" + strconv.Itoa(cfg.maxQueued),
		"RTM_BROKER_MAX_INFLIGHT=" + strconv.Itoa(cfg.maxInflight),
	}
	if c.a, err = startNode(ctx, dir, bin, "a", storeURI, "", nodeEnv); err != nil {
		return err
	}
	if c.b, err = startNode(ctx, dir, bin, "b", storeURI, c.a.gossip, nodeEnv); err != nil {
		return err
	}
	if err = c.waitFormed(ctx, 60*time.Second); err != nil {
		return err
	}
	benchkit.Logf("cluster formed: a and b alive, links a→b and b→a up")
	var start clusterStats
	if err = c.a.get(ctx, "/v1/cluster", &start); err != nil {
		return err
	}

	same := placement{key: "same", title: "same node", pub: c.a, sub: c.a}
	cross := placement{key: "cross", title: "cross node", pub: c.a, sub: c.b, ready: c.waitRoute}
	results := map[string]map[string][]result{} // scenario → placement → runs
	for _, sc := range scenarios {
		results[sc.key] = map[string][]result{}
	}
	var crossSent int64 // messages published in cross-node runs, warm-up included
	env.loadBefore = benchkit.Loadavg()
	measured := time.Now()
	if cfg.warmup {
		benchkit.Logf("warm-up at a tenth of the sizes")
		for _, sc := range scenarios {
			for _, pl := range []placement{same, cross} {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r := runOne(ctx, c, sc, pl, cfg.params.scaled(10), fmt.Sprintf("w-%s-%s", sc.key, pl.key))
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if pl.key == "cross" {
					crossSent += r.expected
				}
				logRun("warm-up", sc, pl, r)
			}
		}
	}
	for round := 1; round <= cfg.rounds; round++ {
		order := []placement{same, cross}
		if round%2 == 0 {
			order = []placement{cross, same}
		}
		for _, sc := range scenarios {
			for _, pl := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r := runOne(ctx, c, sc, pl, cfg.params, fmt.Sprintf("r%d-%s-%s", round, sc.key, pl.key))
				if ctx.Err() != nil {
					return ctx.Err() // an interrupted run measures nothing
				}
				if pl.key == "cross" {
					crossSent += r.expected
				}
				results[sc.key][pl.key] = append(results[sc.key][pl.key], r)
				logRun(fmt.Sprintf("round %d/%d", round, cfg.rounds), sc, pl, r)
			}
		}
	}
	env.measured = time.Since(measured)
	env.loadAfter = benchkit.Loadavg()

	var endA, endB clusterStats
	if err = errors.Join(c.a.get(ctx, "/v1/cluster", &endA), c.b.get(ctx, "/v1/cluster", &endB)); err != nil {
		return fmt.Errorf("read link counters: %w", err)
	}
	if err = errors.Join(c.a.alive(), c.b.alive(), c.store.alive()); err != nil {
		return err
	}
	env.elapsed = time.Since(began)
	report(os.Stdout, cfg, env, results, linkReport{start: start, endA: endA, endB: endB, crossSent: crossSent}, dir)
	return nil
}

// runOne runs one scenario in one placement, then waits for the cluster to
// drop the run's clients and routes, and reads the drops counted meanwhile.
func runOne(ctx context.Context, c *pair, sc scenario, pl placement, p params, tag string) result {
	if err := errors.Join(c.store.alive(), c.a.alive(), c.b.alive()); err != nil {
		return result{errs: []string{err.Error()}}
	}
	r := sc.run(ctx, pl, p, tag)
	d, err := c.drained(ctx, 30*time.Second)
	if err != nil {
		r.fail("%v", err)
	}
	r.drops = d
	return r
}

func logRun(phase string, sc scenario, pl placement, r result) {
	var vals []string
	for _, m := range sc.metrics {
		if v, ok := r.values[m.key]; ok {
			vals = append(vals, fmt.Sprintf("%s=%s", m.key, benchkit.Num(v)))
		}
	}
	benchkit.Logf("%s %-7s %-10s %s lost=%d dups=%d dropped(a/b/link)=%d/%d/%d %s", phase, sc.key, pl.title, strings.Join(vals, " "),
		r.lost(), r.dups, r.drops.a, r.drops.b, r.drops.link, strings.Join(append(r.errs, r.notes...), "; "))
}
