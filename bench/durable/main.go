// Command durable measures what durable sessions cost and how long a
// restart takes (docs/clustering.md "Durability", BENCHMARKS.md):
//
//   - throughput: QoS 1 to persistent-session subscribers, one `rtm broker`
//     process with broker.durability on and one with it off, measured in
//     alternating rounds (the machine is shared: medians and their ratio);
//   - restart: a node holding -sessions persistent sessions and -queued
//     queued messages is killed (SIGKILL) and started again on the same
//     data directory: the time until it serves (its "broker started" line),
//     the time it reports restoring them, and the time until every device
//     has reconnected and received its queue;
//   - failover: a 3-node cluster on one `rtm store`, -failover-sessions
//     persistent sessions connected to n2, kill -9 n2: the time until every
//     device has reconnected to a survivor, and how many found their
//     session (failover.go).
//
// Every broker and store process it starts is ended by PID on every way
// out (an error, an interrupt).
//
// go run ./bench/durable [-rounds 5] [-pubs 4] [-subs 4] [-msgs 5000] [-window 64] [-cpuprofile FILE]
// go run ./bench/durable -restart [-sessions 10000] [-queued 100000]
// go run ./bench/durable -failover [-failover-sessions 1000] [-probe 1s]
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

var (
	rounds   = flag.Int("rounds", 5, "throughput rounds per setting (alternating)")
	pubs     = flag.Int("pubs", 4, "publishers")
	subs     = flag.Int("subs", 4, "persistent subscribers (each gets every message)")
	msgs     = flag.Int("msgs", 5000, "messages per publisher per round")
	window   = flag.Int("window", 64, "QoS 1 publishes in flight per publisher")
	size     = flag.Int("size", 256, "payload bytes")
	persist  = flag.Bool("persistent", true, "subscribers have persistent sessions (false: clean sessions, the path durability must not cost)")
	restart  = flag.Bool("restart", false, "measure the restart instead")
	sessions = flag.Int("sessions", 10000, "restart: persistent sessions")
	queued   = flag.Int("queued", 100000, "restart: queued messages in all (spread evenly)")
	failover = flag.Bool("failover", false, "measure the time from kill -9 of a node until its sessions are served elsewhere instead")
	logLevel = flag.String("log-level", "", "the brokers' log.level (the store's stays as it is)")
	logDir   = flag.String("logs", "", "keep each broker's log (JSON lines) in this directory, as NAME.log")
	cpuprof  = flag.String("cpuprofile", "", "write a CPU profile of the broker in the first round with durability on (3 s from its start) to this file")
)

func main() {
	flag.Parse()
	// Interrupted: the brokers started go too.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		fail(fmt.Errorf("%v", s))
	}()
	bin, err := build()
	if err != nil {
		fail(err)
	}
	binDir = filepath.Dir(bin)
	switch {
	case *restart:
		err = measureRestart(bin)
	case *failover:
		err = measureFailover(bin)
	case *wills > 0:
		err = measureWills(bin)
	default:
		err = measureThroughput(bin)
	}
	if err != nil {
		fail(err)
	}
	endChildren()
	_ = os.RemoveAll(binDir)
}

var binDir string

// children are the broker processes started and not yet ended: every way
// out of the program ends them, by PID.
var (
	childMu  sync.Mutex
	children = map[*broker]bool{}
)

func endChildren() {
	childMu.Lock()
	defer childMu.Unlock()
	for b := range children {
		_ = b.cmd.Process.Kill()
		<-b.done
		delete(children, b)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "durable:", err)
	endChildren()
	if binDir != "" {
		_ = os.RemoveAll(binDir)
	}
	os.Exit(1)
}

func build() (string, error) {
	dir, err := os.MkdirTemp("", "rtm-durable-bench-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "rtm")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/rtm")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	return bin, cmd.Run()
}

// broker is one `rtm broker` child process.
type broker struct {
	cmd     *exec.Cmd
	addr    string
	admin   string
	data    string
	durable string
	started time.Time
	ready   time.Duration // from exec to "broker started"
	restore string        // the "restored from the store" line's "took"
	done    chan struct{}
}

