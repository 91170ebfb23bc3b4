package mochifix_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt "github.com/mochi-mqtt/server/v2"
)

// TestQoS1SlowSubscriberSmallReceiveMaximum: a v5 subscriber with Receive
// Maximum 10 that acknowledges slowly (manual acks, released with a small
// delay) must receive every one of 20,000 QoS 1 messages that a publisher
// pushes as fast as the broker acks it. On v2.7.9 the subscriber's delivery
// hangs forever: Inflight.NextImmediate read-locks twice (directly and via
// GetAll) and a concurrent Inflight.Set from the publisher's goroutine, queued
// between the two, blocks the second read lock; the subscriber's read
// goroutine and the publisher's goroutine both stop.
func TestQoS1SlowSubscriberSmallReceiveMaximum(t *testing.T) {
	const (
		total      = 20_000
		receiveMax = 10
		publishers = 8
		topic      = "flow/qos1"
		deadline   = 30 * time.Second
	)

	_, addr, rec := startBroker(t, func(c *mqtt.Capabilities) {
		// The subscriber drains at most receiveMax messages per round trip, so
		// the backlog is held in its inflight store, which must be large enough
		// not to drop (mochi drops above MaximumInflight, default 8192).
		c.MaximumInflight = 65535
	})

	var (
		mu       sync.Mutex
		seen     = make([]int, total)
		received atomic.Int64
		dups     atomic.Int64
		all      = make(chan struct{})
		acks     = make(chan *paho.Publish, 1024)
	)

	sub := connectPaho(t, addr, "slow-sub", receiveMax, func(c *paho.ClientConfig) {
		c.EnableManualAcknowledgment = true
		c.SendAcksInterval = time.Millisecond
		c.OnPublishReceived = []func(paho.PublishReceived) (bool, error){
			func(pr paho.PublishReceived) (bool, error) {
				n := int(binary.BigEndian.Uint32(pr.Packet.Payload))
				mu.Lock()
				seen[n]++
				if seen[n] > 1 {
					dups.Add(1)
				}
				mu.Unlock()
				if received.Add(1) == total {
					close(all)
				}
				acks <- pr.Packet
				return true, nil
			},
		}
	})

	// The slow part: acks leave one at a time, each after a short pause, so
	// the broker's send quota for this client stays exhausted most of the time
	// and the rest queues in its inflight store.
	ackDone := make(chan struct{})
	go func() {
		defer close(ackDone)
		for i := 0; ; i++ {
			select {
			case pb := <-acks:
				if i%50 == 0 {
					time.Sleep(time.Millisecond)
				}
				if err := sub.Ack(pb); err != nil {
					t.Errorf("ack: %v", err)
					return
				}
			case <-all:
				return
			}
		}
	}()

	subscribe(t, sub, topic, 1)

	pub := connectPaho(t, addr, "fast-pub", 0, nil)
	start := time.Now()
	var pwg sync.WaitGroup
	var pubErr atomic.Value
	for p := 0; p < publishers; p++ {
		pwg.Add(1)
		go func(p int) {
			defer pwg.Done()
			payload := make([]byte, 4)
			for n := p; n < total; n += publishers {
				binary.BigEndian.PutUint32(payload, uint32(n))
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				_, err := pub.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: append([]byte(nil), payload...)})
				cancel()
				if err != nil {
					pubErr.Store(err)
					return
				}
			}
		}(p)
	}
	pwg.Wait()
	if err, _ := pubErr.Load().(error); err != nil {
		t.Fatalf("publish: %v (after %s)", err, time.Since(start))
	}
	published := time.Since(start)

	select {
	case <-all:
	case <-time.After(deadline):
		t.Fatalf("subscriber stalled: %d of %d QoS 1 messages received %s after the publisher finished (published in %s); %s",
			received.Load(), total, deadline, published, stuckIn("(*Inflight).NextImmediate"))
	}
	<-ackDone

	mu.Lock()
	defer mu.Unlock()
	var missing []int
	for n, c := range seen {
		if c == 0 {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		t.Fatalf("%d messages never received, first %v", len(missing), missing[:min(10, len(missing))])
	}
	if d := dups.Load(); d > 0 {
		t.Errorf("%d duplicate deliveries", d)
	}
	if drops := rec.matching("quota reached"); len(drops) > 0 {
		t.Errorf("broker dropped messages: %v", drops[0])
	}
	t.Logf("%d QoS 1 messages to a Receive Maximum %d subscriber: published in %s, all received in %s",
		total, receiveMax, published, time.Since(start))
}

// stuckIn reports how many goroutines have fn on their stack, with the first
// such stack, to tell a lock deadlock from a stalled quota.
func stuckIn(fn string) string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var n int
	var first string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			if n == 0 {
				first = g
			}
			n++
		}
	}
	if n == 0 {
		return fmt.Sprintf("no goroutine in %s", fn)
	}
	return fmt.Sprintf("%d goroutine(s) blocked in %s, e.g.:\n%s", n, fn, first)
}
