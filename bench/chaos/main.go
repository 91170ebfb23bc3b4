// Command chaos checks rtm's central promise under repeated node faults: a
// PUBACK from rtm means the message reaches every subscriber entitled to
// it. It starts one `rtm store` and -brokers `rtm broker` processes (and,
// with -router, `rtm router`) on 127.0.0.1 with durability on, connects
// publishers (QoS 1, numbered messages, one topic each) and persistent
// subscribers (MQTT 5 and 3.1.1) spread over the nodes, and every
// -interval kills (or stops, or terminates) a random broker and brings it
// back. At the end it checks, for every subscriber, that every message
// acknowledged to a publisher arrived, in order per publisher, and counts
// duplicates. See bench/chaos/README.md.
//
// go run ./bench/chaos [-duration 60s] [-interval 8s] [-faults kill|stop|term|stopkill|mix] [-slow-subscribers 1] [-router] [-json]
//
// Exit status: 0 nothing acknowledged was lost, 1 something was, 2 the
// harness itself failed, 3 messages were missing when -settle ran out while
// deliveries were still coming (a backlog, maybe no loss: slow subscribers
// that cannot keep up, or a machine too loaded for -rate).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rtm-dev/rtm/bench/internal/benchkit"
)

var (
	brokers    = flag.Int("brokers", 3, "broker processes")
	pubs       = flag.Int("pubs", 4, "publishers (MQTT 3.1.1, clean session, one topic each), spread over the nodes")
	subs       = flag.Int("subs", 6, "persistent subscribers to every publisher's topic, spread over the nodes")
	v3Every    = flag.Int("v3-every", 3, "every Nth subscriber is MQTT 3.1.1 (clean session false), the others MQTT 5 (clean start false, session expiry 600 s); 0: all MQTT 5")
	rate       = flag.Float64("rate", 50, "messages per second per publisher")
	window     = flag.Int("window", 16, "unacknowledged QoS 1 publishes per publisher at most")
	duration   = flag.Duration("duration", 60*time.Second, "how long publishers publish and faults are injected (setup and settling come on top)")
	interval   = flag.Duration("interval", 8*time.Second, "time between faults")
	down       = flag.Duration("down", 3*time.Second, "how long a faulted node stays down (killed, terminated) or stopped")
	faults     = flag.String("faults", "kill", "kill (SIGKILL, restart), term (SIGTERM, restart), stop (SIGSTOP, SIGCONT), stopkill (SIGSTOP one node, SIGKILL another 1 s later while its link to the stopped one is backing up), or mix (each fault picked at random among the four); none: no faults")
	slowSubs   = flag.Int("slow-subscribers", 0, "this many subscribers read slowly (see -slow-delay), so what is queued for them backs up")
	slowDelay  = flag.Duration("slow-delay", 4*time.Millisecond, "pause per message received of a slow subscriber; keep -pubs x -rate x -slow-delay below 1 (it must keep up on average, or the run ends with a backlog, exit 3)")
	useRouter  = flag.Bool("router", false, "start `rtm router`: clients ask it for a broker at every (re)connect instead of trying the nodes in turn")
	probe      = flag.String("probe", "200ms", "the brokers' cluster.probe_interval (failure detection: about 1.5 s at 200ms)")
	logLevel   = flag.String("log-level", "", "the brokers' log.level (debug for the most detail)")
	logDirFlag = flag.String("logs", "", "directory for every process's log (default: a new temporary directory, kept and named in the report)")
	settle     = flag.Duration("settle", 90*time.Second, "at most this long after the last fault for deliveries to come in")
	quiet      = flag.Duration("quiet", 5*time.Second, "settled when nothing was delivered for this long (and every subscriber is connected)")
	jsonOut    = flag.Bool("json", false, "print one JSON object with the results on standard output (the report goes to standard error)")
	seedFlag   = flag.Uint64("seed", 0, "random seed for the choice of faults (0: from the clock; printed)")
)

// event is one entry of the fault timeline.
type event struct {
	At   time.Duration `json:"at_ns"`
	Wall string        `json:"wall"` // UTC, as in the brokers' logs
	What string        `json:"what"`
}

var (
	evMu   sync.Mutex
	events []event
)

