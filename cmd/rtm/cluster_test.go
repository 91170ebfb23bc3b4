package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/broker/link"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testutil"
)

// clusterFixture is a cluster of `rtm broker` processes sharing one
// `rtm store` process, all on loopback with ports picked by the kernel.
type clusterFixture struct {
	t        *testing.T
	storeURI string
	secret   string
	seed     string // gossip address of the first node, joined by the others
}

// clusterNode is a broker process of a clusterFixture. Its addresses are
// those it bound, so a restart reuses them.
type clusterNode struct {
	name, data                string
	env                       []string
	p                         *proc
	mqtt, admin, gossip, link string
}

// probeInterval shortens gossip failure detection (LAN profile: 1s).
const probeInterval = 200 * time.Millisecond

func newClusterFixture(t *testing.T) *clusterFixture {
	t.Helper()
	s := start(t, nil, "store", "--addr", "127.0.0.1:0", "--data", t.TempDir())
	f := &clusterFixture{t: t, secret: fmt.Sprintf("test-secret-%d", rand.Uint64())}
	re := regexp.MustCompile(`use --store-uri (mongodb://\S+)`)
	testutil.WaitFor(t, 60*time.Second, func() error {
		if m := re.FindStringSubmatch(s.stdout.String()); m != nil {
			f.storeURI = m[1]
			return nil
		}
		return fmt.Errorf("rtm store printed no URI yet: %q", s.stdout.String())
	})
	return f
}

// start starts a broker named name; the first one started begins the
// cluster, the others join it. env is added to the broker's environment.
func (f *clusterFixture) start(name string, env ...string) *clusterNode {
	f.t.Helper()
	n := &clusterNode{name: name, data: f.t.TempDir(), env: env,
		mqtt: "127.0.0.1:0", admin: "127.0.0.1:0", gossip: "127.0.0.1:0", link: "127.0.0.1:0"}
	f.run(n)
	if f.seed == "" {
		f.seed = n.gossip
	}
	return n
}

// restart starts a broker that exited again, with the same name, ports and
// data directory.
func (f *clusterFixture) restart(n *clusterNode) {
	f.t.Helper()
	select {
	case err := <-n.p.done:
		n.p.done <- err
	default:
		f.t.Fatalf("restart %s: still running", n.name)
	}
	f.run(n)
}

func (f *clusterFixture) run(n *clusterNode) {
	t := f.t
	t.Helper()
	args := []string{"broker", "--node-name", n.name, "--data", n.data, "--store-uri", f.storeURI,
		"--mqtt-addr", n.mqtt, "--ws-addr", "", "--admin-addr", n.admin, "--gossip-addr", n.gossip, "--link-addr", n.link,
		"--cluster-secret", f.secret, "--log-format", "json"}
	if f.seed != "" && f.seed != n.gossip {
		args = append(args, "--join", f.seed)
	}
	env := append([]string{"RTM_CLUSTER_PROBE_INTERVAL=" + probeInterval.String()}, n.env...)
	n.p = start(t, env, args...)
	addrs := n.p.listeners(t)
	n.mqtt, n.admin = addrs["tcp"], addrs["admin"]
	s, err := clusterStats(n.admin)
	if err != nil {
		t.Fatalf("%s: %v", n.name, err)
	}
	n.gossip, n.link = s.Gossip, s.Link
}

// clusterStats reads a broker's /v1/cluster with testAdminKey.
func clusterStats(admin string) (*broker.ClusterStats, error) {
	return clusterStatsKey(admin, testAdminKey)
}

