package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// sessionExpiry is the session expiry interval of movingClient (10 minutes).
var sessionExpiry = uint32(600)

// movingClient is a persistent MQTT 5 client (session expiry 10 minutes)
// that, whenever its connection ends, connects again to the next address
// that answers, with clean start false, as a device behind a router does.
// It records what it receives and whether each reconnect found its session.
type movingClient struct {
	t      *testing.T
	id     string
	filter string // subscribed once, on the first connection ("" for none)
	addrs  func() []string

	mu         sync.Mutex
	got        map[uint64]int // sequence number → times received
	order      []uint64
	reconnects int
	noSession  int // reconnects that found no session
	refused    int // CONNECTs refused with 0x88 (session moving)
	client     *paho.Client
	ready      chan struct{}

	stop, done chan struct{}
}

func newMovingClient(t *testing.T, id, filter string, first int, addrs func() []string) *movingClient {
	return newMovingClientClean(t, id, filter, first, true, addrs)
}

// newMovingClientClean is newMovingClient whose first CONNECT has clean
// start as given (false: a device that expects a session somewhere).
func newMovingClientClean(t *testing.T, id, filter string, first int, clean bool, addrs func() []string) *movingClient {
	c := &movingClient{t: t, id: id, filter: filter, addrs: addrs, got: map[uint64]int{},
		ready: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	go c.run(first, clean)
	t.Cleanup(c.close)
	select {
	case <-c.ready:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: never connected", id)
	}
	return c
}

func (c *movingClient) close() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
}

func (c *movingClient) run(next int, clean bool) {
	defer close(c.done)
	first := true
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		addrs := c.addrs()
		addr := addrs[next%len(addrs)]
		next++
		conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		ended := make(chan struct{})
		var once sync.Once
		end := func() { once.Do(func() { close(ended) }) }
		pc := paho.NewClient(paho.ClientConfig{Conn: conn, PacketTimeout: 10 * time.Second,
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
				c.received(pr.Packet.Payload)
				return true, nil
			}},
			OnServerDisconnect: func(*paho.Disconnect) { end() },
			OnClientError:      func(error) { end() },
		})
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		ca, err := pc.Connect(ctx, &paho.Connect{ClientID: c.id, KeepAlive: 10, CleanStart: clean,
			Properties: &paho.ConnectProperties{SessionExpiryInterval: &sessionExpiry}})
		cancel()
		if err != nil {
			_ = conn.Close()
			if ca != nil && ca.ReasonCode == 0x88 {
				c.mu.Lock()
				c.refused++
				c.mu.Unlock()
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		c.mu.Lock()
		if !first {
			c.reconnects++
			if !ca.SessionPresent {
				c.noSession++
			}
		}
		c.client = pc
		c.mu.Unlock()
		if c.filter != "" && (clean || !ca.SessionPresent) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := pc.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: c.filter, QoS: 1}}})
			cancel()
			if err != nil {
				_ = conn.Close()
				continue
			}
		}
		if first {
			first, clean = false, false
			close(c.ready)
		}
		select {
		case <-ended:
			_ = conn.Close()
		case <-c.stop:
			_ = pc.Disconnect(&paho.Disconnect{})
			_ = conn.Close()
			return
		}
	}
}

func (c *movingClient) received(payload []byte) {
	if len(payload) < 8 {
		return
	}
	seq := binary.BigEndian.Uint64(payload)
	c.mu.Lock()
	c.got[seq]++
	c.order = append(c.order, seq)
	c.mu.Unlock()
}

// missing returns the sequence numbers of acked not received.
func (c *movingClient) missing(acked []uint64) []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []uint64
	for _, s := range acked {
		if c.got[s] == 0 {
			out = append(out, s)
		}
	}
	return out
}

func (c *movingClient) duplicates() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, k := range c.got {
		n += k - 1
	}
	return n
}

// streamPublisher publishes QoS 1 messages numbered 1, 2, ... to topic
// every interval, one at a time, reconnecting (clean start) to the next
// address that answers when its connection ends, and retrying the message
// it was publishing. acked holds every number acknowledged with success.
type streamPublisher struct {
	mu    sync.Mutex
	acked []uint64
	next  atomic.Uint64
	stop  chan struct{}
	done  chan struct{}
}

