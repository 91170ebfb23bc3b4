package main

import (
	"context"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestPublisherNodeDeathLosesNoAckedMessage: a publisher on n1 streams QoS
// 1 to a persistent subscriber on n2 that reads slowly, so n2 paces its
// link from n1 and n1's link queue grows; n1 is killed (kill -9)
// mid-stream. The subscriber, still connected to n2, must get every
// message whose PUBACK the publisher got, in order (duplicates allowed,
// reported). Before, n1 acknowledged a message once it was queued on its
// link to n2, which is memory only: the kill lost every acknowledged
// message still in it (about a thousand of 1,500 acknowledged here).
func TestPublisherNodeDeathLosesNoAckedMessage(t *testing.T) {
	const msgs, killAt, window = 3000, 1500, 100
	f := newClusterFixture(t)
	n1, n2 := f.start("n1"), f.start("n2")
	waitFormed(t, n1, n2)

	// The subscriber takes each message after a pause (a slow device):
	// once n2 holds half of broker.max_queued for it, n2 paces the link
	// from n1, and n1's link queue grows. (Not with a small Receive
	// Maximum as well: the order of what n2 then queues beyond it is not
	// this test's subject.)
	var mu sync.Mutex
	var got []int
	conn, err := net.DialTimeout("tcp", n2.mqtt, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	sub := paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(r paho.PublishReceived) (bool, error) {
			n, _ := strconv.Atoi(string(r.Packet.Payload))
			mu.Lock()
			got = append(got, n)
			mu.Unlock()
			time.Sleep(time.Millisecond) // a slow device
			return true, nil
		}},
		OnClientError: func(error) {},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, err := sub.Connect(ctx, &paho.Connect{ClientID: "slow-sub", CleanStart: false, KeepAlive: 30,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(600)}})
	if err != nil || ca.ReasonCode != 0 {
		t.Fatalf("subscriber connect: %v (%v)", err, ca)
	}
	t.Cleanup(func() { _ = sub.Disconnect(&paho.Disconnect{}); _ = conn.Close() })
	if _, err := sub.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "pk/#", QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, n1, "n2", 1)

	// The publisher keeps up to window messages unacknowledged (below
	// broker.max_inflight), in publish order.
	pub, err := testutil.DialV3(t, n1.mqtt, "fast-pub", nil)
	if err != nil {
		t.Fatal(err)
	}
	acked := make([]atomic.Bool, msgs)
	var nacked atomic.Int64
	slots := make(chan struct{}, window)
	var wg sync.WaitGroup
	killed := make(chan struct{})
	go func() {
		for end := time.Now().Add(60 * time.Second); nacked.Load() < killAt; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(end) {
				t.Errorf("%d of %d acknowledged after 60 s", nacked.Load(), killAt)
				break
			}
		}
		t.Logf("kill -9 n1 at %d acknowledged", nacked.Load())
		if err := syscall.Kill(n1.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
			t.Error(err)
		}
		close(killed)
	}()
publish:
	for i := range msgs {
		select {
		case slots <- struct{}{}:
		case <-killed:
			break publish
		}
		tok := pub.Publish("pk/a", 1, false, strconv.Itoa(i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			if tok.WaitTimeout(30*time.Second) && tok.Error() == nil {
				acked[i].Store(true)
				nacked.Add(1)
			}
		}()
	}
	<-killed
	n1.p.wait(t, 10*time.Second)
	pub.Disconnect(0)
	wg.Wait()
	var want []int
	for i := range acked {
		if acked[i].Load() {
			want = append(want, i)
		}
	}
	t.Logf("%d of %d messages acknowledged before n1 died", len(want), msgs)

	// Every acknowledged message arrives (n2 is alive: no failover is
	// needed for its own session).
	missing := func() []int {
		mu.Lock()
		defer mu.Unlock()
		seen := map[int]bool{}
		for _, n := range got {
			seen[n] = true
		}
		var miss []int
		for _, n := range want {
			if !seen[n] {
				miss = append(miss, n)
			}
		}
		return miss
	}
	var miss []int
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if miss = missing(); len(miss) == 0 || time.Now().After(deadline) {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(miss) > 0 {
		t.Fatalf("%d of %d acknowledged messages never arrived (first %d; %d received in all)", len(miss), len(want), miss[0], len(got))
	}
	// In order: each message's first arrival after the previous one's.
	seen := map[int]bool{}
	prev, dups := -1, 0
	for _, n := range got {
		if seen[n] {
			dups++
			continue
		}
		seen[n] = true
		if n < prev {
			t.Fatalf("message %d first arrived after %d", n, prev)
		}
		prev = n
	}
	t.Logf("%d received, %d duplicates", len(got), dups)
}
