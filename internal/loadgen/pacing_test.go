package loadgen_test

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/loadgen"
)

// TestPublishersAreSpreadOverTheInterval: n publishers sharing a rate R
// send one message every 1/R s between them, each i/n of its own interval
// late, not all n at the same instant every n/R s. A burst of n arriving
// together is queued by the broker, and a latency measured through it was
// the broker's time to work through the burst (10 pairs at 1,000 msg/s:
// p50 0.45 ms for rtm and 0.29 ms for Mosquitto bursty, 0.12 and 0.08
// spread). The send times come from the payloads, received by a minimal
// MQTT 3.1.1 server in the test.
func TestPublishersAreSpreadOverTheInterval(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type send struct {
		at  int64
		pub uint32
	}
	var mu sync.Mutex
	var sends []send
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					typ, body, err := readPacket(br)
					if err != nil {
						return
					}
					switch typ {
					case 1: // CONNECT
						_, _ = c.Write([]byte{0x20, 2, 0, 0})
					case 3: // PUBLISH, QoS 0: topic, then the payload
						tl := int(binary.BigEndian.Uint16(body))
						p := body[2+tl:]
						if len(p) >= 24 {
							mu.Lock()
							sends = append(sends, send{at: int64(binary.BigEndian.Uint64(p[16:])), pub: binary.BigEndian.Uint32(p[4:])})
							mu.Unlock()
						}
					case 14: // DISCONNECT
						return
					}
				}
			}()
		}
	}()

	const n = 4
	c := cfg(loadgen.ScenarioPub, ln.Addr().String())
	c.Version = loadgen.V311
	c.Clients = n
	c.Rate = 200 // 50 msg/s each: one send every 5 ms in all, each publisher's 20 ms apart
	c.Duration = 2 * time.Second
	run(t, c)

	mu.Lock()
	defer mu.Unlock()
	if len(sends) < 200 {
		t.Fatalf("%d sends received, want about 400", len(sends))
	}
	sort.Slice(sends, func(i, j int) bool { return sends[i].at < sends[j].at })
	// In send order the publishers take turns: 0, 1, 2, 3, 0, ... Late
	// wake-ups on a loaded machine swap a few; all due at once, the order
	// within each instant is the scheduler's (about 1 in n follow).
	turns := 0
	for i := 1; i < len(sends); i++ {
		if sends[i].pub == (sends[i-1].pub+1)%n {
			turns++
		}
	}
	if share := float64(turns) / float64(len(sends)-1); share < 0.7 {
		t.Errorf("publishers took turns in %.0f%% of consecutive sends, want at least 70%% (spread over the interval)", 100*share)
	}
}

// readPacket reads one MQTT packet: its type and body.
func readPacket(br *bufio.Reader) (byte, []byte, error) {
	h, err := br.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, shift := 0, 0
	for {
		b, err := br.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n |= int(b&0x7f) << shift
		if b&0x80 == 0 {
			break
		}
		shift += 7
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(br, body); err != nil {
		return 0, nil, err
	}
	return h >> 4, body, nil
}