func logEvent(format string, args ...any) {
	e := event{At: since(), Wall: time.Now().UTC().Format("15:04:05.000"), What: fmt.Sprintf(format, args...)}
	evMu.Lock()
	events = append(events, e)
	evMu.Unlock()
	benchkit.Logf("[%6.1fs] %s", e.At.Seconds(), e.What)
}

func main() {
	flag.Parse()
	code, err := run()
	endChildren()
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(2)
	}
	os.Exit(code)
}

func run() (int, error) {
	if *brokers < 2 || *pubs < 1 || *subs < 1 || *rate <= 0 || *window < 1 {
		return 0, fmt.Errorf("need -brokers >= 2, -pubs >= 1, -subs >= 1, -rate > 0, -window >= 1")
	}
	switch *faults {
	case "kill", "term", "stop", "stopkill", "mix", "none":
	default:
		return 0, fmt.Errorf("-faults %q: want kill, term, stop, stopkill, mix or none", *faults)
	}
	seed := *seedFlag
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	rng := rand.New(rand.NewPCG(seed, 0))

	// Ctrl-C or SIGTERM: the children go, and the run ends with exit 2.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	root, err := os.MkdirTemp("", "rtm-chaos-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(root)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "chaos: %v: stopping\n", s)
		cancel()
		endChildren()
		_ = os.RemoveAll(root) // the binary and the data directories; the logs stay
		os.Exit(2)
	}()
	logDir := *logDirFlag
	if logDir == "" {
		if logDir, err = os.MkdirTemp("", "rtm-chaos-logs-"); err != nil {
			return 0, err
		}
	} else if err := os.MkdirAll(logDir, 0o755); err != nil {
		return 0, err
	}
	bin := filepath.Join(root, "rtm")
	benchkit.Logf("building rtm")
	build := exec.Command("go", "build", "-o", bin, "./cmd/rtm")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return 0, fmt.Errorf("go build ./cmd/rtm (run from the repository root): %w", err)
	}
	c := &cluster{bin: bin, root: root, logDir: logDir, probe: *probe, logLevel: *logLevel,
		secret: fmt.Sprintf("chaos-secret-%d", rand.Uint64())}
	if c.storeURI, err = startStore(bin, filepath.Join(root, "store"), logDir); err != nil {
		return 0, err
	}
	for i := range *brokers {
		n := &node{idx: i, name: fmt.Sprintf("n%d", i+1), data: filepath.Join(root, fmt.Sprintf("n%d", i+1)),
			mqtt: "127.0.0.1:0", admin: "127.0.0.1:0", gossip: "127.0.0.1:0", link: "127.0.0.1:0"}
		c.nodes = append(c.nodes, n)
		if err := c.run(n); err != nil {
			return 0, err
		}
	}
	if err := c.formed(ctx, 2*time.Minute, false); err != nil {
		return 0, fmt.Errorf("cluster did not form: %w", err)
	}
	if *useRouter {
		if c.router, err = c.startRouter(); err != nil {
			return 0, err
		}
	}
	benchkit.Logf("cluster of %d brokers formed; logs in %s", *brokers, logDir)

	// Subscribers first, all subscribed (and their routes everywhere)
	// before the first publish: each is entitled to every message.
	pk := picker{c: c}
	subCtx, stopSubs := context.WithCancel(ctx)
	defer stopSubs()
	var subWG sync.WaitGroup
	var all []*subscriber
	subscribed := make(chan error, *subs)
	for i := range *subs {
		s := newSubscriber(i, *v3Every > 0 && i%*v3Every == *v3Every-1, 0)
		if i < *slowSubs {
			s.slow = *slowDelay
		}
		all = append(all, s)
		subWG.Add(1)
		go func() { defer subWG.Done(); s.run(subCtx, pk, subscribed) }()
	}
	for range *subs {
		select {
		case <-subscribed:
		case <-time.After(2 * time.Minute):
			return 0, fmt.Errorf("subscribers not all subscribed in 2m")
		}
	}
	if *subs >= *brokers && !*useRouter {
		if err := c.formed(ctx, 2*time.Minute, true); err != nil {
			return 0, fmt.Errorf("routes did not spread: %w", err)
		}
	} else {
		time.Sleep(2 * time.Second) // routes spread in milliseconds; which nodes hold subscribers is not known here
	}

	pubCtx, stopPubs := context.WithCancel(ctx)
	defer stopPubs()
	var pubWG sync.WaitGroup
	var ps []*publisher
	for i := range *pubs {
		p := &publisher{id: i}
		ps = append(ps, p)
		pubWG.Add(1)
		go func() { defer pubWG.Done(); p.run(pubCtx, pk, *rate, *window) }()
	}
	logEvent("publishing started (seed %d)", seed)

	var nFaults int
	progCtx, stopProg := context.WithCancel(ctx)
	defer stopProg()
	progDone := make(chan struct{})
	go func() { defer close(progDone); progress(progCtx, c, ps, all, &nFaults) }()

	faultCtx, stopFaults := context.WithTimeout(ctx, *duration)
	defer stopFaults()
	if *faults != "none" {
		injectFaults(faultCtx, c, rng, &nFaults)
	}
	<-faultCtx.Done()
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	logEvent("faults over; stopping publishers")
	stopPubs()
	pubWG.Wait()
	// Every node up again (the last fault's restart is done by now).
	for _, n := range c.nodes {
		if st := n.getState(); st != "up" {
			return 0, fmt.Errorf("%s is %s at the end", n.name, st)
		}
	}
	if err := c.formed(ctx, time.Minute, false); err != nil {
		benchkit.Logf("cluster not whole at the end: %v", err)
	}
	settled, ok := waitSettled(ctx, ps, all)
	logEvent("settled: %s", settled)
	stopProg()
	<-progDone
	drops := map[string]map[string]float64{}
	for _, n := range c.nodes {
		drops[n.name] = dropped(n.admin)
	}
	stopSubs()
	subWG.Wait()
	endChildren()

	r := analyse(ps, all, seed, logDir, drops)
	r.Settled, r.NotSettled = settled, !ok
	r.Faults = nFaults
	r.print(os.Stderr)
	if *jsonOut {
		enc := json.NewEncoder(os.Stdout)
		if err := enc.Encode(r); err != nil {
			return 0, err
		}
	}
	switch {
	case r.Lost > 0 && r.NotSettled:
		return 3, nil
	case r.Lost > 0:
		return 1, nil
	}
	return 0, nil
}

