package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

// environment describes the machine and the versions measured.
type environment struct {
	date, goVersion, cpu, kernel, rtm, paho, command string
	cores                                            int
	loadBefore, loadAfter                            string
	elapsed, measured                                time.Duration
}

func collectEnv(cfg config) environment {
	e := environment{
		date:      time.Now().UTC().Format("2006-01-02 15:04 MST"),
		goVersion: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH,
		cores:     runtime.NumCPU(),
		rtm:       gitDescribe() + " (working tree)",
		command:   strings.TrimSpace("go run ./bench/cluster " + strings.Join(os.Args[1:], " ")),
	}
	if cfg.rtmBin != "" {
		e.rtm = cfg.rtmBin + " (prebuilt; working tree is " + gitDescribe() + ")"
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
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/eclipse/paho.golang" {
				e.paho = d.Path + " " + d.Version
			}
		}
	}
	return e
}

// gitDescribe is `git describe --always --dirty` of the working tree.
func gitDescribe() string {
	out, err := exec.Command("git", "describe", "--always", "--dirty").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// signed formats a difference with its sign.
func signed(v float64) string {
	if v < 0 {
		return "−" + benchkit.Num(-v)
	}
	return "+" + benchkit.Num(v)
}

// linkReport holds the link counters read at the start and at the end.
type linkReport struct {
	start, endA, endB clusterStats // a's at the start; a's and b's at the end
	crossSent         int64        // messages published in cross-node runs, warm-up included
}

var placements = []struct{ key, title string }{{"same", "same node"}, {"cross", "cross node"}}

// report prints the Markdown report: environment, medians, ratios and
// added latency, every loss, drop and error, the link counters and what the
// children logged.
func report(w io.Writer, cfg config, e environment, results map[string]map[string][]result, lr linkReport, dir string) {
	fmt.Fprintf(w, "## Cluster cost: publisher on node a, subscriber on node b, vs both on node a\n\n")
	fmt.Fprintf(w, "Command: `%s` (rounds: %d, placements alternating; warm-up %v; measuring took %s, the whole run %s with build and start-up)\n\n",
		e.command, cfg.rounds, cfg.warmup, e.measured.Round(time.Second), e.elapsed.Round(time.Second))
	fmt.Fprintf(w, "| | |\n| --- | --- |\n")
	fmt.Fprintf(w, "| date | %s |\n| CPU | %s × %d (nproc) |\n| kernel | %s |\n| Go | %s |\n", e.date, e.cpu, e.cores, e.kernel, e.goVersion)
	fmt.Fprintf(w, "| rtm | %s |\n| client | %s, MQTT 5, clean sessions |\n", e.rtm, e.paho)
	fmt.Fprintf(w, "| load average before / after | %s / %s |\n\n", e.loadBefore, e.loadAfter)
	linkTLS := "encrypted with TLS keyed by it (cluster.link_tls=auto)"
	if cfg.linkTLS == "off" {
		linkTLS = "in plaintext (cluster.link_tls=off)"
	}
	fmt.Fprintf(w, "Setup: one `rtm store` shared by two `rtm broker` nodes, a and b (b joins a), on loopback, with the node link authenticated by a cluster secret and %s; both nodes run with RTM_BROKER_MAX_QUEUED=%d and RTM_BROKER_MAX_INFLIGHT=%d. ",
		linkTLS, cfg.maxQueued, cfg.maxInflight)
	fmt.Fprintf(w, "*Same node*: publisher and subscriber on a. *Cross node*: publisher on a, subscriber on b; each cross-node run starts once a lists b's route.\n\n")
	fmt.Fprintf(w, "Sizes: QoS 0 throughput %d messages as fast as one publisher can; QoS 1 throughput %d messages, %d in flight; latency: QoS 1 at %d msg/s for %s (%d messages). Payload %d B.\n\n",
		cfg.msgs, cfg.qos1Msgs, cfg.window, cfg.rate, cfg.duration, int(cfg.duration.Seconds()*float64(cfg.rate)), cfg.size)

	fmt.Fprintf(w, "| scenario | metric | same node median (min–max) | cross node median (min–max) | cross / same | cross − same |\n")
	fmt.Fprintf(w, "| --- | --- | ---: | ---: | ---: | ---: |\n")
	for _, sc := range scenarios {
		for _, m := range sc.metrics {
			better := "higher is better"
			if !m.higherBetter {
				better = "lower is better"
			}
			fmt.Fprintf(w, "| %s | %s (%s) |", sc.title, m.label, better)
			med := map[string]float64{}
			for _, pl := range placements {
				var vals []float64
				for _, r := range results[sc.key][pl.key] {
					if v, ok := r.values[m.key]; ok {
						vals = append(vals, v)
					}
				}
				if len(vals) == 0 {
					fmt.Fprintf(w, " n/a |")
					continue
				}
				med[pl.key] = benchkit.Median(vals)
				fmt.Fprintf(w, " **%s** (%s–%s) |", benchkit.Num(med[pl.key]), benchkit.Num(slices.Min(vals)), benchkit.Num(slices.Max(vals)))
			}
			s, okS := med["same"]
			x, okX := med["cross"]
			switch {
			case m.cmp == none || !okS || !okX:
				fmt.Fprintf(w, " |")
			case s > 0:
				fmt.Fprintf(w, " **%.2f** |", x/s)
			default:
				fmt.Fprintf(w, " n/a |")
			}
			if m.cmp == added && okS && okX {
				fmt.Fprintf(w, " **%s ms** |\n", signed(x-s))
			} else {
				fmt.Fprintf(w, " |\n")
			}
		}
	}

	fmt.Fprintf(w, "\nLosses over all measured rounds. Lost = sent − received at the client. Dropped = the cluster's own counts during the runs: /v1/stats messages_dropped + inflight_dropped of a and of b, and a's link to b refusing messages with its queue full. QoS 0 may be dropped under overload (MQTT allows it); QoS 1 must lose nothing.\n\n")
	fmt.Fprintf(w, "| scenario | placement | runs | sent | lost | loss %% | duplicates | dropped a / b / link | runs with errors |\n")
	fmt.Fprintf(w, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	var errLines, noteLines []string
	for _, sc := range scenarios {
		for _, pl := range placements {
			var exp, lost, dups int64
			var d drops
			var bad int
			rs := results[sc.key][pl.key]
			for i, r := range rs {
				exp += r.expected
				lost += r.lost()
				dups += r.dups
				d = drops{a: d.a + r.drops.a, b: d.b + r.drops.b, link: d.link + r.drops.link}
				if len(r.errs) > 0 {
					bad++
					errLines = append(errLines, fmt.Sprintf("- %s, %s, round %d: %s", sc.title, pl.title, i+1, strings.Join(r.errs, "; ")))
				}
				for _, n := range r.notes {
					noteLines = append(noteLines, fmt.Sprintf("- %s, %s, round %d: %s", sc.title, pl.title, i+1, n))
				}
			}
			pct := 0.0
			if exp > 0 {
				pct = 100 * float64(lost) / float64(exp)
			}
			fmt.Fprintf(w, "| %s | %s | %d | %d | %d | %.2f | %d | %d / %d / %d | %d |\n", sc.title, pl.title, len(rs), exp, lost, pct, dups, d.a, d.b, d.link, bad)
		}
	}
	if len(errLines) > 0 {
		fmt.Fprintf(w, "\nErrors:\n\n%s\n", strings.Join(errLines, "\n"))
	}
	if len(noteLines) > 0 {
		fmt.Fprintf(w, "\nNotes:\n\n%s\n", strings.Join(noteLines, "\n"))
	}
	reportLink(w, lr)
	reportLogs(w, dir)
}

// reportLink prints a's link to b and b's inbound side from a, as read at
// the end, against what the runs published cross-node.
func reportLink(w io.Writer, lr linkReport) {
	fmt.Fprintf(w, "\nLink a → b at the end (a's and b's /v1/cluster), against the %d messages published on a in cross-node runs, warm-up included (same-node runs forward nothing):\n\n", lr.crossSent)
	fmt.Fprintf(w, "| counter | value |\n| --- | ---: |\n")
	row := func(k string, v any) { fmt.Fprintf(w, "| %s | %v |\n", k, v) }
	row("a messages_forwarded", lr.endA.Forwarded-lr.start.Forwarded)
	row("a bytes_forwarded", lr.endA.ForwardedBytes-lr.start.ForwardedBytes)
	if l, l0 := lr.endA.link("b"), lr.start.link("b"); l != nil && l0 != nil {
		for _, k := range []string{"messages", "acked", "resends", "skipped", "dropped_reliable", "dropped_unreliable", "oversize", "connects", "handshake_failures"} {
			row("a link to b: "+k, l.int(k)-l0.int(k))
		}
		row("a link to b: state / queue_len (now)", fmt.Sprintf("%s / %d", l.str("state"), l.int("queue_len")))
		if e := l.str("last_error"); e != "" {
			row("a link to b: last_error", "`"+e+"`")
		}
	} else {
		row("a link to b", "missing")
	}
	if in, ok := lr.endB.Inbound["a"]; ok {
		row("b inbound from a: messages (since b started)", in.int("messages"))
		row("b inbound from a: duplicates (since b started)", in.int("duplicates"))
	}
	row("b messages_received_from_peers (since b started)", lr.endB.Received)
	fmt.Fprintf(w, "\nThe link's messages also count route updates; connects 0 means the link never reconnected during the runs.\n")
}

// reportLogs summarises what the store and the brokers logged (level warn
// and above): each distinct message with its count.
func reportLogs(w io.Writer, dir string) {
	fmt.Fprintf(w, "\nChild logs (level warn and above), each distinct message once with its count:\n\n")
	for _, name := range []string{"store", "a", "b"} {
		lines, err := summarizeLog(filepath.Join(dir, name+".log"))
		if err != nil {
			fmt.Fprintf(w, "- %s: %v\n", name, err)
			continue
		}
		if len(lines) == 0 {
			fmt.Fprintf(w, "- %s: nothing\n", name)
			continue
		}
		fmt.Fprintf(w, "- %s:\n", name)
		for _, l := range lines {
			fmt.Fprintf(w, "  - %s\n", l)
		}
	}
}

// summarizeLog reads a JSON slog file and returns "count × LEVEL msg" for
// each distinct level and message, in order of first appearance (at most
// 20), and other lines verbatim (at most 5).
func summarizeLog(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	type key struct{ level, msg string }
	var order []key
	count := map[key]int{}
	var other []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var rec struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if json.Unmarshal(sc.Bytes(), &rec) != nil || rec.Msg == "" {
			if len(other) < 5 && strings.TrimSpace(sc.Text()) != "" {
				other = append(other, "`"+strings.TrimSpace(sc.Text())+"`")
			}
			continue
		}
		k := key{rec.Level, rec.Msg}
		if count[k] == 0 {
			order = append(order, k)
		}
		count[k]++
	}
	var out []string
	for i, k := range order {
		if i == 20 {
			out = append(out, fmt.Sprintf("… %d more distinct messages", len(order)-20))
			break
		}
		out = append(out, fmt.Sprintf("%d × %s %s", count[k], k.level, k.msg))
	}
	return append(out, other...), sc.Err()
}

// printLogTails copies the last n lines of each child's log to stderr, so a
// failed run shows them before the temporary directory goes.
func printLogTails(dir string, n int) {
	for _, name := range []string{"store", "a", "b"} {
		b, err := os.ReadFile(filepath.Join(dir, name+".log"))
		if err != nil || len(bytes.TrimSpace(b)) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		lines = lines[max(len(lines)-n, 0):]
		benchkit.Logf("last %d lines of %s.log:\n%s", len(lines), name, strings.Join(lines, "\n"))
	}
}
