// Package watchdog is rtm's watchdog role: it joins the gossip cluster as a
// member with role "watchdog", watches every broker that joins (nothing to
// configure per broker), polls each one's admin /v1/stats every
// watchdog.interval, evaluates the alert rules, keeps alerts in the store
// (pending → firing → resolved, one per rule and node), notifies webhooks,
// $SYS/rtm/alerts and the log, drains sick brokers when a rule says so, and
// serves its API and the dashboard. See docs/watchdog.md.
//
// A Watchdog keeps the lifecycle of package lifecycle: New (no I/O), Start
// (returns its bound addresses), Shutdown (idempotent), Done/Err.
package watchdog

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/lifecycle"
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/internal/store"
)

// ErrStarted reports a second call to Start.
var ErrStarted = errors.New("watchdog: already started")

const (
	// keepAlerts bounds the alerts kept for /v1/alerts.
	keepAlerts = 500
)

// Options are a watchdog's configuration and dependencies.
type Options struct {
	Config config.Watchdog
	// Cluster configures the watchdog's gossip membership (GossipAddr
	// required, Join, Secret, AdvertiseHost, ProbeInterval).
	Cluster config.Cluster
	// Seeds, when set, replaces Cluster's seeds at Start (a watchdog
	// sharing its process with a broker joins it).
	Seeds func() []string
	// AdminKey is the brokers' admin key (the first of broker.admin_keys),
	// for their /v1/stats, drain and $SYS alert endpoints.
	AdminKey string
	// Store keeps the alerts; nil keeps them in memory only (a restarted
	// watchdog then notifies again what was firing).
	Store        *store.Store
	GossipTiming cluster.Timing
	Version      string
	Logger       *slog.Logger
	Registry     *prometheus.Registry
}

// node is one broker as the watchdog sees it.
type node struct {
	name     string
	status   string // alive, suspect, failed, left
	admin    string
	draining bool
	lastPoll time.Time
	pollErr  string
	polled   bool // the last poll succeeded
	stats    NodeStats
	prev     *sample
	series   *series
}

// Watchdog is the watchdog role.
type Watchdog struct {
	cfg    config.Watchdog
	opts   Options
	log    *slog.Logger
	reg    *prometheus.Registry
	rules  map[string]rule
	poll   *poller
	alerts alertStore
	notif  *notifier
	m      *metrics
	hub    *hub

	mu       sync.Mutex
	nodes    map[string]*node
	active   map[string]*Alert // pending and firing, by rule/node
	history  []*Alert          // every alert this watchdog knows, newest last
	evalMu   sync.Mutex        // one evaluation at a time
	storeErr atomic.Bool

	node    *cluster.Node
	srv     *http.Server
	ln      net.Listener
	started atomic.Bool
	ready   atomic.Bool
	fault   lifecycle.Fault

	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once
	stopErr  error
}

