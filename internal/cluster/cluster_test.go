package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

func startNode(t *testing.T, name string, join []string, mutate func(*cluster.Options)) *cluster.Node {
	t.Helper()
	log, logs := testutil.Logger(t)
	opts := cluster.Options{NodeName: name, BindAddr: "127.0.0.1:0", Join: join, Timing: cluster.TimingFast, Logger: log,
		Tags: cluster.Tags{Role: cluster.RoleBroker, MQTT: "127.0.0.1:1883", Capacity: 100}}
	if mutate != nil {
		mutate(&opts)
	}
	n, err := cluster.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Shutdown(); logs.Stop() })
	return n
}

func view(n *cluster.Node) string {
	var s []string
	for _, m := range n.Members() {
		s = append(s, m.Name+"="+string(m.Status))
	}
	sort.Strings(s)
	return strings.Join(s, ",")
}

func waitView(t *testing.T, n *cluster.Node, want string) {
	t.Helper()
	testutil.WaitFor(t, 10*time.Second, func() error {
		if got := view(n); got != want {
			return fmt.Errorf("%s sees %s, want %s", n.Name(), got, want)
		}
		return nil
	})
}

func TestMembershipJoinFailLeave(t *testing.T) {
	a := startNode(t, "a", nil, nil)
	events, cancel := a.Subscribe(64)
	defer cancel()
	b := startNode(t, "b", []string{a.Addr()}, nil)
	c := startNode(t, "c", []string{b.Addr()}, func(o *cluster.Options) { o.Tags.Role = cluster.RoleRouter })
	for _, n := range []*cluster.Node{a, b, c} {
		waitView(t, n, "a=alive,b=alive,c=alive")
	}
	for _, m := range a.Members() {
		if m.Name == "c" && (m.Tags.Role != cluster.RoleRouter || m.Tags.Capacity != 100) {
			t.Fatalf("tags of c as a sees them: %+v", m.Tags)
		}
	}

	// A crash (no leave) is detected as a failure by gossip.
	start := time.Now()
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	waitView(t, a, "a=alive,b=alive,c=failed")
	t.Logf("failure detected in %v", time.Since(start))

	// A graceful leave is seen as "left", not failed.
	ctx, cancelLeave := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelLeave()
	if err := b.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	_ = b.Shutdown()
	waitView(t, a, "a=alive,b=left,c=failed")

	var got []string
	for len(got) < 4 {
		select {
		case e := <-events:
			if e.Member.Name != "a" { // a's own join may come before or after Subscribe
				got = append(got, string(e.Type)+":"+e.Member.Name)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("events so far %v", got)
		}
	}
	if want := "join:b,join:c,fail:c,leave:b"; strings.Join(got, ",") != want {
		t.Fatalf("events %v, want %s", got, want)
	}
}

func TestTagsUpdatePropagate(t *testing.T) {
	a := startNode(t, "a", nil, nil)
	b := startNode(t, "b", []string{a.Addr()}, nil)
	waitView(t, a, "a=alive,b=alive")
	if err := b.SetTags(cluster.Tags{Role: cluster.RoleBroker, Capacity: 100, Connections: 42, Draining: true}); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 5*time.Second, func() error {
		for _, m := range a.Members() {
			if m.Name == "b" && m.Tags.Connections == 42 && m.Tags.Draining {
				return nil
			}
		}
		return fmt.Errorf("a sees %+v", a.Members())
	})
}

func TestJoinRetriesUntilSeedIsUp(t *testing.T) {
	// Reserve a port for the seed, start the joiner first, then the seed.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	seedAddr := l.Addr().String()
	l.Close()
	b := startNode(t, "b", []string{seedAddr}, nil)
	select {
	case <-b.Joined():
		t.Fatal("joined a seed that is not up")
	default:
	}
	a := startNode(t, "a", nil, func(o *cluster.Options) { o.BindAddr = seedAddr })
	select {
	case <-b.Joined():
	case <-time.After(10 * time.Second):
		t.Fatal("b did not join the seed within 10s of it starting")
	}
	waitView(t, a, "a=alive,b=alive")
}

func TestNameClashIsAnError(t *testing.T) {
	a := startNode(t, "same", nil, nil)
	n, err := cluster.New(cluster.Options{NodeName: "same", BindAddr: "127.0.0.1:0", Join: []string{a.Addr()}, Timing: cluster.TimingFast})
	if err != nil {
		t.Fatal(err)
	}
	err = n.Start(context.Background())
	t.Cleanup(func() { _ = n.Shutdown() })
	if !errors.Is(err, cluster.ErrNameClash) {
		t.Fatalf("Start with a taken name: %v, want ErrNameClash", err)
	}
}

