package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

// Credentials of the rtm systems under test.
const (
	adminKey = "bench-admin-key-0123456789"
	tokenKey = "bench-token-key-0123456789abcdef"
	// aclRules are production-like extra rules, so every publish and
	// delivery walks a rule list as it would in a deployment.
	aclRules = "deny all secret/#; allow sub $SYS/broker/#; deny pub %c/status/#"
	// clusterSettle lets subscriptions reach the other nodes before the
	// first publish.
	clusterSettle = "1s"
)

// proc is a child process of the suite, stopped by PID.
type proc struct {
	name    string
	cmd     *exec.Cmd
	exited  chan struct{}
	logPath string
	once    sync.Once
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) stop() {
	p.once.Do(func() {
		select {
		case <-p.exited:
			return
		default:
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(20 * time.Second):
			benchkit.Logf("%s (pid %d) did not stop within 20s, killing it", p.name, p.pid())
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	})
}

func (p *proc) alive() error {
	select {
	case <-p.exited:
		return fmt.Errorf("%s (pid %d) exited: %v; log: %s", p.name, p.pid(), p.cmd.ProcessState, p.logPath)
	default:
		return nil
	}
}

// pinned prefixes argv with taskset when cpus is set.
func pinned(cpus string, argv []string) []string {
	if cpus == "" {
		return argv
	}
	return append([]string{"taskset", "-c", cpus}, argv...)
}

// startChild starts argv (pinned to cpus), logging to dir/name.log, in its
// own process group so a terminal's Ctrl-C reaches only the suite, which
// stops its children itself (and the kernel kills them if the suite dies).
func startChild(dir, name, cpus string, argv, env []string) (*proc, error) {
	logPath := filepath.Join(dir, name+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	argv = pinned(cpus, argv)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", argv[0], err)
	}
	p := &proc{name: name, cmd: cmd, exited: make(chan struct{}), logPath: logPath}
	go func() {
		_ = cmd.Wait()
		lf.Close()
		close(p.exited)
	}()
	return p, nil
}

func poll(ctx context.Context, p *proc, timeout time.Duration, what string, check func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		err := check(ctx)
		if err == nil {
			return nil
		}
		if perr := p.alive(); perr != nil {
			return perr
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last: %v)", what, ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func dialable(addr string) func(context.Context) error {
	return func(ctx context.Context) error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			_ = c.Close()
		}
		return err
	}
}

var hc = &http.Client{Timeout: 5 * time.Second}

func adminGet(ctx context.Context, admin, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+adminKey)
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	if v == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// system is one broker setup under test.
type system struct {
	key, title string
	// pubAddrs and subAddrs are where publishers and subscribers connect
	// (different nodes in the cluster).
	pubAddrs, subAddrs []string
	pids               []int  // every broker process: CPU and RSS are summed
	connPID            int    // the process the conn scenario's clients reach
	connAddr           string // ... at this address
	extra              []string
	admin              string // rtm: node 1's admin address (profiles)
	procs              []*proc
	version            string
}

// stop stops the brokers at once (a cluster node's graceful leave takes
// seconds, one after the other they would add up), then the store.
func (s *system) stop() {
	var wg sync.WaitGroup
	for _, p := range s.procs {
		if p.name == "store" {
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); p.stop() }()
	}
	wg.Wait()
	for _, p := range s.procs {
		p.stop()
	}
}

func (s *system) alive() error {
	for _, p := range s.procs {
		if err := p.alive(); err != nil {
			return err
		}
	}
	return nil
}

// rtmEnv is the production configuration of the rtm systems: token auth
// for devices, extra ACL rules, an admin key; the rest defaults.
var rtmEnv = []string{"RTM_AUTH_DEVICES=token", "RTM_AUTH_TOKEN_KEYS=" + tokenKey, "RTM_AUTH_ACL=" + aclRules,
	"RTM_BROKER_ADMIN_KEYS=" + adminKey}

type rtmNode struct {
	p                         *proc
	mqtt, admin, gossip, link string
}