// clusterStatsKey reads a broker's /v1/cluster with the admin key key.
func clusterStatsKey(admin, key string) (*broker.ClusterStats, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+"/v1/cluster", nil)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /v1/cluster: %s: %s", resp.Status, body)
	}
	var s broker.ClusterStats
	if err := json.Unmarshal(body, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

func (n *clusterNode) stats(t *testing.T) *broker.ClusterStats {
	t.Helper()
	s, err := clusterStats(n.admin)
	if err != nil {
		t.Fatalf("%s: %v", n.name, err)
	}
	return s
}

func memberStatus(s *broker.ClusterStats, name string) string {
	for _, m := range s.Members {
		if m.Name == name {
			return m.Status
		}
	}
	return ""
}

func linkTo(s *broker.ClusterStats, peer string) (link.LinkStats, bool) {
	for _, l := range s.Links {
		if l.Peer == peer {
			return l, true
		}
	}
	return link.LinkStats{}, false
}

// formed reports whether every node sees every other alive, with its link
// to it up.
func formed(nodes ...*clusterNode) error {
	for _, n := range nodes {
		s, err := clusterStats(n.admin)
		if err != nil {
			return fmt.Errorf("%s: %v", n.name, err)
		}
		for _, o := range nodes {
			if st := memberStatus(s, o.name); st != "alive" {
				return fmt.Errorf("%s sees %s %q, want alive", n.name, o.name, st)
			}
			if o == n {
				continue
			}
			if l, _ := linkTo(s, o.name); l.State != link.StateUp {
				return fmt.Errorf("%s's link to %s is %q, want %q (last error %q)", n.name, o.name, l.State, link.StateUp, l.LastError)
			}
		}
	}
	return nil
}

func waitFormed(t *testing.T, nodes ...*clusterNode) {
	t.Helper()
	testutil.WaitFor(t, 30*time.Second, func() error { return formed(nodes...) })
}

// waitRoutes waits until from holds exactly want routes of peer.
func waitRoutes(t *testing.T, from *clusterNode, peer string, want int) {
	t.Helper()
	testutil.WaitFor(t, 15*time.Second, func() error {
		s, err := clusterStats(from.admin)
		if err != nil {
			return err
		}
		if got := s.RemoteRoutes[peer]; got != want {
			return fmt.Errorf("%s holds %d routes of %s, want %d", from.name, got, peer, want)
		}
		return nil
	})
}

func expectMessage(t *testing.T, c *testutil.V5, topic, payload string) *paho.Publish {
	t.Helper()
	m := c.Next(t, 10*time.Second)
	if m.Topic != topic || string(m.Payload) != payload {
		t.Fatalf("client %s got %s %q, want %s %q", c.ClientID(), m.Topic, m.Payload, topic, payload)
	}
	return m
}

// TestClusterKillAndRejoin kills a broker with SIGKILL: the others detect
// the failure within a few probe intervals while their own traffic flows,
// and the broker restarted under its name rejoins with fresh routes.
func TestClusterKillAndRejoin(t *testing.T) {
	t.Parallel()
	f := newClusterFixture(t)
	n1 := f.start("n1")
	n2 := f.start("n2")
	n3 := f.start("n3")
	waitFormed(t, n1, n2, n3)

	// A router process watches too: it must stop naming n3.
	rt := start(t, []string{"RTM_CLUSTER_PROBE_INTERVAL=" + probeInterval.String()}, "router", "--addr", "127.0.0.1:0",
		"--gossip-addr", "127.0.0.1:0", "--join", f.seed, "--cluster-secret", f.secret, "--log-format", "json")
	routerAddr := rt.jsonField(t, "router started", "addr")
	testutil.WaitFor(t, 30*time.Second, func() error {
		if seen := routeSpread(t, routerAddr, 30); !seen["n3"] {
			return fmt.Errorf("the router has not named n3 yet: %v", seen)
		}
		return nil
	})

	testutil.MustV5(t, n1.mqtt, "retainer").Pub(t, "r/x", 1, true, "kept")
	old := testutil.MustV5(t, n3.mqtt, "old-sub")
	old.Sub(t, "old/#", 1)
	waitRoutes(t, n1, "n3", 1)

	sub := testutil.MustV5(t, n2.mqtt, "sub-n2")
	sub.Sub(t, "t/#", 1)
	waitRoutes(t, n1, "n2", 1)
	pub := testutil.MustV5(t, n1.mqtt, "pub-n1")
	pub.Pub(t, "t/before", 1, false, "0")
	expectMessage(t, sub, "t/before", "0")

	// n1 → n2 traffic keeps flowing while n3 is failing.
	flowStop, flowDone := make(chan struct{}), make(chan error, 1)
	stopFlow := sync.OnceFunc(func() { close(flowStop) })
	t.Cleanup(stopFlow)
	var flowSent atomic.Int64
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-flowStop:
				flowDone <- nil
				return
			case <-tick.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			i := flowSent.Load()
			_, err := pub.Publish(ctx, &paho.Publish{Topic: "t/flow", QoS: 1, Payload: []byte(strconv.FormatInt(i, 10))})
			cancel()
			if err != nil {
				flowDone <- fmt.Errorf("publish %d on n1 while n3 fails: %w", i, err)
				return
			}
			flowSent.Add(1)
		}
	}()

	if err := syscall.Kill(n3.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	n3.p.wait(t, 5*time.Second)
	detected := map[string]time.Duration{}
	for len(detected) < 2 {
		for _, n := range []*clusterNode{n1, n2} {
			if _, ok := detected[n.name]; ok {
				continue
			}
			s, err := clusterStats(n.admin)
			if err != nil {
				t.Fatalf("%s: %v", n.name, err)
			}
			switch st := memberStatus(s, "n3"); st {
			case "failed", "":
				detected[n.name] = time.Since(killed)
			case "alive", "leaving":
			default:
				t.Fatalf("%s sees the killed n3 %q, want failed", n.name, st)
			}
		}
		if time.Since(killed) > 10*time.Second {
			t.Fatalf("n3 not seen failed 10s after kill -9 (detected so far: %v)", detected)
		}
		time.Sleep(20 * time.Millisecond) // polling interval
	}
	worst := max(detected["n1"], detected["n2"])
	t.Logf("failure detected after %v (n1 %v, n2 %v; cluster.probe_interval %v, 3 brokers)",
		worst.Round(time.Millisecond), detected["n1"].Round(time.Millisecond), detected["n2"].Round(time.Millisecond), probeInterval)
	if worst > 5*time.Second {
		t.Errorf("failure detected after %v, want within 5s at probe interval %v", worst, probeInterval)
	}
	waitRoutes(t, n1, "n3", 0)
	// The router too, within the same bound.
	for {
		if seen := routeSpread(t, routerAddr, 30); !seen["n3"] {
			t.Logf("router stopped naming n3 %v after kill -9", time.Since(killed).Round(time.Millisecond))
			break
		}
		if time.Since(killed) > 5*time.Second {
			t.Fatalf("the router still names n3 %v after kill -9", time.Since(killed))
		}
		time.Sleep(20 * time.Millisecond) // polling interval
	}
	for range 5 {
		if seen := routeSpread(t, routerAddr, 30); seen["n3"] {
			t.Fatal("the router named the killed n3 again")
		}
	}

	// A few more after the failure, then every one must have arrived, in
	// order.
	atDetection := flowSent.Load()
	testutil.WaitFor(t, 10*time.Second, func() error {
		if n := flowSent.Load(); n < atDetection+5 {
			return fmt.Errorf("%d flow messages sent since the failure was detected, want 5", n-atDetection)
		}
		return nil
	})
	stopFlow()
	if err := <-flowDone; err != nil {
		t.Fatal(err)
	}
	for i := range flowSent.Load() {
		expectMessage(t, sub, "t/flow", strconv.FormatInt(i, 10))
	}
	t.Logf("%d QoS 1 messages n1 → n2 while n3 failed: all delivered in order", flowSent.Load())

	f.restart(n3)
	waitFormed(t, n1, n2, n3)
	// The retained message reaches n3 with the snapshot n1 sends when its
	// link comes up: poll with fresh subscribers until it is there.
	testutil.WaitFor(t, 15*time.Second, func() error {
		c := testutil.MustV5(t, n3.mqtt, "ret-sub")
		c.Sub(t, "r/x", 1)
		select {
		case m := <-c.Messages:
			if string(m.Payload) == "kept" && m.Retain {
				return nil // it stays subscribed
			}
			_ = c.Disconnect(&paho.Disconnect{})
			return fmt.Errorf("n3 gave r/x %q retain=%v, want the retained %q", m.Payload, m.Retain, "kept")
		case <-time.After(time.Second):
			_ = c.Disconnect(&paho.Disconnect{})
			return errors.New("no retained message r/x on n3")
		}
	})
	sub3 := testutil.MustV5(t, n3.mqtt, "sub-n3")
	sub3.Sub(t, "t/#", 1)
	// n3's routes now are r/x and t/#; old/# died with the killed process.
	for _, n := range []*clusterNode{n1, n2} {
		waitRoutes(t, n, "n3", 2)
	}
	if s := n3.stats(t); s.LocalRoutes != 2 {
		t.Fatalf("n3 has %d local routes, want 2 (r/x, t/#)", s.LocalRoutes)
	}
	pub.Pub(t, "t/after", 1, false, "back")
	expectMessage(t, sub3, "t/after", "back")
	expectMessage(t, sub, "t/after", "back")
	// OnPublish forwards before the PUBACK: a route for old/# anywhere
	// would show in the counter once Pub returns.
	before := n1.stats(t).Forwarded
	pub.Pub(t, "old/x", 1, false, "stale")
	if s := n1.stats(t); s.Forwarded != before || s.RemoteRoutes["n3"] != 2 {
		t.Fatalf("n1 forwarded old/x %d times and holds %d routes of n3 after the restart, want 0 and 2: the killed process's old/# came back",
			s.Forwarded-before, s.RemoteRoutes["n3"])
	}
}