func startBroker(bin, data, durable string) (*broker, error) {
	return startNode(bin, data, durable, "bench-"+durable, "--gossip-addr", "")
}

// startNode starts `rtm broker` named name with durability durable, and
// extra arguments (the cluster's, or none).
func startNode(bin, data, durable, name string, extra ...string) (*broker, error) {
	b := &broker{data: data, durable: durable, done: make(chan struct{})}
	args := append([]string{"broker", "--data", data, "--node-name", name,
		"--mqtt-addr", "127.0.0.1:0", "--ws-addr", "", "--admin-addr", "127.0.0.1:0", "--log-format", "json"}, extra...)
	b.cmd = exec.Command(bin, args...)
	// Ended with this process even when it is killed (go run passes on a
	// SIGTERM as a kill, which no handler sees).
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	b.cmd.Env = append(os.Environ(), "RTM_AUTH_DEVICES=anonymous", "RTM_BROKER_DURABILITY="+durable,
		"RTM_BROKER_ADMIN_KEYS=bench-admin-key-0123456789abcdef", "RTM_BROKER_MAX_QUEUED=65535",
		"RTM_BROKER_MAX_QUEUED_BYTES=1073741824", "RTM_BROKER_MAX_QUEUED_BYTES_TOTAL=8589934592",
		"RTM_BROKER_CAPACITY=1000000")
	if *logLevel != "" {
		b.cmd.Env = append(b.cmd.Env, "RTM_LOG_LEVEL="+*logLevel)
	}
	stderr, err := b.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	b.started = time.Now()
	if err := b.cmd.Start(); err != nil {
		return nil, err
	}
	childMu.Lock()
	children[b] = true
	childMu.Unlock()
	var logf *os.File
	if *logDir != "" {
		if logf, err = os.Create(filepath.Join(*logDir, name+".log")); err != nil {
			return nil, err
		}
	}
	got := make(chan error, 1)
	go func() {
		if logf != nil {
			defer logf.Close()
		}
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		sent := false
		for sc.Scan() {
			if logf != nil {
				_, _ = logf.Write(append(sc.Bytes(), '\n'))
			}
			var rec struct {
				Msg       string            `json:"msg"`
				Listeners map[string]string `json:"listeners"`
				Took      string            `json:"took"`
			}
			if json.Unmarshal(sc.Bytes(), &rec) != nil {
				continue
			}
			switch rec.Msg {
			case "restored from the store":
				b.restore = rec.Took
			case "broker started":
				b.ready = time.Since(b.started)
				b.addr = rec.Listeners["tcp"]
				b.admin = rec.Listeners["admin"]
				if !sent {
					sent = true
					got <- nil
				}
			}
		}
		if !sent {
			got <- fmt.Errorf("broker (durability %s) exited before starting", durable)
		}
	}()
	go func() {
		_ = b.cmd.Wait()
		close(b.done)
		childMu.Lock()
		delete(children, b)
		childMu.Unlock()
	}()
	select {
	case err := <-got:
		return b, err
	case <-time.After(10 * time.Minute):
		return b, fmt.Errorf("broker did not start in 10m")
	}
}

func (b *broker) stop(sig syscall.Signal) {
	_ = b.cmd.Process.Signal(sig)
	select {
	case <-b.done:
	case <-time.After(60 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.done
	}
}

// dial connects an MQTT 5 client; expiry > 0 makes its session persistent.
func dial(ctx context.Context, addr, id string, expiry uint32, clean bool, on func(*paho.Publish)) (*paho.Client, *paho.Connack, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	cfg := paho.ClientConfig{ClientID: id, Conn: conn, PacketTimeout: 60 * time.Second, OnClientError: func(error) {}}
	cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
		if on != nil {
			on(pr.Packet)
		}
		return true, nil
	}}
	c := paho.NewClient(cfg)
	rm := uint16(65535)
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: id, KeepAlive: 60, CleanStart: clean,
		Properties: &paho.ConnectProperties{ReceiveMaximum: &rm, SessionExpiryInterval: &expiry}})
	if err != nil {
		_ = conn.Close()
		return nil, nil, err
	}
	return c, ca, nil
}

