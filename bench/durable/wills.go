package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

var (
	wills       = flag.Int("wills", 0, "measure the CONNECT of this many clients with a will and no persistent session instead (their CONNACK waits for the will's commit with durability on)")
	willWorkers = flag.Int("will-workers", 50, "wills: CONNECTs in flight at once")
	willPersist = flag.Bool("will-persistent", false, "wills: the clients have a persistent session (MQTT 5 session expiry 60 s); their CONNACK waits for the session document's commit too")
)

// measureWills connects *wills clients with a will (and no persistent
// session, unless *willPersist), *willWorkers at a time, to a broker with durability on and off
// (alternating rounds), and reports the CONNACK latency (median, p99) and
// the CONNECT rate.
func measureWills(bin string) error {
	root, err := os.MkdirTemp("", "rtm-durable-data-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	p50s, p99s, rates := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	for r := 0; r < *rounds; r++ {
		order := []string{"on", "off"}
		if r%2 == 1 {
			order = []string{"off", "on"}
		}
		for _, mode := range order {
			b, err := startBroker(bin, filepath.Join(root, fmt.Sprintf("wills-%s-%d", mode, r)), mode)
			if err != nil {
				return err
			}
			lat, took, err := willsRound(b.addr, r)
			b.stop(syscall.SIGKILL)
			if err != nil {
				return fmt.Errorf("durability %s round %d: %w", mode, r, err)
			}
			slices.Sort(lat)
			p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
			rate := float64(len(lat)) / took.Seconds()
			p50s[mode], p99s[mode], rates[mode] = append(p50s[mode], p50), append(p99s[mode], p99), append(rates[mode], rate)
			fmt.Printf("round %d durability %-3s CONNACK p50 %6.1f ms p99 %6.1f ms, %7.0f CONNECTs/s\n", r+1, mode, p50, p99, rate)
		}
	}
	kind := "no persistent session"
	if *willPersist {
		kind = "persistent sessions"
	}
	fmt.Printf("median: CONNACK p50 on %.1f ms off %.1f ms, p99 on %.1f ms off %.1f ms, CONNECTs/s on %.0f off %.0f (ratio on/off %.2f); %d clients with a will and %s, %d at a time\n",
		median(p50s["on"]), median(p50s["off"]), median(p99s["on"]), median(p99s["off"]),
		median(rates["on"]), median(rates["off"]), median(rates["on"])/median(rates["off"]), *wills, kind, *willWorkers)
	return nil
}

// willsRound connects the clients and returns each CONNACK's latency in
// milliseconds and the time all took. The clients stay connected until
// the round ends (the broker is killed).
func willsRound(addr string, round int) ([]float64, time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	lat := make([]float64, *wills)
	next := make(chan int)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	start := time.Now()
	for range *willWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				t0 := time.Now()
				conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
				if err == nil {
					c := paho.NewClient(paho.ClientConfig{Conn: conn, OnClientError: func(error) {}})
					cp := &paho.Connect{ClientID: fmt.Sprintf("will-%d-%d", round, i), KeepAlive: 60, CleanStart: true,
						WillMessage: &paho.WillMessage{Topic: fmt.Sprintf("will/%d", i), QoS: 1, Payload: []byte("gone")}}
					if *willPersist {
						expiry := uint32(60)
						cp.CleanStart, cp.Properties = false, &paho.ConnectProperties{SessionExpiryInterval: &expiry}
					}
					_, err = c.Connect(ctx, cp)
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				lat[i] = float64(time.Since(t0).Microseconds()) / 1000
			}
		}()
	}
	for i := range *wills {
		next <- i
	}
	close(next)
	wg.Wait()
	return lat, time.Since(start), firstErr
}
