package mochifix_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/mochi-mqtt/server/v2/packets"
)

// v5Connect returns an MQTT 5 CONNECT packet (clean start, keepalive 60s, no
// properties) for the client id.
func v5Connect(id string) []byte {
	body := []byte{0, 4, 'M', 'Q', 'T', 'T', 5, 0x02, 0, 60, 0, 0, byte(len(id))}
	body = append(body, id...)
	return append([]byte{0x10, byte(len(body))}, body...)
}

// issue501Subscribes are MQTT 5 SUBSCRIBE packets that end right after a
// topic filter, without its subscription options byte. Sent after a valid
// MQTT 5 CONNECT, each crashed the whole v2.7.9 broker process with "index
// out of range" in SubscribeDecode
// (https://github.com/mochi-mqtt/server/issues/501).
var issue501Subscribes = [][]byte{
	{0x82, 5, 0, 1, 0, 0, 0},                     // packet id 1, no properties, empty filter
	{0x82, 6, 0, 1, 0, 0, 1, 'a'},                // filter "a"
	{0x82, 10, 0, 1, 0, 0, 1, 'a', 1, 0, 1, 'b'}, // second filter "b" without options
}

// frame builds a packet from a fixed header byte and a body, with a correct
// remaining length.
func frame(hb byte, body []byte) []byte {
	var b bytes.Buffer
	b.WriteByte(hb)
	n := len(body)
	for {
		eb := byte(n % 128)
		n /= 128
		if n > 0 {
			eb |= 0x80
		}
		b.WriteByte(eb)
		if n == 0 {
			break
		}
	}
	b.Write(body)
	return b.Bytes()
}

// splitPacket returns the fixed header byte and the body of a raw packet.
func splitPacket(raw []byte) (byte, []byte) {
	i := 1
	for i < len(raw) && raw[i]&0x80 != 0 {
		i++
	}
	if i+1 > len(raw) {
		return raw[0], nil
	}
	return raw[0], raw[i+1:]
}

// samplePackets are the raw test packets of every type shipped with mochi
// (valid and malformed cases), the material the mutations start from.
func samplePackets() [][]byte {
	var out [][]byte
	for typ := packets.Reserved; typ <= packets.Auth; typ++ {
		for _, tc := range packets.TPacketData[typ] {
			if len(tc.RawBytes) > 1 {
				out = append(out, tc.RawBytes)
			}
		}
	}
	return out
}

// mutate returns a malformed variant of raw: truncated, bit-flipped, garbage
// body, a length prefix that lies, or trailing junk.
func mutate(rng *rand.Rand, raw []byte) []byte {
	hb, body := splitPacket(raw)
	body = append([]byte(nil), body...)
	switch rng.IntN(6) {
	case 0: // truncated, with a consistent length
		return frame(hb, body[:rng.IntN(len(body)+1)])
	case 1: // a few bytes flipped
		for i := rng.IntN(3) + 1; i > 0 && len(body) > 0; i-- {
			body[rng.IntN(len(body))] ^= byte(1 << rng.IntN(8))
		}
		return frame(hb, body)
	case 2: // random body of a random length
		junk := make([]byte, rng.IntN(48))
		for i := range junk {
			junk[i] = byte(rng.UintN(256))
		}
		return frame(hb, junk)
	case 3: // the length prefix claims more than is sent
		p := frame(hb, body)
		return append(p[:1], append([]byte{byte(len(body) + 1 + rng.IntN(100)&0x7f)}, body...)...)
	case 4: // random fixed header flags / type
		return frame(byte(rng.UintN(256)), body)
	default: // valid packet followed by junk
		return append(frame(hb, body), byte(rng.UintN(256)), byte(rng.UintN(256)))
	}
}

// attackConn opens one raw TCP connection, writes the given bytes, half-closes
// and drains until the broker closes it. Every step has a deadline.
func attackConn(addr string, payload ...[]byte) error {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	for _, p := range payload {
		if _, err := c.Write(p); err != nil {
			return nil // the broker closed first: fine
		}
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite() // EOF for the broker's reader
	}
	_, _ = io.Copy(io.Discard, c) // until the broker closes, or the deadline
	return nil
}