// New validates the options and builds a watchdog; it binds nothing,
// starts no goroutine and registers no metric.
func New(opts Options) (*Watchdog, error) {
	cfg := opts.Config
	errs := []error{cfg.Validate(), opts.Cluster.Validate()}
	if opts.Cluster.GossipAddr == "" {
		errs = append(errs, &config.FieldError{Key: "cluster.gossip_addr", Value: "",
			Why: "the watchdog needs gossip: it finds the brokers through it"})
	}
	if opts.AdminKey == "" {
		errs = append(errs, &config.FieldError{Key: "broker.admin_keys", Value: "",
			Why: "the watchdog needs the brokers' admin key: it reads their /v1/stats"})
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	name, err := lifecycle.DefaultName("watchdog", "watchdog.name", cfg.Name)
	if err != nil {
		return nil, err
	}
	cfg.Name = name
	if cfg.PollTimeout == 0 {
		cfg.PollTimeout = cfg.Interval
	}
	if opts.Version == "" {
		opts.Version = "dev"
	}
	if opts.Logger == nil {
		opts.Logger = obs.Discard()
	}
	if opts.Registry == nil {
		opts.Registry = obs.NewRegistry()
	}
	log := opts.Logger.With("component", "watchdog", "node", cfg.Name)
	w := &Watchdog{cfg: cfg, opts: opts, log: log, reg: opts.Registry, rules: rulesFrom(cfg.Rules),
		poll: newPoller(opts.AdminKey, cfg.PollTimeout), alerts: alertStore{st: opts.Store},
		nodes: map[string]*node{}, active: map[string]*Alert{}, hub: newHub()}
	w.m = newMetrics(w)
	w.notif = newNotifier(log, w.m.notifications, cfg.WebhookRetry)
	for _, u := range cfg.WebhookList() {
		w.notif.webhook(u, cfg.WebhookSecret, cfg.WebhookTimeout)
	}
	w.notif.add("mqtt "+sysAlertsTopic, w.publishSys)
	return w, nil
}

// sysAlertsTopic is where alerts reach MQTT subscribers (every broker).
const sysAlertsTopic = "$SYS/rtm/alerts"

// Start binds the HTTP listener, loads the alerts in progress from the
// store, joins gossip as role "watchdog" and starts polling. On error
// nothing is left running.
func (w *Watchdog) Start(ctx context.Context) (_ lifecycle.Addrs, err error) {
	if !w.started.CompareAndSwap(false, true) {
		return nil, ErrStarted
	}
	if err := w.m.register(w.reg); err != nil {
		return nil, fmt.Errorf("watchdog: metrics: %w", err)
	}
	ln, err := net.Listen("tcp", w.cfg.Addr)
	if err != nil {
		return nil, &config.ListenError{Key: "watchdog.addr", Addr: w.cfg.Addr, Err: err}
	}
	defer func() {
		if err != nil {
			_ = ln.Close()
		}
	}()
	if loaded, err := w.alerts.load(keepAlerts); err != nil {
		w.log.Warn("alerts not loaded from the store; firing alerts may be notified again", "error", err)
	} else {
		for i := len(loaded) - 1; i >= 0; i-- {
			a := loaded[i]
			w.history = append(w.history, a)
			if a.State != StateResolved {
				w.active[a.key()] = a
			}
		}
	}
	cc := w.opts.Cluster
	seeds := cc.Seeds()
	if w.opts.Seeds != nil {
		seeds = w.opts.Seeds()
	}
	tags := cluster.Tags{Role: cluster.RoleWatchdog, Version: w.opts.Version, Admin: ln.Addr().String()}
	copts := cluster.Options{NodeName: w.cfg.Name, BindAddr: cc.GossipAddr, Join: seeds, Secret: cc.Secret,
		Timing: w.opts.GossipTiming, ProbeInterval: cc.ProbeInterval, Tags: tags, Logger: w.opts.Logger}
	if cc.AdvertiseHost != "" {
		if _, port, err := net.SplitHostPort(cc.GossipAddr); err == nil && port != "0" {
			copts.AdvertiseAddr = net.JoinHostPort(cc.AdvertiseHost, port)
		}
	}
	node, err := cluster.New(copts)
	if err != nil {
		return nil, fmt.Errorf("watchdog: %w", err)
	}
	events, unsubscribe := node.Subscribe(256)
	if err := node.Start(ctx); err != nil {
		unsubscribe()
		return nil, fmt.Errorf("watchdog: %w", err)
	}
	w.node, w.ln = node, ln
	tags.Admin = cluster.PublicAddr(ln.Addr().String(), cc.AdvertiseHost, node.Addr())
	if err := node.SetTags(tags); err != nil {
		w.log.Warn("gossip tags not updated", "error", err)
	}
	w.srv = &http.Server{Handler: w.handler(), ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(w.log.Handler(), slog.LevelDebug)}
	runCtx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	w.notif.run(runCtx)
	w.wg.Add(3)
	go func() {
		defer w.wg.Done()
		lifecycle.Serve(w.srv, ln, &w.fault, "watchdog: HTTP server")
	}()
	go func() {
		defer w.wg.Done()
		lifecycle.Watch(node, runCtx.Done(), &w.fault, "watchdog: gossip")
	}()
	go func() {
		defer w.wg.Done()
		defer unsubscribe()
		w.loop(runCtx, events)
	}()
	w.ready.Store(true)
	w.log.Info("watchdog started", "addr", ln.Addr().String(), "gossip", node.Addr(), "seeds", seeds,
		"interval", w.cfg.Interval, "rules", len(w.rules), "webhooks", len(w.cfg.WebhookList()), "store", w.opts.Store != nil)
	return w.Addrs(), nil
}

// Addrs returns the bound addresses ("http", "gossip").
func (w *Watchdog) Addrs() lifecycle.Addrs {
	if w.ln == nil {
		return lifecycle.Addrs{}
	}
	return lifecycle.Addrs{"http": w.ln.Addr().String(), "gossip": w.node.Addr()}
}

// Addr returns the bound HTTP address, or "" before Start.
func (w *Watchdog) Addr() string {
	if w.ln == nil {
		return ""
	}
	return w.ln.Addr().String()
}

// Done is closed when the watchdog failed while running; Err says why.
func (w *Watchdog) Done() <-chan struct{} { return w.fault.Done() }

// Err is the reason Done was closed, or nil.
func (w *Watchdog) Err() error { return w.fault.Err() }

// Shutdown stops answering (bounded by ctx), stops polling, leaves gossip
// and waits for the notifications in progress to end (queued ones that
// were not sent are logged as lost). Drained nodes stay drained: their
// alerts are still firing, and the next watchdog undrains them when they
// resolve. It is idempotent.
func (w *Watchdog) Shutdown(ctx context.Context) error {
	w.stopOnce.Do(func() {
		w.ready.Store(false)
		if !w.started.Load() || w.srv == nil {
			return
		}
		w.stopErr = lifecycle.Within(ctx, "watchdog", func() error {
			w.hub.close()
			errs := []error{lifecycle.ShutdownHTTP(ctx, w.srv, "watchdog")}
			w.cancel()
			lifecycle.Leave(ctx, w.node, w.log)
			if err := w.node.Shutdown(); err != nil {
				errs = append(errs, fmt.Errorf("watchdog: gossip shutdown: %w", err))
			}
			w.wg.Wait()
			w.notif.wait()
			w.log.Info("watchdog stopped")
			return errors.Join(errs...)
		})
	})
	return w.stopErr
}

// loop polls every interval and re-evaluates on every membership change,
// so node_down fires as soon as gossip declares a broker failed.
func (w *Watchdog) loop(ctx context.Context, events <-chan cluster.Event) {
	tick := time.NewTicker(w.cfg.Interval)
	defer tick.Stop()
	w.syncMembers()
	w.round(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-events:
			for drained := false; !drained; {
				select {
				case <-events:
				default:
					drained = true
				}
			}
			w.syncMembers()
			w.evaluate(time.Now())
		case <-tick.C:
			w.syncMembers()
			w.round(ctx)
		}
	}
}

