// Command suite is `make bench`: it starts every system under test on
// loopback — rtm one node with production plugins (token auth, ACL rules),
// rtm three nodes (publishers on node 1, subscribers on nodes 2 and 3),
// bare mochi (bench/baremochi) and Mosquitto — runs the same `rtm bench`
// scenarios against each in alternating order for several rounds, and
// writes a Markdown section with SVG charts: messages per second and per
// broker CPU-second, loss and duplicates, latency, RSS per idle
// connection, connect rate and the load generator's own CPU.
//
//	go run ./bench/suite                # full: about 15 minutes on 2 cores
//	go run ./bench/suite -quick         # short runs: about 4 minutes
//	go run ./bench/suite -profile DIR   # pprof profiles of rtm instead (make profile)
//
// BENCH_BROKER_CPUS and BENCH_LOAD_CPUS (taskset lists, e.g. 0-3 and 4-7)
// pin the brokers and the load generator.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
	"github.com/rtm-dev/rtm/internal/loadgen"
)

type options struct {
	quick      bool
	rounds     int
	systems    []string
	only       map[string]bool
	write      string // Markdown file to update between the markers, "" for stdout only
	charts     string // directory of the SVG charts
	profile    string
	mosquitto  string
	brokerCPUs string
	loadCPUs   string
	keep       bool
	conns      int
	base       string // rtm binary of system rtm-base (an A/B against another revision)
}

// scenario is one `rtm bench` invocation, the same for every system.
type scenario struct {
	key, title string
	args       []string // rtm bench arguments, without addresses
	conn       bool
	fullOnly   bool
}

func scenarios(quick bool, nconns int) []scenario {
	d := "10s"
	// The conn scenario reads RSS connSettle after the last connect: rtm
	// parks a connection idle for 5 s and returns a connect storm's
	// garbage to the OS two quiet 5 s ticks after the connections have
	// parked (15-20 s after the last connect), so an earlier reading
	// measures fresh connections and the storm, not idle ones (it is
	// reported too). 10,000 at 2,000/s take 5 s; the hold leaves room for
	// 1,000/s on a loaded machine; the clients ping 45 s after the last
	// connect, after the reading.
	conns, connDur, connSettle := "10000", "42s", "30s"
	if quick {
		d, conns, connDur, connSettle = "1500ms", "1000", "9s", "7s"
	}
	if nconns > 0 {
		conns, connDur = strconv.Itoa(nconns), fmt.Sprintf("%ds", nconns/1000+32)
	}
	return []scenario{
		{key: "fanin0", title: "QoS 0 fan-in 10→1 at 20,000 msg/s", args: []string{"fanin", "-c", "10", "--qos", "0", "--rate", "20000", "--duration", d}},
		{key: "fanin1", title: "QoS 1 fan-in 10→1 at 10,000 msg/s", args: []string{"fanin", "-c", "10", "--qos", "1", "--rate", "10000", "--duration", d}},
		{key: "fanout0", title: "QoS 0 fan-out 1→10, unlimited", args: []string{"fanout", "-c", "10", "--qos", "0", "--duration", d}},
		{key: "lat1", title: "QoS 1, 10 pairs at 1,000 msg/s (latency)", args: []string{"pairs", "-c", "10", "--qos", "1", "--rate", "1000", "--duration", d}},
		{key: "fanin1max", title: "QoS 1 fan-in 10→1, unlimited (flow control)", args: []string{"fanin", "-c", "10", "--qos", "1", "--duration", d}, fullOnly: true},
		{key: "conn", title: "Idle connections, " + conns + " at 2,000/s", args: []string{"conn", "-c", conns, "--rate", "2000", "--duration", connDur, "--rss-after", connSettle}, conn: true},
	}
}