// TestMalformedPacketsDoNotCrashBroker runs a live broker, keeps a healthy
// MQTT 5 subscriber receiving QoS 1 messages from a healthy publisher, and
// meanwhile opens raw connections that send (i) the truncated SUBSCRIBE
// packets of issue 501 after a valid CONNECT, which crashed v2.7.9, and (ii)
// 2,000 connections of random, truncated and corrupted packets of every
// packet type (fixed seed). The healthy subscriber must get every message,
// the broker must log no recovered panic, all attack connections must be
// closed, and the broker must still accept new clients.
func TestMalformedPacketsDoNotCrashBroker(t *testing.T) {
	const (
		attacks = 2000
		workers = 32
		topic   = "health/q1"
	)

	s, addr, rec := startBroker(t, nil)

	var got atomic.Int64
	var lastSeq atomic.Int64
	sub := connectPaho(t, addr, "healthy-sub", 0, func(c *paho.ClientConfig) {
		c.OnPublishReceived = []func(paho.PublishReceived) (bool, error){
			func(pr paho.PublishReceived) (bool, error) {
				got.Add(1)
				lastSeq.Store(int64(binary.BigEndian.Uint32(pr.Packet.Payload)))
				return true, nil
			},
		}
	})
	subscribe(t, sub, topic, 1)
	pub := connectPaho(t, addr, "healthy-pub", 0, nil)

	// The healthy publisher runs for the whole attack.
	stopPub := make(chan struct{})
	var published atomic.Int64
	var pubErr atomic.Value
	var pubWG sync.WaitGroup
	pubWG.Add(1)
	go func() {
		defer pubWG.Done()
		payload := make([]byte, 4)
		for seq := uint32(0); ; seq++ {
			select {
			case <-stopPub:
				return
			case <-time.After(2 * time.Millisecond):
			}
			binary.BigEndian.PutUint32(payload, seq)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := pub.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: append([]byte(nil), payload...)})
			cancel()
			if err != nil {
				pubErr.Store(err)
				return
			}
			published.Add(1)
		}
	}()

	start := time.Now()

	// (i) the exact issue 501 packets, each on its own connection.
	for i, sb := range issue501Subscribes {
		if err := attackConn(addr, v5Connect("i501-"+itoa(i)), sb); err != nil {
			t.Fatal(err)
		}
	}

	// (ii) random and truncated packets of every type.
	samples := samplePackets()
	jobs := make(chan int)
	var wg sync.WaitGroup
	var dialErrs atomic.Int64
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				rng := rand.New(rand.NewPCG(501, uint64(i))) // deterministic per connection
				id := "atk-" + itoa(i)
				var payload [][]byte
				switch k := rng.IntN(10); {
				case k < 6: // valid CONNECT, then malformed packets
					if rng.IntN(2) == 0 {
						payload = append(payload, v311Connect(id))
					} else {
						payload = append(payload, v5Connect(id))
					}
					for n := rng.IntN(3) + 1; n > 0; n-- {
						payload = append(payload, mutate(rng, samples[rng.IntN(len(samples))]))
					}
				case k < 8: // malformed CONNECT
					payload = append(payload, mutate(rng, v5Connect(id)))
				default: // anything as the first packet
					payload = append(payload, mutate(rng, samples[rng.IntN(len(samples))]))
				}
				if err := attackConn(addr, payload...); err != nil {
					dialErrs.Add(1)
				}
			}
		}()
	}
	for i := 0; i < attacks; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	attackTime := time.Since(start)

	close(stopPub)
	pubWG.Wait()
	if err, _ := pubErr.Load().(error); err != nil {
		t.Fatalf("healthy publisher failed during the attack: %v", err)
	}
	if n := dialErrs.Load(); n > 0 {
		t.Errorf("%d attack connections could not be opened", n)
	}

	// The healthy subscriber got everything that was published.
	want := published.Load()
	deadline := time.Now().Add(10 * time.Second)
	for got.Load() < want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got.Load() != want || lastSeq.Load() != want-1 {
		t.Errorf("healthy subscriber received %d of %d QoS 1 messages (last seq %d)", got.Load(), want, lastSeq.Load())
	}

	// No panic was recovered: the patched decoders reject every input.
	if panics := rec.matching("recovered panic"); len(panics) > 0 {
		t.Errorf("%d recovered panics, first: %.2000s", len(panics), panics[0])
	}

	// Every attack connection is gone; only the two healthy clients remain.
	deadline = time.Now().Add(10 * time.Second)
	for atomic.LoadInt64(&s.Info.ClientsConnected) != 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := atomic.LoadInt64(&s.Info.ClientsConnected); n != 2 {
		t.Errorf("%d clients connected after the attack, want 2", n)
	}

	// The broker still accepts new clients, and they work.
	late := connectPaho(t, addr, "late-sub", 0, nil)
	subscribe(t, late, topic, 1)

	t.Logf("%d attack connections (+%d issue 501) in %s; healthy client got %d/%d QoS 1 messages; %d warnings logged",
		attacks, len(issue501Subscribes), attackTime.Round(time.Millisecond), got.Load(), want, len(rec.matching("WARN")))
}