// syncMembers reads the brokers from gossip: a new one is watched at once,
// one reaped by gossip is forgotten.
func (w *Watchdog) syncMembers() {
	seen := map[string]bool{}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, m := range w.node.Members() {
		if m.Tags.Role != cluster.RoleBroker {
			continue
		}
		seen[m.Name] = true
		n, ok := w.nodes[m.Name]
		if !ok {
			n = &node{name: m.Name, series: newSeries(max(1, int(time.Hour/w.cfg.Interval)))}
			w.nodes[m.Name] = n
			w.log.Info("watching broker", "broker", m.Name, "admin", m.Tags.Admin)
		}
		prev := n.status
		switch m.Status {
		case cluster.StatusAlive:
			n.status = "alive"
			if prev == "alive" && !n.polled && n.pollErr != "" {
				n.status = "suspect"
			}
		case cluster.StatusFailed:
			n.status = "failed"
			n.polled = false
		default:
			n.status = "left"
			n.polled = false
		}
		if m.Tags.Admin != "" && m.Tags.Admin != n.admin {
			n.admin = m.Tags.Admin
			n.prev = nil // another process: counters start again
		}
		n.draining = m.Tags.Draining
		if prev != n.status && prev != "" && !(prev == "suspect" && n.status == "alive") && !(prev == "alive" && n.status == "suspect") {
			w.log.Info("broker state changed", "broker", m.Name, "from", prev, "to", n.status)
		}
	}
	for name := range w.nodes {
		if !seen[name] {
			delete(w.nodes, name)
			w.log.Info("broker forgotten by gossip", "broker", name)
		}
	}
}