func startStreamPublisher(t *testing.T, topic string, interval time.Duration, addrs func() []string) *streamPublisher {
	p := &streamPublisher{stop: make(chan struct{}), done: make(chan struct{})}
	p.next.Store(1)
	go p.run(topic, interval, addrs)
	t.Cleanup(p.close)
	return p
}

func (p *streamPublisher) close() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
}

func (p *streamPublisher) ackedSeqs() []uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.acked)
}

func (p *streamPublisher) run(topic string, interval time.Duration, addrs func() []string) {
	defer close(p.done)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-p.stop:
			return
		default:
		}
		as := addrs()
		conn, err := net.DialTimeout("tcp", as[i%len(as)], 2*time.Second)
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		pc := paho.NewClient(paho.ClientConfig{Conn: conn, PacketTimeout: 10 * time.Second, OnClientError: func(error) {}})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = pc.Connect(ctx, &paho.Connect{ClientID: "stream-pub", KeepAlive: 10, CleanStart: true})
		cancel()
		if err != nil {
			_ = conn.Close()
			time.Sleep(50 * time.Millisecond)
			continue
		}
		for err == nil {
			select {
			case <-p.stop:
				_ = pc.Disconnect(&paho.Disconnect{})
				_ = conn.Close()
				return
			case <-tick.C:
			}
			seq := p.next.Load()
			payload := binary.BigEndian.AppendUint64(nil, seq)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			var resp *paho.PublishResponse
			resp, err = pc.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: payload})
			cancel()
			if err == nil && resp.ReasonCode >= 0x80 {
				err = fmt.Errorf("PUBACK 0x%02X", resp.ReasonCode)
			}
			if err == nil {
				p.mu.Lock()
				p.acked = append(p.acked, seq)
				p.mu.Unlock()
				p.next.Add(1)
			}
		}
		_ = conn.Close()
	}
}

// TestRollingRestartLosesNothing restarts the three brokers of a cluster
// one after the other (SIGTERM, wait for exit 0, start again, wait until
// the cluster is whole) while a publisher streams QoS 1 messages to four
// persistent subscribers, all of which reconnect elsewhere whenever their
// broker goes. Every message acknowledged to the publisher reaches every
// subscriber, and every reconnect finds its session. Before the stopping
// node handed its sessions over and kept its routes until then, sessions
// were lost (SessionPresent=0) and about 1 % of the messages with them.
func TestRollingRestartLosesNothing(t *testing.T) {
	t.Parallel()
	f := newClusterFixture(t)
	nodes := []*clusterNode{f.start("n1"), f.start("n2"), f.start("n3")}
	waitFormed(t, nodes...)
	// The clients read the nodes' addresses while a restart rewrites
	// them.
	var addrMu sync.Mutex
	addrs := func() []string {
		addrMu.Lock()
		defer addrMu.Unlock()
		var out []string
		for _, n := range nodes {
			out = append(out, n.mqtt)
		}
		return out
	}
	var subs []*movingClient
	for i := range 4 {
		subs = append(subs, newMovingClient(t, fmt.Sprintf("rr-sub%d", i), "rr/stream", i, addrs))
	}
	for _, n := range nodes {
		waitRoutesAtLeast(t, n, nodes)
	}
	pub := startStreamPublisher(t, "rr/stream", 10*time.Millisecond, addrs)

	// The first node began the cluster: restarted, it joins the others.
	nodes[0].env = append(nodes[0].env, "RTM_CLUSTER_JOIN="+nodes[1].gossip)
	for _, n := range nodes {
		waitAcked(t, pub, 50)
		if err := n.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := n.p.wait(t, 30*time.Second); code != 0 {
			t.Fatalf("%s exit code %d after SIGTERM", n.name, code)
		}
		addrMu.Lock()
		f.restart(n)
		addrMu.Unlock()
		waitFormed(t, nodes...)
	}
	waitAcked(t, pub, 50)
	pub.close()
	acked := pub.ackedSeqs()
	testutil.WaitFor(t, 30*time.Second, func() error {
		for _, s := range subs {
			if m := s.missing(acked); len(m) > 0 {
				return fmt.Errorf("%s misses %d of %d acknowledged messages (first %v)", s.id, len(m), len(acked), m[:min(len(m), 5)])
			}
		}
		return nil
	})
	for _, s := range subs {
		dups := s.duplicates()
		s.mu.Lock()
		t.Logf("%s: %d reconnects, %d without session, %d refused while moving, %d duplicates", s.id, s.reconnects, s.noSession, s.refused, dups)
		if s.noSession > 0 {
			t.Errorf("%s: %d of %d reconnects found no session", s.id, s.noSession, s.reconnects)
		}
		s.mu.Unlock()
	}
	t.Logf("%d messages acknowledged, all delivered to the %d subscribers", len(acked), len(subs))
}

