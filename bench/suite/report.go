package main

import (
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"os/exec"
	"path"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
	"github.com/rtm-dev/rtm/internal/loadgen"
)

type environment struct {
	date, cpu, kernel, goVersion, rtm string
	versions                          map[string]string
	brokerCPUs, loadCPUs              string
	loadBefore, loadAfter             string
	elapsed                           time.Duration
	quick                             bool
	rounds                            int
}

func collectEnv(o options, version string, syss []*system) environment {
	e := environment{date: time.Now().UTC().Format("2006-01-02 15:04 UTC"), goVersion: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH,
		rtm: version, versions: map[string]string{}, brokerCPUs: o.brokerCPUs, loadCPUs: o.loadCPUs, quick: o.quick, rounds: o.rounds}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		n := 0
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				n++
				e.cpu = strings.TrimSpace(v)
			}
		}
		e.cpu = fmt.Sprintf("%s × %d", e.cpu, n)
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		e.kernel = strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("go", "version").Output(); err == nil {
		e.goVersion = strings.TrimPrefix(strings.TrimSpace(string(out)), "go version ")
	}
	for _, s := range syss {
		e.versions[s.key] = s.version
	}
	return e
}

// metric reads one number from a result; ok false when it has none.
type metric struct {
	label        string
	higherBetter bool
	get          func(r *loadgen.Result) (float64, bool)
}

var (
	mDelivered = metric{"delivered msg/s", true, func(r *loadgen.Result) (float64, bool) { return r.DeliveredRate, r.Subscribers > 0 }}
	mPerCPU    = metric{"msg per broker CPU-second", true, func(r *loadgen.Result) (float64, bool) {
		if r.Broker == nil || r.Broker.MsgsPerCPUs == 0 {
			return 0, false
		}
		return r.Broker.MsgsPerCPUs, true
	}}
	mBrokerCPU = metric{"broker CPU (cores)", false, func(r *loadgen.Result) (float64, bool) {
		if r.Broker == nil {
			return 0, false
		}
		return r.Broker.CPUShare, true
	}}
	mGenCPU = metric{"generator CPU (cores)", false, func(r *loadgen.Result) (float64, bool) { return r.Generator.CPUShare, true }}
	mLost   = metric{"lost %", false, func(r *loadgen.Result) (float64, bool) {
		if r.Expected == 0 {
			return 0, r.Subscribers > 0
		}
		return 100 * float64(r.Lost) / float64(r.Expected), true
	}}
	mDups = metric{"duplicated", false, func(r *loadgen.Result) (float64, bool) { return float64(r.Duplicated), r.Subscribers > 0 }}
	mP50  = metric{"p50 ms", false, func(r *loadgen.Result) (float64, bool) {
		if r.Latency == nil {
			return 0, false
		}
		return r.Latency.P50, true
	}}
	mP99 = metric{"p99 ms", false, func(r *loadgen.Result) (float64, bool) {
		if r.Latency == nil {
			return 0, false
		}
		return r.Latency.P99, true
	}}
	mConnRate = metric{"connections/s", true, func(r *loadgen.Result) (float64, bool) { return r.ConnRate, r.Connections > 0 }}
	mRSSConn  = metric{"RSS per idle connection (KiB)", false, func(r *loadgen.Result) (float64, bool) {
		return r.RSSPerConn / 1024, r.Broker != nil && r.Connections > 0
	}}
	// mRSSFresh is read 1 s after the last connect, mRSSConn --rss-after
	// it (the idle state).
	mRSSFresh = metric{"RSS per connection 1 s after connecting (KiB)", false, func(r *loadgen.Result) (float64, bool) {
		return r.RSSPerConnFresh / 1024, r.Broker != nil && r.Connections > 0 && r.RSSPerConnFresh != 0
	}}
	mConnFail = metric{"failed", false, func(r *loadgen.Result) (float64, bool) { return float64(r.ConnFailed), true }}
)

// stat is the median, min and max of a metric over the rounds that have it.
type stat struct {
	med, lo, hi float64
	n           int
}

func summarize(runs []outcome, m metric) stat {
	var v []float64
	for _, o := range runs {
		if o.res == nil {
			continue
		}
		if x, ok := m.get(o.res); ok && !math.IsNaN(x) && !math.IsInf(x, 0) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return stat{}
	}
	return stat{med: benchkit.Median(v), lo: slices.Min(v), hi: slices.Max(v), n: len(v)}
}

