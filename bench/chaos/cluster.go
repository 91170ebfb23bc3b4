package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

const adminKey = "chaos-admin-key-0123456789abcdef"

// proc is one child process (the store, a broker, the router). Every way
// out of the harness ends the children still running, by PID.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

var (
	childMu  sync.Mutex
	children = map[*proc]bool{}
)

func startProc(cmd *exec.Cmd) (*proc, error) {
	p := &proc{cmd: cmd, done: make(chan struct{})}
	// Ended with the harness even when it is killed outright.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	childMu.Lock()
	children[p] = true
	childMu.Unlock()
	go func() {
		_ = cmd.Wait()
		childMu.Lock()
		delete(children, p)
		childMu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// endChildren kills every child still running (a stopped one too: SIGKILL
// ends a process under SIGSTOP) and waits for it.
func endChildren() {
	childMu.Lock()
	var ps []*proc
	for p := range children {
		ps = append(ps, p)
	}
	childMu.Unlock()
	for _, p := range ps {
		_ = p.cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
		}
	}
}

// startStore starts `rtm store` and returns its URI.
func startStore(bin, data, logDir string) (string, error) {
	cmd := exec.Command(bin, "store", "--addr", "127.0.0.1:0", "--data", data)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	lf, err := os.Create(filepath.Join(logDir, "store.log"))
	if err != nil {
		return "", err
	}
	cmd.Stderr = lf
	p, err := startProc(cmd)
	if err != nil {
		return "", err
	}
	re := regexp.MustCompile(`use --store-uri (mongodb://\S+)`)
	uri := make(chan string, 1)
	go func() {
		defer lf.Close()
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			_, _ = fmt.Fprintln(lf, sc.Text())
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case uri <- m[1]:
				default:
				}
			}
		}
	}()
	select {
	case u := <-uri:
		return u, nil
	case <-p.done:
		return "", fmt.Errorf("rtm store exited (log: %s)", lf.Name())
	case <-time.After(2 * time.Minute):
		return "", fmt.Errorf("rtm store printed no URI in 2m")
	}
}

// node is one `rtm broker`. Its addresses are those it bound at its first
// start; a restart binds the same ones, so clients and peers find it again.
type node struct {
	idx                       int
	name, data                string
	mqtt, admin, gossip, link string

	mu    sync.Mutex
	p     *proc
	state string // up, down, stopped, starting
	start int    // starts so far
}

func (n *node) getState() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state
}

func (n *node) setState(s string) {
	n.mu.Lock()
	n.state = s
	n.mu.Unlock()
}

func (n *node) addr() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mqtt
}

type cluster struct {
	bin, storeURI, secret, logDir, root string
	probe, logLevel                     string
	nodes                               []*node
	router                              string // the router's HTTP address, or empty
}

