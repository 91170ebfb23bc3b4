// Package router is rtm's router role: devices ask it which broker to
// connect to (GET /v1/route) instead of being configured with a fixed one,
// and it answers with the least-loaded healthy broker, so a broker that just
// joined takes new devices first and a failed, leaving or draining one takes
// none.
//
// The router learns the brokers only from gossip: it joins the cluster as a
// member with role "router" and reads the brokers' tags (public addresses,
// capacity, connections, the time of that figure, draining). Between two
// load reports of a broker it counts its own answers naming it, so a burst
// of requests spreads over the brokers instead of landing on the one that
// looked emptiest. Several routers may run side by side; they share nothing.
// See docs/router.md.
//
// A Router is created by New (no I/O), started by Start (returns once its
// HTTP listener is bound and it has joined gossip) and stopped by Shutdown
// (idempotent, bounded by its context; not to be called concurrently with
// Start). Its methods are safe for concurrent use.
package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/lifecycle"
	"github.com/rtm-dev/rtm/internal/obs"
)

// ErrStarted reports a second call to Start.
var ErrStarted = errors.New("router: already started")

// Options are a router's configuration and dependencies.
type Options struct {
	// Config is the router section: name, HTTP address, staleness bound.
	Config config.Router
	// Cluster configures the router's gossip membership: GossipAddr (bind;
	// required), Join (seeds), Secret, AdvertiseHost, ProbeInterval. The
	// node-link keys are not used.
	Cluster config.Cluster
	// GossipTiming selects gossip timers; tests use cluster.TimingFast.
	GossipTiming cluster.Timing
	// Seeds, when set, replaces Cluster's seeds at Start: a router sharing
	// its process with a broker joins that broker, whose gossip port is
	// known only once the broker started.
	Seeds func() []string
	// Version is published in the router's gossip tags; "" means "dev".
	Version string
	// Logger receives the router's logs; nil discards them.
	Logger *slog.Logger
	// Registry receives the router's metrics and is served on /metrics;
	// nil means a new registry with the Go and process collectors.
	Registry *prometheus.Registry
}

// Router answers devices' questions about which broker to connect to.
type Router struct {
	cfg  config.Router
	opts Options
	log  *slog.Logger
	reg  *prometheus.Registry
	m    *metrics
	view *view

	// Written by Start only, before it returns.
	node *cluster.Node
	srv  *http.Server
	ln   net.Listener

	started atomic.Bool
	ready   atomic.Bool
	fault   lifecycle.Fault

	stop     chan struct{} // closed by Shutdown: the watch loop ends
	wg       sync.WaitGroup
	stopOnce sync.Once
	stopErr  error
}