func (s stat) String() string {
	if s.n == 0 {
		return "–"
	}
	if s.n == 1 || s.lo == s.hi {
		return benchkit.Num(s.med)
	}
	return fmt.Sprintf("%s (%s–%s)", benchkit.Num(s.med), benchkit.Num(s.lo), benchkit.Num(s.hi))
}

func ratio(a, b stat) string {
	if a.n == 0 || b.n == 0 || b.med == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", a.med/b.med)
}

func writeReport(w io.Writer, o options, env environment, scs []scenario, syss []*system, res results, commands map[string]string, rtmBin string) map[string]string {
	charts := map[string]string{}
	mode := "full"
	if env.quick {
		mode = "quick (BENCH=quick)"
	}
	fmt.Fprintf(w, "## `make bench`: rtm, bare mochi and Mosquitto side by side\n\n")
	if env.quick {
		fmt.Fprintf(w, "> **Quick mode**: 1.5-second runs and 1,000 connections, to check the harness, not to compare. Run `make bench` (full) on a quiet machine for figures.\n\n")
	}
	if f := strings.Fields(env.loadBefore); len(f) > 0 {
		if l, err := strconv.ParseFloat(f[0], 64); err == nil && l > float64(runtime.NumCPU()) {
			fmt.Fprintf(w, "> **Busy machine**: load average %s on %d CPUs before the run; other work shared the CPUs, so the figures are noisy.\n\n", f[0], runtime.NumCPU())
		}
	}
	fmt.Fprintf(w, "Mode %s, %d rounds (systems alternate: order reversed every other round), medians with (min–max). Generated by `bench/suite` in %s.\n\n",
		mode, env.rounds, env.elapsed.Round(time.Second))
	cmd := "make bench"
	if env.quick {
		cmd = "BENCH=quick make bench"
	}
	fmt.Fprintf(w, "Command: `%s` (runs `go run ./bench/suite -write BENCHMARKS.md`; `-h` lists the flags).\n\n", cmd)
	fmt.Fprintf(w, "| | |\n| --- | --- |\n| date | %s |\n| CPU | %s |\n| kernel | %s |\n| Go | %s |\n| rtm | %s |\n", env.date, env.cpu, env.kernel, env.goVersion, env.rtm)
	for _, s := range syss {
		if s.key != "rtm" && s.key != "rtm3" {
			fmt.Fprintf(w, "| %s | %s |\n", s.title, env.versions[s.key])
		}
	}
	pin := func(s string) string {
		if s == "" {
			return "not pinned"
		}
		return "taskset -c " + s
	}
	fmt.Fprintf(w, "| brokers / load generator | %s / %s |\n| load average before / after | %s / %s |\n\n", pin(env.brokerCPUs), pin(env.loadCPUs), env.loadBefore, env.loadAfter)
	fmt.Fprintf(w, "Systems: **rtm, one node**: `rtm broker` with its embedded store, `auth.devices: token` (every client presents a device token), `auth.acl: %s`, other settings default. "+
		"**rtm, three nodes**: three `rtm broker` processes sharing one `rtm store`, same settings; publishers connect to node 1, subscribers to nodes 2 and 3 (every message crosses a node link); CPU and RSS are the sum of the three; the conn scenario uses node 1. "+
		"**bare mochi**: `bench/baremochi`, mochi-mqtt v2.7.9 with an allow-all hook and nothing else, built from rtm's fork in third_party/mochi (go.mod replaces mochi with it), so it includes the fork's patches but none of rtm's hooks, store or cluster. "+
		"**Mosquitto**: Debian's, `allow_anonymous true`, `persistence false`, `max_queued_messages 100000`, one thread; its default `set_tcp_nodelay false` leaves Nagle's algorithm on, so the kernel coalesces its small writes to one subscriber (fewer segments, at up to a delayed ACK of latency), where rtm and mochi set TCP_NODELAY (Go's default) and coalesce in the broker (rtm's `broker.write_coalesce`). "+
		nodelayNote(syss)+
		"All on loopback; one `rtm bench` process drives each run (MQTT 5, 64-byte payloads carrying a sequence number and the send time).\n\n", aclRules)

	// Ratios.
	var peers []*system
	var rtm *system
	for _, s := range syss {
		if s.key == "rtm" {
			rtm = s
		} else {
			peers = append(peers, s)
		}
	}
	// Mosquitto, bare mochi, then rtm's own cluster: the order of issue 16.
	slices.SortStableFunc(peers, func(a, b *system) int { return peerRank[a.key] - peerRank[b.key] })
	if rtm != nil && len(peers) > 0 {
		fmt.Fprintf(w, "### rtm (one node) ÷ each peer, medians\n\nAbove 1 is better for rtm except where the metric says lower is better.\n\n| scenario | metric |")
		for _, p := range peers {
			fmt.Fprintf(w, " rtm ÷ %s |", p.title)
		}
		fmt.Fprintf(w, "\n| --- | --- |%s\n", strings.Repeat(" --- |", len(peers)))
		for _, sc := range scs {
			ms := []metric{mPerCPU}
			switch {
			case sc.conn:
				ms = []metric{mRSSConn, mConnRate}
			case sc.key == "lat1":
				ms = []metric{mPerCPU, mP50, mP99}
			case sc.key == "fanin1max":
				ms = []metric{mDelivered}
			}
			for _, m := range ms {
				label := m.label
				if !m.higherBetter {
					label += " (lower is better)"
				}
				fmt.Fprintf(w, "| %s | %s |", sc.title, label)
				a := summarize(res[sc.key][rtm.key], m)
				for _, p := range peers {
					fmt.Fprintf(w, " %s |", ratio(a, summarize(res[sc.key][p.key], m)))
				}
				fmt.Fprintln(w)
			}
		}
		fmt.Fprintln(w)
	}

	// Charts.
	var msgScs []scenario
	for _, sc := range scs {
		if !sc.conn {
			msgScs = append(msgScs, sc)
		}
	}
	names := make([]string, len(syss))
	for i, s := range syss {
		names[i] = s.title
	}
	// chart draws group i as metric ms[i] of scenario keys[i].
	chart := func(file, title string, groups []string, ms []metric, keys []string) {
		vals := make([][]float64, len(groups))
		for gi := range groups {
			vals[gi] = make([]float64, len(syss))
			for si, s := range syss {
				vals[gi][si] = summarize(res[keys[gi]][s.key], ms[gi]).med
			}
		}
		charts[file] = barChart(title, groups, names, vals)
		fmt.Fprintf(w, "![%s](%s)\n\n", title, path.Join(o.charts, file))
	}
	var titles, keys []string
	for _, sc := range msgScs {
		titles, keys = append(titles, sc.title), append(keys, sc.key)
	}
	repeat := func(m metric, n int) []metric {
		out := make([]metric, n)
		for i := range out {
			out[i] = m
		}
		return out
	}
	if len(msgScs) > 0 {
		fmt.Fprintf(w, "### Charts\n\n")
		chart("per-cpu.svg", "Messages delivered per broker CPU-second (higher is better)", titles, repeat(mPerCPU, len(keys)), keys)
		chart("delivered.svg", "Messages delivered per second", titles, repeat(mDelivered, len(keys)), keys)
		var lt, lk []string
		var lm []metric
		for _, sc := range msgScs {
			if sc.key == "lat1" || sc.key == "fanin1" {
				lt, lk, lm = append(lt, sc.title+", p50"), append(lk, sc.key), append(lm, mP50)
				lt, lk, lm = append(lt, sc.title+", p99"), append(lk, sc.key), append(lm, mP99)
			}
		}
		if len(lt) > 0 {
			chart("latency.svg", "Publish-to-delivery latency, ms (lower is better)", lt, lm, lk)
		}
	}
	for _, sc := range scs {
		if sc.conn {
			chart("rss-per-conn.svg", "RSS per idle connection, KiB (lower is better)", []string{sc.title}, []metric{mRSSConn}, []string{sc.key})
			chart("connect-rate.svg", "Connections per second (CONNECT→CONNACK)", []string{sc.title}, []metric{mConnRate}, []string{sc.key})
		}
	}

	// Tables.
	fmt.Fprintf(w, "### Each scenario\n\n")
	for _, sc := range scs {
		fmt.Fprintf(w, "#### %s\n\n`rtm bench %s`\n\n", sc.title, strings.Join(sc.args, " "))
		ms := []metric{mDelivered, mPerCPU, mBrokerCPU, mLost, mDups, mP50, mP99, mGenCPU}
		if sc.conn {
			ms = []metric{mConnRate, mConnFail, mRSSConn, mRSSFresh, mP50, mP99, mGenCPU}
		}
		fmt.Fprintf(w, "| system |")
		for _, m := range ms {
			label := m.label
			if sc.conn && (m.label == "p50 ms" || m.label == "p99 ms") {
				label = "CONNACK " + label
			}
			fmt.Fprintf(w, " %s |", label)
		}
		fmt.Fprintf(w, " errors |\n| --- |%s --- |\n", strings.Repeat(" --- |", len(ms)))
		for _, s := range syss {
			runs := res[sc.key][s.key]
			fmt.Fprintf(w, "| %s |", s.title)
			for _, m := range ms {
				if sc.conn && (m.label == "p50 ms" || m.label == "p99 ms") {
					m = connLatency(m.label == "p50 ms")
				}
				fmt.Fprintf(w, " %s |", summarize(runs, m))
			}
			var errs []string
			for i, o := range runs {
				if o.err != "" {
					errs = append(errs, fmt.Sprintf("round %d: %s", i+1, o.err))
				}
			}
			fmt.Fprintf(w, " %s |\n", strings.ReplaceAll(strings.Join(errs, "; "), "|", "\\|"))
		}
		fmt.Fprintln(w)
	}
	for _, sc := range scs {
		if sc.conn {
			fmt.Fprintf(w, "RSS per idle connection: the brokers' RSS growth over the connections held, read `--rss-after` the last connect (%s), after rtm has parked them (5 s idle) and returned the connect storm's garbage to the OS (two quiet 5 s ticks after they parked); the column beside it is read 1 s after the last connect, while they are fresh.\n\n", rssAfter(sc))
		}
	}
	fmt.Fprintf(w, "Lost: messages sent but not delivered when the run ended (5 s drain after publishing). Generator CPU near 1 core per generator thread means the load generator, not the broker, set the pace.\n\n")
	fmt.Fprintf(w, "<details><summary>Exact commands of the last round</summary>\n\n```sh\n")
	for _, sc := range scs {
		for _, s := range syss {
			c := strings.ReplaceAll(commands[sc.key+"/"+s.key], rtmBin, "rtm")
			fmt.Fprintln(w, c)
		}
	}
	fmt.Fprintf(w, "```\n\n</details>\n")
	return charts
}

