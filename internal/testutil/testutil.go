// Package testutil holds helpers for rtm's tests: polling with a deadline,
// logs routed to t.Log, and MQTT client helpers. It imports no rtm package,
// and only _test.go files import it.
package testutil

import (
	"bytes"
	"context"

	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// WaitFor polls cond until it returns nil or the timeout passes, then fails
// the test with cond's last error, which should say expected versus got.
func WaitFor(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	wait := time.Millisecond
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", timeout, err)
		}
		time.Sleep(wait) // polling interval, not synchronisation
		if wait < 50*time.Millisecond {
			wait *= 2
		}
	}
}

// Context returns a context that ends with the test or after timeout.
func Context(t testing.TB, timeout time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}

// Logger returns a logger whose lines go to t.Log (shown when the test fails
// or with -v) and are also kept for assertions through the returned Buffer.
func Logger(t testing.TB) (*slog.Logger, *LogBuffer) {
	buf := &LogBuffer{t: t}
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})), buf
}

// LogBuffer collects log lines.
type LogBuffer struct {
	t    testing.TB
	mu   sync.Mutex
	buf  bytes.Buffer
	done bool
}

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Write(p)
	if !b.done {
		b.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// Stop ends the copying to t.Log; call it before the test returns when
// goroutines may still log, since t.Log panics after the test ends.
func (b *LogBuffer) Stop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.done = true
}

// Count returns how many lines hold every one of parts.
func (b *LogBuffer) Count(parts ...string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, line := range strings.Split(b.buf.String(), "\n") {
		ok := line != ""
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			n++
		}
	}
	return n
}

// Contains reports whether any line holds every one of parts.
func (b *LogBuffer) Contains(parts ...string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, line := range strings.Split(b.buf.String(), "\n") {
		ok := true
		for _, p := range parts {
			if !strings.Contains(line, p) {
				ok = false
				break
			}
		}
		if ok && line != "" {
			return true
		}
	}
	return false
}
