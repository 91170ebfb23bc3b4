package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

// counters are a broker's own cumulative counters, read before and after a
// run: what it says it dropped, and how many clients it holds.
type counters struct {
	dropped int64
	conns   int64
}

// target is one broker under test, running as a child process.
type target struct {
	name    string
	addr    string // MQTT over TCP, host:port
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the process has been reaped
	logPath string        // the child's stdout and stderr
	// read returns the broker's counters as of now (or later).
	read func(ctx context.Context) (counters, error)
	// baseConns is the number of connections held by the harness itself
	// (mosquitto's $SYS monitor), so a drained broker reports this many.
	baseConns int64
	// last is the reading after the previous run: nothing but the
	// harness's runs touches the broker, so it is the next run's "before".
	last     counters
	cleanup  func()
	stopOnce sync.Once
}

func (t *target) pid() int { return t.cmd.Process.Pid }

// stop sends SIGTERM to the broker's PID, waits up to timeout for it to
// exit, then sends SIGKILL. It is idempotent.
func (t *target) stop(timeout time.Duration) {
	t.stopOnce.Do(func() {
		if t.cleanup != nil {
			t.cleanup()
		}
		_ = t.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-t.exited:
		case <-time.After(timeout):
			benchkit.Logf("%s (pid %d) did not stop within %s, killing it", t.name, t.pid(), timeout)
			_ = t.cmd.Process.Kill()
			<-t.exited
		}
	})
}

// alive reports an error if the broker process has exited.
func (t *target) alive() error {
	select {
	case <-t.exited:
		return fmt.Errorf("%s (pid %d) exited: %v; log: %s", t.name, t.pid(), t.cmd.ProcessState, t.logPath)
	default:
		return nil
	}
}

