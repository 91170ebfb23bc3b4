package benchkit

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// epoch anchors Mono: durations on the monotonic clock as int64, cheap to
// store atomically and to carry in a payload.
var epoch = time.Now()

// Mono is the time since the harness started, in nanoseconds.
func Mono() int64 { return int64(time.Since(epoch)) }

// Logf prints a progress line to standard error, with the time.
func Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, time.Now().Format("15:04:05 ")+format+"\n", args...)
}

// Tracker counts deliveries and remembers when the last one arrived.
type Tracker struct {
	want int64
	n    atomic.Int64
	last atomic.Int64 // Mono() of the latest delivery
	done chan struct{}
}

// NewTracker expects want deliveries.
func NewTracker(want int64) *Tracker { return &Tracker{want: want, done: make(chan struct{})} }

// Hit counts one delivery.
func (tr *Tracker) Hit() {
	tr.last.Store(Mono())
	if tr.n.Add(1) == tr.want {
		close(tr.done)
	}
}

// Done is closed once every expected delivery arrived.
func (tr *Tracker) Done() <-chan struct{} { return tr.done }

// Received is the number of deliveries so far.
func (tr *Tracker) Received() int64 { return tr.n.Load() }

// Wait returns when every delivery arrived, when the senders are done and
// nothing arrived for idle (messages lost), or when ctx ends.
func (tr *Tracker) Wait(ctx context.Context, sent <-chan struct{}, idle time.Duration) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var sentAt int64
	for {
		select {
		case <-tr.done:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("timed out with %d of %d delivered: %w", tr.n.Load(), tr.want, ctx.Err())
		case <-sent:
			sentAt, sent = Mono(), nil
		case <-tick.C:
			if sent != nil {
				continue
			}
			if quiet := time.Duration(Mono() - max(sentAt, tr.last.Load())); quiet > idle {
				return fmt.Errorf("%d of %d delivered, nothing for %s after the last send", tr.n.Load(), tr.want, idle)
			}
		}
	}
}

// Rate is deliveries per second from start (a Mono time) to the last
// delivery.
func (tr *Tracker) Rate(start int64) float64 {
	d := time.Duration(tr.last.Load() - start)
	if d <= 0 {
		return 0
	}
	return float64(tr.n.Load()) / d.Seconds()
}

// Median of v (not modified).
func Median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Num formats v with three significant digits, thousands separated.
func Num(v float64) string {
	switch {
	case v >= 1000:
		// Three significant digits: 123456 → 123,000.
		r, _ := strconv.ParseFloat(strconv.FormatFloat(v, 'g', 3, 64), 64)
		return Thousands(strconv.FormatFloat(r, 'f', 0, 64))
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}

// Thousands puts a comma between every three digits of an integer.
func Thousands(s string) string {
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// Loadavg is the machine's load averages (1, 5, 15 minutes), or "?".
func Loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// FreePort asks the kernel for a free loopback port. The port is released
// before the broker binds it; on a quiet loopback-only host nothing else
// takes it in between.
func FreePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}