// injectFaults runs until ctx ends: one fault every -interval, each
// followed by its repair (which completes even after ctx ended, so the run
// ends with every node up).
func injectFaults(ctx context.Context, c *cluster, rng *rand.Rand, nFaults *int) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(*interval):
		}
		mode := *faults
		if mode == "mix" {
			mode = []string{"kill", "term", "stop", "stopkill"}[rng.IntN(4)]
		}
		victim := c.nodes[rng.IntN(len(c.nodes))]
		*nFaults++
		switch mode {
		case "kill", "term":
			s := syscall.SIGKILL
			if mode == "term" {
				s = syscall.SIGTERM
			}
			at := stopNode(victim, s)
			time.Sleep(*down)
			restartNode(c, victim, at)
		case "stop":
			logEvent("SIGSTOP %s", victim.name)
			_ = victim.p.cmd.Process.Signal(syscall.SIGSTOP)
			victim.setState("stopped")
			time.Sleep(*down)
			_ = victim.p.cmd.Process.Signal(syscall.SIGCONT)
			victim.setState("up")
			logEvent("SIGCONT %s", victim.name)
		case "stopkill":
			// The stopped node's peers queue what their clients publish
			// for its subscribers on their links to it (and acknowledge
			// it); the killed one dies with its queue.
			other := c.nodes[(victim.idx+1+rng.IntN(len(c.nodes)-1))%len(c.nodes)]
			logEvent("SIGSTOP %s", victim.name)
			_ = victim.p.cmd.Process.Signal(syscall.SIGSTOP)
			victim.setState("stopped")
			time.Sleep(time.Second)
			d := stopNode(other, syscall.SIGKILL)
			time.Sleep(*down)
			_ = victim.p.cmd.Process.Signal(syscall.SIGCONT)
			victim.setState("up")
			logEvent("SIGCONT %s", victim.name)
			restartNode(c, other, d)
		}
		if err := c.formed(context.Background(), 60*time.Second, false); err != nil {
			logEvent("cluster not whole 60 s after the repair: %v", err)
		} else {
			logEvent("cluster whole")
		}
	}
}

