// Package app is rtm's composition root: it builds the roles a process runs
// from one configuration, starts them in dependency order (store, broker,
// router, push API) and stops them in reverse. `rtm dev` is every role in
// one App, where the router and the push API join the broker's gossip on
// ports of their own; `rtm broker` is the broker role alone.
//
// Every role keeps the lifecycle of package lifecycle: New builds every
// role once, from the configuration, without I/O; Start opens the store and
// starts the roles; Done reports a role that failed while running, so the
// process exits non-zero. An App is started once and shut down once;
// Shutdown may be called from any goroutine and is idempotent.
package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/lifecycle"
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/pushapi"
	"github.com/rtm-dev/rtm/router"
	"github.com/rtm-dev/rtm/watchdog"
)

// Role names a part of rtm that a process can run.
type Role string

// The roles an App can run.
const (
	RoleBroker   Role = "broker"
	RoleRouter   Role = "router"
	RolePushAPI  Role = "pushapi"
	RoleWatchdog Role = "watchdog"
)

// Options are an App's dependencies besides its configuration.
type Options struct {
	Roles    []Role
	Version  string
	Logger   *slog.Logger         // nil discards
	Registry *prometheus.Registry // nil: a new one with Go and process collectors
}

// App is a set of running roles sharing one store and one metrics registry.
type App struct {
	cfg    config.Config
	opts   Options
	log    *slog.Logger
	store  *store.Store // nil when no role uses it
	broker *broker.Broker
	router *router.Router
	push   *pushapi.PushAPI
	watch  *watchdog.Watchdog
	// running are the roles in start order, each with its name.
	running []named

	fault    lifecycle.Fault
	stop     chan struct{} // closed by Shutdown: the role watchers end
	stopOnce sync.Once
	stopErr  error
}

type named struct {
	name Role
	role lifecycle.Role
}

// legacy is the lifecycle of the roles whose Start predates lifecycle.Role
// (it returns only an error; their tests call it so).
type legacy interface {
	Start(ctx context.Context) error
	Shutdown(ctx context.Context) error
	Done() <-chan struct{}
	Err() error
	Addrs() lifecycle.Addrs
}

// adapt gives a legacy role lifecycle.Role's Start.
type adapt struct{ legacy }

func (r adapt) Start(ctx context.Context) (lifecycle.Addrs, error) {
	if err := r.legacy.Start(ctx); err != nil {
		return nil, err
	}
	return r.Addrs(), nil
}

// New builds every role of opts.Roles from cfg, once. It does no I/O and
// registers nothing: configuration errors surface here, before anything is
// opened.
func New(cfg config.Config, opts Options) (*App, error) {
	if opts.Logger == nil {
		opts.Logger = obs.Discard()
	}
	if opts.Registry == nil {
		opts.Registry = obs.NewRegistry()
	}
	a := &App{cfg: cfg, opts: opts, log: opts.Logger, stop: make(chan struct{})}
	roles := map[Role]bool{}
	for _, r := range opts.Roles {
		switch r {
		case RoleBroker, RoleRouter, RolePushAPI, RoleWatchdog:
			roles[r] = true
		default:
			return nil, fmt.Errorf("app: unknown role %q", r)
		}
	}
	if roles[RoleBroker] || roles[RolePushAPI] || roles[RoleWatchdog] {
		st, err := store.New(store.Options{
			URI:            cfg.Store.URI,
			Database:       cfg.Store.Database,
			DataDir:        filepath.Join(cfg.Data, "store"),
			ConnectTimeout: cfg.Store.ConnectTimeout,
			Logger:         a.log,
		})
		if err != nil {
			return nil, err
		}
		a.store = st
	}
	// Start order: the broker first, so the other roles of the process can
	// join its gossip.
	if roles[RoleBroker] {
		b, err := broker.New(a.brokerOptions())
		if err != nil {
			return nil, err
		}
		a.broker = b
		a.running = append(a.running, named{RoleBroker, adapt{b}})
	}
	if roles[RoleRouter] {
		o := a.routerOptions()
		rt, err := router.New(o)
		if err != nil {
			return nil, err
		}
		a.router = rt
		a.running = append(a.running, named{RoleRouter, adapt{rt}})
	}
	if roles[RolePushAPI] {
		p, err := pushapi.New(a.pushOptions())
		if err != nil {
			return nil, err
		}
		a.push = p
		a.running = append(a.running, named{RolePushAPI, adapt{p}})
	}
	if roles[RoleWatchdog] {
		cc, seeds := a.sideCluster()
		wd, err := watchdog.New(watchdog.Options{Config: cfg.Watchdog, Cluster: cc, Seeds: seeds, AdminKey: a.adminKey(),
			Store: a.store, Version: opts.Version, Logger: opts.Logger, Registry: opts.Registry})
		if err != nil {
			return nil, err
		}
		a.watch = wd
		a.running = append(a.running, named{RoleWatchdog, wd})
	}
	return a, nil
}