func startRTMNode(ctx context.Context, dir, bin, cpus, name, storeURI, join string) (*rtmNode, error) {
	n := &rtmNode{}
	for _, a := range []*string{&n.mqtt, &n.admin, &n.gossip, &n.link} {
		var err error
		if *a, err = benchkit.FreePort(); err != nil {
			return nil, err
		}
	}
	args := []string{bin, "broker", "--node-name", name, "--mqtt-addr", n.mqtt, "--ws-addr", "", "--admin-addr", n.admin,
		"--data", filepath.Join(dir, "data-"+name), "--log-level", "warn", "--log-format", "json"}
	if storeURI != "" {
		args = append(args, "--store-uri", storeURI, "--gossip-addr", n.gossip, "--link-addr", n.link, "--cluster-secret", "bench")
		if join != "" {
			args = append(args, "--join", join)
		}
	} else {
		args = append(args, "--gossip-addr", "")
	}
	p, err := startChild(dir, name, cpus, args, rtmEnv)
	if err != nil {
		return nil, err
	}
	n.p = p
	if err := poll(ctx, p, 90*time.Second, name+" /readyz", func(ctx context.Context) error {
		return adminGet(ctx, n.admin, "/readyz", nil)
	}); err != nil {
		p.stop()
		return nil, err
	}
	return n, nil
}

// startRTM starts one rtm broker with its embedded store.
func startRTM(ctx context.Context, dir, bin, cpus, version string) (*system, error) {
	n, err := startRTMNode(ctx, dir, bin, cpus, "rtm", "", "")
	if err != nil {
		return nil, err
	}
	return &system{key: "rtm", title: "rtm, one node", pubAddrs: []string{n.mqtt}, subAddrs: []string{n.mqtt}, pids: []int{n.p.pid()},
		connPID: n.p.pid(), connAddr: n.mqtt, extra: []string{"--token-key", tokenKey}, admin: n.admin, procs: []*proc{n.p}, version: version}, nil
}

// startRTMCluster starts a shared store and three rtm nodes joined into a
// cluster: publishers use node 1, subscribers nodes 2 and 3.
func startRTMCluster(ctx context.Context, dir, bin, cpus, version string) (*system, error) {
	s := &system{key: "rtm3", title: "rtm, three nodes", extra: []string{"--token-key", tokenKey, "--settle", clusterSettle}, version: version}
	storeAddr, err := benchkit.FreePort()
	if err != nil {
		return nil, err
	}
	st, err := startChild(dir, "store", cpus, []string{bin, "store", "--addr", storeAddr, "--data", filepath.Join(dir, "store"), "--log-level", "warn"}, nil)
	if err != nil {
		return nil, err
	}
	s.procs = append(s.procs, st)
	if err := poll(ctx, st, 60*time.Second, "store "+storeAddr, dialable(storeAddr)); err != nil {
		s.stop()
		return nil, err
	}
	uri := "mongodb://" + storeAddr + "/"
	var nodes []*rtmNode
	for i, name := range []string{"n1", "n2", "n3"} {
		join := ""
		if i > 0 {
			join = nodes[0].gossip
		}
		n, err := startRTMNode(ctx, dir, bin, cpus, name, uri, join)
		if err != nil {
			s.stop()
			return nil, err
		}
		nodes = append(nodes, n)
		s.procs = append(s.procs, n.p)
		s.pids = append(s.pids, n.p.pid())
	}
	// Formed: node 1 sees the others alive with its links up.
	err = poll(ctx, nodes[0].p, 60*time.Second, "cluster formed", func(ctx context.Context) error {
		var cs struct {
			Members []struct{ Name, Status string } `json:"members"`
			Links   []map[string]any                `json:"links"`
		}
		if err := adminGet(ctx, nodes[0].admin, "/v1/cluster", &cs); err != nil {
			return err
		}
		alive, up := 0, 0
		for _, m := range cs.Members {
			if m.Status == "alive" {
				alive++
			}
		}
		for _, l := range cs.Links {
			if l["state"] == "up" {
				up++
			}
		}
		if alive < 3 || up < 2 {
			return fmt.Errorf("%d members alive, %d links up", alive, up)
		}
		return nil
	})
	if err != nil {
		s.stop()
		return nil, err
	}
	s.pubAddrs = []string{nodes[0].mqtt}
	s.subAddrs = []string{nodes[1].mqtt, nodes[2].mqtt}
	s.connAddr, s.connPID, s.admin = nodes[0].mqtt, nodes[0].p.pid(), nodes[0].admin
	return s, nil
}

