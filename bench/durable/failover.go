package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

var (
	failSessions = flag.Int("failover-sessions", 1000, "failover: persistent sessions connected to the node that is killed")
	probe        = flag.String("probe", "", "failover: cluster.probe_interval of the brokers (empty: the default)")
	failProf     = flag.String("failover-cpuprofile", "", "failover: write a CPU profile of n1 over the 20 s after the kill to this file")
)

// measureFailover: a 3-node cluster sharing one `rtm store`; -failover-sessions
// persistent sessions are connected to n2 (each got a QoS 1 message
// published on n1 and queued while it was offline, so routes and stored
// messages are known to work); n2 is killed (SIGKILL) and every device
// reconnects, once its connection ends and then with backoff until its
// CONNECT succeeds, to a survivor (n1 and n3 alternately, as a device
// behind a load balancer would). Reported: the time from the kill until
// the survivors adopted n2's sessions, until every device is connected,
// and how many found their session (session present).
func measureFailover(bin string) error {
	root, err := os.MkdirTemp("", "rtm-durable-failover-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	storeURI, err := startStore(bin, filepath.Join(root, "store"))
	if err != nil {
		return err
	}
	secret := "bench-failover-secret-0123456789"
	var nodes []*broker
	seed := ""
	for i := 1; i <= 3; i++ {
		extra := []string{"--store-uri", storeURI, "--gossip-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0", "--cluster-secret", secret}
		if seed != "" {
			extra = append(extra, "--join", seed)
		}
		if *probe != "" {
			os.Setenv("RTM_CLUSTER_PROBE_INTERVAL", *probe)
		}
		b, err := startNode(bin, filepath.Join(root, fmt.Sprintf("n%d", i)), "on", fmt.Sprintf("n%d", i), extra...)
		if err != nil {
			return err
		}
		nodes = append(nodes, b)
		if seed == "" {
			var cs struct {
				Gossip string `json:"gossip_addr"`
			}
			if err := adminGet(b.admin, "/v1/cluster", &cs); err != nil {
				return err
			}
			seed = cs.Gossip
		}
	}
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	if err := waitFor(2*time.Minute, func() error {
		for _, n := range nodes {
			var cs struct {
				Links []json.RawMessage `json:"links"`
			}
			if err := adminGet(n.admin, "/v1/cluster", &cs); err != nil {
				return err
			}
			if len(cs.Links) < 2 {
				return fmt.Errorf("%s has %d links", n.admin, len(cs.Links))
			}
		}
		return nil
	}); err != nil {
		return fmt.Errorf("cluster not formed: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()

	// Sessions on n2: subscribed, offline while one message queues, then
	// connected again (it is delivered; the session stays persistent).
	t0 := time.Now()
	n := *failSessions
	type device struct {
		id      string
		c       *paho.Client
		got     atomic.Int64
		after   atomic.Int64 // copies of its message published after the kill
		present bool
		at      time.Duration
	}
	devs := make([]*device, n)
	if err := parallel(n, 16, func(i int) error {
		d := &device{id: fmt.Sprintf("fo-%05d", i)}
		devs[i] = d
		c, _, err := dial(ctx, n2.addr, d.id, 86400, true, nil)
		if err != nil {
			return err
		}
		if _, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "fo/" + d.id, QoS: 1}}}); err != nil {
			return err
		}
		return c.Disconnect(&paho.Disconnect{})
	}); err != nil {
		return fmt.Errorf("sessions: %w", err)
	}
	fmt.Printf("%d persistent sessions made on n2 in %v\n", n, time.Since(t0).Round(time.Millisecond))
	if err := waitFor(time.Minute, func() error {
		var st struct {
			Durability struct{ Queued int } `json:"durability"`
		}
		if err := adminGet(n2.admin, "/v1/stats", &st); err != nil {
			return err
		}
		if st.Durability.Queued > 0 {
			return fmt.Errorf("%d writes queued", st.Durability.Queued)
		}
		return nil
	}); err != nil {
		return err
	}
	pub, _, err := dial(ctx, n1.addr, "fo-pub", 0, true, nil)
	if err != nil {
		return err
	}
	// Routes reach n1 by gossip and link: a device's first publish waits for its route.
	if err := waitFor(time.Minute, func() error {
		var cs struct {
			Routes map[string]int `json:"remote_routes"`
		}
		if err := adminGet(n1.admin, "/v1/cluster", &cs); err != nil {
			return err
		}
		if cs.Routes["n2"] < n {
			return fmt.Errorf("n1 knows %d routes of n2, want %d", cs.Routes["n2"], n)
		}
		return nil
	}); err != nil {
		fmt.Println("  (could not read n1's remote routes, publishing anyway:", err, ")")
	}
	if err := parallel(n, 16, func(i int) error {
		_, err := pub.Publish(ctx, &paho.Publish{Topic: "fo/" + devs[i].id, QoS: 1, Payload: []byte("queued")})
		return err
	}); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	if err := parallel(n, 16, func(i int) error {
		d := devs[i]
		c, ca, err := dial(ctx, n2.addr, d.id, 86400, false, func(*paho.Publish) { d.got.Add(1) })
		if err == nil && !ca.SessionPresent {
			err = fmt.Errorf("%s: session not present on n2", d.id)
		}
		d.c = c
		return err
	}); err != nil {
		return err
	}
	if err := waitFor(time.Minute, func() error {
		for _, d := range devs {
			if d.got.Load() < 1 {
				return fmt.Errorf("%s has not received its queued message", d.id)
			}
		}
		return nil
	}); err != nil {
		return err
	}
	fmt.Printf("%d devices connected to n2 with their sessions; kill -9 n2\n", n)

	killed := time.Now()
	if err := n2.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	<-n2.done
	if *failProf != "" {
		go profileFor(n1.admin, *failProf, 20)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstConnect time.Duration
	for i, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if d.c != nil {
				<-d.c.Done()
			}
			survivor := []*broker{n1, n3}[i%2]
			// As devices do: at once, then with exponential backoff and
			// jitter (250 ms doubling to 4 s), so a fleet does not retry in
			// step.
			backoff := 250 * time.Millisecond
			for ctx.Err() == nil {
				c, ca, err := dial(ctx, survivor.addr, d.id, 86400, false, func(p *paho.Publish) {
					if string(p.Payload) == "after" {
						d.after.Add(1)
					}
				})
				if err == nil {
					d.at = time.Since(killed)
					d.present = ca.SessionPresent
					d.c = c // stays connected: its message published after the kill comes
					mu.Lock()
					if firstConnect == 0 {
						firstConnect = d.at
					}
					mu.Unlock()
					return
				}
				time.Sleep(backoff/2 + rand.N(backoff/2))
				backoff = min(2*backoff, 4*time.Second)
			}
		}()
	}
	// One QoS 1 message per device published on n1 right after the kill:
	// n1 holds it for n2 (whose routes it keeps) and hands it to the
	// adopters, or, once a session is adopted, sends it to its adopter.
	// Each one acknowledged must reach its device.
	pubAcked := make([]bool, n)
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		_ = parallel(n, 16, func(i int) error {
			pctx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			pr, err := pub.Publish(pctx, &paho.Publish{Topic: "fo/" + devs[i].id, QoS: 1, Payload: []byte("after")})
			pubAcked[i] = err == nil && (pr == nil || pr.ReasonCode < 0x80)
			return nil
		})
	}()
	adopted := make(chan time.Duration, 1)
	go func() {
		_ = waitFor(10*time.Minute, func() error {
			total := 0
			for _, b := range []*broker{n1, n3} {
				var st struct {
					Durability struct {
						Adopted int `json:"adopted"`
					} `json:"durability"`
				}
				if err := adminGet(b.admin, "/v1/stats", &st); err != nil {
					return err
				}
				total += st.Durability.Adopted
			}
			if total == 0 {
				return fmt.Errorf("none adopted")
			}
			return nil
		})
		adopted <- time.Since(killed)
	}()
	wg.Wait()
	all := time.Since(killed)
	<-pubDone
	acked, delivered, dups := 0, 0, 0
	_ = waitFor(time.Minute, func() error {
		acked, delivered, dups = 0, 0, 0
		for i, d := range devs {
			if !pubAcked[i] {
				continue
			}
			acked++
			if g := d.after.Load(); g > 0 {
				delivered++
				dups += int(g - 1)
			}
		}
		if delivered < acked {
			return fmt.Errorf("%d of %d delivered", delivered, acked)
		}
		return nil
	})
	for _, d := range devs {
		_ = d.c.Disconnect(&paho.Disconnect{})
	}
	var present int
	var ats []time.Duration
	for _, d := range devs {
		if d.present {
			present++
		}
		ats = append(ats, d.at)
	}
	slices.Sort(ats)
	var adoptAt time.Duration
	select {
	case adoptAt = <-adopted:
	case <-time.After(time.Minute):
	}
	var adoptedN, superseded, refused int
	for _, b := range []*broker{n1, n3} {
		var st struct {
			Durability struct {
				Adopted                 int `json:"adopted"`
				SupersededSkipped       int `json:"superseded_skipped"`
				RefusedOwnerUnreachable int `json:"refused_owner_unreachable"`
			} `json:"durability"`
		}
		if adminGet(b.admin, "/v1/stats", &st) == nil {
			adoptedN += st.Durability.Adopted
			superseded += st.Durability.SupersededSkipped
			refused += st.Durability.RefusedOwnerUnreachable
		}
	}
	var lost []string
	for _, d := range devs {
		if !d.present {
			lost = append(lost, fmt.Sprintf("%s@%v", d.id, d.at.Round(time.Millisecond)))
		}
	}
	if len(lost) > 0 {
		fmt.Printf("  without their session: %v\n", lost)
	}
	fmt.Printf("kill -9 of n2 with %d connected persistent sessions (probe interval %s):\n", n, orDefault(*probe))
	fmt.Printf("  first adoption seen after %v (polled every 100 ms); %d sessions adopted by n1 and n3, %d not (client online elsewhere first); %d CONNECTs refused to retry while n2 was unreachable but not declared failed\n",
		adoptAt.Round(time.Millisecond), adoptedN, superseded, refused)
	fmt.Printf("  first reconnect %v, median %v, all %d reconnected after %v\n", firstConnect.Round(time.Millisecond),
		ats[len(ats)/2].Round(time.Millisecond), n, all.Round(time.Millisecond))
	fmt.Printf("  %d of %d reconnected with their session (session present)\n", present, n)
	fmt.Printf("  messages published on n1 right after the kill, one per device: %d acknowledged, %d of them delivered (%d lost), %d duplicates\n",
		acked, delivered, acked-delivered, dups)
	return nil
}