func TestSecretKeepsStrangersOut(t *testing.T) {
	a := startNode(t, "a", nil, func(o *cluster.Options) { o.Secret = "s3cret" })
	b := startNode(t, "b", []string{a.Addr()}, func(o *cluster.Options) { o.Secret = "s3cret" })
	waitView(t, a, "a=alive,b=alive")
	_ = b
	stranger := startNode(t, "x", []string{a.Addr()}, func(o *cluster.Options) { o.Secret = "other" })
	select {
	case <-stranger.Joined():
		t.Fatal("a member with another secret joined")
	case <-time.After(time.Second): // the absence of a join needs a window
	}
	if got := view(a); got != "a=alive,b=alive" {
		t.Fatalf("a sees %s after a stranger tried to join", got)
	}
}

func TestDecodeTagsRejectsBadNumbers(t *testing.T) {
	tags := cluster.Tags{Role: cluster.RoleBroker, MQTT: "h:1", Capacity: 5, Connections: 2, Draining: true, Version: "v1", Protocol: 2}
	got, err := cluster.DecodeTags(tags.Encode())
	if err != nil || got != tags {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if _, err := cluster.DecodeTags(map[string]string{"role": "broker", "cap": "-3"}); err == nil {
		t.Fatal("negative capacity accepted")
	}
}

// A member whose background join finds its name taken is of no use to its
// role: Done must say so, so the process stops instead of running outside
// the cluster with only a log line.
func TestBackgroundNameClashClosesDone(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	seedAddr := l.Addr().String()
	l.Close()
	late := startNode(t, "same", []string{seedAddr}, nil)
	select {
	case <-late.Done():
		t.Fatal("Done closed before any clash")
	default:
	}
	seed := startNode(t, "seed", nil, func(o *cluster.Options) { o.BindAddr = seedAddr })
	startNode(t, "same", []string{seed.Addr()}, nil)
	select {
	case <-late.Done():
		if !errors.Is(late.Err(), cluster.ErrNameClash) {
			t.Fatalf("Err = %v, want ErrNameClash", late.Err())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Done not closed within 20s of the clash")
	}
}

// A Shutdown is not a failure.
func TestShutdownDoesNotCloseDone(t *testing.T) {
	n := startNode(t, "a", nil, nil)
	if err := n.Shutdown(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-n.Done():
		t.Fatalf("Done closed by Shutdown: %v", n.Err())
	case <-time.After(300 * time.Millisecond):
	}
}

// A Leave given up by its caller must not bring the process down when
// Shutdown follows while the leave is still broadcasting (memberlist panics
// on a leave after shutdown).
func TestShutdownDuringAbandonedLeave(t *testing.T) {
	var leavers []*cluster.Node
	for i := 0; i < 5; i++ {
		a := startNode(t, fmt.Sprintf("a%d", i), nil, nil)
		b := startNode(t, fmt.Sprintf("b%d", i), []string{a.Addr()}, nil)
		waitView(t, b, fmt.Sprintf("a%d=alive,b%d=alive", i, i))
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i)*time.Millisecond)
		if err := b.Leave(ctx); err == nil {
			t.Logf("round %d: leave finished before its deadline", i)
		}
		cancel()
		_ = b.Shutdown()
		_ = a.Shutdown()
		leavers = append(leavers, b)
	}
	for _, b := range leavers { // up to serf's broadcast timeout, 5 s
		b.WaitLeaves()
	}
}

// SetTags may be called from several goroutines (a broker's load ticker and
// its drain): -race finds serf's unguarded config write otherwise.
func TestSetTagsConcurrently(t *testing.T) {
	a := startNode(t, "a", nil, nil)
	done := make(chan struct{})
	// With a peer, UpdateNode reads the tags outside memberlist's locks.
	startNode(t, "b", []string{a.Addr()}, nil)
	waitView(t, a, "a=alive,b=alive")
	for g := 0; g < 2; g++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := 0; i < 30; i++ {
				_ = a.SetTags(cluster.Tags{Role: cluster.RoleBroker, Capacity: 100, Connections: i})
			}
		}()
	}
	<-done
	<-done
}