// round polls every live broker concurrently, each bounded by the poll
// timeout, then evaluates the rules and publishes the nodes.
func (w *Watchdog) round(ctx context.Context) {
	type target struct {
		n     *node
		admin string
	}
	var targets []target
	w.mu.Lock()
	for _, n := range w.nodes {
		if (n.status == "alive" || n.status == "suspect") && n.admin != "" {
			targets = append(targets, target{n, n.admin})
		}
	}
	w.mu.Unlock()
	var wg sync.WaitGroup
	for _, t := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			raw, err := w.poll.fetch(ctx, t.admin)
			now := time.Now()
			w.m.pollDuration.Observe(now.Sub(start).Seconds())
			w.mu.Lock()
			defer w.mu.Unlock()
			n := t.n
			n.lastPoll = now
			if err != nil {
				w.m.polls.WithLabelValues("error").Inc()
				if n.pollErr == "" {
					w.log.Warn("broker poll failed", "broker", n.name, "error", err)
				}
				n.pollErr, n.polled = err.Error(), false
				if n.status == "alive" {
					n.status = "suspect"
				}
				return
			}
			w.m.polls.WithLabelValues("ok").Inc()
			ns, cur := convert(raw, now, n.prev)
			n.stats, n.prev, n.pollErr, n.polled = ns, &cur, "", true
			if n.status == "suspect" {
				n.status = "alive"
			}
			n.series.add(now, ns)
		}()
	}
	wg.Wait()
	w.evaluate(time.Now())
	w.hub.publish("nodes", w.nodesBody())
}

// evaluate applies the rules to the current view and moves the alerts.
func (w *Watchdog) evaluate(now time.Time) {
	w.evalMu.Lock()
	defer w.evalMu.Unlock()
	w.mu.Lock()
	var views []nodeView
	present := map[string]bool{}
	for _, n := range w.nodes {
		st := n.status
		if st == "suspect" {
			st = "alive"
		}
		views = append(views, nodeView{name: n.name, status: st, polled: n.polled, stats: n.stats, draining: n.draining})
		if n.status != "left" {
			present[n.name] = true
		}
	}
	w.mu.Unlock()
	conds := evaluate(w.rules, views, w.cfg.ImbalanceMin)
	seen := map[string]bool{}
	for _, c := range conds {
		seen[c.key()] = true
		w.apply(c, now)
	}
	// Alerts of nodes that left (or were forgotten) end with them; so do
	// those of rules no longer configured.
	w.mu.Lock()
	var gone []*Alert
	for k, a := range w.active {
		if _, ok := w.rules[a.Rule]; (a.Node != "" && !present[a.Node]) || !ok {
			gone = append(gone, a)
			delete(w.active, k)
		}
	}
	w.mu.Unlock()
	for _, a := range gone {
		w.end(a, now, "broker "+a.Node+" left the cluster")
	}
	w.retryActions()
}