// TestClusterLinkDropLosesNothing cuts the node link n1 → n2 (through a TCP
// proxy) again and again while n1 forwards a stream of messages: the
// subscriber on n2 receives each exactly once, in order.
func TestClusterLinkDropLosesNothing(t *testing.T) {
	t.Parallel()
	f := newClusterFixture(t)
	px := testutil.NewTCPProxy(t)
	n1 := f.start("n1")
	n2 := f.start("n2", "RTM_CLUSTER_LINK_ADVERTISE_ADDR="+px.Addr())
	px.SetTarget(n2.link)
	waitFormed(t, n1, n2)
	if px.Accepted() == 0 {
		t.Fatal("n1's link to n2 does not go through the proxy")
	}

	sub := testutil.MustV5(t, n2.mqtt, "sub")
	sub.Sub(t, "s/t", 2)
	waitRoutes(t, n1, "n2", 1)
	pub := testutil.MustV5(t, n1.mqtt, "pub")

	const total, cuts = 2000, 5
	for _, qos := range []byte{1, 2} {
		t.Run(fmt.Sprintf("publish_qos%d", qos), func(t *testing.T) {
			before1, before2, cutBefore := n1.stats(t), n2.stats(t), px.CutConns()
			// Every total/(cuts+1) messages the link is cut, once it is
			// connected again: at once, or after the proxy held back for
			// stall either what n1 writes (n2 never gets
			// those: n1 must send them again) or n2's acks (n2 delivered
			// those: n1 must not send them again, or n2 must skip them).
			// With durability (the default) a PUBACK waits for n2's
			// acknowledgement on the link, so while the proxy holds either
			// direction the publisher waits too: the cut comes after a
			// time, not after a number of messages.
			const stall = 200 * time.Millisecond
			cutAfter := func(d time.Duration) {
				tm := time.AfterFunc(d, px.Cut)
				t.Cleanup(func() { tm.Stop() })
			}
			every, cutAt := total/(cuts+1), -1
			for i := range total {
				if k := i / every; i%every == 0 && k >= 1 && k <= cuts {
					testutil.WaitFor(t, 10*time.Second, func() error {
						if px.Active() == 0 {
							return fmt.Errorf("before cut %d: n1's link to n2 is not connected through the proxy again", k)
						}
						return nil
					})
					switch k % 3 {
					case 1:
						cutAt = i
					case 2:
						px.Hold(testutil.ToTarget)
						cutAfter(stall)
					case 0:
						px.Hold(testutil.FromTarget)
						cutAfter(stall)
					}
				}
				if i == cutAt {
					px.Cut()
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := pub.Publish(ctx, &paho.Publish{Topic: "s/t", QoS: qos, Payload: []byte(strconv.Itoa(i))})
				cancel()
				if err != nil {
					t.Fatalf("publish %d: %v", i, err)
				}
			}
			for i := range total {
				select {
				case m := <-sub.Messages:
					if got := string(m.Payload); got != strconv.Itoa(i) {
						t.Fatalf("message %d of %d is %q, want %q: lost, repeated or reordered", i, total, got, strconv.Itoa(i))
					}
				case <-time.After(20 * time.Second):
					t.Fatalf("received %d of %d messages", i, total)
				}
			}
			sub.None(t, 300*time.Millisecond)
			after1, after2 := n1.stats(t), n2.stats(t)
			l1, _ := linkTo(after1, "n2")
			l0, _ := linkTo(before1, "n2")
			resends := l1.Resends - l0.Resends
			dups := after2.Inbound["n1"].Duplicates - before2.Inbound["n1"].Duplicates
			t.Logf("%d messages at QoS %d, %d link cuts (%d connections cut): n1 resent %d, n2 skipped %d duplicates",
				total, qos, cuts, px.CutConns()-cutBefore, resends, dups)
			if resends == 0 {
				t.Fatal("nothing re-sent: the cuts did not hit the link mid-stream, so this test proved nothing")
			}
		})
	}
}

// TestClusterSIGTERMLeaves stops a broker with SIGTERM: the others see it
// leave (not fail) at once. `rtm cluster status` reads the cluster first.
func TestClusterSIGTERMLeaves(t *testing.T) {
	t.Parallel()
	f := newClusterFixture(t)
	n1 := f.start("n1")
	n2 := f.start("n2")
	waitFormed(t, n1, n2)

	t.Run("status", func(t *testing.T) {
		var out, errOut strings.Builder
		if code := run([]string{"cluster", "status", "--admin", n1.admin, "--admin-key", testAdminKey}, &out, &errOut); code != 0 {
			t.Fatalf("rtm cluster status: exit %d: %s", code, errOut.String())
		}
		for _, re := range []string{`(?m)^NAME\s+ROLE\s+STATUS\s+MQTT\s+CONNECTIONS\s+DRAINING\s+LINK\s+QUEUE$`,
			`(?m)^n1\s+broker\s+alive\s+` + regexp.QuoteMeta(n1.mqtt) + `\s+0/100000\s+no\s+this node\s+—$`,
			`(?m)^n2\s+broker\s+alive\s+` + regexp.QuoteMeta(n2.mqtt) + `\s+0/100000\s+no\s+up\s+0$`,
			`Routes: 0 local on n1; from peers: n2 0`} {
			if !regexp.MustCompile(re).MatchString(out.String()) {
				t.Errorf("rtm cluster status output does not match %s:\n%s", re, out.String())
			}
		}
		out.Reset()
		if code := run([]string{"cluster", "status", "--json", "--admin", "http://" + n2.admin + "/", "--admin-key", testAdminKey}, &out, &errOut); code != 0 {
			t.Fatalf("rtm cluster status --json: exit %d: %s", code, errOut.String())
		}
		var s broker.ClusterStats
		if err := json.Unmarshal([]byte(out.String()), &s); err != nil || s.Node != "n2" || len(s.Members) != 2 {
			t.Fatalf("rtm cluster status --json printed %q (%v), want n2's /v1/cluster", out.String(), err)
		}

		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		closed := ln.Addr().String()
		ln.Close()
		errOut.Reset()
		if code := run([]string{"cluster", "status", "--admin", closed}, io.Discard, &errOut); code != 1 || !strings.Contains(errOut.String(), "cannot reach http://"+closed+"/v1/cluster") {
			t.Fatalf("status of a closed port: exit %d, stderr %q; want 1 and 'cannot reach'", code, errOut.String())
		}

		alone := start(t, nil, "broker", "--node-name", "alone", "--data", t.TempDir(), "--store-uri", f.storeURI, "--mqtt-addr", "127.0.0.1:0",
			"--ws-addr", "", "--admin-addr", "127.0.0.1:0", "--gossip-addr", "", "--log-format", "json")
		admin := alone.listeners(t)["admin"]
		errOut.Reset()
		if code := run([]string{"cluster", "status", "--admin", admin, "--admin-key", testAdminKey}, io.Discard, &errOut); code != 1 ||
			!strings.Contains(errOut.String(), "404 Not Found (not_clustered): this broker runs alone") {
			t.Fatalf("status of a broker running alone: exit %d, stderr %q; want 1 and its not_clustered error", code, errOut.String())
		}
	})

	// The admin endpoints refuse rtm node and rtm cluster status without
	// the brokers' admin key (issue 12 item 4); with it, drain and undrain
	// work and travel in gossip.
	t.Run("drain needs the admin key", func(t *testing.T) {
		for _, c := range []struct {
			name string
			args []string
		}{
			{"drain without a key", []string{"node", "drain", "n2", "--admin", n1.admin}},
			{"drain with a wrong key", []string{"node", "drain", "n2", "--admin", n1.admin, "--admin-key", "not-the-admin-key-0123"}},
			{"status without a key", []string{"cluster", "status", "--admin", n1.admin}},
		} {
			var errOut strings.Builder
			if code := run(c.args, io.Discard, &errOut); code != 1 || !strings.Contains(errOut.String(), "401 Unauthorized (unauthorized)") ||
				!strings.Contains(errOut.String(), "--admin-key") {
				t.Errorf("%s: exit %d, stderr %q; want 1 and a 401 naming --admin-key", c.name, code, errOut.String())
			}
		}
		draining := func(want bool) {
			t.Helper()
			testutil.WaitFor(t, 10*time.Second, func() error {
				s, err := clusterStats(n1.admin)
				if err != nil {
					return err
				}
				for _, m := range s.Members {
					if m.Name == "n2" && m.Draining == want {
						return nil
					}
				}
				return fmt.Errorf("n1 does not see n2 with draining=%t: %+v", want, s.Members)
			})
		}
		draining(false) // the refused drains changed nothing
		var out, errOut strings.Builder
		if code := run([]string{"node", "drain", "n2", "--admin", n1.admin, "--admin-key", testAdminKey}, &out, &errOut); code != 0 ||
			!strings.Contains(out.String(), "n2 is draining") {
			t.Fatalf("rtm node drain with the key: exit %d, stdout %q, stderr %q", code, out.String(), errOut.String())
		}
		draining(true)
		out.Reset()
		if code := run([]string{"node", "undrain", "n2", "--admin", n1.admin, "--admin-key", testAdminKey}, &out, &errOut); code != 0 ||
			!strings.Contains(out.String(), "n2 takes new devices again") {
			t.Fatalf("rtm node undrain with the key: exit %d, stdout %q, stderr %q", code, out.String(), errOut.String())
		}
		draining(false)
	})

	if err := n2.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	testutil.WaitFor(t, 2*time.Second, func() error {
		s, err := clusterStats(n1.admin)
		if err != nil {
			return err
		}
		switch st := memberStatus(s, "n2"); st {
		case "left":
			return nil
		case "failed":
			t.Fatalf("n1 sees n2 failed after its SIGTERM, want left")
		default:
			return fmt.Errorf("n1 sees n2 %q, want left", st)
		}
		return nil
	})
	t.Logf("n1 saw n2 leave %v after its SIGTERM", time.Since(stopped).Round(time.Millisecond))
	if code := n2.p.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("n2 exit code %d after SIGTERM, want 0", code)
	}
	t.Logf("n2 exited 0 %v after its SIGTERM", time.Since(stopped).Round(time.Millisecond))
	waitRoutes(t, n1, "n2", 0)
}