func (a *App) brokerOptions() broker.Options {
	return broker.Options{
		Config:   a.cfg.Broker,
		Cluster:  a.cfg.Cluster,
		Auth:     a.cfg.Auth,
		Version:  a.opts.Version,
		Logger:   a.opts.Logger,
		Registry: a.opts.Registry,
		Store:    a.store,
		Groups:   a.cfg.Groups,
		History:  a.cfg.History,
		DataDir:  a.cfg.Data,
	}
}

func (a *App) routerOptions() router.Options {
	cc, seeds := a.sideCluster()
	return router.Options{Config: a.cfg.Router, Cluster: cc, Seeds: seeds, Version: a.opts.Version, Logger: a.opts.Logger, Registry: a.opts.Registry}
}

func (a *App) pushOptions() pushapi.Options {
	cc, seeds := a.sideCluster()
	return pushapi.Options{Config: a.cfg.PushAPI, Auth: a.cfg.Auth, AdminKey: a.adminKey(), Cluster: cc, Seeds: seeds, Store: a.store, Groups: a.cfg.Groups,
		Version: a.opts.Version, Logger: a.opts.Logger, Registry: a.opts.Registry}
}

// adminKey is the key the roles send to the brokers' admin endpoints.
func (a *App) adminKey() string {
	if keys := a.cfg.Broker.AdminKeyList(); len(keys) > 0 {
		return keys[0]
	}
	return ""
}

// sideCluster is the gossip configuration of a role sharing the process
// with a broker: a port of its own on the broker's gossip host, joined to
// the broker (whose port is known once it started: seeds is asked at
// Start). Without a gossiping broker it is the configuration as given.
func (a *App) sideCluster() (config.Cluster, func() []string) {
	cc := a.cfg.Cluster
	if a.broker == nil || cc.GossipAddr == "" {
		return cc, nil
	}
	host, _, _ := net.SplitHostPort(cc.GossipAddr)
	cc.GossipAddr = net.JoinHostPort(host, "0")
	b := a.broker
	return cc, func() []string {
		if g := b.GossipAddr(); g != "" {
			return []string{g}
		}
		return a.cfg.Cluster.Seeds()
	}
}

// Start opens the store, then starts each role, and returns their bound
// addresses by role. If any step fails, what was started is stopped again
// and the error names the failing part.
func (a *App) Start(ctx context.Context) (map[Role]lifecycle.Addrs, error) {
	if a.store != nil {
		if err := a.store.Start(ctx); err != nil {
			return nil, err
		}
	}
	out := map[Role]lifecycle.Addrs{}
	for i, r := range a.running {
		addrs, err := r.role.Start(ctx)
		if err != nil {
			a.running = a.running[:i] // only the started ones are shut down
			_ = a.Shutdown(context.Background())
			if r.name == RoleBroker {
				return nil, err
			}
			return nil, fmt.Errorf("%s: %w", r.name, err)
		}
		out[r.name] = addrs
	}
	for _, r := range a.running {
		go func() {
			select {
			case <-r.role.Done():
				a.log.Error("role failed", "role", r.name, "error", r.role.Err())
				a.fault.Fail(fmt.Errorf("%s: %w", r.name, r.role.Err()))
			case <-a.stop:
			}
		}()
	}
	return out, nil
}

// Done is closed when a role failed while running; Err says which and why.
// The App still has to be shut down.
func (a *App) Done() <-chan struct{} { return a.fault.Done() }

// Err is the failure that closed Done, or nil.
func (a *App) Err() error { return a.fault.Err() }

// Shutdown stops the roles in reverse order of Start, then closes the
// store. It returns the first error, or ctx's if ctx ends first.
func (a *App) Shutdown(ctx context.Context) error {
	a.stopOnce.Do(func() {
		close(a.stop)
		var errs []error
		for i := len(a.running) - 1; i >= 0; i-- {
			errs = append(errs, a.running[i].role.Shutdown(ctx))
		}
		if a.store != nil {
			errs = append(errs, a.store.Close(ctx))
		}
		a.stopErr = errors.Join(errs...)
	})
	return a.stopErr
}

// Broker returns the broker role, or nil when the App does not run one.
func (a *App) Broker() *broker.Broker { return a.broker }

// PushAPI returns the push API role, or nil when the App does not run one.
func (a *App) PushAPI() *pushapi.PushAPI { return a.push }

// Router returns the router role, or nil when the App does not run one.
func (a *App) Router() *router.Router { return a.router }

// Watchdog returns the watchdog role, or nil when the App does not run one.
func (a *App) Watchdog() *watchdog.Watchdog { return a.watch }

// Store returns the store (open once Start succeeded), or nil.
func (a *App) Store() *store.Store { return a.store }
