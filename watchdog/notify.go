package watchdog

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/prometheus/client_golang/prometheus"
)

// SignatureHeader carries the HMAC-SHA256 of a webhook body, hex, prefixed
// "sha256=", when watchdog.webhook_secret is set.
const SignatureHeader = "X-RTM-Signature"

// Event is what every notification carries: the alert, and what happened
// to it ("pending" is not notified; "firing", "resolved", or "action").
type Event struct {
	Event string `json:"event"`
	Alert
}

// queueLen bounds the notifications waiting per sink; beyond it they are
// dropped, counted and logged, so a dead sink costs bounded memory.
const queueLen = 1000

// sink delivers events one at a time from its own queue, so a slow or dead
// one delays nothing else.
type sink struct {
	name string
	q    chan []byte
	send func(ctx context.Context, body []byte) error
}

// notifier fans events out to the webhooks and $SYS/rtm/alerts.
type notifier struct {
	log     *slog.Logger
	sinks   []*sink
	sent    *prometheus.CounterVec
	retries time.Duration
	wg      sync.WaitGroup
}

func newNotifier(log *slog.Logger, sent *prometheus.CounterVec, retryFor time.Duration) *notifier {
	return &notifier{log: log, sent: sent, retries: retryFor}
}

// webhook adds a webhook sink.
func (n *notifier) webhook(url, secret string, timeout time.Duration) {
	client := &http.Client{Timeout: timeout}
	n.add("webhook "+url, func(ctx context.Context, body []byte) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
		if err != nil {
			return backoff.Permanent(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("User-Agent", "rtm-watchdog")
		if secret != "" {
			m := hmac.New(sha256.New, []byte(secret))
			m.Write(body)
			req.Header.Set(SignatureHeader, "sha256="+hex.EncodeToString(m.Sum(nil)))
		}
		res, err := client.Do(req)
		if err != nil {
			return err
		}
		defer res.Body.Close()
		_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
		if res.StatusCode/100 != 2 {
			err := fmt.Errorf("status %d", res.StatusCode)
			if res.StatusCode/100 == 4 && res.StatusCode != http.StatusTooManyRequests && res.StatusCode != http.StatusRequestTimeout {
				return backoff.Permanent(err) // the receiver refuses it: retrying changes nothing
			}
			return err
		}
		return nil
	})
}

func (n *notifier) add(name string, send func(ctx context.Context, body []byte) error) {
	n.sinks = append(n.sinks, &sink{name: name, q: make(chan []byte, queueLen), send: send})
}

// run starts one goroutine per sink until ctx ends.
func (n *notifier) run(ctx context.Context) {
	for _, s := range n.sinks {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case body := <-s.q:
					n.deliver(ctx, s, body)
				}
			}
		}()
	}
}

func (n *notifier) deliver(ctx context.Context, s *sink, body []byte) {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 500 * time.Millisecond
	b.MaxInterval = 30 * time.Second
	attempts := 0
	_, err := backoff.Retry(ctx, func() (struct{}, error) {
		attempts++
		return struct{}{}, s.send(ctx, body)
	}, backoff.WithBackOff(b), backoff.WithMaxElapsedTime(n.retries), backoff.WithNotify(func(err error, next time.Duration) {
		n.sent.WithLabelValues(s.name, "retry").Inc()
		n.log.Warn("notification failed, retrying", "sink", s.name, "error", err, "retry_in", next.Round(time.Millisecond))
	}))
	if err != nil {
		n.sent.WithLabelValues(s.name, "failed").Inc()
		n.log.Error("notification given up", "sink", s.name, "attempts", attempts, "error", err)
		return
	}
	n.sent.WithLabelValues(s.name, "ok").Inc()
}

// notify queues ev for every sink, never blocking.
func (n *notifier) notify(ev Event) {
	body, err := json.Marshal(ev)
	if err != nil {
		return
	}
	for _, s := range n.sinks {
		select {
		case s.q <- body:
		default:
			n.sent.WithLabelValues(s.name, "dropped").Inc()
			n.log.Error("notification dropped: sink queue full", "sink", s.name, "rule", ev.Rule, "node", ev.Node, "state", ev.State)
		}
	}
}

// wait returns once every sender stopped, logging what they left unsent.
func (n *notifier) wait() {
	n.wg.Wait()
	for _, s := range n.sinks {
		if k := len(s.q); k > 0 {
			n.sent.WithLabelValues(s.name, "dropped").Add(float64(k))
			n.log.Warn("notifications not sent before shutdown", "sink", s.name, "count", k)
		}
	}
}
