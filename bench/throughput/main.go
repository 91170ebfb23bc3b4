// Command throughput measures rtm's broker and Mosquitto side by side on one
// machine, in one run, with the same MQTT 5 client for both (`rtm bench`'s
// engine, internal/loadgen; paho.golang in the flow-control scenarios):
// QoS 0 fan-in, QoS 1 end-to-end throughput and latency, QoS 0 fan-out and
// connection rate. Both brokers run as child processes on loopback; the
// targets alternate within each round (rtm first in odd rounds, Mosquitto
// first in even ones) so they share the machine's noise, and the report
// gives medians over the rounds and the rtm/Mosquitto ratio of the medians,
// with every lost or dropped message.
//
// Run it from the repository root:
//
//	go run ./bench/throughput            # full run, about 2 minutes on 2 cores
//	go run ./bench/throughput -quick     # small sizes, for development
//
// The Markdown report goes to stdout, progress to stderr. Every run of a
// scenario is bounded by -timeout, and both brokers are stopped by PID at
// the end or on SIGINT/SIGTERM.
package main

import (
	"context"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

type config struct {
	params
	rounds     int
	warmup     bool
	calibrate  bool
	rtmBin     string
	rev        string
	mosqBin    string
	only       map[string]bool
	targets    []string
	perf       string
	keep       bool
	maxQueued  int
	rtmInfl    int
	mosqQueued int
	mosqInfl   int
	defaults   bool
}

func parseFlags() config {
	var c config
	var only, targets string
	var quick bool
	flag.IntVar(&c.rounds, "rounds", 5, "rounds; each runs every scenario once against each target")
	flag.BoolVar(&c.warmup, "warmup", true, "run every scenario once at a tenth of its size before measuring")
	flag.BoolVar(&c.calibrate, "calibrate", true, "measure the client's own QoS 0 send and receive ceilings against a null broker first")
	flag.IntVar(&c.size, "size", 64, "payload bytes of every message")
	flag.IntVar(&c.faninPubs, "fanin-pubs", 4, "fan-in: publishers")
	flag.IntVar(&c.faninMsgs, "fanin-msgs", 200000, "fan-in: messages in all")
	flag.IntVar(&c.qos1Msgs, "qos1-msgs", 50000, "QoS 1: messages")
	flag.IntVar(&c.qos1Window, "qos1-window", 100, "QoS 1: publishes in flight (capped by the broker's Receive Maximum)")
	flag.IntVar(&c.fanoutSubs, "fanout-subs", 100, "fan-out: subscribers")
	flag.IntVar(&c.fanoutMsgs, "fanout-msgs", 2000, "fan-out: messages published (deliveries = msgs × subs)")
	flag.IntVar(&c.conns, "conns", 2000, "connection rate: clients")
	flag.IntVar(&c.connConc, "conn-concurrency", 50, "connection rate: clients connecting at once")
	flag.IntVar(&c.burstPubs, "burst-pubs", 4, "burst: publishers")
	flag.IntVar(&c.burstMsgs, "burst-msgs", 5000, "burst: QoS 1 messages per publisher")
	flag.IntVar(&c.burstWindow, "burst-window", 64, "burst: publishes in flight per publisher (capped by the broker's Receive Maximum)")
	flag.IntVar(&c.fanin1Pubs, "fanin1-pubs", 10, "sustained QoS 1 fan-in: publishers")
	flag.IntVar(&c.fanin1Window, "fanin1-window", 64, "sustained QoS 1 fan-in: publishes in flight per publisher (capped by the broker's Receive Maximum)")
	flag.DurationVar(&c.fanin1Dur, "fanin1-duration", 10*time.Second, "sustained QoS 1 fan-in: how long the publishers publish")
	flag.IntVar(&c.stuckMsgs, "stuck-msgs", 20000, "stuck: QoS 1 messages of the measured pair")
	flag.IntVar(&c.stuckWindow, "stuck-window", 64, "stuck: the pair's publishes in flight")
	flag.IntVar(&c.stuckSideRate, "stuck-side-rate", 500, "stuck: msg/s published to the stuck subscriber's topic meanwhile")
	flag.BoolVar(&c.defaults, "defaults", false, "run both brokers with their default queue and in-flight limits (overrides -rtm-max-queued, -rtm-max-inflight, -mosquitto-max-queued, -mosquitto-max-inflight); meant for -scenarios burst,fanin1,stuck")
	flag.DurationVar(&c.timeout, "timeout", 60*time.Second, "bound on one run of one scenario")
	flag.DurationVar(&c.idle, "idle", 3*time.Second, "a run ends as lossy after this long without a delivery once sending is done")
	flag.StringVar(&only, "scenarios", "fanin,qos1,fanout,connect", "scenarios to run, comma-separated (also: burst, fanin1, stuck)")
	flag.StringVar(&targets, "targets", "rtm,mosquitto", "brokers to run, comma-separated")
	flag.StringVar(&c.rtmBin, "rtm", "", "rtm binary; empty builds ./cmd/rtm into the temporary directory (not stripped, so perf can symbolize it)")
	flag.StringVar(&c.rev, "rev", "", "build rtm from this git revision (git archive) instead of the working tree")
	flag.StringVar(&c.mosqBin, "mosquitto", "/usr/sbin/mosquitto", "mosquitto binary")
	flag.IntVar(&c.maxQueued, "rtm-max-queued", 65535, "rtm broker.max_queued (RTM_BROKER_MAX_QUEUED)")
	flag.IntVar(&c.rtmInfl, "rtm-max-inflight", 65535, "rtm broker.max_inflight, its Receive Maximum (RTM_BROKER_MAX_INFLIGHT)")
	flag.IntVar(&c.mosqQueued, "mosquitto-max-queued", 100000, "mosquitto max_queued_messages")
	flag.IntVar(&c.mosqInfl, "mosquitto-max-inflight", 65535, "mosquitto max_inflight_messages")
	flag.StringVar(&c.perf, "perf", "", "record perf CPU profiles of both brokers during this `scenario` of the last round")
	flag.BoolVar(&c.keep, "keep", false, "keep the temporary directory (broker logs, perf data)")
	flag.BoolVar(&quick, "quick", false, "small sizes and 2 rounds, for development")
	flag.Parse()
	if quick {
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		if !set["rounds"] {
			c.rounds = 2
		}
		c.params = c.params.scaled(20)
	}
	if c.defaults {
		c.maxQueued, c.rtmInfl, c.mosqQueued, c.mosqInfl = 0, 0, 0, 0 // 0: not set, the broker's default
	}
	c.only = map[string]bool{}
	for _, s := range strings.Split(only, ",") {
		c.only[strings.TrimSpace(s)] = true
	}
	for _, s := range strings.Split(targets, ",") {
		c.targets = append(c.targets, strings.TrimSpace(s))
	}
	return c
}

func main() {
	cfg := parseFlags()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg); err != nil {
		benchkit.Logf("error: %v", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config) error {
	var scs []scenario
	for _, sc := range scenarios {
		if cfg.only[sc.key] {
			scs = append(scs, sc)
			delete(cfg.only, sc.key)
		}
	}
	if len(cfg.only) > 0 {
		return fmt.Errorf("unknown scenarios %q (want fanin, qos1, fanout, connect, burst, fanin1, stuck)", slices.Sorted(maps.Keys(cfg.only)))
	}
	dir, err := os.MkdirTemp("", "rtm-throughput-")
	if err != nil {
		return err
	}
	if cfg.keep {
		benchkit.Logf("temporary directory kept: %s", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	env := collectEnv(cfg)

	var targets []*target
	defer func() {
		for _, t := range targets {
			benchkit.Logf("stopping %s (pid %d)", t.name, t.pid())
			t.stop(20 * time.Second)
		}
	}()
	for _, name := range cfg.targets {
		var t *target
		switch name {
		case "rtm":
			bin := cfg.rtmBin
			if bin == "" {
				if bin, err = buildRTM(ctx, dir, cfg.rev); err != nil {
					return err
				}
			}
			t, err = startRTM(ctx, dir, bin, cfg.maxQueued, cfg.rtmInfl)
		case "mosquitto":
			t, err = startMosquitto(ctx, dir, cfg.mosqBin, cfg.mosqQueued, cfg.mosqInfl)
		default:
			return fmt.Errorf("unknown target %q (want rtm or mosquitto)", name)
		}
		if err != nil {
			return err
		}
		benchkit.Logf("%s started: pid %d, mqtt %s, log %s", t.name, t.pid(), t.addr, t.logPath)
		targets = append(targets, t)
		if t.last, err = t.read(ctx); err != nil {
			return fmt.Errorf("%s counters: %w", t.name, err)
		}
	}

	results := map[string]map[string][]result{} // scenario → target → runs
	for _, sc := range scs {
		results[sc.key] = map[string][]result{}
	}
	env.loadBefore = benchkit.Loadavg()
	began := time.Now()
	if cfg.calibrate {
		c, err := calibrate(ctx, cfg.faninPubs, cfg.faninMsgs, cfg.size)
		if err != nil {
			return fmt.Errorf("calibrate: %w", err)
		}
		env.ceilings = &c
		benchkit.Logf("client ceilings: send %s msg/s (%d publishers), receive %s msg/s", benchkit.Num(c.send), cfg.faninPubs, benchkit.Num(c.recv))
	}
	if cfg.warmup {
		benchkit.Logf("warm-up at a tenth of the sizes")
		for _, sc := range scs {
			for _, t := range targets {
				r := runOne(ctx, sc, t, cfg.params.scaled(10), fmt.Sprintf("w-%s", sc.key), "")
				logRun("warm-up", sc, t, r)
			}
		}
	}
	for round := 1; round <= cfg.rounds; round++ {
		order := targets
		if round%2 == 0 {
			order = reversed(targets)
		}
		for _, sc := range scs {
			for _, t := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				perfOut := ""
				if cfg.perf == sc.key && round == cfg.rounds {
					perfOut = filepath.Join(dir, fmt.Sprintf("perf-%s-%s.data", t.name, sc.key))
				}
				r := runOne(ctx, sc, t, cfg.params, fmt.Sprintf("r%d-%s", round, sc.key), perfOut)
				results[sc.key][t.name] = append(results[sc.key][t.name], r)
				logRun(fmt.Sprintf("round %d/%d", round, cfg.rounds), sc, t, r)
			}
		}
	}
	env.loadAfter = benchkit.Loadavg()
	env.elapsed = time.Since(began)
	report(os.Stdout, cfg, env, scs, targets, results)
	for _, t := range targets {
		if err := t.alive(); err != nil {
			return err
		}
	}
	return nil
}

// runOne runs one scenario against one target, then waits for the broker
// to drop the run's connections and reads the drops it counted.
func runOne(ctx context.Context, sc scenario, t *target, p params, tag, perfOut string) result {
	if err := t.alive(); err != nil {
		return result{errs: []string{err.Error()}}
	}
	var stopPerf func()
	if perfOut != "" {
		stopPerf = startPerf(t, perfOut)
	}
	r := sc.run(ctx, t, p, tag)
	if stopPerf != nil {
		stopPerf()
	}
	c, err := t.drained(ctx, 30*time.Second)
	if err != nil {
		r.fail("%v", err)
	}
	if c != (counters{}) {
		r.dropped = c.dropped - t.last.dropped
		t.last = c
	}
	if err := t.alive(); err != nil {
		r.fail("%v", err)
	}
	return r
}

func logRun(phase string, sc scenario, t *target, r result) {
	var vals []string
	for _, m := range sc.metrics {
		if v, ok := r.values[m.key]; ok {
			vals = append(vals, fmt.Sprintf("%s=%s", m.key, benchkit.Num(v)))
		}
	}
	benchkit.Logf("%s %-8s %-10s %s lost=%d dropped=%d dups=%d %s", phase, sc.key, t.name, strings.Join(vals, " "),
		r.lost(), r.dropped, r.dups, strings.Join(r.errs, "; "))
}

// startPerf records the target's process with `perf record` (the cpu-clock
// software event: virtual machines often have no hardware counters) until the
// returned function is called.
func startPerf(t *target, out string) func() {
	cmd := exec.Command("perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", fmt.Sprint(t.pid()), "-o", out)
	cmd.Stdout, cmd.Stderr = nil, nil
	if err := cmd.Start(); err != nil {
		benchkit.Logf("perf: %v (profile skipped)", err)
		return nil
	}
	benchkit.Logf("perf recording %s (pid %d) into %s", t.name, t.pid(), out)
	return func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		benchkit.Logf("perf data: %s (perf report -i %s --no-children)", out, out)
	}
}

// buildRTM builds ./cmd/rtm into dir: from the working tree of the
// enclosing module, or from git revision rev when it is set.
func buildRTM(ctx context.Context, dir, rev string) (string, error) {
	gomod, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	if err != nil || root == "." || strings.TrimSpace(string(gomod)) == os.DevNull {
		return "", fmt.Errorf("run from inside the rtm module (go env GOMOD: %q, %v)", gomod, err)
	}
	version := gitDescribe()
	if rev != "" {
		src := filepath.Join(dir, "src")
		if err := os.Mkdir(src, 0o755); err != nil {
			return "", err
		}
		arch := exec.CommandContext(ctx, "sh", "-c", `git -C "$1" archive --format=tar "$2" | tar -x -C "$3"`, "sh", root, rev, src)
		arch.Stderr = os.Stderr
		if err := arch.Run(); err != nil {
			return "", fmt.Errorf("export revision %s: %w", rev, err)
		}
		out, err := exec.CommandContext(ctx, "git", "-C", root, "rev-parse", "--short", rev).Output()
		if err != nil {
			return "", fmt.Errorf("resolve revision %s: %w", rev, err)
		}
		root, version = src, strings.TrimSpace(string(out))
	}
	bin := filepath.Join(dir, "rtm")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-X main.version="+version, "-o", bin, "./cmd/rtm")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stderr = os.Stderr
	benchkit.Logf("building rtm: %s (in %s)", strings.Join(cmd.Args, " "), cmd.Dir)
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build rtm: %w", err)
	}
	return bin, nil
}

func reversed[T any](s []T) []T {
	r := make([]T, len(s))
	for i, v := range s {
		r[len(s)-1-i] = v
	}
	return r
}