func stopNode(n *node, s syscall.Signal) time.Time {
	logEvent("%s %s (pid %d)", map[syscall.Signal]string{syscall.SIGKILL: "kill -9", syscall.SIGTERM: "SIGTERM"}[s], n.name, n.p.cmd.Process.Pid)
	_ = n.p.cmd.Process.Signal(s)
	select {
	case <-n.p.done:
	case <-time.After(30 * time.Second):
		logEvent("%s still running 30 s after %v: kill -9", n.name, s)
		_ = n.p.cmd.Process.Kill()
		<-n.p.done
	}
	n.setState("down")
	logEvent("%s exited (%s)", n.name, n.p.cmd.ProcessState)
	return time.Now()
}

func restartNode(c *cluster, n *node, downAt time.Time) {
	t0 := time.Now()
	for attempt := 1; ; attempt++ {
		err := c.run(n)
		if err == nil {
			break
		}
		// A port of the previous process may not be free yet.
		logEvent("restart of %s failed (attempt %d): %v", n.name, attempt, err)
		if attempt == 5 {
			return
		}
		time.Sleep(time.Second)
	}
	logEvent("%s restarted (serving %.1fs after exec, %.1fs after it went down)", n.name, time.Since(t0).Seconds(), time.Since(downAt).Seconds())
}

func progress(ctx context.Context, c *cluster, ps []*publisher, all []*subscriber, nFaults *int) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var sent, acked, deliv int64
		for _, p := range ps {
			sent += p.sent.Load()
			acked += p.nAck.Load()
		}
		conn := 0
		for _, s := range all {
			deliv += s.delivered.Load()
			if s.connected.Load() {
				conn++
			}
		}
		var st []string
		for _, n := range c.nodes {
			if s := n.getState(); s != "up" {
				st = append(st, n.name+" "+s)
			}
		}
		nodes := "all up"
		if len(st) > 0 {
			nodes = strings.Join(st, ", ")
		}
		benchkit.Logf("[%6.1fs] sent %d acked %d delivered %d (of %d acked x subscribers) faults %d | %s | subscribers connected %d/%d",
			since().Seconds(), sent, acked, deliv, acked*int64(len(all)), *nFaults, nodes, conn, len(all))
	}
}

// waitSettled waits, at most -settle, until every subscriber holds every
// acknowledged message, or until every subscriber is connected and
// nothing was delivered for -quiet.
func waitSettled(ctx context.Context, ps []*publisher, all []*subscriber) (string, bool) {
	t0 := time.Now()
	deadline := t0.Add(*settle)
	var acked int64
	for _, p := range ps {
		acked += p.nAck.Load()
	}
	for time.Now().Before(deadline) && ctx.Err() == nil {
		complete, connected := true, true
		lastAt := time.Duration(0)
		for _, s := range all {
			if !s.connected.Load() {
				connected = false
			}
			lastAt = max(lastAt, time.Duration(s.last.Load()))
			if !s.hasAll(ps) {
				complete = false
			}
		}
		if complete {
			return fmt.Sprintf("every acknowledged message delivered to every subscriber %.1fs after the publishers stopped", time.Since(t0).Seconds()), true
		}
		if connected && since()-lastAt > *quiet && time.Since(t0) > *quiet {
			return fmt.Sprintf("nothing delivered for %s, every subscriber connected (%.1fs after the publishers stopped)", *quiet, time.Since(t0).Seconds()), true
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Sprintf("NOT SETTLED after %s: deliveries still coming or a subscriber not connected", *settle), false
}

// hasAll reports whether s received every message acknowledged so far.
func (s *subscriber) hasAll(ps []*publisher) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range ps {
		p.mu.Lock()
		for _, a := range p.acked {
			if s.got[[2]uint64{uint64(p.id), a.seq}] == 0 {
				p.mu.Unlock()
				return false
			}
		}
		p.mu.Unlock()
	}
	return true
}
