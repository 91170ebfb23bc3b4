package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// rtmBin is the rtm binary built once for the process tests.
var rtmBin string

func TestMain(m *testing.M) {
	// RTM_TEST_BINARY runs the process tests against another build, e.g.
	// one from before a fix, to measure it.
	if bin := os.Getenv("RTM_TEST_BINARY"); bin != "" {
		rtmBin = bin
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "rtm-bin-")
	if err != nil {
		panic(err)
	}
	rtmBin = filepath.Join(dir, "rtm")
	build := exec.Command("go", "build", "-o", rtmBin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building rtm:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func runInProcess(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestConfigCommandPrintsEffectiveMaskedConfig(t *testing.T) {
	code, out, stderr := runInProcess(t, map[string]string{
		"RTM_STORE_URI":       "mongodb://rtm:hunter2@db.example:27017/?replicaSet=rs0",
		"RTM_BROKER_CAPACITY": "500",
	}, "config", "--capacity", "700", "--node-name", "n7")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"capacity: 700", "node_name: n7", "uri: mongodb://rtm:xxxxx@db.example:27017/?replicaSet=rs0", "mqtt_addr: :1883"} {
		if !strings.Contains(out, want) {
			t.Errorf("rtm config output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "hunter2") {
		t.Fatal("rtm config printed the store password")
	}
	code, out, _ = runInProcess(t, nil, "config", "--dev")
	if code != 0 || !strings.Contains(out, "mqtt_addr: 127.0.0.1:1883") {
		t.Fatalf("rtm config --dev: exit %d, output:\n%s", code, out)
	}
}

func TestInvalidConfigurationExits2NamingEveryKey(t *testing.T) {
	code, _, stderr := runInProcess(t, map[string]string{"RTM_LOG_LEVEL": "loud"},
		"broker", "--capacity", "-1", "--mqtt-addr", "nonsense", "--data", t.TempDir())
	if code != 2 {
		t.Fatalf("exit %d, want 2; stderr: %s", code, stderr)
	}
	for _, want := range []string{`broker.capacity: invalid value -1 (from flag --capacity)`, `broker.mqtt_addr: invalid value "nonsense" (from flag --mqtt-addr)`,
		`log.level: invalid value "loud" (from environment RTM_LOG_LEVEL)`} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
	code, _, stderr = runInProcess(t, nil, "broker", "--no-such-flag")
	if code != 2 || !strings.Contains(stderr, "no-such-flag") {
		t.Fatalf("unknown flag: exit %d, stderr %s", code, stderr)
	}
}

// TestProductionRolesNeedTheAdminKey: with token auth (the default outside
// rtm dev), a broker, a push API and a watchdog without broker.admin_keys exit 2 at
// once naming the key: the admin endpoints they serve or call would refuse
// everything. (Processes, so that a role that starts anyway is stopped.)
func TestProductionRolesNeedTheAdminKey(t *testing.T) {
	t.Parallel()
	env := []string{"RTM_AUTH_DEVICES=token", "RTM_AUTH_TOKEN_KEYS=token-key-0123456789abcdef",
		"RTM_BROKER_ADMIN_KEYS", "RTM_PUSHAPI_API_KEYS=api-key-0123456789abcdef"}
	for _, args := range [][]string{
		{"broker", "--data", t.TempDir(), "--mqtt-addr", "127.0.0.1:0", "--ws-addr", "", "--admin-addr", "127.0.0.1:0", "--gossip-addr", ""},
		{"pushapi", "--data", t.TempDir(), "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"},
		{"watchdog", "--data", t.TempDir(), "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"},
	} {
		p := start(t, env, args...)
		if code := p.wait(t, 30*time.Second); code != 2 || !strings.Contains(p.stderr.String(), "broker.admin_keys") {
			t.Errorf("rtm %s without an admin key: exit %d, stderr %q; want 2 naming broker.admin_keys", args[0], code, p.stderr.String())
		}
	}
}

// TestHelpIsAccurate checks that each command's help lists the flags it
// takes with the defaults it really uses.
func TestHelpIsAccurate(t *testing.T) {
	for cmd, wants := range map[string][]string{
		"broker":  {"--mqtt-addr string", `(default ":1883")`, "--capacity int", "(default 100000)", "--store-uri", "--config", "--tls-cert", "--admin-addr"},
		"dev":     {`(default "127.0.0.1:1883")`, `(default "127.0.0.1:9101")`, "--store-uri"},
		"store":   {"--addr string", `(default "127.0.0.1:27017")`, "--data string"},
		"config":  {"--dev", "--capacity"},
		"version": {"Print the version"},
	} {
		code, out, stderr := runInProcess(t, nil, cmd, "--help")
		if code != 0 {
			t.Fatalf("rtm %s --help: exit %d: %s", cmd, code, stderr)
		}
		for _, w := range wants {
			if !strings.Contains(out, w) {
				t.Errorf("rtm %s --help lacks %q:\n%s", cmd, w, out)
			}
		}
	}
	code, out, _ := runInProcess(t, nil, "version")
	if code != 0 || !strings.HasPrefix(out, "rtm ") {
		t.Fatalf("rtm version: exit %d, %q", code, out)
	}
}

// proc is an rtm process started by a test, stopped by PID when it ends.
type proc struct {
	cmd    *exec.Cmd
	stdout *lineBuffer
	stderr *lineBuffer
	done   chan error
}

// testAdminKey is broker.admin_keys of the brokers started by start.
const testAdminKey = testcluster.AdminKey

func start(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(rtmBin, args...), stdout: newLineBuffer(), stderr: newLineBuffer(), done: make(chan error, 1)}
	// Devices connect without credentials unless a test says otherwise
	// (later entries win; a bare "KEY" unsets KEY); the admin endpoints
	// take testAdminKey.
	p.cmd.Env = append(os.Environ(), "RTM_AUTH_DEVICES=anonymous", "RTM_BROKER_ADMIN_KEYS="+testAdminKey)
	for _, kv := range env {
		if !strings.Contains(kv, "=") {
			p.cmd.Env = slices.DeleteFunc(p.cmd.Env, func(e string) bool { return strings.HasPrefix(e, kv+"=") })
			continue
		}
		p.cmd.Env = append(p.cmd.Env, kv)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("rtm %v stdout:\n%s\nstderr:\n%s", args, p.stdout.String(), p.stderr.String())
		}
	})
	return p
}

// wait returns the exit code, failing the test if the process runs past d.
func (p *proc) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(d):
		t.Fatalf("rtm still running %v after it was asked to stop", d)
		return -1
	}
}

