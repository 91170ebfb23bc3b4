package main

import (
	"context"
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

// proc is one child process: the store or a broker.
type proc struct {
	name    string
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the process has been reaped
	logPath string        // the child's stdout and stderr
	once    sync.Once
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// stop sends SIGTERM to the process, waits up to timeout for it to exit,
// then sends SIGKILL. It is idempotent.
func (p *proc) stop(timeout time.Duration) {
	p.once.Do(func() {
		select {
		case <-p.exited:
			return
		default:
		}
		benchkit.Logf("stopping %s (pid %d)", p.name, p.pid())
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(timeout):
			benchkit.Logf("%s (pid %d) did not stop within %s, killing it", p.name, p.pid(), timeout)
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	})
}

// alive reports an error if the process has exited.
func (p *proc) alive() error {
	select {
	case <-p.exited:
		return fmt.Errorf("%s (pid %d) exited: %v; log: %s", p.name, p.pid(), p.cmd.ProcessState, p.logPath)
	default:
		return nil
	}
}

// startChild starts bin with args and env (added to this process's),
// logging to dir/name.log, in its own process group so a terminal Ctrl-C
// reaches only the harness, which then stops the child itself. Pdeathsig
// kills the child if the harness dies without stopping it.
func startChild(dir, name, bin string, args, env []string) (*proc, error) {
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
	p := &proc{name: name, cmd: cmd, exited: make(chan struct{}), logPath: logPath}
	go func() {
		_ = cmd.Wait()
		lf.Close()
		close(p.exited)
	}()
	benchkit.Logf("%s started: pid %d, log %s", name, p.pid(), logPath)
	return p, nil
}

// poll calls check every 100 ms until it returns nil, p exits, ctx ends or
// timeout passes; the error then says what check saw last.
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

// startStore runs `rtm store` on a free port with its files in dir/store
// and waits until it accepts TCP connections.
func startStore(ctx context.Context, dir, bin string) (*proc, string, error) {
	addr, err := benchkit.FreePort()
	if err != nil {
		return nil, "", err
	}
	args := []string{"store", "--addr", addr, "--data", filepath.Join(dir, "store"), "--log-level", "warn", "--log-format", "json"}
	p, err := startChild(dir, "store", bin, args, nil)
	if err != nil {
		return nil, "", err
	}
	err = poll(ctx, p, 60*time.Second, "store at "+addr+" not accepting", func(ctx context.Context) error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err != nil {
		p.stop(10 * time.Second)
		return nil, "", err
	}
	return p, "mongodb://" + addr + "/", nil
}

// node is one `rtm broker` of the cluster under test.
type node struct {
	*proc
	mqtt, admin, gossip, link string
	hc                        *http.Client
}

// startNode runs `rtm broker` named name on free loopback ports, joining
// join when it is set, and waits for /readyz.
func startNode(ctx context.Context, dir, bin, name, storeURI, join string, env []string) (*node, error) {
	n := &node{hc: &http.Client{Timeout: 5 * time.Second}}
	for _, a := range []*string{&n.mqtt, &n.admin, &n.gossip, &n.link} {
		var err error
		if *a, err = benchkit.FreePort(); err != nil {
			return nil, err
		}
	}
	args := []string{"broker", "--node-name", name, "--store-uri", storeURI,
		"--mqtt-addr", n.mqtt, "--ws-addr", "", "--admin-addr", n.admin,
		"--gossip-addr", n.gossip, "--link-addr", n.link, "--cluster-secret", "bench",
		"--data", filepath.Join(dir, "data-"+name), "--log-level", "warn", "--log-format", "json"}
	if join != "" {
		args = append(args, "--join", join)
	}
	p, err := startChild(dir, name, bin, args, env)
	if err != nil {
		return nil, err
	}
	n.proc = p
	err = poll(ctx, p, 60*time.Second, name+" /readyz not 200", func(ctx context.Context) error {
		return n.get(ctx, "/readyz", nil)
	})
	if err != nil {
		n.stop(20 * time.Second)
		return nil, err
	}
	benchkit.Logf("%s ready: mqtt %s, admin %s, gossip %s, link %s", name, n.mqtt, n.admin, n.gossip, n.link)
	return n, nil
}

// get fetches path from the node's admin server and decodes its JSON body
// into v (unless v is nil); any status but 200 is an error.
// adminKey is broker.admin_keys of the nodes (/v1 needs it).
const adminKey = "bench-admin-key-0123456789"

func (n *node) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.admin+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+adminKey)
	resp, err := n.hc.Do(req)
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
	if err := decodeJSON(resp.Body, v); err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	return nil
}

// buildRTM builds ./cmd/rtm of the enclosing module's working tree into dir.
func buildRTM(ctx context.Context, dir string) (string, error) {
	gomod, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	if err != nil || root == "." || strings.TrimSpace(string(gomod)) == os.DevNull {
		return "", fmt.Errorf("run from inside the rtm module (go env GOMOD: %q, %v)", gomod, err)
	}
	bin := filepath.Join(dir, "rtm")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-X main.version="+gitDescribe(), "-o", bin, "./cmd/rtm")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stderr = os.Stderr
	benchkit.Logf("building rtm: %s (in %s)", strings.Join(cmd.Args, " "), cmd.Dir)
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build rtm: %w", err)
	}
	return bin, nil
}
