package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// Issue 12 items 6 and 7: what a client, or a stranger, can make a broker
// hold is bounded in bytes. Both tests run a real `rtm broker`, read its
// RSS from /proc/<pid>/status while attacking it from 127.0.0.1, and
// measure another client's QoS 1 round trip in the same run. Set
// RTM_TEST_BINARY to run them against another build (e.g. one from before
// the fix, to measure it: they then fail with the figures logged).

// vmRSS returns the resident set size of process pid, in bytes.
func vmRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// rssSampler records the peak RSS of a process, sampled every 50 ms.
type rssSampler struct {
	peak atomic.Int64
	stop chan struct{}
	done chan struct{}
}

func sampleRSS(t *testing.T, pid int) *rssSampler {
	s := &rssSampler{stop: make(chan struct{}), done: make(chan struct{})}
	s.peak.Store(vmRSS(t, pid))
	go func() {
		defer close(s.done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tick.C:
				b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
				if err != nil {
					return
				}
				for _, line := range strings.Split(string(b), "\n") {
					if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
						kb, _ := strconv.ParseInt(f[1], 10, 64)
						if kb<<10 > s.peak.Load() {
							s.peak.Store(kb << 10)
						}
					}
				}
			}
		}
	}()
	return s
}

func (s *rssSampler) finish() int64 {
	close(s.stop)
	<-s.done
	return s.peak.Load()
}

// latencyProbe measures the QoS 1 round trip of a healthy pair: the time
// from a PUBLISH to its delivery to a subscriber (the PUBACK included), one
// message every 50 ms while it runs.
type latencyProbe struct {
	mu      sync.Mutex
	samples []time.Duration
	stop    chan struct{}
	done    chan struct{}
}

func startProbe(t *testing.T, addr, id string) *latencyProbe {
	t.Helper()
	got := make(chan string, 16)
	sub := dialPaho(t, addr, id+"-sub", func(pk *paho.Publish) { got <- string(pk.Payload) })
	subscribe(t, sub, "probe/"+id)
	pub := dialPaho(t, addr, id+"-pub", nil)
	p := &latencyProbe{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			payload := strconv.Itoa(i)
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			_, err := pub.Publish(ctx, &paho.Publish{Topic: "probe/" + id, QoS: 1, Payload: []byte(payload)})
			cancel()
			if err != nil {
				p.add(time.Minute) // counted as a failure: far above any bound
				continue
			}
			deadline := time.After(60 * time.Second)
		wait:
			for {
				select {
				case s := <-got:
					if s == payload {
						p.add(time.Since(start))
						break wait
					}
				case <-deadline:
					p.add(time.Minute)
					break wait
				}
			}
		}
	}()
	return p
}

func (p *latencyProbe) add(d time.Duration) {
	p.mu.Lock()
	p.samples = append(p.samples, d)
	p.mu.Unlock()
}

// take returns the samples so far and starts a new set.
func (p *latencyProbe) take() []time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.samples
	p.samples = nil
	return s
}

func (p *latencyProbe) finish() {
	close(p.stop)
	<-p.done
}