// TestClusterUp starts `rtm cluster up` with two brokers, sends a message
// across them and stops it with SIGTERM.
func TestClusterUp(t *testing.T) {
	t.Parallel()
	const brokers = 2
	base := freePortRange(t, 5*brokers, func(p int) bool { return (p-3)%5 == 0 })
	// Without RTM_BROKER_ADMIN_KEYS: cluster up generates the admin key.
	p := start(t, []string{"RTM_BROKER_ADMIN_KEYS"}, "cluster", "up", "--brokers", strconv.Itoa(brokers), "--base-port", strconv.Itoa(base), "--data", t.TempDir())
	testutil.WaitFor(t, 90*time.Second, func() error {
		if strings.Contains(p.stdout.String(), "Ctrl-C stops the cluster") {
			return nil
		}
		select {
		case err := <-p.done:
			p.done <- err
			return fmt.Errorf("rtm cluster up exited (%v) before the cluster was up: %s", err, p.stderr.String())
		default:
		}
		return fmt.Errorf("no table yet: %q", p.stdout.String())
	})
	out := p.stdout.String()
	var pids []int
	if m := regexp.MustCompile(`sharing the store mongodb://\S+ \(pid (\d+),`).FindStringSubmatch(out); m != nil {
		pid, _ := strconv.Atoi(m[1])
		pids = append(pids, pid)
	}
	type row struct{ mqtt, admin string }
	nodes := map[string]row{}
	for _, m := range regexp.MustCompile(`(?m)^\s+(n\d+)\s+(\d+)\s+mqtt://(\S+)\s+ws://\S+/mqtt\s+http://(\S+)\s+\S+\.log$`).FindAllStringSubmatch(out, -1) {
		pid, _ := strconv.Atoi(m[2])
		pids = append(pids, pid)
		nodes[m[1]] = row{mqtt: m[3], admin: m[4]}
	}
	// Should the test fail before cluster up stops them, kill the children.
	t.Cleanup(func() {
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	if len(pids) != brokers+1 || len(nodes) != brokers {
		t.Fatalf("want the store's and %d brokers' PIDs in the output, got %v:\n%s", brokers, pids, out)
	}
	if want := fmt.Sprintf("mqtt://127.0.0.1:%d", base); !strings.Contains(out, want) {
		t.Errorf("n1's MQTT URL is not %s:\n%s", want, out)
	}
	for _, want := range []string{"mosquitto_sub -h 127.0.0.1 -p " + strconv.Itoa(base) + " -t 'demo/#' -v",
		"mosquitto_pub -h 127.0.0.1 -p " + strconv.Itoa(base+5) + " -t demo/hello -m hi"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}

	m := regexp.MustCompile(`rtm cluster status --admin (\S+) --admin-key (admin-[0-9a-f]{32})\n`).FindStringSubmatch(out)
	if m == nil || m[1] != nodes["n1"].admin {
		t.Fatalf("no 'rtm cluster status' line with n1's admin address and the generated admin key:\n%s", out)
	}
	adminKey := m[2]
	var status, errOut strings.Builder
	if code := run([]string{"cluster", "status", "--admin", m[1], "--admin-key", adminKey}, &status, &errOut); code != 0 || !strings.Contains(status.String(), "Cluster as n1 sees it") {
		t.Fatalf("the printed rtm cluster status command: exit %d, stdout %q, stderr %q", code, status.String(), errOut.String())
	}

	sub := testutil.MustV5(t, nodes["n1"].mqtt, "up-sub")
	sub.Sub(t, "demo/#", 1)
	testutil.WaitFor(t, 15*time.Second, func() error {
		s, err := clusterStatsKey(nodes["n2"].admin, adminKey)
		if err != nil {
			return err
		}
		if s.RemoteRoutes["n1"] != 1 {
			return fmt.Errorf("n2 holds %d routes of n1, want 1", s.RemoteRoutes["n1"])
		}
		return nil
	})
	testutil.MustV5(t, nodes["n2"].mqtt, "up-pub").Pub(t, "demo/hello", 1, false, "hi")
	expectMessage(t, sub, "demo/hello", "hi")

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("rtm cluster up exit code %d after SIGTERM, want 0", code)
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("child pid %d still exists after cluster up exited (kill 0: %v)", pid, err)
		}
	}
	if errOut := p.stderr.String(); errOut != "" {
		t.Errorf("rtm cluster up wrote to stderr (a child did not stop cleanly?):\n%s", errOut)
	}
	if !strings.Contains(p.stdout.String(), "rtm cluster: stopped") {
		t.Errorf("no 'stopped' line:\n%s", p.stdout.String())
	}
}