// listeners waits for the JSON "broker started" log line and returns its
// listener addresses.
func (p *proc) listeners(t *testing.T) map[string]string {
	t.Helper()
	var addrs map[string]string
	testutil.WaitFor(t, 60*time.Second, func() error {
		for _, line := range p.stderr.Lines() {
			var rec struct {
				Msg       string            `json:"msg"`
				Listeners map[string]string `json:"listeners"`
			}
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "broker started" {
				addrs = rec.Listeners
				return nil
			}
		}
		select {
		case err := <-p.done:
			p.done <- err
			t.Fatalf("rtm exited (%v) before starting", err)
		default:
		}
		return fmt.Errorf("no 'broker started' line yet")
	})
	return addrs
}

// loopbackFlags put every listener of a broker on a free loopback port, so
// process tests run beside each other and anything else on the machine.
var loopbackFlags = []string{"--mqtt-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
	"--gossip-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0", "--log-format", "json"}

func TestBrokerProcessSIGTERMDisconnectsClientsAndExits0(t *testing.T) {
	p := start(t, nil, append([]string{"broker", "--data", t.TempDir(), "--node-name", "p1"}, loopbackFlags...)...)
	addrs := p.listeners(t)
	c := testutil.MustV5(t, addrs["tcp"], "sigterm-client")
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case d := <-c.Disconnects:
		if d.ReasonCode != 0x8B {
			t.Fatalf("DISCONNECT reason 0x%02X, want 0x8B (server shutting down)", d.ReasonCode)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no DISCONNECT within 10s of SIGTERM")
	}
	if code := p.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0", code)
	}
}