// waitRoutesAtLeast waits until every other node holds n's routes (one
// per subscribed filter here), or n has no subscribers.
func waitRoutesAtLeast(t *testing.T, n *clusterNode, nodes []*clusterNode) {
	t.Helper()
	local := n.stats(t).LocalRoutes
	for _, o := range nodes {
		if o != n {
			waitRoutes(t, o, n.name, local)
		}
	}
}

// waitAcked waits until the publisher has k more messages acknowledged.
func waitAcked(t *testing.T, p *streamPublisher, k int) {
	t.Helper()
	want := len(p.ackedSeqs()) + k
	testutil.WaitFor(t, 30*time.Second, func() error {
		if n := len(p.ackedSeqs()); n < want {
			return fmt.Errorf("%d messages acknowledged, want %d", n, want)
		}
		return nil
	})
}

// TestPartitionHealOneOwner stops a broker with SIGSTOP for 10 s while its
// persistent subscriber, still connected to it, connects to the other
// broker, and resumes it with SIGCONT. The new CONNECT does not wait out
// cluster.claim_timeout (10 s here) for the stopped node, which gossip
// suspects; after the heal the old connection is ended (0x8E) and the
// stopped node holds no session for the client (its stale one is dropped
// and counted), the new connection keeps receiving, and it gets no message
// twice and none late (numbers only increase). Before, both connections
// stayed alive and the stopped node kept, filled and later handed over the
// stale session (hundreds of duplicates and late messages).
func TestPartitionHealOneOwner(t *testing.T) {
	t.Parallel()
	// The heal exchange alone, without the store-backed session
	// durability. What the stopped node relays after SIGCONT for the move
	// it tries of its stale session is dropped at n1
	// (TestStaleMoveRelayNotDelivered; before, this test failed rarely with
	// 1 duplicate and 1 late message).
	partitionHealOneOwner(t, "RTM_BROKER_DURABILITY=off")
}

// TestPartitionHealOneOwnerDurable is TestPartitionHealOneOwner with the
// store-backed durability: n2 is declared failed while stopped, n1 adopts
// the session from the store and sends on what it held for n2. What n2
// had not acknowledged on the link reaches the session through that held
// copy alone, before what was published later (cluster_failover.go).
// Before, one run of it gave 1 duplicate (published between the adoption
// and the release of n2's link) and 1 late message (delivered to the old
// connection, not acknowledged by n2 on the link, re-sent after newer
// ones).
func TestPartitionHealOneOwnerDurable(t *testing.T) {
	t.Parallel()
	partitionHealOneOwner(t, "RTM_BROKER_DURABILITY=on")
}

