package watchdog_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/watchdog"
)

// TestAPIKeysAndEventStream: with watchdog.api_keys set, /v1 needs the key
// and the rest stays open; the event stream starts with a snapshot of the
// nodes and then carries alert changes as they happen.
func TestAPIKeysAndEventStream(t *testing.T) {
	bs := brokers(t, 1, 10)
	w := startWatchdog(t, "wd", bs[0].GossipAddr(), nil, func(c *config.Watchdog) {
		capacityRule(20, 0, "", "")(c)
		c.APIKeys = "k1,k2"
	})
	waitWatched(t, w, 1)
	base := "http://" + w.Addr()
	do := func(path, key string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	for _, c := range []struct {
		path, key string
		want      int
	}{
		{"/v1/nodes", "", 401}, {"/v1/nodes", "wrong", 401}, {"/v1/nodes", "k2", 200},
		{"/v1/alerts?state=bogus", "k1", 400}, {"/v1/series", "k1", 200},
		{"/healthz", "", 200}, {"/readyz", "", 200}, {"/metrics", "", 200}, {"/", "", 200},
	} {
		res := do(c.path, c.key)
		res.Body.Close()
		if res.StatusCode != c.want {
			t.Errorf("GET %s with key %q: %d, want %d", c.path, c.key, res.StatusCode, c.want)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/events", nil)
	req.Header.Set("Authorization", "Bearer k1")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if ct := res.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type %q", ct)
	}
	events := make(chan [2]string, 64)
	go func() {
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		var ev string
		for sc.Scan() {
			line := sc.Text()
			if e, ok := strings.CutPrefix(line, "event: "); ok {
				ev = e
			} else if d, ok := strings.CutPrefix(line, "data: "); ok {
				events <- [2]string{ev, d}
			}
		}
		close(events)
	}()
	next := func() [2]string {
		t.Helper()
		select {
		case e, ok := <-events:
			if !ok {
				t.Fatal("event stream ended")
			}
			return e
		case <-ctx.Done():
			t.Fatal("no event in time")
		}
		return [2]string{}
	}
	first := next()
	var snap struct {
		Nodes  []watchdog.NodeJSON `json:"nodes"`
		Alerts []watchdog.Alert    `json:"alerts"`
	}
	if first[0] != "snapshot" || json.Unmarshal([]byte(first[1]), &snap) != nil || len(snap.Nodes) != 1 || snap.Nodes[0].Name != "b0" {
		t.Fatalf("first event %q %s: want a snapshot with node b0", first[0], first[1])
	}
	drop := connectN(t, bs[0], 3, "c")
	defer drop()
	// Both kinds arrive: alert changes as they happen, nodes after every
	// round.
	sawNodes, sawAlert := false, false
	for !sawNodes || !sawAlert {
		e := next()
		switch e[0] {
		case "nodes":
			var body struct {
				Nodes []watchdog.NodeJSON `json:"nodes"`
			}
			if err := json.Unmarshal([]byte(e[1]), &body); err != nil || len(body.Nodes) != 1 {
				t.Fatalf("nodes event %s: %v", e[1], err)
			}
			sawNodes = true
		case "alert":
			var a watchdog.Alert
			if err := json.Unmarshal([]byte(e[1]), &a); err != nil {
				t.Fatal(err)
			}
			if a.Rule == "connections_over_capacity_pct" && a.State == "firing" {
				sawAlert = true
			}
		}
	}
}