// drained polls until the broker holds only the harness's own connections,
// so one run's disconnects do not overlap the next run, and returns the
// counters read then.
func (t *target) drained(ctx context.Context, timeout time.Duration) (counters, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last counters
	var lastErr error
	for {
		c, err := t.read(ctx)
		if err == nil && c.conns <= t.baseConns {
			return c, nil
		}
		if err == nil {
			last = c
		} else {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			if lastErr != nil && last == (counters{}) {
				return counters{}, fmt.Errorf("read %s counters: %w", t.name, lastErr)
			}
			return last, fmt.Errorf("%s still holds %d connections (want %d): %w", t.name, last.conns, t.baseConns, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// startChild starts bin with args and env (added to this process's),
// logging to dir/name.log, in its own process group so a terminal Ctrl-C
// reaches only the harness, which then stops the child itself.
func startChild(dir, name, bin string, args, env []string) (*target, error) {
	logPath := filepath.Join(dir, name+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	t := &target{name: name, cmd: cmd, exited: make(chan struct{}), logPath: logPath}
	go func() {
		_ = cmd.Wait()
		lf.Close()
		close(t.exited)
	}()
	return t, nil
}

// startRTM runs `rtm broker` with a fresh data directory (its embedded
// store included) and the given limits, and waits for /readyz.
func startRTM(ctx context.Context, dir, bin string, maxQueued, maxInflight int) (*target, error) {
	mqttAddr, err := benchkit.FreePort()
	if err != nil {
		return nil, err
	}
	adminAddr, err := benchkit.FreePort()
	if err != nil {
		return nil, err
	}
	data := filepath.Join(dir, "rtm-data")
	// One node, compared with one Mosquitto: no gossip, no node link.
	args := []string{"broker", "--data", data, "--mqtt-addr", mqttAddr, "--ws-addr", "",
		"--admin-addr", adminAddr, "--gossip-addr", "", "--log-level", "warn", "--log-format", "json"}
	// The clients have no tokens (ACLs still apply); /v1/stats needs the
	// admin key.
	env := []string{"RTM_AUTH_DEVICES=anonymous", "RTM_BROKER_ADMIN_KEYS=" + adminKey}
	if maxQueued > 0 { // 0: rtm's default
		env = append(env, "RTM_BROKER_MAX_QUEUED="+strconv.Itoa(maxQueued))
	}
	if maxInflight > 0 {
		env = append(env, "RTM_BROKER_MAX_INFLIGHT="+strconv.Itoa(maxInflight))
	}
	t, err := startChild(dir, "rtm", bin, args, env)
	if err != nil {
		return nil, err
	}
	t.addr = mqttAddr
	hc := &http.Client{Timeout: 5 * time.Second}
	t.read = func(ctx context.Context) (counters, error) { return rtmCounters(ctx, hc, adminAddr) }
	if err := waitHTTP(ctx, hc, "http://"+adminAddr+"/readyz", t, 60*time.Second); err != nil {
		t.stop(20 * time.Second)
		return nil, err
	}
	return t, nil
}

// adminKey is broker.admin_keys of the measured broker.
const adminKey = "bench-admin-key-0123456789"

// rtmCounters reads /v1/stats: drops are messages_dropped (queue full, all
// QoS) plus inflight_dropped (session full).
func rtmCounters(ctx context.Context, hc *http.Client, adminAddr string) (counters, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+adminAddr+"/v1/stats", nil)
	if err != nil {
		return counters{}, err
	}
	req.Header.Set("Authorization", "Bearer "+adminKey)
	resp, err := hc.Do(req)
	if err != nil {
		return counters{}, err
	}
	defer resp.Body.Close()
	var s struct {
		Connections     int64            `json:"connections"`
		MessagesDropped map[string]int64 `json:"messages_dropped"`
		InflightDropped int64            `json:"inflight_dropped"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return counters{}, fmt.Errorf("decode /v1/stats: %w", err)
	}
	c := counters{conns: s.Connections, dropped: s.InflightDropped}
	for _, n := range s.MessagesDropped {
		c.dropped += n
	}
	return c, nil
}

func waitHTTP(ctx context.Context, hc *http.Client, url string, t *target, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		if err := t.alive(); err != nil {
			return err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready at %s: %w; log: %s", t.name, url, ctx.Err(), t.logPath)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// startMosquitto runs mosquitto with a temporary configuration and connects
// a monitor client to its $SYS tree for drop and connection counts.
func startMosquitto(ctx context.Context, dir, bin string, maxQueued, maxInflight int) (*target, error) {
	addr, err := benchkit.FreePort()
	if err != nil {
		return nil, err
	}
	_, port, _ := net.SplitHostPort(addr)
	conf := filepath.Join(dir, "mosquitto.conf")
	lines := []string{
		"listener " + port + " 127.0.0.1",
		"allow_anonymous true",
		"persistence false",
	}
	// 0 leaves mosquitto's default (-defaults).
	if maxInflight > 0 {
		// Outgoing QoS 1/2 in flight per client, as rtm's max_inflight; an
		// MQTT 5 subscriber's Receive Maximum lowers it further. (0 would
		// mean no limit, and mosquitto would then never drop QoS 0.)
		lines = append(lines, fmt.Sprintf("max_inflight_messages %d", maxInflight))
	}
	if maxQueued > 0 {
		// Packets waiting to be written to a client before mosquitto drops
		// QoS 0 (and queues QoS 1/2 beyond those in flight); its default of
		// 1000 drops in the fan-in scenario.
		lines = append(lines, fmt.Sprintf("max_queued_messages %d", maxQueued))
	}
	body := strings.Join(append(lines,
		"sys_interval 1",
		"log_dest stderr",
		"log_type error",
		"log_type warning",
		"",
	), "\n")
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		return nil, err
	}
	t, err := startChild(dir, "mosquitto", bin, []string{"-c", conf}, nil)
	if err != nil {
		return nil, err
	}
	t.addr = addr
	m, err := newSysMonitor(ctx, t, 30*time.Second)
	if err != nil {
		t.stop(10 * time.Second)
		return nil, err
	}
	t.read = m.read
	t.baseConns = 1
	t.cleanup = func() { benchkit.HangUp(m.c) }
	return t, nil
}

// sysMonitor follows mosquitto's $SYS counters, published every second
// (sys_interval 1) when they change; the uptime changes every tick.
type sysMonitor struct {
	c       *paho.Client
	mu      sync.Mutex
	uptime  int64
	dropped int64
	conns   int64
	tick    chan struct{} // closed and replaced on every uptime update
}

func newSysMonitor(ctx context.Context, t *target, timeout time.Duration) (*sysMonitor, error) {
	m := &sysMonitor{tick: make(chan struct{})}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var (
		c   *paho.Client
		err error
	)
	for {
		if err := t.alive(); err != nil {
			return nil, err
		}
		c, _, err = benchkit.Dial(ctx, t.addr, benchkit.Options{ID: "bench-sys-monitor", ReceiveMax: 1024, OnPublish: m.onPublish})
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("mosquitto not accepting at %s: %v; log: %s", t.addr, err, t.logPath)
		case <-time.After(100 * time.Millisecond):
		}
	}
	m.c = c
	for _, f := range []string{"$SYS/broker/uptime", "$SYS/broker/publish/messages/dropped", "$SYS/broker/clients/connected"} {
		if err := benchkit.Subscribe(ctx, c, f, 0); err != nil {
			benchkit.HangUp(c)
			return nil, err
		}
	}
	return m, nil
}

func (m *sysMonitor) onPublish(p *paho.Publish) {
	f := strings.Fields(string(p.Payload))
	if len(f) == 0 {
		return
	}
	n, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	switch p.Topic {
	case "$SYS/broker/uptime":
		m.uptime = n
		close(m.tick)
		m.tick = make(chan struct{})
	case "$SYS/broker/publish/messages/dropped":
		m.dropped = n
	case "$SYS/broker/clients/connected":
		m.conns = n
	}
}

// read waits for two uptime ticks past the current one, so the values
// returned were published after the call began (1–2 s).
func (m *sysMonitor) read(ctx context.Context) (counters, error) {
	m.mu.Lock()
	want := m.uptime + 2
	m.mu.Unlock()
	for {
		m.mu.Lock()
		if m.uptime >= want {
			c := counters{dropped: m.dropped, conns: m.conns}
			m.mu.Unlock()
			return c, nil
		}
		tick := m.tick
		m.mu.Unlock()
		select {
		case <-tick:
		case <-ctx.Done():
			return counters{}, ctx.Err()
		case <-time.After(5 * time.Second):
			return counters{}, errors.New("no $SYS/broker/uptime update from mosquitto for 5s")
		}
	}
}