func measureThroughput(bin string) error {
	root, err := os.MkdirTemp("", "rtm-durable-data-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	rates := map[string][]float64{}
	for r := 0; r < *rounds; r++ {
		order := []string{"on", "off"}
		if r%2 == 1 {
			order = []string{"off", "on"}
		}
		for _, mode := range order {
			b, err := startBroker(bin, filepath.Join(root, fmt.Sprintf("%s-%d", mode, r)), mode)
			if err != nil {
				return err
			}
			var prof chan struct{}
			if *cpuprof != "" && mode == "on" && r == 0 {
				prof = make(chan struct{})
				go func() { defer close(prof); profile(b.admin, *cpuprof) }()
			}
			rate, err := throughputRound(b.addr)
			if prof != nil {
				<-prof
			}
			if mode == "on" {
				fmt.Printf("  store writes: %s\n", durabilityStats(b.admin))
			}
			b.stop(syscall.SIGKILL)
			if err != nil {
				return fmt.Errorf("durability %s round %d: %w", mode, r, err)
			}
			rates[mode] = append(rates[mode], rate)
			fmt.Printf("round %d durability %-3s %10.0f deliveries/s\n", r+1, mode, rate)
		}
	}
	on, off := median(rates["on"]), median(rates["off"])
	kind := "persistent"
	if !*persist {
		kind = "clean-session"
	}
	fmt.Printf("median: on %.0f/s, off %.0f/s, ratio on/off %.2f (%d publishers x %d msgs, window %d, %d %s subscribers, %d B, QoS 1)\n",
		on, off, on/off, *pubs, *msgs, *window, *subs, kind, *size)
	fmt.Printf("rounds: on %v off %v\n", rates["on"], rates["off"])
	return nil
}

func throughputRound(addr string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	want := int64(*pubs) * int64(*msgs) * int64(*subs)
	var got atomic.Int64
	done := make(chan struct{})
	var once sync.Once
	for i := 0; i < *subs; i++ {
		expiry := uint32(0)
		if *persist {
			expiry = 3600
		}
		c, _, err := dial(ctx, addr, fmt.Sprintf("sub-%d", i), expiry, true, func(*paho.Publish) {
			if got.Add(1) == want {
				once.Do(func() { close(done) })
			}
		})
		if err != nil {
			return 0, err
		}
		defer func() { _ = c.Disconnect(&paho.Disconnect{}) }()
		if _, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "bench/#", QoS: 1}}}); err != nil {
			return 0, err
		}
	}
	payload := make([]byte, *size)
	start := time.Now()
	var wg sync.WaitGroup
	var pubErr atomic.Pointer[error]
	for p := 0; p < *pubs; p++ {
		c, _, err := dial(ctx, addr, fmt.Sprintf("pub-%d", p), 0, true, nil)
		if err != nil {
			return 0, err
		}
		defer func() { _ = c.Disconnect(&paho.Disconnect{}) }()
		next := atomic.Int64{}
		for w := 0; w < *window; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for next.Add(1) <= int64(*msgs) {
					if _, err := c.Publish(ctx, &paho.Publish{Topic: fmt.Sprintf("bench/%d", p), QoS: 1, Payload: payload}); err != nil {
						pubErr.Store(&err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	if p := pubErr.Load(); p != nil {
		return 0, *p
	}
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		return 0, fmt.Errorf("%d of %d deliveries", got.Load(), want)
	}
	return float64(want) / time.Since(start).Seconds(), nil
}

// durabilityStats returns the broker's /v1/stats "durability" object.
func durabilityStats(admin string) string {
	req, _ := http.NewRequest(http.MethodGet, "http://"+admin+"/v1/stats", nil)
	req.Header.Set("Authorization", "Bearer bench-admin-key-0123456789abcdef")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	var st struct {
		Durability json.RawMessage `json:"durability"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return err.Error()
	}
	return string(st.Durability)
}

// profile saves 3 s of the broker's CPU profile to path.
func profile(admin, path string) { profileFor(admin, path, 3) }

// profileFor saves secs seconds of the broker's CPU profile to path.
func profileFor(admin, path string, secs int) {
	req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", admin, secs), nil)
	req.Header.Set("Authorization", "Bearer bench-admin-key-0123456789abcdef")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, "profile:", err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "profile:", err)
		return
	}
	defer f.Close()
	_, _ = io.Copy(f, resp.Body)
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func measureRestart(bin string) error {
	data, err := os.MkdirTemp("", "rtm-durable-restart-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(data)
	b, err := startBroker(bin, data, "on")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	// Sessions subscribe to one filter, so each publish queues a message in
	// every session: queued/sessions publishes make queued messages.
	t0 := time.Now()
	var wg sync.WaitGroup
	ids := make(chan int)
	var errMu sync.Mutex
	var firstErr error
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range ids {
				c, _, err := dial(ctx, b.addr, fmt.Sprintf("dev-%05d", i), 86400, true, nil)
				if err == nil {
					_, err = c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "fleet/#", QoS: 1}}})
					_ = c.Disconnect(&paho.Disconnect{})
				}
				if err != nil {
					errMu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("session %d: %w", i, err)
					}
					errMu.Unlock()
				}
			}
		}()
	}
	for i := 0; i < *sessions; i++ {
		ids <- i
	}
	close(ids)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	fmt.Printf("%d persistent sessions made in %v\n", *sessions, time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	pub, _, err := dial(ctx, b.addr, "fleet-pub", 0, true, nil)
	if err != nil {
		return err
	}
	n := *queued / *sessions
	for i := 0; i < n; i++ {
		t1 := time.Now()
		if _, err := pub.Publish(ctx, &paho.Publish{Topic: "fleet/cmd", QoS: 1, Payload: []byte(strings.Repeat("c", 64))}); err != nil {
			return fmt.Errorf("publish %d of %d: %w (store writes: %s)", i+1, n, err, durabilityStats(b.admin))
		}
		fmt.Printf("  publish %d acknowledged after %v\n", i+1, time.Since(t1).Round(time.Millisecond))
	}
	fmt.Printf("%d messages queued (%d publishes, each acknowledged once written) in %v\n", n**sessions, n, time.Since(t0).Round(time.Millisecond))
	b.stop(syscall.SIGKILL)
	b2, err := startBroker(bin, data, "on")
	if err != nil {
		return err
	}
	fmt.Printf("restart after kill -9: serving after %v (restore took %s)\n", b2.ready.Round(time.Millisecond), b2.restore)
	// Every device reconnects (16 at a time) and gets its queue.
	restarted := time.Now()
	var got, present atomic.Int64
	var clients sync.Map
	if err := parallel(*sessions, 16, func(i int) error {
		c, ca, err := dial(ctx, b2.addr, fmt.Sprintf("dev-%05d", i), 86400, false, func(*paho.Publish) { got.Add(1) })
		if err != nil {
			return err
		}
		if ca.SessionPresent {
			present.Add(1)
		}
		clients.Store(i, c)
		return nil
	}); err != nil {
		return fmt.Errorf("reconnect: %w", err)
	}
	connected := time.Since(restarted)
	want := int64(n * *sessions)
	_ = waitFor(10*time.Minute, func() error {
		if got.Load() < want {
			return fmt.Errorf("%d of %d", got.Load(), want)
		}
		return nil
	})
	fmt.Printf("all %d devices reconnected in %v (%d with session present); %d of %d queued messages received %v after the restart was serving (%v after exec)\n",
		*sessions, connected.Round(time.Millisecond), present.Load(), got.Load(), want, time.Since(restarted).Round(time.Millisecond),
		(time.Since(restarted) + b2.ready).Round(time.Millisecond))
	clients.Range(func(_, c any) bool { _ = c.(*paho.Client).Disconnect(&paho.Disconnect{}); return true })
	b2.stop(syscall.SIGTERM)
	return nil
}