func orDefault(s string) string {
	if s == "" {
		return "default"
	}
	return s
}

// startStore starts `rtm store` and returns its URI.
func startStore(bin, data string) (string, error) {
	b := &broker{done: make(chan struct{})}
	b.cmd = exec.Command(bin, "store", "--addr", "127.0.0.1:0", "--data", data)
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := b.cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	b.cmd.Stderr = os.Stderr
	if err := b.cmd.Start(); err != nil {
		return "", err
	}
	childMu.Lock()
	children[b] = true
	childMu.Unlock()
	go func() {
		_ = b.cmd.Wait()
		close(b.done)
		childMu.Lock()
		delete(children, b)
		childMu.Unlock()
	}()
	re := regexp.MustCompile(`use --store-uri (mongodb://\S+)`)
	uri := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				uri <- m[1]
			}
		}
	}()
	select {
	case u := <-uri:
		return u, nil
	case <-b.done:
		return "", fmt.Errorf("rtm store exited")
	case <-time.After(2 * time.Minute):
		return "", fmt.Errorf("rtm store printed no URI in 2m")
	}
}

func adminGet(admin, path string, v any) error {
	req, _ := http.NewRequest(http.MethodGet, "http://"+admin+path, nil)
	req.Header.Set("Authorization", "Bearer bench-admin-key-0123456789abcdef")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func waitFor(d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// parallel runs f(0..n-1) on workers goroutines and returns the first error.
func parallel(n, workers int, f func(int) error) error {
	ids := make(chan int)
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range ids {
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := range n {
		ids <- i
	}
	close(ids)
	wg.Wait()
	return first
}