// TestClusterUpFailsClearly: a port taken or a process that does not come
// up stops `rtm cluster up` with exit 1 and says why.
func TestClusterUpFailsClearly(t *testing.T) {
	t.Parallel()
	base := freePortRange(t, 5, func(p int) bool { return (p-3)%5 == 0 })
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+2))
	if err != nil {
		t.Fatal(err)
	}
	p := start(t, nil, "cluster", "up", "--brokers", "1", "--base-port", strconv.Itoa(base), "--data", t.TempDir())
	if code := p.wait(t, 10*time.Second); code != 1 || !strings.Contains(p.stderr.String(), fmt.Sprintf("port %d (n1 admin) is not free", base+2)) {
		t.Fatalf("with n1's admin port taken: exit %d, stderr %q", code, p.stderr.String())
	}
	ln.Close()

	dir := t.TempDir()
	p = start(t, []string{"RTM_LOG_LEVEL=loud"}, "cluster", "up", "--brokers", "1", "--base-port", strconv.Itoa(base), "--data", dir)
	if code := p.wait(t, 30*time.Second); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	for _, want := range []string{"store did not come up: store exited: exit status 2", "last lines of " + dir + "/store.log:", `log.level: invalid value "loud"`} {
		if !strings.Contains(p.stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, p.stderr.String())
		}
	}
}

