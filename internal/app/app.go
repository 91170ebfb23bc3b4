// Package app is rtm's composition root: it builds the roles a process runs
// from one configuration, starts them in dependency order (store, broker,
// router, push API) and stops them in reverse. `rtm dev` is every role in
// one App, where the router and the push API join the broker's gossip on
// ports of their own; `rtm broker` is the broker role alone.
//
// An App is started once and shut down once; Shutdown may be called from
// any goroutine and is idempotent.
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
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/pushapi"
	"github.com/rtm-dev/rtm/router"
)

// Role names a part of rtm that a process can run.
type Role string

// The roles an App can run.
const (
	RoleBroker  Role = "broker"
	RoleRouter  Role = "router"
	RolePushAPI Role = "pushapi"
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
	store  *store.Store
	broker *broker.Broker
	router *router.Router
	push   *pushapi.PushAPI
	roles  map[Role]bool

	stopOnce sync.Once
	stopErr  error
}

// New builds the roles; it starts nothing.
func New(cfg config.Config, opts Options) (*App, error) {
	if opts.Logger == nil {
		opts.Logger = obs.Discard()
	}
	if opts.Registry == nil {
		opts.Registry = obs.NewRegistry()
	}
	a := &App{cfg: cfg, opts: opts, log: opts.Logger, roles: map[Role]bool{}}
	for _, r := range opts.Roles {
		a.roles[r] = true
		switch r {
		case RoleBroker:
			// Built in Start, once the store it writes to is open; this
			// one only checks the configuration now (on a registry of
			// its own).
			o := a.brokerOptions()
			o.Registry = prometheus.NewRegistry()
			if _, err := broker.New(o); err != nil {
				return nil, err
			}
		case RoleRouter:
			// Built in Start, which knows the gossip address of a broker
			// in the same process; this one only checks the
			// configuration now (on a registry of its own).
			o := a.routerOptions(cfg.Cluster)
			o.Registry = prometheus.NewRegistry()
			if _, err := router.New(o); err != nil {
				return nil, err
			}
		case RolePushAPI:
			o := a.pushOptions(cfg.Cluster)
			o.Registry = prometheus.NewRegistry()
			if _, err := pushapi.New(o); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("app: unknown role %q", r)
		}
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
		History:  a.cfg.History,
		DataDir:  a.cfg.Data,
	}
}

func (a *App) routerOptions(cc config.Cluster) router.Options {
	return router.Options{Config: a.cfg.Router, Cluster: cc, Version: a.opts.Version, Logger: a.opts.Logger, Registry: a.opts.Registry}
}

func (a *App) pushOptions(cc config.Cluster) pushapi.Options {
	var adminKey string
	if keys := a.cfg.Broker.AdminKeyList(); len(keys) > 0 {
		adminKey = keys[0]
	}
	return pushapi.Options{Config: a.cfg.PushAPI, Auth: a.cfg.Auth, AdminKey: adminKey, Cluster: cc, Store: a.store,
		Version: a.opts.Version, Logger: a.opts.Logger, Registry: a.opts.Registry}
}

// needsStore reports whether a role of the App uses the store.
func (a *App) needsStore() bool { return a.roles[RoleBroker] || a.roles[RolePushAPI] }

// sideCluster is the gossip configuration of a role sharing the process
// with a broker: a port of its own on the broker's host, joined to the
// broker. Without a broker it is the configuration as given.
func (a *App) sideCluster() config.Cluster {
	cc := a.cfg.Cluster
	if a.broker == nil {
		return cc
	}
	if gossip := a.broker.GossipAddr(); gossip != "" {
		host, _, _ := net.SplitHostPort(gossip)
		cc.GossipAddr, cc.Join = net.JoinHostPort(host, "0"), gossip
	}
	return cc
}

// Start opens the store, then starts each role. If any step fails, what was
// started is stopped again and the error names the failing part.
func (a *App) Start(ctx context.Context) error {
	if a.needsStore() {
		st, err := store.Open(ctx, store.Options{
			URI:            a.cfg.Store.URI,
			Database:       a.cfg.Store.Database,
			DataDir:        filepath.Join(a.cfg.Data, "store"),
			ConnectTimeout: a.cfg.Store.ConnectTimeout,
			Logger:         a.log,
		})
		if err != nil {
			return err
		}
		a.store = st
	}
	fail := func(err error) error {
		_ = a.Shutdown(context.Background())
		return err
	}
	if a.roles[RoleBroker] {
		b, err := broker.New(a.brokerOptions())
		if err != nil {
			return fail(err)
		}
		a.broker = b
		if err := a.broker.Start(ctx); err != nil {
			return fail(err)
		}
	}
	if a.roles[RoleRouter] {
		rt, err := router.New(a.routerOptions(a.sideCluster()))
		if err != nil {
			return fail(err)
		}
		a.router = rt
		if err := a.router.Start(ctx); err != nil {
			return fail(fmt.Errorf("router: %w", err))
		}
	}
	if a.roles[RolePushAPI] {
		p, err := pushapi.New(a.pushOptions(a.sideCluster()))
		if err != nil {
			return fail(err)
		}
		a.push = p
		if err := a.push.Start(ctx); err != nil {
			return fail(fmt.Errorf("pushapi: %w", err))
		}
	}
	return nil
}

// Shutdown stops the roles in reverse order of Start, then closes the
// store. It returns the first error, or ctx's if ctx ends first.
func (a *App) Shutdown(ctx context.Context) error {
	a.stopOnce.Do(func() {
		var errs []error
		if a.push != nil {
			errs = append(errs, a.push.Shutdown(ctx))
		}
		if a.router != nil {
			errs = append(errs, a.router.Shutdown(ctx))
		}
		if a.broker != nil {
			errs = append(errs, a.broker.Shutdown(ctx))
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

// Store returns the open store (nil before Start).
func (a *App) Store() *store.Store { return a.store }
