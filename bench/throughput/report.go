package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

// environment describes the machine and the versions measured.
type environment struct {
	date, goVersion, cpu, kernel, mosquitto, rtm, paho, command string
	cores                                                       int
	loadBefore, loadAfter                                       string
	elapsed                                                     time.Duration
	ceilings                                                    *ceilings
}

func collectEnv(cfg config) environment {
	e := environment{
		date:      time.Now().UTC().Format("2006-01-02 15:04 MST"),
		goVersion: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH,
		cores:     runtime.NumCPU(),
		rtm:       gitDescribe() + " (working tree)",
		command:   "go run ./bench/throughput " + strings.Join(os.Args[1:], " "),
	}
	if cfg.rev != "" {
		out, _ := exec.Command("git", "rev-parse", "--short", cfg.rev).Output()
		e.rtm = strings.TrimSpace(string(out)) + " (git archive of " + cfg.rev + ")"
	}
	if cfg.rtmBin != "" {
		e.rtm = cfg.rtmBin + " (prebuilt; HEAD is " + gitDescribe() + ")"
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				e.cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		e.kernel = strings.TrimSpace(string(b))
	}
	// mosquitto -h prints its version and exits with status 3.
	out, _ := exec.Command(cfg.mosqBin, "-h").CombinedOutput()
	e.mosquitto, _, _ = strings.Cut(string(out), "\n")
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/eclipse/paho.golang" {
				e.paho = d.Path + " " + d.Version
			}
		}
	}
	return e
}

// gitDescribe is the short commit, marked dirty when tracked files differ.
func gitDescribe() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	s := strings.TrimSpace(string(out))
	if exec.Command("git", "diff", "--quiet", "HEAD").Run() != nil {
		s += "-dirty"
	}
	return s
}