func main() {
	var o options
	var systems, only string
	flag.BoolVar(&o.quick, "quick", os.Getenv("BENCH") == "quick", "1.5-second runs and 1,000 connections (BENCH=quick)")
	flag.IntVar(&o.rounds, "rounds", 3, "rounds; each runs every scenario once against each system, in alternating order")
	flag.StringVar(&systems, "systems", "rtm,rtm3,mochi,mosquitto", "systems under test, comma-separated (also: mosquitto-nodelay, Mosquitto with set_tcp_nodelay true; rtm-base, with -base)")
	flag.StringVar(&only, "scenarios", "", "scenarios to run, comma-separated (default all: fanin0, fanin1, fanout0, lat1, fanin1max (full only), conn)")
	flag.StringVar(&o.write, "write", "", "update this Markdown file (BENCHMARKS.md) between its make-bench markers, and write charts")
	flag.StringVar(&o.charts, "charts", "docs/bench", "directory of the SVG charts (with -write)")
	flag.StringVar(&o.profile, "profile", "", "instead of comparing: write CPU and allocation profiles of rtm (one node) under QoS 0 fan-in, QoS 1 fan-in and QoS 0 fan-out (or -scenarios, e.g. lat1) into this directory")
	flag.StringVar(&o.mosquitto, "mosquitto", "/usr/sbin/mosquitto", "mosquitto binary")
	flag.IntVar(&o.conns, "conns", 0, "connections of the conn scenario (default 10,000; quick 1,000); the brokers and the generator each need as many open files (ulimit -Hn)")
	flag.BoolVar(&o.keep, "keep", false, "keep the temporary directory (logs)")
	flag.StringVar(&o.base, "base", "", "rtm binary of the system rtm-base, one node configured as rtm: an A/B against another revision (build it with `go build -o /tmp/rtm-base ./cmd/rtm` in that revision's checkout)")
	flag.Parse()
	o.brokerCPUs, o.loadCPUs = os.Getenv("BENCH_BROKER_CPUS"), os.Getenv("BENCH_LOAD_CPUS")
	for _, s := range strings.Split(systems, ",") {
		o.systems = append(o.systems, strings.TrimSpace(s))
	}
	if only != "" {
		o.only = map[string]bool{}
		for _, s := range strings.Split(only, ",") {
			o.only[strings.TrimSpace(s)] = true
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	if o.profile != "" {
		err = profile(ctx, o)
	} else {
		err = compare(ctx, o)
	}
	if err != nil {
		benchkit.Logf("error: %v", err)
		os.Exit(1)
	}
}

// outcome is one run of one scenario against one system.
type outcome struct {
	res *loadgen.Result
	err string
}

type results map[string]map[string][]outcome // scenario → system → rounds

func compare(ctx context.Context, o options) error {
	began := time.Now()
	dir, err := os.MkdirTemp("", "rtm-bench-")
	if err != nil {
		return err
	}
	if o.keep {
		benchkit.Logf("temporary directory kept: %s", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	version := gitDescribe()
	rtmBin, err := build(ctx, dir, "rtm", "./cmd/rtm", version)
	if err != nil {
		return err
	}
	mochiBin, err := build(ctx, dir, "baremochi", "./bench/baremochi", version)
	if err != nil {
		return err
	}
	// start starts a fresh instance of system key, in its own directory.
	instance := 0
	start := func(key string) (*system, error) {
		instance++
		sdir := filepath.Join(dir, fmt.Sprintf("%s-%d", key, instance))
		if err := os.Mkdir(sdir, 0o755); err != nil {
			return nil, err
		}
		var s *system
		var err error
		switch key {
		case "rtm":
			s, err = startRTM(ctx, sdir, rtmBin, o.brokerCPUs, version)
		case "rtm-base":
			if o.base == "" {
				return nil, fmt.Errorf("system rtm-base needs -base BIN")
			}
			if s, err = startRTM(ctx, sdir, o.base, o.brokerCPUs, "base"); err == nil {
				s.key, s.title = "rtm-base", "rtm, one node, base binary"
			}
		case "rtm3":
			s, err = startRTMCluster(ctx, sdir, rtmBin, o.brokerCPUs, version)
		case "mochi":
			s, err = startMochi(ctx, sdir, mochiBin, o.brokerCPUs)
		case "mosquitto", "mosquitto-nodelay":
			s, err = startMosquitto(ctx, sdir, o.mosquitto, o.brokerCPUs, key == "mosquitto-nodelay")
		default:
			return nil, fmt.Errorf("unknown system %q (want rtm, rtm-base, rtm3, mochi, mosquitto, mosquitto-nodelay)", key)
		}
		if err != nil {
			return nil, fmt.Errorf("start %s: %w", key, err)
		}
		return s, nil
	}
	var syss []*system
	stopAll := func() {
		for _, s := range syss {
			s.stop()
		}
	}
	defer stopAll()
	for _, key := range o.systems {
		s, err := start(key)
		if err != nil {
			return err
		}
		benchkit.Logf("%s started: pids %v", s.title, s.pids)
		syss = append(syss, s)
	}
	var scs []scenario
	for _, sc := range scenarios(o.quick, o.conns) {
		if (o.only == nil && !(sc.fullOnly && o.quick)) || o.only[sc.key] {
			scs = append(scs, sc)
		}
	}
	env := collectEnv(o, version, syss)
	env.loadBefore = benchkit.Loadavg()
	res := results{}
	for _, sc := range scs {
		res[sc.key] = map[string][]outcome{}
	}
	commands := map[string]string{}
	run := func(round int, sc scenario, s *system) {
		argv := benchArgs(rtmBin, sc, s)
		commands[sc.key+"/"+s.key] = strings.Join(pinned(o.loadCPUs, argv), " ")
		out := runBench(ctx, o.loadCPUs, argv, filepath.Join(dir, fmt.Sprintf("bench-r%d-%s-%s.log", round, sc.key, s.key)))
		if err := s.alive(); err != nil {
			out.err = strings.TrimSpace(out.err + " " + err.Error())
		}
		res[sc.key][s.key] = append(res[sc.key][s.key], out)
		logOutcome(round, o.rounds, sc, s, out)
		// Let the broker close the run's connections before the next.
		time.Sleep(300 * time.Millisecond)
	}
	// Message scenarios: every system up, alternating within each round.
	for round := 1; round <= o.rounds; round++ {
		order := syss
		if round%2 == 0 {
			order = reversed(syss)
		}
		for _, sc := range scs {
			if sc.conn {
				continue
			}
			for _, s := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				run(round, sc, s)
			}
		}
	}
	stopAll()
	// Idle connections on a fresh instance each time, alone on the
	// machine: RSS per connection is read as growth from before the
	// connections, which memory freed from an earlier load would mask
	// (Mosquitto returned it while 10,000 connections came in: negative).
	for round := 1; round <= o.rounds; round++ {
		order := syss
		if round%2 == 0 {
			order = reversed(syss)
		}
		for _, sc := range scs {
			if !sc.conn {
				continue
			}
			for _, old := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				s, err := start(old.key)
				if err != nil {
					return err
				}
				run(round, sc, s)
				s.stop()
			}
		}
	}
	env.loadAfter = benchkit.Loadavg()
	env.elapsed = time.Since(began)
	var md bytes.Buffer
	charts := writeReport(&md, o, env, scs, syss, res, commands, rtmBin)
	os.Stdout.Write(md.Bytes())
	if o.write != "" {
		if err := os.MkdirAll(o.charts, 0o755); err != nil {
			return err
		}
		for name, svg := range charts {
			if err := os.WriteFile(filepath.Join(o.charts, name), []byte(svg), 0o644); err != nil {
				return err
			}
		}
		if err := updateMarkdown(o.write, md.Bytes()); err != nil {
			return err
		}
		benchkit.Logf("wrote %s and %d charts in %s", o.write, len(charts), o.charts)
	}
	benchkit.Logf("done in %s", time.Since(began).Round(time.Second))
	return nil
}

// benchArgs is the `rtm bench` command line of sc against s.
func benchArgs(bin string, sc scenario, s *system) []string {
	argv := append([]string{bin, "bench"}, sc.args...)
	if sc.conn {
		argv = append(argv, "--addr", s.connAddr, "--broker-pid", strconv.Itoa(s.connPID))
	} else {
		argv = append(argv, "--pub-addr", strings.Join(s.pubAddrs, ","), "--sub-addr", strings.Join(s.subAddrs, ","), "--broker-pid", joinInts(s.pids))
	}
	argv = append(argv, s.extra...)
	return append(argv, "--drain", "5s", "--json")
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// runBench runs one `rtm bench` process and decodes its JSON.
func runBench(ctx context.Context, cpus string, argv []string, logPath string) outcome {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	argv = pinned(cpus, argv)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	_ = os.WriteFile(logPath, append(append([]byte(strings.Join(argv, " ")+"\n"), stderr.Bytes()...), out...), 0o644)
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if i := strings.LastIndex(msg, "rtm: "); i >= 0 {
			msg = msg[i:]
		}
		return outcome{err: fmt.Sprintf("%v: %s", err, msg)}
	}
	var r loadgen.Result
	if err := json.Unmarshal(out, &r); err != nil {
		return outcome{err: fmt.Sprintf("rtm bench output: %v", err)}
	}
	o := outcome{res: &r}
	if len(r.Errors) > 0 {
		o.err = strings.Join(r.Errors, "; ")
	}
	return o
}

func logOutcome(round, rounds int, sc scenario, s *system, o outcome) {
	if o.res == nil {
		benchkit.Logf("round %d/%d %-9s %-9s FAILED %s", round, rounds, sc.key, s.key, o.err)
		return
	}
	r := o.res
	if sc.conn {
		benchkit.Logf("round %d/%d %-9s %-9s %d conns %.0f/s rss/conn %.0f B %s", round, rounds, sc.key, s.key, r.Connections, r.ConnRate, r.RSSPerConn, o.err)
		return
	}
	per := 0.0
	if r.Broker != nil {
		per = r.Broker.MsgsPerCPUs
	}
	benchkit.Logf("round %d/%d %-9s %-9s delivered %.0f/s, %.0f per broker CPU-s, lost %d dup %d %s", round, rounds, sc.key, s.key,
		r.DeliveredRate, per, r.Lost, r.Duplicated, o.err)
}

// markers delimit the section of BENCHMARKS.md that `make bench` owns.
const (
	beginMarker = "<!-- make bench: begin (generated by bench/suite; edits here are overwritten) -->"
	endMarker   = "<!-- make bench: end -->"
)

// updateMarkdown replaces the section between the markers in path with
// md, or inserts it after the file's first paragraph when it has none.
func updateMarkdown(path string, md []byte) error {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	section := beginMarker + "\n\n" + strings.TrimSpace(string(md)) + "\n\n" + endMarker
	s := string(old)
	if i, j := strings.Index(s, beginMarker), strings.Index(s, endMarker); i >= 0 && j > i {
		s = s[:i] + section + s[j+len(endMarker):]
	} else if k := strings.Index(s, "\n## "); k >= 0 {
		s = s[:k+1] + section + "\n\n" + s[k+1:]
	} else {
		s += "\n" + section + "\n"
	}
	return os.WriteFile(path, []byte(s), 0o644)
}

func reversed[T any](s []T) []T {
	r := make([]T, len(s))
	for i, v := range s {
		r[len(s)-1-i] = v
	}
	return r
}
