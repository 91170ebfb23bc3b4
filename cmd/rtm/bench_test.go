package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestBenchAgainstDev is CI's smoke test of `rtm bench`: a real `rtm dev`
// process, and `rtm bench pairs --qos 1 --json` as another process against
// it. Not for numbers: it checks the run completes in its bounds, the JSON
// object parses with its documented fields, and QoS 1 loses nothing.
func TestBenchAgainstDev(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := start(t, []string{"RTM_ROUTER_ADDR=127.0.0.1:0", "RTM_PUSHAPI_ADDR=127.0.0.1:0"},
		"dev", "--data", filepath.Join(dir, "data"), "--mqtt-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
		"--gossip-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0")
	re := regexp.MustCompile(`MQTT\s+mqtt://(127\.0\.0\.1:\d+)`)
	var addr string
	testutil.WaitFor(t, 60*time.Second, func() error {
		m := re.FindStringSubmatch(p.stdout.String())
		if m == nil {
			return fmt.Errorf("no MQTT URL in the banner yet: %q", p.stdout.String())
		}
		addr = m[1]
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	began := time.Now()
	cmd := exec.CommandContext(ctx, rtmBin, "bench", "pairs", "--addr", addr, "--qos", "1", "-c", "4", "--rate", "400",
		"--duration", "2s", "--drain", "10s", "--json", "--broker-pid", fmt.Sprint(p.cmd.Process.Pid))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("rtm bench: %v\nstderr: %s", err, stderr.String())
	}
	if took := time.Since(began); took > 60*time.Second {
		t.Errorf("rtm bench took %v for --duration 2s --drain 10s", took)
	}
	var res struct {
		Scenario   string   `json:"scenario"`
		QoS        int      `json:"qos"`
		Sent       int64    `json:"sent"`
		Acked      int64    `json:"acked"`
		Expected   int64    `json:"expected"`
		Delivered  int64    `json:"delivered"`
		Lost       int64    `json:"lost"`
		Duplicated int64    `json:"duplicated"`
		DurationS  float64  `json:"duration_s"`
		Errors     []string `json:"errors"`
		Latency    *struct {
			P50, P99 float64
		} `json:"latency_ms"`
		Broker *struct {
			CPUSeconds float64 `json:"cpu_s"`
			RSSBytes   int64   `json:"rss_bytes"`
		} `json:"broker"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("stdout is not one JSON object: %v\n%s", err, out)
	}
	if res.Scenario != "pairs" || res.QoS != 1 || res.Sent == 0 || res.Acked != res.Sent || res.Delivered != res.Expected ||
		res.Expected != res.Sent || res.Lost != 0 || res.Duplicated != 0 || len(res.Errors) != 0 {
		t.Errorf("QoS 1 against rtm dev: %s", out)
	}
	if res.DurationS < 1.5 || res.DurationS > 5 {
		t.Errorf("published for %.2fs with --duration 2s", res.DurationS)
	}
	if res.Latency == nil || res.Broker == nil || res.Broker.RSSBytes <= 0 {
		t.Errorf("latency or broker usage missing: %s", out)
	}
	if !strings.Contains(stderr.String(), "run 1s/2s") {
		t.Errorf("no progress line on stderr: %q", stderr.String())
	}
}

// TestBenchUsageAndConnectErrors: invalid flags exit 2 naming the flag;
// an address nothing listens on exits 1 saying so.
func TestBenchUsageAndConnectErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bench"}, "want one scenario"},
		{[]string{"bench", "nosuch", "--addr", "127.0.0.1:1883"}, `unknown scenario "nosuch"`},
		{[]string{"bench", "pairs"}, "--addr: no broker address"},
		{[]string{"bench", "pairs", "--addr", "127.0.0.1:1883", "--qos", "3"}, "--qos"},
		{[]string{"bench", "pairs", "--addr", "127.0.0.1:1883", "--version", "4.0"}, "--version"},
		{[]string{"bench", "pairs", "--addr", "127.0.0.1:1883", "--size", "8"}, "--size"},
		{[]string{"bench", "pairs", "--addr", "127.0.0.1:1883", "--duration", "nope"}, "duration"},
	} {
		code, _, stderr := runInProcess(t, nil, tc.args...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("rtm %v: exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	code, out, stderr := runInProcess(t, nil, "bench", "pairs", "--addr", addr, "--duration", "1s", "--json")
	if code != 1 || !strings.Contains(stderr, "connection refused") || !strings.Contains(stderr, addr) || out != "" {
		t.Errorf("no listener: exit %d, stdout %q, stderr %q; want 1 and connection refused", code, out, stderr)
	}
}