// apply moves the alert of one condition.
func (w *Watchdog) apply(c condition, now time.Time) {
	w.mu.Lock()
	a := w.active[c.key()]
	w.mu.Unlock()
	switch {
	case c.active && a == nil:
		a = newAlert(c, now)
		if cur, err := w.alerts.open(a); err != nil && !errors.Is(err, errNoStore) {
			w.storeFailed(err)
		} else if cur != nil {
			a = cur // in progress already: another watchdog, or before a restart
			w.log.Info("alert adopted from the store", "rule", a.Rule, "node", a.Node, "state", a.State)
		}
		w.mu.Lock()
		w.active[c.key()] = a
		w.history = append(w.history, a)
		w.trimLocked()
		w.mu.Unlock()
		if a.owned {
			w.hub.publishAlert(a)
		}
		if a.State == StatePending && now.Sub(a.StartedAt) >= c.rule.dur {
			w.fire(a, c, now)
		}
	case c.active && a.State == StatePending:
		w.mu.Lock()
		a.Value, a.Message = c.value, c.message
		w.mu.Unlock()
		if now.Sub(a.StartedAt) >= c.rule.dur {
			w.fire(a, c, now)
		}
	case c.active:
		w.mu.Lock()
		a.Value = c.value
		w.mu.Unlock()
	case a == nil:
	case a.State == StatePending:
		// A flap shorter than the rule's duration: never fired, forgotten.
		w.mu.Lock()
		delete(w.active, c.key())
		w.history = slices.DeleteFunc(w.history, func(x *Alert) bool { return x == a })
		w.mu.Unlock()
		w.alerts.drop(a)
		w.hub.publishAlert(&Alert{ID: a.ID, Rule: a.Rule, Node: a.Node, Severity: a.Severity, State: StateResolved, StartedAt: a.StartedAt, Message: "cleared before firing"})
	default:
		w.mu.Lock()
		delete(w.active, c.key())
		a.Value = c.value
		w.mu.Unlock()
		w.end(a, now, "")
	}
}

// fire moves a pending alert to firing; the watchdog that wins the move in
// the store notifies and acts.
func (w *Watchdog) fire(a *Alert, c condition, now time.Time) {
	w.mu.Lock()
	t := now.UTC()
	a.State, a.FiredAt, a.Value, a.Message = StateFiring, &t, c.value, c.message
	w.mu.Unlock()
	won, err := w.alerts.transition(a, StatePending)
	if err != nil && !errors.Is(err, errNoStore) {
		w.storeFailed(err)
	}
	if !won {
		w.mu.Lock()
		a.owned = false
		w.mu.Unlock()
		w.log.Info("alert fired by another watchdog", "rule", a.Rule, "node", a.Node)
		return
	}
	w.mu.Lock()
	a.owned = true
	w.mu.Unlock()
	w.log.Warn("ALERT firing", "rule", a.Rule, "node", a.Node, "severity", a.Severity, "value", a.Value, "threshold", a.Threshold, "message", a.Message)
	w.publish("firing", a)
	if a.Action == "drain" {
		w.drain(a)
	}
}

// end resolves a firing alert (or drops a pending one), undraining the node
// if this alert drained it.
func (w *Watchdog) end(a *Alert, now time.Time, why string) {
	if a.State == StatePending {
		w.alerts.drop(a)
		return
	}
	w.mu.Lock()
	t := now.UTC()
	a.State, a.ResolvedAt = StateResolved, &t
	if why != "" {
		a.Message = why
	}
	w.mu.Unlock()
	won, err := w.alerts.transition(a, StateFiring)
	if err != nil && !errors.Is(err, errNoStore) {
		w.storeFailed(err)
	}
	// Undrain what this watchdog drained, or, for an alert adopted from
	// the store, what the watchdog before it drained.
	if a.drained || (won && strings.HasPrefix(a.ActionTaken, "drained ")) {
		w.undrain(a)
	}
	if !won {
		return
	}
	w.log.Info("ALERT resolved", "rule", a.Rule, "node", a.Node, "severity", a.Severity, "value", a.Value)
	w.publish("resolved", a)
}