// TestSharedStore runs the store as its own process and a broker that uses
// it. /readyz reports the store, and stays 200 when the store goes away:
// the broker still serves MQTT (a readiness probe must not pull the MQTT
// tier out of service when the store fails).
func TestSharedStore(t *testing.T) {
	s := start(t, nil, "store", "--addr", "127.0.0.1:0", "--data", t.TempDir())
	var uri string
	re := regexp.MustCompile(`use --store-uri (mongodb://\S+)`)
	testutil.WaitFor(t, 30*time.Second, func() error {
		if m := re.FindStringSubmatch(s.stdout.String()); m != nil {
			uri = m[1]
			return nil
		}
		return fmt.Errorf("rtm store printed no URI yet: %q", s.stdout.String())
	})
	b := start(t, nil, append([]string{"broker", "--data", t.TempDir(), "--store-uri", uri}, loopbackFlags...)...)
	admin := "http://" + b.listeners(t)["admin"]
	if code, body := readyzBody(t, admin); code != 200 || !strings.Contains(body, `"store":"up"`) {
		t.Fatalf("/readyz = %d %s with the store up", code, body)
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := s.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("rtm store exit code %d after SIGTERM", code)
	}
	testutil.WaitFor(t, 30*time.Second, func() error {
		if code, body := readyzBody(t, admin); code != 200 || !strings.Contains(body, `"store":"down"`) {
			return fmt.Errorf("/readyz = %d %s with the store gone, want 200 with the store down", code, body)
		}
		return nil
	})
	if code := httpStatus(t, admin+"/healthz"); code != 200 {
		t.Fatalf("/healthz = %d with the store gone", code)
	}
	c := testutil.MustV5(t, b.listeners(t)["tcp"], "no-store-needed")
	c.Sub(t, "t/x", 1)
	c.Pub(t, "t/x", 1, false, "hi")
	select {
	case <-c.Messages:
	case <-time.After(10 * time.Second):
		t.Fatal("no MQTT round trip with the store gone")
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	if code := b.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("broker exit code %d", code)
	}
}

