package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// pushAPIProc starts an `rtm pushapi` process joined to the fixture's
// cluster and returns it with its base URL and API key.
func pushAPIProc(t *testing.T, f *clusterFixture, tokenKey string) (*proc, string, string) {
	t.Helper()
	apiKey := "test-api-key-0123456789"
	p := start(t, []string{tokenKey, "RTM_PUSHAPI_API_KEYS=" + apiKey, "RTM_CLUSTER_PROBE_INTERVAL=" + probeInterval.String()},
		"pushapi", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", f.seed, "--cluster-secret", f.secret,
		"--store-uri", f.storeURI, "--data", t.TempDir(), "--log-format", "json")
	return p, "http://" + p.jsonField(t, "push API started", "addr"), apiKey
}

// devicePresence is GET /v1/devices/{id}: online and node, or an error
// naming the answer.
func devicePresence(hc *http.Client, base, apiKey, id string) (online bool, node string, err error) {
	req, _ := http.NewRequest(http.MethodGet, base+"/v1/devices/"+id, nil)
	req.Header.Set("Authorization", "Bearer "+apiKey)
	resp, err := hc.Do(req)
	if err != nil {
		return false, "", err
	}
	defer resp.Body.Close()
	var d struct {
		Online bool    `json:"online"`
		Node   *string `json:"node"`
	}
	if resp.StatusCode != http.StatusOK {
		return false, "", fmt.Errorf("GET /v1/devices/%s: status %d", id, resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil {
		return false, "", err
	}
	if d.Node != nil {
		node = *d.Node
	}
	return d.Online, node, nil
}

// TestPresenceAfterBrokerKilled: devices connected to an `rtm broker` that
// is killed (kill -9) and started again under the same name are offline
// for the push API once it is back (its previous process's connections are
// gone), and online again when they reconnect. Before, the restarted
// broker was alive in gossip under the same name, and its previous
// process's "online" records stayed true forever.
func TestPresenceAfterBrokerKilled(t *testing.T) {
	t.Parallel()
	tokenKey := "RTM_AUTH_TOKEN_KEYS=" + fmt.Sprintf("presence-test-key-%d", time.Now().UnixNano())
	f := newClusterFixture(t)
	n1 := f.start("n1", tokenKey)
	push, base, apiKey := pushAPIProc(t, f, tokenKey)
	hc := &http.Client{Timeout: 10 * time.Second}

	devices := []string{"pk-0", "pk-1", "pk-2", "pk-3", "pk-4"}
	for _, id := range devices {
		testutil.MustV5(t, n1.mqtt, id)
	}
	waitAll := func(want bool, what string) {
		t.Helper()
		testutil.WaitFor(t, 30*time.Second, func() error {
			for _, id := range devices {
				online, node, err := devicePresence(hc, base, apiKey, id)
				if err != nil {
					return err
				}
				if online != want || node != "n1" {
					return fmt.Errorf("%s: %s is online=%t on %q, want online=%t on n1", what, id, online, node, want)
				}
			}
			return nil
		})
	}
	waitAll(true, "connected")

	if err := syscall.Kill(n1.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n1.p.wait(t, 10*time.Second)
	f.restart(n1)
	// The push API sees the new process alive: it connects to it.
	testutil.WaitFor(t, 30*time.Second, func() error {
		if n := strings.Count(push.stderr.String(), `"msg":"connected to broker"`); n < 2 {
			return fmt.Errorf("push API connected to a broker %d times, want a second time after the restart", n)
		}
		return nil
	})
	waitAll(false, "after the restart")

	// Still offline a moment later (nothing brings the old records back),
	// then online again once the devices reconnect.
	for _, id := range devices {
		if online, _, err := devicePresence(hc, base, apiKey, id); err != nil || online {
			t.Fatalf("%s: online=%t %v after the restart, want offline", id, online, err)
		}
	}
	for _, id := range devices {
		testutil.MustV5(t, n1.mqtt, id)
	}
	waitAll(true, "reconnected")
}

// TestPushAPIDeviceReadsUnderConcurrency: 2,000 concurrent GET
// /v1/devices/{id} on one `rtm pushapi` with a healthy embedded store
// (`rtm store`) all answer 200. They used to get 75-98 % 503
// store_unavailable: each request's deadline was spent waiting for one of
// the driver's pooled connections, and the driver then refused to send the
// query ("calculated server-side timeout (0 ms)"). The figure for 10,000
// is in the bench/pushapi harness (-devices).
func TestPushAPIDeviceReadsUnderConcurrency(t *testing.T) {
	t.Parallel()
	const requests, devices = 2000, 200
	tokenKey := "RTM_AUTH_TOKEN_KEYS=" + fmt.Sprintf("load-test-key-%d", time.Now().UnixNano())
	f := newClusterFixture(t)
	n1 := f.start("n1", tokenKey)
	_, base, apiKey := pushAPIProc(t, f, tokenKey)
	for i := range devices {
		testutil.MustV5(t, n1.mqtt, fmt.Sprintf("load-%d", i))
	}
	hc := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: requests}}
	defer hc.CloseIdleConnections()
	testutil.WaitFor(t, 30*time.Second, func() error {
		online, _, err := devicePresence(hc, base, apiKey, fmt.Sprintf("load-%d", devices-1))
		if err == nil && !online {
			err = fmt.Errorf("the last device is not online yet")
		}
		return err
	})

	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		result = map[string]int{}
	)
	start := time.Now()
	for i := range requests {
		wg.Go(func() {
			online, _, err := devicePresence(hc, base, apiKey, fmt.Sprintf("load-%d", i%devices))
			key := "200 online"
			switch {
			case err != nil:
				key = err.Error()
			case !online:
				key = "200 offline"
			}
			mu.Lock()
			result[key]++
			mu.Unlock()
		})
	}
	wg.Wait()
	t.Logf("%d concurrent GET /v1/devices/{id}: %v in %v", requests, result, time.Since(start).Round(time.Millisecond))
	if result["200 online"] != requests {
		t.Fatalf("%d of %d answered 200 online: %v", result["200 online"], requests, result)
	}
}