// publish notifies an alert change: the log has it already; the webhooks,
// $SYS/rtm/alerts and the event stream get it here.
func (w *Watchdog) publish(event string, a *Alert) {
	w.mu.Lock()
	ev := Event{Event: event, Alert: *a}
	w.mu.Unlock()
	w.notif.notify(ev)
	w.hub.publishAlert(&ev.Alert)
}

func (w *Watchdog) storeFailed(err error) {
	if !w.storeErr.Swap(true) {
		w.log.Error("alert store unreachable; alerts are kept in memory and may be notified again by another watchdog", "error", err)
	}
}

func (w *Watchdog) trimLocked() {
	if n := len(w.history) - keepAlerts; n > 0 {
		w.history = slices.Delete(w.history, 0, n)
	}
}

// drain applies a firing alert's drain action within the guard rails:
// at most watchdog.max_drained nodes drained by the watchdog, never the
// last healthy broker. A refused drain is retried on later rounds.
func (w *Watchdog) drain(a *Alert) {
	w.mu.Lock()
	if a.drained || a.State != StateFiring || !a.owned {
		w.mu.Unlock()
		return
	}
	drained, healthy := 0, 0
	ours := map[string]bool{} // drained by this watchdog: gossip may not say so yet
	for _, x := range w.active {
		if x.holdsDrain() {
			drained++
			ours[x.Node] = true
		}
	}
	n := w.nodes[a.Node]
	for _, o := range w.nodes {
		if o.name != a.Node && o.status == "alive" && !o.draining && !ours[o.name] {
			healthy++
		}
	}
	var refuse string
	switch {
	case n == nil || n.admin == "":
		refuse = "node unknown"
	case drained >= w.cfg.MaxDrained:
		refuse = fmt.Sprintf("not drained: watchdog.max_drained (%d) nodes drained already", w.cfg.MaxDrained)
	case healthy == 0:
		refuse = "not drained: it is the last healthy broker"
	}
	if refuse != "" {
		changed := a.ActionTaken != refuse
		a.ActionTaken = refuse
		w.mu.Unlock()
		if changed {
			w.m.actions.WithLabelValues("drain", "refused").Inc()
			w.log.Warn("ACTION refused", "action", "drain", "node", a.Node, "rule", a.Rule, "why", refuse)
			w.alerts.update(a)
			w.publish("action", a)
		}
		return
	}
	a.drained = true // claimed under the lock: no concurrent drain passes the guard
	admin := n.admin
	w.mu.Unlock()
	err := w.poll.call(context.Background(), admin, "/v1/drain", nil)
	w.mu.Lock()
	if err != nil {
		a.drained = false
		a.ActionTaken = "drain failed: " + err.Error()
	} else {
		a.ActionTaken = "drained " + a.Node
	}
	w.mu.Unlock()
	if err != nil {
		w.m.actions.WithLabelValues("drain", "failed").Inc()
		w.log.Error("ACTION failed", "action", "drain", "node", a.Node, "rule", a.Rule, "error", err)
	} else {
		w.m.actions.WithLabelValues("drain", "ok").Inc()
		w.log.Warn("ACTION drained broker", "node", a.Node, "rule", a.Rule)
	}
	w.alerts.update(a)
	w.publish("action", a)
}

// holdsDrain reports whether the alert keeps its node drained: drained by
// this watchdog, or, adopted from the store, by the one before it.
func (a *Alert) holdsDrain() bool {
	return a.drained || (a.State != StateResolved && strings.HasPrefix(a.ActionTaken, "drained "))
}

