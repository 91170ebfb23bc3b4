package loadgen

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteTable writes res as a human-readable summary table.
func WriteTable(w io.Writer, res *Result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, format string, args ...any) {
		fmt.Fprintf(tw, "  %s\t"+format+"\n", append([]any{k}, args...)...)
	}
	addrs := strings.Join(res.Addrs, ",")
	if len(res.PubAddrs) > 0 || len(res.SubAddrs) > 0 {
		addrs = fmt.Sprintf("publishers %s, subscribers %s", orList(res.PubAddrs, res.Addrs), orList(res.SubAddrs, res.Addrs))
	}
	fmt.Fprintf(tw, "rtm bench %s: %s, MQTT %s, QoS %d\n", res.Scenario, addrs, res.MQTTVersion, res.QoS)
	if res.Scenario == ScenarioConn {
		row("connections", "%d held, %d failed", res.Connections, res.ConnFailed)
		row("connect rate", "%s/s (asked: %s)", num(res.ConnRate), rateText(res.TargetRate))
		if l := res.ConnLatency; l != nil {
			row("CONNECT→CONNACK ms", "p50 %s  p90 %s  p99 %s  p99.9 %s  max %s", ms(l.P50), ms(l.P90), ms(l.P99), ms(l.P999), ms(l.Max))
		}
		if res.Broker != nil {
			row("broker RSS", "%s before, %s holding them %.0fs after the last connect: %s per connection (%s 1s after it)", bytesText(res.Broker.RSSBefore),
				bytesText(res.Broker.RSSBytes), max(res.RSSAfterS, 1), bytesText(int64(res.RSSPerConn)), bytesText(int64(res.RSSPerConnFresh)))
		}
	} else {
		row("clients", "%d publishers, %d subscribers, payload %d B, rate %s", res.Publishers, res.Subscribers, res.PayloadBytes, rateText(res.TargetRate))
		row("sent", "%d in %.1fs: %s msg/s", res.Sent, res.DurationS, num(res.SentRate))
		if res.QoS > 0 {
			row("acknowledged", "%d (refused %d)", res.Acked, res.Refused)
		}
		if res.Scenario != ScenarioPub {
			row("delivered", "%d of %d expected: %s msg/s", res.Delivered, res.Expected, num(res.DeliveredRate))
			row("lost", "%d (%s)", res.Lost, pct(res.Lost, res.Expected))
			row("duplicated", "%d", res.Duplicated)
		}
		if l := res.Latency; l != nil {
			row("latency ms", "p50 %s  p90 %s  p99 %s  p99.9 %s  max %s", ms(l.P50), ms(l.P90), ms(l.P99), ms(l.P999), ms(l.Max))
		}
		if res.Broker != nil {
			row("broker", "%.2f CPU-s (%.0f%% of a core): %s msg per CPU-second; RSS %s", res.Broker.CPUSeconds, res.Broker.CPUShare*100,
				num(res.Broker.MsgsPerCPUs), bytesText(res.Broker.RSSBytes))
		}
	}
	row("generator", "%.2f CPU-s (%.0f%% of a core)", res.Generator.CPUSeconds, res.Generator.CPUShare*100)
	for _, e := range res.Errors {
		row("error", "%s", e)
	}
	return tw.Flush()
}

func orList(a, b []string) string {
	if len(a) > 0 {
		return strings.Join(a, ",")
	}
	return strings.Join(b, ",")
}

func rateText(r float64) string {
	if r == 0 {
		return "unlimited"
	}
	return num(r) + "/s"
}

func pct(n, of int64) string {
	if of == 0 {
		return "0%"
	}
	return strconv.FormatFloat(100*float64(n)/float64(of), 'f', 2, 64) + "%"
}

func ms(v float64) string { return strconv.FormatFloat(v, 'f', 3, 64) }

func num(v float64) string {
	if v >= 100 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'f', 1, 64)
}

func bytesText(n int64) string {
	switch {
	case n >= 10<<20 || n <= -10<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 10<<10 || n <= -10<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// ProgressPrinter renders Progress: on a terminal one line redrawn with a
// bar, otherwise one plain line per call.
func ProgressPrinter(w io.Writer, terminal bool) (print func(Progress), done func()) {
	var drawn bool
	print = func(p Progress) {
		var line string
		elapsed := p.Elapsed.Truncate(time.Second)
		if p.Phase == "connect" || p.Phase == "hold" {
			line = fmt.Sprintf("%s %s/%s connected %d", p.Phase, elapsed, p.Duration, p.Connected)
		} else {
			line = fmt.Sprintf("%s %s/%s sent %d delivered %d of %d", p.Phase, elapsed, p.Duration, p.Sent, p.Delivered, p.Expected)
		}
		if !terminal {
			fmt.Fprintln(w, line)
			return
		}
		const width = 30
		frac := min(float64(p.Elapsed)/float64(max(p.Duration, 1)), 1)
		n := int(frac * width)
		bar := strings.Repeat("=", n) + strings.Repeat(" ", width-n)
		fmt.Fprintf(w, "\r\x1b[K[%s] %s", bar, line)
		drawn = true
	}
	done = func() {
		if drawn {
			fmt.Fprintln(w)
		}
	}
	return print, done
}