// summary is "n=… p50=… p99=… max=…" of samples.
func summary(samples []time.Duration) (string, time.Duration) {
	if len(samples) == 0 {
		return "no samples", time.Hour
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	q := func(f float64) time.Duration { return s[min(len(s)-1, int(f*float64(len(s))))] }
	return fmt.Sprintf("n=%d p50=%v p99=%v max=%v", len(s), q(0.5).Round(time.Microsecond),
		q(0.99).Round(time.Microsecond), s[len(s)-1].Round(time.Microsecond)), s[len(s)-1]
}

// startMemBroker starts an `rtm broker` on loopback and returns its PID and
// addresses.
func startMemBroker(t *testing.T, name string, env ...string) (pid int, mqttAddr, admin string) {
	t.Helper()
	p := start(t, env, append([]string{"broker", "--data", t.TempDir(), "--node-name", name}, loopbackFlags...)...)
	addrs := p.listeners(t)
	return p.cmd.Process.Pid, addrs["tcp"], addrs["admin"]
}

// mqttString is an MQTT UTF-8 string: length, then bytes.
func mqttString(s string) []byte { return append([]byte{byte(len(s) >> 8), byte(len(s))}, s...) }

// varint is an MQTT variable byte integer.
func varint(n int) []byte {
	var b []byte
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}

// connect311 is an MQTT 3.1.1 CONNECT (clean session) with keepalive ka.
func connect311(id string, ka uint16) []byte {
	body := append([]byte{0, 4, 'M', 'Q', 'T', 'T', 4, 2, byte(ka >> 8), byte(ka)}, mqttString(id)...)
	return append(append([]byte{0x10}, varint(len(body))...), body...)
}

// readConnack reads a CONNACK and returns an error unless it accepts.
func readConnack(r io.Reader) error {
	ack := make([]byte, 4)
	if _, err := io.ReadFull(r, ack); err != nil || ack[0] != 0x20 || ack[3] != 0 {
		return errors.Join(fmt.Errorf("CONNACK % x", ack), err)
	}
	return nil
}

// TestUnauthenticatedMemoryBounded (issue 12 item 7): sockets that declare
// large packets, send part of them and stall cannot make the broker hold
// what they declared: a CONNECT over broker.max_connect_size (64 KiB) is
// refused at its header, a large body is read as it arrives and counted
// against broker.max_reading_bytes (64 MiB; beyond it connections are
// closed), and a body that stops arriving is dropped after
// broker.read_timeout, also after a CONNECT with keepalive 0. Another
// client's QoS 1 round trip stays bounded meanwhile. Before the fix the
// broker allocated each declared 1 MiB up front and held it forever.
func TestUnauthenticatedMemoryBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("attack test")
	}
	const (
		bigConnects = 400       // CONNECT declaring 1 MiB, 60 KiB sent
		slowBodies  = 600       // after CONNECT (keepalive 0): PUBLISH declaring 1 MiB, 512 KiB sent
		declared    = 1_000_000 // bytes each declares (1 MB, under broker.max_packet_size)
	)
	pid, mqttAddr, admin := startMemBroker(t, "unauth1", "RTM_BROKER_READ_TIMEOUT=5s")
	probe := startProbe(t, mqttAddr, "probe7")
	defer probe.finish()
	time.Sleep(time.Second) // a baseline of round trips before the attack
	base := vmRSS(t, pid)
	baseLat, _ := summary(probe.take())
	rss := sampleRSS(t, pid)

	var conns []net.Conn
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	attack := func(first []byte, body int) {
		defer wg.Done()
		sem <- struct{}{}
		defer func() { <-sem }()
		c, err := net.DialTimeout("tcp", mqttAddr, 10*time.Second)
		if err != nil {
			t.Error(err)
			return
		}
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		if len(first) > 0 {
			if _, err := c.Write(first); err != nil {
				return
			}
			if err := readConnack(c); err != nil {
				t.Error(err)
				return
			}
		}
		hdr := append([]byte{0x10}, varint(declared)...) // CONNECT
		if len(first) > 0 {
			hdr = append([]byte{0x30}, varint(declared)...) // PUBLISH, QoS 0
			hdr = append(hdr, mqttString("atk")...)
		}
		_, _ = c.Write(append(hdr, make([]byte, body)...)) // refused sockets fail here: fine
	}
	for i := 0; i < bigConnects; i++ {
		wg.Add(1)
		go attack(nil, 60<<10)
	}
	for i := 0; i < slowBodies; i++ {
		wg.Add(1)
		go attack(connect311(fmt.Sprintf("atk-%d", i), 0), 512<<10)
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			_ = c.Close()
		}
	})
	time.Sleep(2 * time.Second) // the stalled bodies held, the probe still running
	during := brokerStats(t, admin)
	peak := rss.finish()
	lat, worst := summary(probe.take())
	t.Logf("RSS before %d MiB, peak during the attack %d MiB; reading %d KiB, read_refused %d, connect_too_large %d",
		base>>20, peak>>20, during.Memory.ReadingBytes>>10, during.Memory.ReadRefused, during.Memory.ConnectTooLarge)
	t.Logf("probe QoS 1 round trip before: %s; during: %s", baseLat, lat)

	if peak-base > 384<<20 {
		t.Errorf("RSS grew %d MiB during the attack (%d sockets declaring 1 MiB): want under 384 MiB", (peak-base)>>20, bigConnects+slowBodies)
	}
	if during.Memory.ReadingBytes > 64<<20+declared {
		t.Errorf("bytes being read %d, over broker.max_reading_bytes", during.Memory.ReadingBytes)
	}
	if during.Memory.ConnectTooLarge != bigConnects {
		t.Errorf("CONNECTs refused as too large: %d, want %d", during.Memory.ConnectTooLarge, bigConnects)
	}
	if during.Memory.ReadRefused == 0 {
		t.Errorf("no connection closed at broker.max_reading_bytes")
	}
	if worst > 5*time.Second {
		t.Errorf("the probe's QoS 1 round trip reached %v during the attack (want under 5 s)", worst)
	}

	// broker.read_timeout (5 s here) drops the stalled bodies, although
	// their connections have keepalive 0.
	testutil.WaitFor(t, 30*time.Second, func() error {
		if n := brokerStats(t, admin).Memory.ReadingBytes; n != 0 {
			return fmt.Errorf("%d bytes still being read", n)
		}
		return nil
	})
}