// undrain reverses the drain of a resolved alert.
func (w *Watchdog) undrain(a *Alert) {
	w.mu.Lock()
	admin := ""
	if n := w.nodes[a.Node]; n != nil {
		admin = n.admin
	}
	a.drained = false
	w.mu.Unlock()
	if admin == "" {
		return
	}
	if err := w.poll.call(context.Background(), admin, "/v1/undrain", nil); err != nil {
		w.m.actions.WithLabelValues("undrain", "failed").Inc()
		w.log.Error("ACTION failed", "action", "undrain", "node", a.Node, "rule", a.Rule, "error", err)
		return
	}
	w.mu.Lock()
	a.ActionTaken = "undrained " + a.Node
	w.mu.Unlock()
	w.m.actions.WithLabelValues("undrain", "ok").Inc()
	w.log.Warn("ACTION undrained broker", "node", a.Node, "rule", a.Rule)
	w.publish("action", a)
}

// retryActions tries again the drains the guard rails refused.
func (w *Watchdog) retryActions() {
	w.mu.Lock()
	var todo []*Alert
	for _, a := range w.active {
		if a.Action == "drain" && a.State == StateFiring && a.owned && !a.drained {
			todo = append(todo, a)
		}
	}
	w.mu.Unlock()
	sort.Slice(todo, func(i, j int) bool { return todo[i].ID < todo[j].ID })
	for _, a := range todo {
		w.drain(a)
	}
}

// publishSys posts an event to every live broker's $SYS/rtm/alerts.
func (w *Watchdog) publishSys(ctx context.Context, body []byte) error {
	w.mu.Lock()
	var admins []string
	for _, n := range w.nodes {
		if n.status == "alive" && n.admin != "" {
			admins = append(admins, n.admin)
		}
	}
	w.mu.Unlock()
	if len(admins) == 0 {
		return errors.New("no live broker")
	}
	errs := make([]error, len(admins))
	var wg sync.WaitGroup
	for i, admin := range admins {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = w.poll.call(ctx, admin, "/v1/sys/alerts", bytes.NewReader(body))
		}()
	}
	wg.Wait()
	// Delivered where it could be: retrying would duplicate it on the
	// brokers that took it. A broker that failed has its own alert.
	for _, err := range errs {
		if err == nil {
			return nil
		}
	}
	return errors.Join(errs...)
}

// NodeJSON is one broker in /v1/nodes.
type NodeJSON struct {
	Name              string     `json:"name"`
	State             string     `json:"state"`
	Draining          bool       `json:"draining"`
	DrainedByWatchdog bool       `json:"drained_by_watchdog"`
	Admin             string     `json:"admin"`
	LastPoll          *time.Time `json:"last_poll"`
	PollError         string     `json:"poll_error"`
	Stats             NodeStats  `json:"stats"`
}

// Nodes returns the brokers, sorted by name.
func (w *Watchdog) Nodes() []NodeJSON {
	w.mu.Lock()
	defer w.mu.Unlock()
	drained := map[string]bool{}
	for _, a := range w.active {
		if a.holdsDrain() {
			drained[a.Node] = true
		}
	}
	out := make([]NodeJSON, 0, len(w.nodes))
	for _, n := range w.nodes {
		j := NodeJSON{Name: n.name, State: n.status, Draining: n.draining, DrainedByWatchdog: drained[n.name], Admin: n.admin,
			PollError: n.pollErr, Stats: n.stats}
		if j.Stats.DroppedTotal == nil {
			j.Stats.DroppedTotal = map[string]int64{}
		}
		if j.Stats.Links == nil {
			j.Stats.Links = []LinkStats{}
		}
		if !n.lastPoll.IsZero() {
			t := n.lastPoll.UTC()
			j.LastPoll = &t
		}
		out = append(out, j)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Alerts returns the alerts in state (all if ""), newest first.
func (w *Watchdog) Alerts(state string) []Alert {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := []Alert{}
	for i := len(w.history) - 1; i >= 0; i-- {
		if a := w.history[i]; state == "" || a.State == state {
			out = append(out, *a)
		}
	}
	return out
}

func (w *Watchdog) nodesBody() []byte {
	b, _ := json.Marshal(map[string]any{"nodes": w.Nodes()})
	return b
}