// startMochi starts bench/baremochi.
func startMochi(ctx context.Context, dir, bin, cpus string) (*system, error) {
	addr, err := benchkit.FreePort()
	if err != nil {
		return nil, err
	}
	p, err := startChild(dir, "mochi", cpus, []string{bin, "-addr", addr}, nil)
	if err != nil {
		return nil, err
	}
	if err := poll(ctx, p, 30*time.Second, "baremochi "+addr, dialable(addr)); err != nil {
		p.stop()
		return nil, err
	}
	return &system{key: "mochi", title: "bare mochi", pubAddrs: []string{addr}, subAddrs: []string{addr}, pids: []int{p.pid()},
		connPID: p.pid(), connAddr: addr, procs: []*proc{p}, version: "mochi-mqtt v2.7.9 + rtm's fork patches (third_party/mochi), allow-all hook"}, nil
}

// mosquittoConf: anonymous, no persistence, and a deeper queue than the
// default 1000 (the same as bench/throughput), so a burst is not dropped
// by configuration alone; one listener on loopback.
const mosquittoConf = "listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"

// startMosquitto starts Mosquitto; nodelay adds `set_tcp_nodelay true`
// (system "mosquitto-nodelay"), turning Nagle's algorithm off as rtm does.
func startMosquitto(ctx context.Context, dir, bin, cpus string, nodelay bool) (*system, error) {
	addr, err := benchkit.FreePort()
	if err != nil {
		return nil, err
	}
	_, port, _ := net.SplitHostPort(addr)
	conf := filepath.Join(dir, "mosquitto.conf")
	text := fmt.Sprintf(mosquittoConf, port)
	if nodelay {
		text += "set_tcp_nodelay true\n"
	}
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		return nil, err
	}
	p, err := startChild(dir, "mosquitto", cpus, []string{bin, "-c", conf}, nil)
	if err != nil {
		return nil, err
	}
	if err := poll(ctx, p, 30*time.Second, "mosquitto "+addr, dialable(addr)); err != nil {
		p.stop()
		return nil, err
	}
	v := "mosquitto"
	if out, _ := exec.Command(bin, "-h").Output(); len(out) > 0 {
		v = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	key, title := "mosquitto", "Mosquitto"
	if nodelay {
		key, title, v = "mosquitto-nodelay", "Mosquitto, TCP_NODELAY", v+", set_tcp_nodelay true"
	}
	return &system{key: key, title: title, pubAddrs: []string{addr}, subAddrs: []string{addr}, pids: []int{p.pid()},
		connPID: p.pid(), connAddr: addr, procs: []*proc{p}, version: v}, nil
}

// build builds pkg of the enclosing module into dir/name.
func build(ctx context.Context, dir, name, pkg, version string) (string, error) {
	gomod, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	if err != nil || root == "." || strings.TrimSpace(string(gomod)) == os.DevNull {
		return "", fmt.Errorf("run from inside the rtm module (go env GOMOD: %q, %v)", gomod, err)
	}
	bin := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-X main.version="+version, "-o", bin, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stderr = os.Stderr
	benchkit.Logf("building %s", pkg)
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	return bin, nil
}

func gitDescribe() string {
	out, err := exec.Command("git", "describe", "--always", "--dirty").Output()
	if err != nil {
		return "dev"
	}
	return strings.TrimSpace(string(out))
}