// TestStuckClientMemoryBounded (issue 12 item 6): a client subscribed to
// its own topic that publishes 1 MB QoS 0 messages at 100/s and never
// reads, and three subscribers that never read a topic of 1 MB QoS 1
// messages, cannot pin more than broker.max_queued_bytes (4 MiB) each: the
// rest is dropped and counted (queue_bytes). RSS stays bounded and another
// client's QoS 1 round trip with it. Before the fix, only broker.max_queued
// (1000 messages: 1 GB each) bounded them.
func TestStuckClientMemoryBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("attack test")
	}
	const (
		size     = 1_000_000
		selfRate = 100 // messages per second
		selfFor  = 10 * time.Second
		qos1Msgs = 300
	)
	pid, mqttAddr, admin := startMemBroker(t, "stuck6")
	probe := startProbe(t, mqttAddr, "probe6")
	defer probe.finish()
	time.Sleep(time.Second)
	base := vmRSS(t, pid)
	baseLat, _ := summary(probe.take())
	rss := sampleRSS(t, pid)

	// Three QoS 1 subscribers that never read, fed by a paho publisher.
	for i := 0; i < 3; i++ {
		stuckSubscriber(t, mqttAddr, fmt.Sprintf("stuck-%d", i), "big/q1")
	}
	var wg sync.WaitGroup
	var acked atomic.Int64
	pub := dialPaho(t, mqttAddr, "big-pub", nil) // here: dialPaho may call t.Fatal
	wg.Add(2)
	go func() {
		defer wg.Done()
		payload := make([]byte, size)
		for i := 0; i < qos1Msgs; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			_, err := pub.Publish(ctx, &paho.Publish{Topic: "big/q1", QoS: 1, Payload: payload})
			cancel()
			if err != nil {
				t.Errorf("QoS 1 publish %d: %v", i, err)
				return
			}
			acked.Add(1)
		}
	}()

	// One raw client subscribed to its own topic, publishing and never reading.
	go func() {
		defer wg.Done()
		c, err := net.DialTimeout("tcp", mqttAddr, 10*time.Second)
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		if _, err := c.Write(connect311("self", 60)); err != nil {
			t.Error(err)
			return
		}
		if err := readConnack(r); err != nil {
			t.Error(err)
			return
		}
		sub := append(append([]byte{0, 1}, mqttString("self/t")...), 0)
		if _, err := c.Write(append(append([]byte{0x82}, varint(len(sub))...), sub...)); err != nil {
			t.Error(err)
			return
		}
		if _, err := io.ReadFull(r, make([]byte, 5)); err != nil {
			t.Error(err)
			return
		}
		body := append(mqttString("self/t"), make([]byte, size)...)
		pk := append(append([]byte{0x30}, varint(len(body))...), body...)
		tick := time.NewTicker(time.Second / selfRate)
		defer tick.Stop()
		for end := time.Now().Add(selfFor); time.Now().Before(end); {
			<-tick.C
			_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(pk); err != nil {
				t.Errorf("self publisher: %v", err)
				return
			}
		}
	}()
	wg.Wait()
	st := brokerStats(t, admin)
	peak := rss.finish()
	lat, worst := summary(probe.take())
	t.Logf("RSS before %d MiB, peak %d MiB; queued %d KiB; QoS 1 acknowledged %d; dropped %v",
		base>>20, peak>>20, st.Memory.QueuedBytes>>10, acked.Load(), st.DroppedByReason)
	t.Logf("probe QoS 1 round trip before: %s; during: %s", baseLat, lat)

	if peak-base > 384<<20 {
		t.Errorf("RSS grew %d MiB: want under 384 MiB", (peak-base)>>20)
	}
	// Self client: 4 MiB of its own messages at most; QoS 1 subscribers: 4
	// MiB each. Everything else dropped and counted.
	if st.Memory.QueuedBytes > 4*(4<<20+size) {
		t.Errorf("queued bytes %d: over 4 clients × broker.max_queued_bytes", st.Memory.QueuedBytes)
	}
	qb := st.DroppedByReason["queue_bytes"]
	if qb["0"] < int64(selfRate*selfFor/time.Second)/2 || qb["1"] < 3*(qos1Msgs-10) {
		t.Errorf("drops counted as queue_bytes: %v, want most of the %d QoS 0 and 3 × %d QoS 1 messages", qb, selfRate*selfFor/time.Second, qos1Msgs)
	}
	if worst > 5*time.Second {
		t.Errorf("the probe's QoS 1 round trip reached %v (want under 5 s)", worst)
	}
}