// readyzBody returns /readyz's status and body.
func readyzBody(t *testing.T, admin string) (int, string) {
	t.Helper()
	resp, err := http.Get(admin + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestUnreachableStoreFailsClearly(t *testing.T) {
	p := start(t, []string{"RTM_STORE_CONNECT_TIMEOUT=1s"},
		append([]string{"broker", "--data", t.TempDir(), "--store-uri", "mongodb://rtm:secret@127.0.0.1:1/"}, loopbackFlags...)...)
	if code := p.wait(t, 20*time.Second); code != 1 {
		t.Fatalf("exit code %d, want 1", code)
	}
	errOut := p.stderr.String()
	if !strings.Contains(errOut, "mongodb://rtm:xxxxx@127.0.0.1:1/ unreachable after 1s") || strings.Contains(errOut, "secret") {
		t.Fatalf("stderr does not name the masked URI and the timeout:\n%s", errOut)
	}
}

// TestDevQuickStart is the README's quick start: rtm dev, then
// mosquitto_sub and mosquitto_pub.
func TestDevQuickStart(t *testing.T) {
	for _, bin := range []string{"mosquitto_sub", "mosquitto_pub"} {
		if _, err := exec.LookPath(bin); err != nil {
			msg := fmt.Sprintf("MOSQUITTO CLIENTS NOT INSTALLED, quick-start test skipped: apt-get install mosquitto-clients (%v)", err)
			if os.Getenv("CI") != "" {
				t.Fatal(msg) // .ci/run installs them: never skip there
			}
			t.Skip(msg)
		}
	}
	dir := t.TempDir()
	p := start(t, []string{"RTM_ROUTER_ADDR=127.0.0.1:0", "RTM_PUSHAPI_ADDR=127.0.0.1:0", "RTM_WATCHDOG_ADDR=127.0.0.1:0"},
		"dev", "--data", filepath.Join(dir, "data"), "--mqtt-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
		"--gossip-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0")
	re := regexp.MustCompile(`MQTT\s+mqtt://127\.0\.0\.1:(\d+)`)
	var port string
	testutil.WaitFor(t, 60*time.Second, func() error {
		m := re.FindStringSubmatch(p.stdout.String())
		if m == nil {
			return fmt.Errorf("no MQTT URL in the banner yet: %q", p.stdout.String())
		}
		port = m[1]
		return nil
	})
	// The banner is written line by line: the MQTT line can be read before
	// the rest is out (seen in CI), so wait for each line, not only the first.
	testutil.WaitFor(t, 30*time.Second, func() error {
		for _, want := range []string{"ANONYMOUS DEVICES ALLOWED", "ws://127.0.0.1:", "/metrics", "mongodb://127.0.0.1:", "mosquitto_sub -h 127.0.0.1 -p " + port, "Dashboard"} {
			if !strings.Contains(p.stdout.String(), want) {
				return fmt.Errorf("banner lacks %q:\n%s", want, p.stdout.String())
			}
		}
		return nil
	})
	// The dashboard's URL is in the banner, and the watchdog there watches
	// the dev broker.
	dm := regexp.MustCompile(`Dashboard\s+(http://127\.0\.0\.1:\d+)/`).FindStringSubmatch(p.stdout.String())
	if dm == nil {
		t.Fatalf("banner lacks the dashboard URL:\n%s", p.stdout.String())
	}
	if code := httpStatus(t, dm[1]+"/"); code != http.StatusOK {
		t.Fatalf("dashboard %s/: status %d", dm[1], code)
	}
	testutil.WaitFor(t, 30*time.Second, func() error {
		resp, err := http.Get(dm[1] + "/v1/nodes")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if !strings.Contains(string(b), `"name":"dev"`) || !strings.Contains(string(b), `"last_poll":"`) {
			return fmt.Errorf("watchdog nodes: %s", b)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sub := exec.CommandContext(ctx, "mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-t", "demo/#", "-v", "-C", "1", "-W", "15")
	subOut := newLineBuffer()
	sub.Stdout = subOut
	if err := sub.Start(); err != nil {
		t.Fatal(err)
	}
	// mosquitto_sub gives no sign that its SUBSCRIBE is done: publish until
	// the message arrives.
	testutil.WaitFor(t, 15*time.Second, func() error {
		if out, err := exec.CommandContext(ctx, "mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-t", "demo/hello", "-m", "hi").CombinedOutput(); err != nil {
			return fmt.Errorf("mosquitto_pub: %v: %s", err, out)
		}
		if strings.Contains(subOut.String(), "demo/hello hi") {
			return nil
		}
		return fmt.Errorf("mosquitto_sub printed %q", subOut.String())
	})
	if err := sub.Wait(); err != nil {
		t.Fatalf("mosquitto_sub: %v", err)
	}

	// The README's push: curl to the push API with the key from the banner
	// reaches mosquitto_sub on push/news.
	m := regexp.MustCompile(`curl -H 'Authorization: Bearer (\S+)' -d '(\{[^']*\})' (http://\S+)`).FindStringSubmatch(p.stdout.String())
	if m == nil {
		t.Fatalf("banner lacks the curl push:\n%s", p.stdout.String())
	}
	key, body, url := m[1], m[2], m[3]
	push := exec.CommandContext(ctx, "mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-t", "push/news", "-v", "-C", "1", "-W", "15")
	pushOut := newLineBuffer()
	push.Stdout = pushOut
	if err := push.Start(); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 15*time.Second, func() error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded") // what curl -d sends
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("push: %s %s", resp.Status, out)
		}
		if strings.Contains(pushOut.String(), "push/news hello") {
			return nil
		}
		return fmt.Errorf("mosquitto_sub printed %q", pushOut.String())
	})
	if err := push.Wait(); err != nil {
		t.Fatalf("mosquitto_sub push/news: %v", err)
	}
	if err := p.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("rtm dev exit code %d after Ctrl-C, want 0", code)
	}
}

func httpStatus(t *testing.T, url string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// lineBuffer is a goroutine-safe output sink.
type lineBuffer struct {
	mu  chan struct{}
	buf bytes.Buffer
}

func newLineBuffer() *lineBuffer { return &lineBuffer{mu: make(chan struct{}, 1)} }

func (b *lineBuffer) Write(p []byte) (int, error) {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.Write(p)
}

func (b *lineBuffer) String() string {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.String()
}

func (b *lineBuffer) Lines() []string {
	var lines []string
	sc := bufio.NewScanner(strings.NewReader(b.String()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return lines
}

// jsonField waits for the JSON log line with message msg and returns its
// string field key.
func (p *proc) jsonField(t *testing.T, msg, key string) string {
	t.Helper()
	var v string
	testutil.WaitFor(t, 60*time.Second, func() error {
		for _, line := range p.stderr.Lines() {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == msg {
				if s, ok := rec[key].(string); ok {
					v = s
					return nil
				}
			}
		}
		select {
		case err := <-p.done:
			p.done <- err
			return fmt.Errorf("rtm exited (%v) before logging %q", err, msg)
		default:
		}
		return fmt.Errorf("no %q line yet", msg)
	})
	return v
}

// TestUnknownCommandExits2: a mistyped command is a usage error (exit 2, as
// the README says), at the top level and inside a command group.
func TestUnknownCommandExits2(t *testing.T) {
	for _, args := range [][]string{{"nosuch"}, {"cluster", "nosuch"}, {"node", "nosuch"}} {
		code, _, stderr := runInProcess(t, nil, args...)
		if code != 2 || !strings.Contains(stderr, `unknown command "nosuch"`) {
			t.Errorf("rtm %v: exit %d, stderr %q; want 2 and unknown command", args, code, stderr)
		}
	}
	if code, out, _ := runInProcess(t, nil, "cluster"); code != 0 || !strings.Contains(out, "Available Commands") {
		t.Errorf("rtm cluster: exit %d, want 0 and its help:\n%s", code, out)
	}
}