// report prints the Markdown report: environment, medians and ratios, and
// every loss, drop and error.
func report(w io.Writer, cfg config, e environment, scs []scenario, targets []*target, results map[string]map[string][]result) {
	fmt.Fprintf(w, "## Throughput: rtm vs Mosquitto\n\n")
	fmt.Fprintf(w, "Command: `%s` (%d rounds, targets alternating; warm-up %v; run took %s)\n\n",
		strings.TrimSpace(e.command), cfg.rounds, cfg.warmup, e.elapsed.Round(time.Second))
	fmt.Fprintf(w, "| | |\n| --- | --- |\n")
	fmt.Fprintf(w, "| date | %s |\n| CPU | %s × %d |\n| kernel | %s |\n| Go | %s |\n", e.date, e.cpu, e.cores, e.kernel, e.goVersion)
	fmt.Fprintf(w, "| rtm | %s |\n| Mosquitto | %s |\n| client | rtm bench's engine (internal/loadgen) for fan-in, QoS 1, fan-out and connect; %s for the flow-control scenarios (same for both) |\n", e.rtm, e.mosquitto, e.paho)
	fmt.Fprintf(w, "| load average before / after | %s / %s |\n\n", e.loadBefore, e.loadAfter)
	if c := e.ceilings; c != nil {
		fmt.Fprintf(w, "Client ceilings, no broker (the load generator's client against a null server, %d B QoS 0): %d publishers send %s msg/s; one client receives %s msg/s.\n\n",
			cfg.size, cfg.faninPubs, benchkit.Num(c.send), benchkit.Num(c.recv))
	}
	fmt.Fprintf(w, "Sizes: fan-in %d publishers → 1 subscriber, %d messages; QoS 1 %d messages, window %d; fan-out 1 → %d subscribers, %d messages; connect %d clients, %d at once. Payload %d B.\n\n",
		cfg.faninPubs, cfg.faninMsgs, cfg.qos1Msgs, cfg.qos1Window, cfg.fanoutSubs, cfg.fanoutMsgs, cfg.conns, cfg.connConc, cfg.size)
	lim := func(n int) string {
		if n == 0 {
			return "default"
		}
		return fmt.Sprint(n)
	}
	fmt.Fprintf(w, "Limits: rtm broker.max_queued %s, broker.max_inflight %s (broker.backpressure_max_wait default); Mosquitto max_queued_messages %s, max_inflight_messages %s.\n\n",
		lim(cfg.maxQueued), lim(cfg.rtmInfl), lim(cfg.mosqQueued), lim(cfg.mosqInfl))
	fmt.Fprintf(w, "Flow control: burst %d publishers × %d QoS 1, window %d; sustained QoS 1 fan-in %d publishers, window %d, %s; stuck: pair of %d QoS 1 (window %d) beside a subscriber that never reads, fed %d msg/s.\n\n",
		cfg.burstPubs, cfg.burstMsgs, cfg.burstWindow, cfg.fanin1Pubs, cfg.fanin1Window, cfg.fanin1Dur, cfg.stuckMsgs, cfg.stuckWindow, cfg.stuckSideRate)

	names := make([]string, len(targets))
	for i, t := range targets {
		names[i] = t.name
	}
	fmt.Fprintf(w, "| scenario | metric |")
	for _, n := range names {
		fmt.Fprintf(w, " %s median (min–max) |", n)
	}
	pair := len(names) == 2 && names[0] == "rtm" || len(names) == 2 && names[1] == "rtm"
	if pair {
		fmt.Fprintf(w, " rtm / mosquitto |")
	}
	fmt.Fprintf(w, "\n| --- | --- |%s", strings.Repeat(" ---: |", len(names)))
	if pair {
		fmt.Fprintf(w, " ---: |")
	}
	fmt.Fprintln(w)
	for _, sc := range scs {
		for _, m := range sc.metrics {
			better := "higher is better"
			if !m.higherBetter {
				better = "lower is better"
			}
			fmt.Fprintf(w, "| %s | %s (%s) |", sc.title, m.label, better)
			med := map[string]float64{}
			for _, n := range names {
				var vals []float64
				for _, r := range results[sc.key][n] {
					if v, ok := r.values[m.key]; ok {
						vals = append(vals, v)
					}
				}
				if len(vals) == 0 {
					fmt.Fprintf(w, " n/a |")
					continue
				}
				med[n] = benchkit.Median(vals)
				fmt.Fprintf(w, " **%s** (%s–%s) |", benchkit.Num(med[n]), benchkit.Num(slices.Min(vals)), benchkit.Num(slices.Max(vals)))
			}
			if pair {
				a, okA := med["rtm"]
				b, okB := med["mosquitto"]
				if okA && okB && b > 0 {
					fmt.Fprintf(w, " **%.2f** |", a/b)
				} else {
					fmt.Fprintf(w, " n/a |")
				}
			}
			fmt.Fprintln(w)
		}
	}

	fmt.Fprintf(w, "\nLosses over all measured rounds (lost = expected − received at the client; dropped = the broker's own count: rtm /v1/stats messages_dropped + inflight_dropped, Mosquitto $SYS/broker/publish/messages/dropped):\n\n")
	fmt.Fprintf(w, "| scenario | target | runs | expected | lost | dropped | duplicates | runs with errors |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	var errLines []string
	for _, sc := range scs {
		for _, n := range names {
			var exp, lost, drop, dups int64
			var bad int
			rs := results[sc.key][n]
			for i, r := range rs {
				exp += r.expected
				lost += r.lost()
				drop += r.dropped
				dups += r.dups
				if len(r.errs) > 0 {
					bad++
					errLines = append(errLines, fmt.Sprintf("- %s, %s, round %d: %s", sc.title, n, i+1, strings.Join(r.errs, "; ")))
				}
			}
			fmt.Fprintf(w, "| %s | %s | %d | %d | %d | %d | %d | %d |\n", sc.title, n, len(rs), exp, lost, drop, dups, bad)
		}
	}
	if len(errLines) > 0 {
		fmt.Fprintf(w, "\nErrors:\n\n%s\n", strings.Join(errLines, "\n"))
	}
}
