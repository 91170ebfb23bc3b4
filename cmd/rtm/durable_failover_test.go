package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestNodeDeathSessionsAdopted: a publisher on n1 streams QoS 1 to 50
// persistent subscribers on n2, half of them connected and half offline;
// n2 is killed (kill -9) mid-stream. Every subscriber reconnects as a
// device behind the router does: it asks the router (a process of its
// own, role router) for a broker, connects there, and asks again after a
// refused or failed CONNECT. The connected ones do so the moment their
// connection ends, before gossip has declared n2 failed. Each must find
// its session (session present) on a survivor and, across its two
// connections, every message acknowledged to the publisher, in publish
// order; duplicates (QoS 1) are bounded. The stream spans the failure
// detection, the adoption and the re-sending of what n1 held for n2.
func TestNodeDeathSessionsAdopted(t *testing.T) {
	const subs, msgs = 50, 120
	f := newClusterFixture(t)
	n1, n2, n3 := f.start("n1"), f.start("n2"), f.start("n3")
	waitFormed(t, n1, n2, n3)
	rt := start(t, []string{"RTM_CLUSTER_PROBE_INTERVAL=" + probeInterval.String()}, "router", "--addr", "127.0.0.1:0",
		"--gossip-addr", "127.0.0.1:0", "--join", f.seed, "--cluster-secret", f.secret, "--log-format", "json")
	routerAddr := rt.jsonField(t, "router started", "addr")
	testutil.WaitFor(t, 30*time.Second, func() error {
		if seen := routeSpread(t, routerAddr, 30); len(seen) < 3 {
			return fmt.Errorf("the router names %v, want all three brokers", seen)
		}
		return nil
	})

	type subscriber struct {
		id      string
		mu      sync.Mutex
		got     []int
		conns   int
		present bool
		refused int
		addr    string
		done    chan struct{} // closed once reconnected to a survivor
	}
	collect := func(s *subscriber, c *testutil.V5) {
		record := func(m *paho.Publish) {
			n, _ := strconv.Atoi(string(m.Payload))
			s.mu.Lock()
			s.got = append(s.got, n)
			s.mu.Unlock()
		}
		go func() {
			for {
				select {
				case m := <-c.Messages:
					record(m)
				case <-c.Done():
					// What arrived before the connection ended is kept.
					for {
						select {
						case m := <-c.Messages:
							record(m)
						default:
							return
						}
					}
				}
			}
		}()
	}
	// route asks the router for a broker, as a device does.
	route := func(id string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+routerAddr+"/v1/route?client_id="+id, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		var r struct {
			Node string `json:"node"`
			Host string `json:"host"`
			Port int    `json:"port"`
		}
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("router: %s", resp.Status)
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return "", err
		}
		return net.JoinHostPort(r.Host, strconv.Itoa(r.Port)), nil
	}
	all := make([]*subscriber, subs)
	var first []*testutil.V5
	for i := range all {
		s := &subscriber{id: fmt.Sprintf("ps-%02d", i), done: make(chan struct{})}
		all[i] = s
		c, _ := persistV5(t, n2.mqtt, s.id, 600)
		c.Sub(t, "stream/#", 1)
		if i%2 == 1 {
			_ = c.Disconnect(&paho.Disconnect{}) // offline: messages queue on n2
			first = append(first, nil)
			continue
		}
		collect(s, c)
		first = append(first, c)
	}
	waitRoutes(t, n1, "n2", 1)

	pub := testutil.MustV5(t, n1.mqtt, "stream-pub")
	acked := make([]bool, msgs)
	kill := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range msgs {
			if i == msgs/4 {
				close(kill)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := pub.Publish(ctx, &paho.Publish{Topic: "stream/a", QoS: 1, Payload: []byte(strconv.Itoa(i))})
			cancel()
			acked[i] = err == nil
			// A stream, not a burst: at 40 ms it spans the failure
			// detection, the adoption and the release of what n1 held for
			// n2 (at 10 ms it ended before the adoption, and the order
			// across the adoption went untested).
			time.Sleep(40 * time.Millisecond)
		}
	}()
	<-kill
	killed := time.Now()
	if err := syscall.Kill(n2.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n2.p.wait(t, 10*time.Second)

	// Every device reconnects through the router, the connected ones as
	// soon as their connection ends, and retries (after 200 ms) a refused
	// CONNECT or one to a broker that is gone.
	var wg sync.WaitGroup
	for i, s := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if c := first[i]; c != nil {
				<-c.Done()
			}
			deadline := time.Now().Add(60 * time.Second)
			for time.Now().Before(deadline) {
				addr, err := route(s.id)
				if err == nil {
					var c *testutil.V5
					var ca *paho.Connack
					c, ca, err = testutil.DialV5(t, addr, &paho.Connect{ClientID: s.id, CleanStart: false,
						Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(600)}})
					if err == nil {
						s.mu.Lock()
						s.present, s.conns, s.addr = ca.SessionPresent, s.conns+1, addr
						s.mu.Unlock()
						collect(s, c)
						close(s.done)
						return
					}
				}
				s.mu.Lock()
				s.refused++
				s.mu.Unlock()
				time.Sleep(200 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	back := time.Since(killed)
	refused := 0
	for _, s := range all {
		select {
		case <-s.done:
		default:
			t.Fatalf("%s did not reconnect through the router within 60 s", s.id)
		}
		if !s.present {
			t.Fatalf("%s: session present = 0 on a survivor after n2 died (%d CONNECTs failed before)", s.id, s.refused)
		}
		refused += s.refused
	}
	<-done
	nAcked := 0
	for _, a := range acked {
		if a {
			nAcked++
		}
	}
	if nAcked < msgs/2 {
		t.Fatalf("only %d of %d publishes acknowledged", nAcked, msgs)
	}
	testutil.WaitFor(t, 30*time.Second, func() error {
		for _, s := range all {
			s.mu.Lock()
			seen := map[int]bool{}
			for _, n := range s.got {
				seen[n] = true
			}
			s.mu.Unlock()
			var missing []int
			for i, a := range acked {
				if a && !seen[i] {
					missing = append(missing, i)
				}
			}
			if len(missing) > 0 {
				return fmt.Errorf("%s has not received acknowledged messages %v (%d received)", s.id, missing, len(seen))
			}
		}
		return nil
	})
	// Order per publisher: no first delivery after a later message's.
	// Duplicates (QoS 1): a connected subscriber gets again what the dead
	// node had delivered to it but not yet acknowledged on its link to n1
	// (n1 re-sends it from the held link; published before the kill, a
	// few per connected subscriber: how many depends on the store's
	// write lag, so they are reported, not bounded). What was published
	// after the kill comes once: what n1 held for n2 reaches each adopted
	// session once, where it was adopted (it moves on afterwards), and
	// instead of the direct copies (docs/clustering.md, "Durability");
	// a session moving while a message is relayed may get that one twice.
	// Before, a session that moved on from its adopter got most held
	// messages twice, some three or four times, and a later message
	// before an earlier one.
	// Published once n2 was killed: message msgs/4 is published while the
	// kill is sent, and n2 may deliver it to its connected sessions first
	// (then it comes again from the held link, as those before the kill:
	// 25 duplicates, one per connected session, seen in 2 of 20 runs).
	const killedAt = msgs/4 + 1
	dupBefore, dupAfter, inversions, most := 0, 0, 0, 1
	var odd []string // the subscribers that got anything twice or out of order
	for _, s := range all {
		s.mu.Lock()
		count := map[int]int{}
		prev, dup, inv := -1, 0, 0
		for _, n := range s.got {
			count[n]++
			if count[n] > 1 {
				dup++
				if n < killedAt {
					dupBefore++
				} else {
					dupAfter++
				}
				most = max(most, count[n])
				continue
			}
			if n < prev {
				inv++
			}
			prev = n
		}
		if dup > 0 || inv > 0 {
			odd = append(odd, fmt.Sprintf("%s (reconnected to %s): %d duplicates, %d out of order, received %v", s.id, s.addr, dup, inv, s.got))
		}
		s.mu.Unlock()
		inversions += inv
	}
	t.Logf("all %d subscribers back with their session %v after kill -9 (%d CONNECTs failed or refused first); %d of %d publishes acknowledged, every one delivered to every subscriber; duplicates %d of messages published before the kill and %d after (at most %d copies of one message), first deliveries after a later message %d",
		subs, back.Round(time.Millisecond), refused, nAcked, msgs, dupBefore, dupAfter, most, inversions)
	if inversions > 0 || most > 2 || dupAfter > subs/2 {
		for _, o := range odd {
			t.Log(o)
		}
		t.Fatalf("want every message in publish order, none more than twice, at most %d duplicates of messages published after the kill", subs/2)
	}
}

// TestNodeDeathReconnectAtOnceFindsSession: devices whose node is killed
// reconnect at once to a survivor, before gossip has declared the node
// failed, and keep retrying while refused. Each must end up with its
// session and its queued message, on whichever survivor it reached; none
// is handed an empty session (which would also make the survivors skip its
// stored one as superseded).
func TestNodeDeathReconnectAtOnceFindsSession(t *testing.T) {
	const devices = 6
	f := newClusterFixture(t)
	n1, n2, n3 := f.start("n1"), f.start("n2"), f.start("n3")
	waitFormed(t, n1, n2, n3)
	for i := range devices {
		id := fmt.Sprintf("at-once-%d", i)
		c, _ := persistV5(t, n2.mqtt, id, 600)
		c.Sub(t, "at-once/"+id, 1)
		_ = c.Disconnect(&paho.Disconnect{})
	}
	// Published on n2: acknowledged once stored for the offline sessions.
	pub := testutil.MustV5(t, n2.mqtt, "at-once-pub")
	for i := range devices {
		id := fmt.Sprintf("at-once-%d", i)
		pub.Pub(t, "at-once/"+id, 1, false, "queued for "+id)
	}
	if err := syscall.Kill(n2.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n2.p.wait(t, 10*time.Second)
	for i := range devices {
		id := fmt.Sprintf("at-once-%d", i)
		addr := []string{n1.mqtt, n3.mqtt}[i%2]
		var c *testutil.V5
		var ca *paho.Connack
		refused := 0
		testutil.WaitFor(t, 60*time.Second, func() error {
			var err error
			c, ca, err = testutil.DialV5(t, addr, &paho.Connect{ClientID: id, CleanStart: false,
				Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(600)}})
			if err != nil {
				refused++
			}
			return err
		})
		if !ca.SessionPresent {
			t.Fatalf("%s reconnected to a survivor after %d refusals with session present = 0", id, refused)
		}
		if m := c.Next(t, 30*time.Second); string(m.Payload) != "queued for "+id {
			t.Fatalf("%s got %q", id, m.Payload)
		}
		t.Logf("%s: session present after %d refused CONNECTs", id, refused)
	}
}
