// Command watchdog measures rtm's watchdog, with an `rtm` binary (-rtm,
// built by the caller) run as real processes:
//
//	go build -o /tmp/rtm ./cmd/rtm
//	go run ./bench/watchdog -rtm /tmp/rtm -mode detect [-probe 1s] [-runs 3]
//	go run ./bench/watchdog -rtm /tmp/rtm -mode load -brokers 30 [-duration 60s]
//
// detect: three `rtm broker` processes and an `rtm watchdog` with a webhook
// receiver; one broker is killed with SIGKILL and the program reports the
// time until the node_down alert is firing in GET /v1/alerts and until the
// webhook received it, per run, at gossip probe interval -probe
// (cluster.probe_interval: 1s is the default).
//
// load: -brokers idle brokers in this process (no store), and an `rtm
// watchdog` process polling them every -interval; after a minute of warm-up
// it reports the watchdog process's CPU (utime+stime from /proc) per second
// over -duration and its RSS. Linux only. Everything listens on loopback
// and stops itself; Ctrl-C ends it early.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/obs"
)

const (
	secret   = "bench secret"
	adminKey = "bench-admin-key-0123456789"
)

func main() {
	bin := flag.String("rtm", "", "path of the rtm binary (required)")
	mode := flag.String("mode", "detect", "detect or load")
	probe := flag.Duration("probe", time.Second, "detect: cluster.probe_interval of every process")
	runs := flag.Int("runs", 3, "detect: kills to measure")
	n := flag.Int("brokers", 3, "load: brokers watched")
	interval := flag.Duration("interval", 5*time.Second, "watchdog.interval")
	duration := flag.Duration("duration", 60*time.Second, "load: measuring time after warm-up")
	flag.Parse()
	if *bin == "" {
		fmt.Fprintln(os.Stderr, "-rtm is required")
		os.Exit(2)
	}
	var err error
	switch *mode {
	case "detect":
		err = detect(*bin, *probe, *interval, *runs)
	case "load":
		err = load(*bin, *n, *interval, *duration)
	default:
		err = fmt.Errorf("unknown mode %q", *mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

// proc is a child rtm process with its stderr lines.
type proc struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []string
}

func spawn(bin string, env []string, args ...string) (*proc, error) {
	p := &proc{cmd: exec.Command(bin, args...)}
	p.cmd.Env = append(os.Environ(), env...)
	r, err := p.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
		}
	}()
	return p, nil
}

// field waits for a JSON log line with msg and returns its key.
func (p *proc) field(msg, key string) (any, error) {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		for _, l := range p.lines {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == msg {
				p.mu.Unlock()
				return m[key], nil
			}
		}
		p.mu.Unlock()
		time.Sleep(50 * time.Millisecond)
	}
	return nil, fmt.Errorf("no %q log line within 60s", msg)
}

func (p *proc) stop() {
	_ = p.cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
	}
}

func baseEnv(probe time.Duration) []string {
	return []string{"RTM_AUTH_DEVICES=anonymous", "RTM_BROKER_ADMIN_KEYS=" + adminKey, "RTM_CLUSTER_SECRET=" + secret,
		"RTM_CLUSTER_PROBE_INTERVAL=" + probe.String(), "RTM_LOG_FORMAT=json"}
}

func startBroker(bin, dir, name, gossip, seed string, probe time.Duration) (*proc, string, error) {
	args := []string{"broker", "--node-name", name, "--data", filepath.Join(dir, name), "--mqtt-addr", "127.0.0.1:0", "--ws-addr", "",
		"--admin-addr", "127.0.0.1:0", "--gossip-addr", gossip, "--link-addr", "127.0.0.1:0"}
	if seed != "" {
		args = append(args, "--join", seed)
	}
	p, err := spawn(bin, baseEnv(probe), args...)
	if err != nil {
		return nil, "", err
	}
	g, err := p.field("cluster started", "gossip")
	if err != nil {
		return nil, "", err
	}
	return p, g.(string), nil
}