func TestClusterUpPortsAndFlags(t *testing.T) {
	dev := config.DevDefaults()
	o := upOptions{brokers: 10, data: "d"}
	want := nodePorts{mqtt: 1883, ws: 8083, admin: 9101, gossip: 7946, link: 7956}
	if got := o.ports(1); got != want {
		t.Fatalf("n1 ports %+v, want %+v", got, want)
	}
	for addr, port := range map[string]int{dev.Broker.MQTTAddr: want.mqtt, dev.Broker.WSAddr: want.ws, dev.Broker.AdminAddr: want.admin,
		dev.Cluster.GossipAddr: want.gossip} {
		if portOf(addr) != strconv.Itoa(port) {
			t.Errorf("n1 port %d, but rtm dev uses %s: the help says they are the same", port, addr)
		}
	}
	seen := map[int]string{}
	for i := 1; i <= o.brokers; i++ {
		p := o.ports(i)
		for _, port := range []int{p.mqtt, p.ws, p.admin, p.gossip, p.link} {
			if prev, ok := seen[port]; ok {
				t.Fatalf("n%d reuses port %d of %s", i, port, prev)
			}
			seen[port] = fmt.Sprintf("n%d", i)
		}
	}
	if got := o.ports(10); got != (nodePorts{mqtt: 1892, ws: 8092, admin: 9110, gossip: 7955, link: 7965}) {
		t.Fatalf("n10 ports %+v", got)
	}
	o.basePort = 20000
	if got := o.ports(2); got != (nodePorts{mqtt: 20005, ws: 20006, admin: 20007, gossip: 20008, link: 20009}) {
		t.Fatalf("n2 ports with --base-port 20000: %+v", got)
	}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	err := upOptions{brokers: 11, basePort: 65500, data: ""}.validate()
	for _, want := range []string{"--brokers 11", "--base-port 65500", "--data"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("validate error %v does not name %s", err, want)
		}
	}
	code, _, stderr := runInProcess(t, nil, "cluster", "up", "--brokers", "0")
	if code != 2 || !strings.Contains(stderr, "--brokers 0: want 1 to 10") {
		t.Fatalf("cluster up --brokers 0: exit %d, %q", code, stderr)
	}

	for cmd, wants := range map[string][]string{
		"up":     {"--brokers int", "(default 3)", "--base-port int", "--secret string", `(default "./data/cluster")`, "MQTT 1882+i", "from P+5(i-1)"},
		"status": {"--admin string", `(default "127.0.0.1:9101")`, "--json"},
	} {
		code, out, stderr := runInProcess(t, nil, "cluster", cmd, "--help")
		if code != 0 {
			t.Fatalf("rtm cluster %s --help: exit %d: %s", cmd, code, stderr)
		}
		for _, w := range wants {
			if !strings.Contains(out, w) {
				t.Errorf("rtm cluster %s --help lacks %q:\n%s", cmd, w, out)
			}
		}
	}
}