// New validates the options and builds a router; it binds nothing and
// starts no goroutine.
func New(opts Options) (*Router, error) {
	cfg := opts.Config
	var errs []error
	errs = append(errs, cfg.Validate(), opts.Cluster.Validate())
	if opts.Cluster.GossipAddr == "" {
		errs = append(errs, &config.FieldError{Key: "cluster.gossip_addr", Value: "",
			Why: "the router needs gossip: it learns the brokers and their load from it"})
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	name, err := lifecycle.DefaultName("router", "router.name", cfg.Name)
	if err != nil {
		return nil, err
	}
	cfg.Name = name
	if opts.Version == "" {
		opts.Version = "dev"
	}
	log := opts.Logger
	if log == nil {
		log = obs.Discard()
	}
	reg := opts.Registry
	if reg == nil {
		reg = obs.NewRegistry()
	}
	opts.Logger = log // the gossip member's logger names its own component
	log = log.With("component", "router", "node", cfg.Name)
	r := &Router{cfg: cfg, opts: opts, log: log, reg: reg, view: newView(cfg.StaleAfter, log), stop: make(chan struct{})}
	r.m = newMetrics(r.view)
	return r, nil
}

// Start binds the HTTP listener, joins gossip as a member with role
// "router" and starts serving. Seeds that do not answer yet are retried in
// the background (the router answers 503 no_broker until it knows a
// broker). On error nothing is left running.
func (r *Router) Start(ctx context.Context) (err error) {
	if !r.started.CompareAndSwap(false, true) {
		return ErrStarted
	}
	if err := r.m.register(r.reg); err != nil {
		return fmt.Errorf("router: metrics: %w", err)
	}
	ln, err := net.Listen("tcp", r.cfg.Addr)
	if err != nil {
		return &config.ListenError{Key: "router.addr", Addr: r.cfg.Addr, Err: err}
	}
	defer func() {
		if err != nil {
			_ = ln.Close()
		}
	}()
	cc := r.opts.Cluster
	seeds := cc.Seeds()
	if r.opts.Seeds != nil {
		seeds = r.opts.Seeds()
	}
	copts := cluster.Options{
		NodeName:      r.cfg.Name,
		BindAddr:      cc.GossipAddr,
		Join:          seeds,
		Secret:        cc.Secret,
		Timing:        r.opts.GossipTiming,
		ProbeInterval: cc.ProbeInterval,
		Tags:          cluster.Tags{Role: cluster.RoleRouter, Version: r.opts.Version, Admin: ln.Addr().String()},
		Logger:        r.opts.Logger,
	}
	if cc.AdvertiseHost != "" {
		if _, port, err := net.SplitHostPort(cc.GossipAddr); err == nil && port != "0" {
			copts.AdvertiseAddr = net.JoinHostPort(cc.AdvertiseHost, port)
		}
	}
	if cc.Secret == "" {
		r.log.Warn("cluster.secret is not set: gossip is not encrypted; any process that reaches the gossip port can pose as a broker")
	}
	node, err := cluster.New(copts)
	if err != nil {
		return fmt.Errorf("router: %w", err)
	}
	// Subscribe before Start, so the first joins are events too.
	events, unsubscribe := node.Subscribe(256)
	if err := node.Start(ctx); err != nil {
		unsubscribe()
		return fmt.Errorf("router: %w", err)
	}
	r.node, r.ln = node, ln
	// The admin address needs the advertised host when the listener binds
	// to every interface: publish it now that the gossip address is known.
	if err := node.SetTags(cluster.Tags{Role: cluster.RoleRouter, Version: r.opts.Version, Admin: r.publicAddr(ln.Addr().String())}); err != nil {
		r.log.Warn("gossip tags not updated", "error", err)
	}
	r.view.setSource(node.Members)
	r.view.sync()

	r.srv = &http.Server{
		Handler:           r.handler(),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(r.log.Handler(), slog.LevelDebug),
	}
	r.wg.Add(3)
	go r.serve()
	go func() {
		defer unsubscribe()
		r.watch(events)
	}()
	go func() {
		defer r.wg.Done()
		lifecycle.Watch(node, r.stop, &r.fault, "router: gossip")
	}()
	r.ready.Store(true)
	r.log.Info("router started", "addr", ln.Addr().String(), "gossip", node.Addr(), "seeds", cc.Seeds(),
		"load_stale_after", r.cfg.StaleAfter)
	return nil
}

func (r *Router) serve() {
	defer r.wg.Done()
	lifecycle.Serve(r.srv, r.ln, &r.fault, "router: HTTP server")
}

// Done is closed when the router failed while running (its HTTP server or
// gossip member stopped); Err says why.
func (r *Router) Done() <-chan struct{} { return r.fault.Done() }

// Err is the reason Done was closed, or nil.
func (r *Router) Err() error { return r.fault.Err() }

// Addrs returns the bound addresses ("http", "gossip"), empty before Start.
func (r *Router) Addrs() lifecycle.Addrs {
	if r.ln == nil {
		return lifecycle.Addrs{}
	}
	return lifecycle.Addrs{"http": r.Addr(), "gossip": r.GossipAddr()}
}

// watch drains the member events and resyncs the view from the member list
// on each batch of them, and every second, so that joins, failures and
// leaves are logged (and counted in metrics) even when no device asks. It
// never blocks on anything but the view's short lock.
func (r *Router) watch(events <-chan cluster.Event) {
	defer r.wg.Done()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-r.stop:
			return
		case <-events:
			// Coalesce a burst of events into one sync.
			for drained := false; !drained; {
				select {
				case <-events:
				default:
					drained = true
				}
			}
		case <-tick.C:
		}
		r.view.sync()
	}
}

// publicAddr is the address others reach a listener at.
func (r *Router) publicAddr(bound string) string {
	return cluster.PublicAddr(bound, r.opts.Cluster.AdvertiseHost, r.node.Addr())
}

// Addr returns the bound HTTP address, or "" before Start.
func (r *Router) Addr() string {
	if r.ln == nil {
		return ""
	}
	return r.ln.Addr().String()
}

// GossipAddr returns the gossip address the router advertises, or "" before
// Start.
func (r *Router) GossipAddr() string {
	if r.node == nil {
		return ""
	}
	return r.node.Addr()
}

// Name returns the router's gossip member name.
func (r *Router) Name() string { return r.cfg.Name }

// Nodes returns the brokers as the router sees them, sorted by name: the
// content of /v1/nodes.
func (r *Router) Nodes() []Node { return r.view.nodes() }

// Shutdown leaves gossip (bounded), so peers see the router "left", stops
// the HTTP server (waiting, bounded by ctx, for requests in progress), and
// shuts gossip down. It is idempotent and returns ctx's error if ctx ends
// first.
func (r *Router) Shutdown(ctx context.Context) error {
	r.stopOnce.Do(func() {
		// /readyz turns 503 at once.
		r.ready.Store(false)
		if !r.started.Load() || r.srv == nil {
			return // never started, or Start failed and cleaned up
		}
		r.stopErr = lifecycle.Within(ctx, "router", func() error {
			// 1. Leave gossip; a peer that misses it sees a failure later,
			// which costs nothing for a router.
			lifecycle.Leave(ctx, r.node, r.log)
			// 2. Stop answering: requests in progress finish, idle
			// keep-alive connections close. Past ctx, close the rest.
			errs := []error{lifecycle.ShutdownHTTP(ctx, r.srv, "router")}
			// 3. Gossip down, then the watch loop ends.
			if err := r.node.Shutdown(); err != nil {
				errs = append(errs, fmt.Errorf("router: gossip shutdown: %w", err))
			}
			close(r.stop)
			r.wg.Wait()
			r.log.Info("router stopped")
			return errors.Join(errs...)
		})
	})
	return r.stopErr
}