var peerRank = map[string]int{"mosquitto": 0, "mosquitto-nodelay": 1, "mochi": 2, "rtm3": 3}

// nodelayNote describes the second Mosquitto, when it ran.
func nodelayNote(syss []*system) string {
	for _, s := range syss {
		if s.key == "mosquitto-nodelay" {
			return "**Mosquitto, TCP_NODELAY**: the same with `set_tcp_nodelay true` (every write its own segment, as rtm's writes without coalescing). "
		}
	}
	return ""
}

func connLatency(p50 bool) metric {
	label := "p99 ms"
	if p50 {
		label = "p50 ms"
	}
	return metric{label, false, func(r *loadgen.Result) (float64, bool) {
		if r.ConnLatency == nil {
			return 0, false
		}
		if p50 {
			return r.ConnLatency.P50, true
		}
		return r.ConnLatency.P99, true
	}}
}

// palette colours the systems in the order given.
var palette = []string{"#1f77b4", "#9ecae1", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"}

// barChart draws a horizontal grouped bar chart as SVG: one group per
// label, one bar per series, each with its value.
func barChart(title string, groups, series []string, vals [][]float64) string {
	const (
		width = 820
		left  = 300
		right = 90
		barH  = 14
		gap   = 10
		top   = 56
	)
	peak := 0.0
	for _, g := range vals {
		for _, v := range g {
			peak = max(peak, v)
		}
	}
	if peak == 0 {
		peak = 1
	}
	groupH := len(series)*barH + gap
	height := top + len(groups)*groupH + 20
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="14" font-weight="bold">%s</text>`+"\n", html.EscapeString(title))
	x := 10
	for i, s := range series {
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n", x, 30, palette[i%len(palette)], x+16, 40, html.EscapeString(s))
		x += 24 + 7*len(s)
	}
	for gi, g := range groups {
		y := top + gi*groupH
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", left-8, y+len(series)*barH/2+4, html.EscapeString(g))
		for si := range series {
			v := vals[gi][si]
			w := int(float64(width-left-right) * v / peak)
			by := y + si*barH
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="%s"/>`, left, by, max(w, 1), barH-2, palette[si%len(palette)])
			label := benchkit.Num(v)
			if v == 0 {
				label = "–"
			}
			fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="11">%s</text>`+"\n", left+max(w, 1)+4, by+barH-4, label)
		}
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#888"/>`+"\n", left, top-4, left, height-16)
	b.WriteString("</svg>\n")
	return b.String()
}

// rssAfter is the conn scenario's --rss-after argument.
func rssAfter(sc scenario) string {
	for i, a := range sc.args {
		if a == "--rss-after" && i+1 < len(sc.args) {
			return sc.args[i+1]
		}
	}
	return "1s"
}