func TestClusterURL(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:9101":         "http://127.0.0.1:9101/v1/cluster",
		"http://h:1/":            "http://h:1/v1/cluster",
		"https://h:1/v1/cluster": "https://h:1/v1/cluster",
		"http://h:1/prefix":      "http://h:1/prefix/v1/cluster",
		"[::1]:9101":             "http://[::1]:9101/v1/cluster",
	} {
		if got := clusterURL(in); got != want {
			t.Errorf("clusterURL(%q) = %q, want %q", in, got, want)
		}
	}
}

// freePortRange returns the first of n consecutive loopback ports that are
// free for TCP, and for UDP too where udp(port) says so. It looks below
// Linux's ephemeral range (32768-60999), where the kernel's port-0 picks
// for other tests do not land.
func freePortRange(t *testing.T, n int, udp func(int) bool) int {
	t.Helper()
	for range 100 {
		base := 20000 + rand.IntN(12000-n)
		ok := true
		for p := base; p < base+n && ok; p++ {
			addr := fmt.Sprintf("127.0.0.1:%d", p)
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				ok = false
				break
			}
			ln.Close()
			if udp(p) {
				pc, err := net.ListenPacket("udp", addr)
				if err != nil {
					ok = false
					break
				}
				pc.Close()
			}
		}
		if ok {
			return base
		}
	}
	t.Fatalf("no %d consecutive free ports found", n)
	return 0
}

// routeSpread asks the router at addr n times for a broker and returns the
// nodes it named.
func routeSpread(t *testing.T, addr string, n int) map[string]bool {
	t.Helper()
	seen := map[string]bool{}
	for i := range n {
		resp, err := http.Get(fmt.Sprintf("http://%s/v1/route?client_id=probe%d", addr, i))
		if err != nil {
			t.Fatal(err)
		}
		var r struct{ Node string }
		_ = json.NewDecoder(resp.Body).Decode(&r)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			seen[r.Node] = true
		}
	}
	return seen
}