func partitionHealOneOwner(t *testing.T, durability string) {
	f := newClusterFixture(t)
	claim := "RTM_CLUSTER_CLAIM_TIMEOUT=10s"
	n1, n2 := f.start("n1", claim, durability), f.start("n2", claim, durability)
	waitFormed(t, n1, n2)

	// The device on n2: a persistent session, and a connection that
	// watches for its DISCONNECT.
	var oldGot atomic.Int64
	oldGone := make(chan byte, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := net.DialTimeout("tcp", n2.mqtt, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// Ended means a DISCONNECT (0x8E), or the connection closed: when the
	// stale node resumes with messages still queued for the connection,
	// the close may overtake the DISCONNECT packet (reported as 0 here).
	var goneOnce sync.Once
	gone := func(code byte) { goneOnce.Do(func() { oldGone <- code }) }
	x := paho.NewClient(paho.ClientConfig{Conn: conn, OnClientError: func(error) { gone(0) },
		OnServerDisconnect: func(d *paho.Disconnect) { gone(d.ReasonCode) },
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(paho.PublishReceived) (bool, error) {
			oldGot.Add(1)
			return true, nil
		}}})
	if _, err := x.Connect(ctx, &paho.Connect{ClientID: "ph-x", KeepAlive: 60, CleanStart: true,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &sessionExpiry}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if _, err := x.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "ph/x", QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, n1, "n2", 1)
	pub := startStreamPublisher(t, "ph/x", 10*time.Millisecond, func() []string { return []string{n1.mqtt} })
	waitAcked(t, pub, 50)

	if err := n2.p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	t.Cleanup(func() { _ = n2.p.cmd.Process.Signal(syscall.SIGCONT) })
	waitStopped(t, n2.p.cmd.Process.Pid)
	// The device gives n2 up and connects to n1.
	began := time.Now()
	cur := newMovingClientClean(t, "ph-x", "ph/x", 0, false, func() []string { return []string{n1.mqtt} })
	took := time.Since(began)
	t.Logf("CONNECT to n1 while n2 is stopped took %v", took.Round(time.Millisecond))
	if took > 6*time.Second {
		t.Errorf("CONNECT to n1 took %v: it waited for the stopped node (claim timeout 10s)", took)
	}
	// The message being published while the SUBACK came may have found no
	// subscriber yet: count from the next one.
	firstSeq := pub.next.Load() + 1
	time.Sleep(10*time.Second - time.Since(stopped)) // the partition lasts 10 s
	if err := n2.p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	healed := time.Now()
	select {
	case code := <-oldGone:
		if code != 0x8E && code != 0 {
			t.Errorf("old connection: DISCONNECT 0x%02X, want 0x8E or a close", code)
		}
		t.Logf("old connection ended (DISCONNECT 0x%02X, 0: closed) %v after SIGCONT", code, time.Since(healed).Round(time.Millisecond))
	case <-time.After(20 * time.Second):
		t.Fatal("the old connection on n2 still open 20 s after SIGCONT")
	}
	testutil.WaitFor(t, 20*time.Second, func() error {
		s := brokerStats(t, n2.admin)
		if s.Sessions != 0 || s.Connections != 0 {
			return fmt.Errorf("n2 holds %d sessions, %d connections; want none", s.Sessions, s.Connections)
		}
		if s.Cluster == nil || s.Cluster.StaleSessions != 1 {
			return fmt.Errorf("n2 ended %+v stale sessions, want 1", s.Cluster)
		}
		return nil
	})
	waitAcked(t, pub, 100)
	pub.close()
	var want []uint64
	for _, s := range pub.ackedSeqs() {
		if s >= firstSeq {
			want = append(want, s)
		}
	}
	testutil.WaitFor(t, 20*time.Second, func() error {
		if m := cur.missing(want); len(m) > 0 {
			return fmt.Errorf("the new connection misses %d of %d messages acknowledged after it subscribed (first %v)", len(m), len(want), m[:min(len(m), 5)])
		}
		return nil
	})
	if d := cur.duplicates(); d > 0 {
		t.Errorf("the new connection got %d duplicates", d)
	}
	cur.mu.Lock()
	defer cur.mu.Unlock()
	for i := 1; i < len(cur.order); i++ {
		if cur.order[i] <= cur.order[i-1] {
			t.Errorf("late message: %d after %d", cur.order[i], cur.order[i-1])
			break
		}
	}
	if cur.reconnects != 0 {
		t.Errorf("the new connection was ended %d times", cur.reconnects)
	}
	s := brokerStats(t, n2.admin)
	t.Logf("old connection received %d messages in all; n2 dropped %v as stale", oldGot.Load(), s.DroppedByReason["stale_session"])
}

// waitStopped waits until process pid is stopped (state T in
// /proc/PID/stat): a signal is delivered asynchronously, and a process
// that still runs for a moment would answer a claim.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	testutil.WaitFor(t, 10*time.Second, func() error {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return err
		}
		// The state follows the command name, which is in parentheses.
		if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'T' {
			return nil
		}
		return fmt.Errorf("process %d not stopped yet", pid)
	})
}
