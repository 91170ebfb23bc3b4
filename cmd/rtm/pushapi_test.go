package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestPushAPIBrokerKilled streams REST publishes through an `rtm pushapi`
// process while the `rtm broker` it is connected to is killed (kill -9).
// Every request is answered within the publish timeout plus a margin,
// with 200 or 503 broker_unavailable; the push API reconnects to the
// survivor and publishes succeed again. Acknowledged messages reach the
// subscriber on the survivor, except at most one per publisher that the
// killed broker acknowledged but had not yet written to its node link (a
// broker that dies loses what only it held; docs/clustering.md).
func TestPushAPIBrokerKilled(t *testing.T) {
	t.Parallel()
	const (
		publishers     = 4
		publishTimeout = 2 * time.Second
		margin         = 2 * time.Second
	)
	tokenKey := "RTM_AUTH_TOKEN_KEYS=" + fmt.Sprintf("kill-test-key-%d", time.Now().UnixNano())
	f := newClusterFixture(t)
	n1 := f.start("n1", tokenKey)
	n2 := f.start("n2", tokenKey)
	waitFormed(t, n1, n2)

	apiKey := "test-api-key-0123456789"
	push := start(t, []string{tokenKey, "RTM_PUSHAPI_API_KEYS=" + apiKey, "RTM_PUSHAPI_PUBLISH_TIMEOUT=" + publishTimeout.String(),
		"RTM_CLUSTER_PROBE_INTERVAL=" + probeInterval.String()},
		"pushapi", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", f.seed, "--cluster-secret", f.secret,
		"--store-uri", f.storeURI, "--data", t.TempDir(), "--log-format", "json")
	base := "http://" + push.jsonField(t, "push API started", "addr")
	doomedName := push.jsonField(t, "connected to broker", "broker")
	doomed, survivor := n1, n2
	if doomedName == "n2" {
		doomed, survivor = n2, n1
	}
	sub := testutil.MustV5(t, survivor.mqtt, "survivor-sub")
	sub.Sub(t, "fo/#", 1)
	waitRoutes(t, doomed, survivor.name, 1)

	type result struct {
		status  int
		payload string
		took    time.Duration
	}
	var (
		mu      sync.Mutex
		results []result
		seq     atomic.Int64
		killed  atomic.Bool
		okAfter atomic.Int64
		wg      sync.WaitGroup
	)
	hc := &http.Client{Timeout: publishTimeout + margin + 5*time.Second}
	for range publishers {
		wg.Go(func() {
			for okAfter.Load() < 40 && seq.Load() < 20000 {
				payload := strconv.FormatInt(seq.Add(1), 10)
				body, _ := json.Marshal(map[string]any{"topic": "fo/x", "payload": payload, "qos": 1})
				req, _ := http.NewRequest(http.MethodPost, base+"/v1/messages", bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+apiKey)
				start := time.Now()
				resp, err := hc.Do(req)
				took := time.Since(start)
				if err != nil {
					t.Errorf("request %s: %v", payload, err)
					return
				}
				var e struct{ Error struct{ Code string } }
				_ = json.NewDecoder(resp.Body).Decode(&e)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK && (resp.StatusCode != http.StatusServiceUnavailable || e.Error.Code != "broker_unavailable") {
					t.Errorf("request %s: %d %q, want 200 or 503 broker_unavailable", payload, resp.StatusCode, e.Error.Code)
				}
				mu.Lock()
				results = append(results, result{resp.StatusCode, payload, took})
				mu.Unlock()
				if resp.StatusCode == http.StatusOK && killed.Load() {
					okAfter.Add(1)
				}
				time.Sleep(2 * time.Millisecond) // pacing: a bounded load, not synchronisation
			}
		})
	}
	testutil.WaitFor(t, 30*time.Second, func() error {
		if n := seq.Load(); n < 100 {
			return fmt.Errorf("%d requests so far", n)
		}
		return nil
	})
	if err := syscall.Kill(doomed.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed.Store(true)
	wg.Wait()
	if t.Failed() {
		return
	}

	ok, unavailable := map[string]bool{}, 0
	for _, r := range results {
		if r.took > publishTimeout+margin {
			t.Errorf("request %s answered after %v, more than the publish timeout %v + %v", r.payload, r.took, publishTimeout, margin)
		}
		if r.status == http.StatusOK {
			ok[r.payload] = true
		} else {
			unavailable++
		}
	}
	if okAfter.Load() < 40 {
		t.Fatalf("only %d publishes succeeded after the kill", okAfter.Load())
	}
	// Everything acknowledged reaches the survivor's subscriber, except what
	// the killed broker held alone.
	got := map[string]bool{}
	deadline := time.After(10 * time.Second)
collect:
	for len(got) < len(ok) {
		select {
		case m := <-sub.Messages:
			got[string(m.Payload)] = true
		case <-deadline:
			break collect
		}
	}
	var lost []string
	for p := range ok {
		if !got[p] {
			lost = append(lost, p)
		}
	}
	t.Logf("%d requests: %d acknowledged, %d answered 503; %d acknowledged but lost with the killed broker %v",
		len(results), len(ok), unavailable, len(lost), lost)
	if len(lost) > publishers {
		t.Errorf("%d acknowledged messages lost, more than the %d the killed broker can hold unforwarded: %v", len(lost), publishers, lost)
	}
}