// run starts (or restarts) n and waits for its "broker started" line.
func (c *cluster) run(n *node) error {
	n.mu.Lock()
	n.state = "starting"
	n.start++
	first := n.start == 1
	n.mu.Unlock()
	args := []string{"broker", "--node-name", n.name, "--data", n.data, "--store-uri", c.storeURI,
		"--mqtt-addr", n.mqtt, "--ws-addr", "", "--admin-addr", n.admin, "--gossip-addr", n.gossip, "--link-addr", n.link,
		"--cluster-secret", c.secret, "--log-format", "json"}
	var seeds []string
	for _, o := range c.nodes {
		if o != n && o.gossip != "127.0.0.1:0" {
			seeds = append(seeds, o.gossip)
		}
	}
	if len(seeds) > 0 {
		args = append(args, "--join", strings.Join(seeds, ","))
	}
	cmd := exec.Command(c.bin, args...)
	cmd.Env = append(os.Environ(), "RTM_AUTH_DEVICES=anonymous", "RTM_BROKER_DURABILITY=on",
		"RTM_BROKER_ADMIN_KEYS="+adminKey, "RTM_BROKER_MAX_QUEUED=65535",
		"RTM_CLUSTER_PROBE_INTERVAL="+c.probe)
	if c.logLevel != "" {
		cmd.Env = append(cmd.Env, "RTM_LOG_LEVEL="+c.logLevel)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	lf, err := os.OpenFile(filepath.Join(c.logDir, n.name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	_, _ = fmt.Fprintf(lf, `{"time":%q,"msg":"chaos: start %d of %s"}`+"\n", time.Now().UTC().Format(time.RFC3339Nano), n.start, n.name)
	p, err := startProc(cmd)
	if err != nil {
		lf.Close()
		return err
	}
	started := make(chan map[string]string, 1)
	go func() {
		defer lf.Close()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			_, _ = lf.Write(append(sc.Bytes(), '\n'))
			if !strings.Contains(sc.Text(), `"broker started"`) {
				continue
			}
			var rec struct {
				Listeners map[string]string `json:"listeners"`
			}
			if json.Unmarshal(sc.Bytes(), &rec) == nil {
				select {
				case started <- rec.Listeners:
				default:
				}
			}
		}
	}()
	select {
	case l := <-started:
		n.mu.Lock()
		n.p, n.mqtt, n.admin, n.state = p, l["tcp"], l["admin"], "up"
		n.mu.Unlock()
	case <-p.done:
		return fmt.Errorf("%s exited before starting (log: %s)", n.name, filepath.Join(c.logDir, n.name+".log"))
	case <-time.After(2 * time.Minute):
		return fmt.Errorf("%s did not start in 2m", n.name)
	}
	if first {
		var cs struct {
			Gossip string `json:"gossip_addr"`
			Link   string `json:"link_addr"`
		}
		if err := adminGet(n.admin, "/v1/cluster", &cs); err != nil {
			return err
		}
		n.mu.Lock()
		n.gossip, n.link = cs.Gossip, cs.Link
		n.mu.Unlock()
	}
	return nil
}

// formed waits until every node sees every other node alive and holds a
// route of each (every node has subscribers).
func (c *cluster) formed(ctx context.Context, d time.Duration, routes bool) error {
	deadline := time.Now().Add(d)
	for {
		err := c.isFormed(routes)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *cluster) isFormed(routes bool) error {
	for _, n := range c.nodes {
		var cs struct {
			Members []struct {
				Name   string `json:"name"`
				Status string `json:"status"`
				Role   string `json:"role"`
			} `json:"members"`
			RemoteRoutes map[string]int `json:"remote_routes"`
		}
		if err := adminGet(n.admin, "/v1/cluster", &cs); err != nil {
			return fmt.Errorf("%s: %w", n.name, err)
		}
		alive := 0
		for _, m := range cs.Members {
			if m.Status == "alive" && m.Role != "router" {
				alive++
			}
		}
		if alive < len(c.nodes) {
			return fmt.Errorf("%s sees %d of %d brokers alive", n.name, alive, len(c.nodes))
		}
		if routes {
			for _, o := range c.nodes {
				if o != n && cs.RemoteRoutes[o.name] == 0 {
					return fmt.Errorf("%s holds no route of %s", n.name, o.name)
				}
			}
		}
	}
	return nil
}

// startRouter starts `rtm router` joined to the cluster and returns its
// HTTP address.
func (c *cluster) startRouter() (string, error) {
	var seeds []string
	for _, n := range c.nodes {
		seeds = append(seeds, n.gossip)
	}
	cmd := exec.Command(c.bin, "router", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0",
		"--join", strings.Join(seeds, ","), "--cluster-secret", c.secret, "--log-format", "json")
	cmd.Env = append(os.Environ(), "RTM_CLUSTER_PROBE_INTERVAL="+c.probe)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return "", err
	}
	lf, err := os.Create(filepath.Join(c.logDir, "router.log"))
	if err != nil {
		return "", err
	}
	p, err := startProc(cmd)
	if err != nil {
		return "", err
	}
	addr := make(chan string, 1)
	go func() {
		defer lf.Close()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			_, _ = lf.Write(append(sc.Bytes(), '\n'))
			var rec struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "router started" {
				select {
				case addr <- rec.Addr:
				default:
				}
			}
		}
	}()
	select {
	case a := <-addr:
		return a, nil
	case <-p.done:
		return "", fmt.Errorf("rtm router exited before starting")
	case <-time.After(time.Minute):
		return "", fmt.Errorf("rtm router did not start in 1m")
	}
}

func adminGet(admin, path string, v any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+adminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// dropped sums rtm_broker_messages_dropped_total of a node by reason (the
// counters of its current process only: a restart resets them).
func dropped(admin string) map[string]float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+adminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	re := regexp.MustCompile(`^rtm_broker_messages_dropped_total\{.*reason="([^"]+)".*\} (\S+)`)
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			var v float64
			_, _ = fmt.Sscan(m[2], &v)
			if v > 0 {
				out[m[1]] += v
			}
		}
	}
	return out
}