func detect(bin string, probe, interval time.Duration, runs int) error {
	dir, err := os.MkdirTemp("", "rtm-bench-watchdog-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var mu sync.Mutex
	hooks := map[string]time.Time{}
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var ev struct{ Event, Rule, Node, ID string }
		_ = json.NewDecoder(r.Body).Decode(&ev)
		if ev.Event == "firing" && ev.Rule == "node_down" {
			mu.Lock()
			if _, ok := hooks[ev.ID]; !ok {
				hooks[ev.ID] = time.Now()
			}
			mu.Unlock()
		}
	}))
	defer recv.Close()
	var procs []*proc
	defer func() {
		for _, p := range procs {
			p.stop()
		}
	}()
	b1, seed, err := startBroker(bin, dir, "b1", "127.0.0.1:0", "", probe)
	if err != nil {
		return err
	}
	procs = append(procs, b1)
	for _, name := range []string{"b2", "b3"} {
		p, _, err := startBroker(bin, dir, name, "127.0.0.1:0", seed, probe)
		if err != nil {
			return err
		}
		procs = append(procs, p)
	}
	wd, err := spawn(bin, append(baseEnv(probe), "RTM_WATCHDOG_WEBHOOKS="+recv.URL, "RTM_WATCHDOG_INTERVAL="+interval.String()),
		"watchdog", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", seed, "--data", filepath.Join(dir, "wd"))
	if err != nil {
		return err
	}
	procs = append(procs, wd)
	a, err := wd.field("watchdog started", "addr")
	if err != nil {
		return err
	}
	api := "http://" + a.(string)
	fmt.Printf("probe interval %v, watchdog.interval %v\n", probe, interval)
	for run := 1; run <= runs; run++ {
		name := fmt.Sprintf("k%d", run)
		victim, _, err := startBroker(bin, dir, name, "127.0.0.1:0", seed, probe)
		if err != nil {
			return err
		}
		if err := waitFor(60*time.Second, func() bool { return strings.Contains(get(api+"/v1/nodes"), `"name":"`+name+`","state":"alive"`) }); err != nil {
			return fmt.Errorf("%s never watched: %w", name, err)
		}
		time.Sleep(2 * interval) // steady state
		killed := time.Now()
		_ = victim.cmd.Process.Kill()
		_ = victim.cmd.Wait()
		var firing time.Time
		if err := waitFor(120*time.Second, func() bool {
			var body struct {
				Alerts []struct{ ID, Rule, Node string } `json:"alerts"`
			}
			_ = json.Unmarshal([]byte(get(api+"/v1/alerts?state=firing")), &body)
			for _, al := range body.Alerts {
				if al.Rule == "node_down" && al.Node == name {
					firing = time.Now()
					return true
				}
			}
			return false
		}); err != nil {
			return err
		}
		var hook time.Time
		_ = waitFor(30*time.Second, func() bool {
			mu.Lock()
			defer mu.Unlock()
			for _, t := range hooks {
				if t.After(killed) {
					hook = t
					delete(hooks, "")
					return true
				}
			}
			return false
		})
		mu.Lock()
		hooks = map[string]time.Time{}
		mu.Unlock()
		fmt.Printf("run %d: kill -9 → firing in /v1/alerts %v, → webhook received %v\n", run,
			firing.Sub(killed).Round(10*time.Millisecond), hook.Sub(killed).Round(10*time.Millisecond))
	}
	return nil
}

func get(url string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return ""
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return string(b)
}

func waitFor(d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("not within %v", d)
}

func load(bin string, n int, interval, duration time.Duration) error {
	var bs []*broker.Broker
	defer func() {
		for _, b := range bs {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = b.Shutdown(ctx)
			cancel()
		}
	}()
	seed := ""
	for i := range n {
		cfg := config.Defaults().Broker
		cfg.NodeName = fmt.Sprintf("b%d", i)
		cfg.MQTTAddr, cfg.WSAddr, cfg.AdminAddr, cfg.AdminKeys = "127.0.0.1:0", "", "127.0.0.1:0", adminKey
		cc := config.Defaults().Cluster
		cc.GossipAddr, cc.LinkAddr, cc.Join, cc.Secret = "127.0.0.1:0", "127.0.0.1:0", seed, secret
		auth := config.Defaults().Auth
		auth.Devices = "anonymous"
		b, err := broker.New(broker.Options{Config: cfg, Cluster: cc, Auth: auth, GossipTiming: cluster.TimingLAN, Logger: obs.Discard()})
		if err != nil {
			return err
		}
		if err := b.Start(context.Background()); err != nil {
			return err
		}
		bs = append(bs, b)
		if seed == "" {
			seed = b.GossipAddr()
		}
	}
	dir, err := os.MkdirTemp("", "rtm-bench-watchdog-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	wd, err := spawn(bin, append(baseEnv(time.Second), "RTM_WATCHDOG_INTERVAL="+interval.String()),
		"watchdog", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", seed, "--data", filepath.Join(dir, "wd"))
	if err != nil {
		return err
	}
	defer wd.stop()
	a, err := wd.field("watchdog started", "addr")
	if err != nil {
		return err
	}
	api := "http://" + a.(string)
	if err := waitFor(60*time.Second, func() bool { return strings.Count(get(api+"/v1/nodes"), `"poll_error":""`) >= n }); err != nil {
		return fmt.Errorf("not every broker polled: %w", err)
	}
	// The watchdog's process also runs its embedded store (FerretDB in the
	// same process): the figures include it, as a default deployment would.
	time.Sleep(20 * time.Second)
	cpu0, _ := cpuSeconds(wd.cmd.Process.Pid)
	start := time.Now()
	time.Sleep(duration)
	cpu1, _ := cpuSeconds(wd.cmd.Process.Pid)
	rss, _ := rssKB(wd.cmd.Process.Pid)
	el := time.Since(start).Seconds()
	fmt.Printf("brokers %d, watchdog.interval %v: watchdog CPU %.2f%% of one core over %.0fs, RSS %.1f MiB\n",
		n, interval, 100*(cpu1-cpu0)/el, el, float64(rss)/1024)
	return nil
}

// cpuSeconds is utime+stime of pid.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100, nil // USER_HZ is 100 on Linux
}

func rssKB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS")
}
