package watchdog

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/internal/obs"
)

// TestWebhookRetriesWithBackoffWithoutDelayingOthers: a webhook answering
// 500 and one that never answers in time are retried, with growing gaps,
// while a healthy webhook gets every event at once.
func TestWebhookRetriesWithBackoffWithoutDelayingOthers(t *testing.T) {
	var mu sync.Mutex
	var failing []time.Time
	var hung int
	fail := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		failing = append(failing, time.Now())
		n := len(failing)
		mu.Unlock()
		if n <= 3 {
			w.WriteHeader(http.StatusInternalServerError)
		}
	}))
	defer fail.Close()
	release := make(chan struct{})
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hung++
		mu.Unlock()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer hang.Close()
	defer close(release)
	const secret = "s3cret"
	got := make(chan time.Time, 10)
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		m := hmac.New(sha256.New, []byte(secret))
		m.Write(body)
		if want := "sha256=" + hex.EncodeToString(m.Sum(nil)); r.Header.Get(SignatureHeader) != want {
			t.Errorf("signature %q, want %q", r.Header.Get(SignatureHeader), want)
		}
		got <- time.Now()
	}))
	defer ok.Close()

	sent := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "n"}, []string{"sink", "result"})
	n := newNotifier(obs.Discard(), sent, time.Minute)
	n.webhook(fail.URL, secret, 300*time.Millisecond)
	n.webhook(hang.URL, secret, 300*time.Millisecond)
	n.webhook(ok.URL, secret, 300*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); n.wait() }()
	n.run(ctx)

	start := time.Now()
	for i := range 3 {
		n.notify(Event{Event: "firing", Alert: Alert{ID: string(rune('a' + i)), Rule: "node_down", Node: "n1", State: StateFiring}})
	}
	for range 3 {
		select {
		case at := <-got:
			if d := at.Sub(start); d > 2*time.Second {
				t.Fatalf("the healthy webhook got an event %v after it was sent: held up by the others", d)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the healthy webhook did not get every event")
		}
	}
	// The failing one gets the first event on its 4th attempt, the gaps
	// growing (500ms initial, ×1.5, with jitter of ±50%).
	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		k := len(failing)
		mu.Unlock()
		if k >= 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("failing webhook tried %d times, want 4", k)
		}
		time.Sleep(50 * time.Millisecond)
	}
	mu.Lock()
	gaps := []time.Duration{failing[1].Sub(failing[0]), failing[2].Sub(failing[1]), failing[3].Sub(failing[2])}
	h := hung
	mu.Unlock()
	if gaps[0] < 200*time.Millisecond || gaps[2] <= gaps[0]/2 || gaps[0]+gaps[1]+gaps[2] < time.Second {
		t.Fatalf("retry gaps %v: want backoff from about 500ms, growing", gaps)
	}
	if h < 2 {
		t.Fatalf("the webhook that times out was tried %d times, want retries", h)
	}
}
