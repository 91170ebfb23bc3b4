package pushapi

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/lifecycle"
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/internal/store"
)

// ErrStarted reports a second call to Start.
var ErrStarted = errors.New("pushapi: already started")

// ErrNoStore reports a Start without Options.Store.
var ErrNoStore = errors.New("pushapi: no store: the push API keeps presence and push subscriptions in it")

// Bounds of work the push API does besides publishing.
const (
	storeTimeout = 5 * time.Second // one store operation of a request
)

// Options are a push API's configuration and dependencies.
type Options struct {
	// Config is the pushapi section: name, HTTP address, API keys (at
	// least one), body and payload limits, publish timeout.
	Config config.PushAPI
	// Auth provides the token keys (at least one; the first signs the
	// push API's service token and the device tokens it issues) and
	// TokenTTL, the lifetime of issued device tokens and the longest one a
	// request may ask for (0 means 30 days).
	Auth config.Auth
	// Cluster configures the push API's gossip membership: GossipAddr
	// (bind; required), Join (seeds), Secret, AdvertiseHost, ProbeInterval.
	// The node-link keys are not used.
	Cluster config.Cluster
	// AdminKey is the brokers' admin key (the first of broker.admin_keys),
	// sent to their admin endpoints for server-side subscriptions and
	// kicks. Required.
	AdminKey string
	// GossipTiming selects gossip timers; tests use cluster.TimingFast.
	GossipTiming cluster.Timing
	// Seeds, when set, replaces Cluster's seeds at Start: a push API
	// sharing its process with a broker joins that broker, whose gossip
	// port is known only once the broker started.
	Seeds func() []string
	// Store holds presence and push subscriptions. Required by Start; New
	// accepts nil so a composition root can check the configuration before
	// it opens the store.
	Store *store.Store
	// Groups bounds groups (max_members) and names the brokers' refresh
	// interval in errors; zero values mean the defaults.
	Groups config.Groups
	// Version is published in gossip tags; "" means "dev".
	Version string
	// Logger receives the push API's logs; nil discards them.
	Logger *slog.Logger
	// Registry receives the push API's metrics and is served on /metrics;
	// nil means a new registry with the Go and process collectors.
	Registry *prometheus.Registry
	// ServiceTokenTTL is the lifetime of the service token the push API
	// signs for each of its broker connections; 0 means 24 hours. Brokers
	// close a connection when its token expires (DISCONNECT 0xA0): the push
	// API replaces it a third of the lifetime (at most an hour) before,
	// holding new publishes meanwhile. Tests shorten it.
	ServiceTokenTTL time.Duration
}

// PushAPI is the push API role.
type PushAPI struct {
	cfg      config.PushAPI
	groups   config.Groups
	opts     Options
	log      *slog.Logger
	reg      *prometheus.Registry
	m        *metrics
	st       *store.Store
	issuer   tokenIssuer
	tokenTTL time.Duration
	keys     [][sha256.Size]byte // SHA-256 of each API key
	keyNames []string            // KeyName of each API key
	e        *echo.Echo
	pub      *publisher
	admin    *nodeAdmin
	storeSem chan struct{} // one element per store call in progress (withStore)

	// Written by Start only, before it returns.
	node *cluster.Node
	srv  *http.Server
	ln   net.Listener

	started atomic.Bool
	ready   atomic.Bool
	fault   lifecycle.Fault

	cancel   context.CancelFunc // ends the publisher and the gossip watch
	wg       sync.WaitGroup
	stopOnce sync.Once
	stopErr  error
}

// New validates the options and builds a push API; it binds nothing and
// starts no goroutine.
func New(opts Options) (*PushAPI, error) {
	cfg := opts.Config
	errs := []error{cfg.Validate(), opts.Auth.Validate(), opts.Cluster.Validate()}
	if len(cfg.Keys()) == 0 {
		errs = append(errs, &config.FieldError{Key: "pushapi.api_keys", Value: "",
			Why: "at least one API key is required: applications authenticate with one"})
	}
	if len(opts.Auth.Keys()) == 0 && opts.Auth.Devices != "token" { // Auth.Validate says it for token
		errs = append(errs, &config.FieldError{Key: "auth.token_keys", Value: "",
			Why: "the push API needs a token key: it signs its own service token and the device tokens it issues"})
	}
	if opts.AdminKey == "" {
		errs = append(errs, &config.FieldError{Key: "broker.admin_keys", Value: "",
			Why: "the push API needs the brokers' admin key: it subscribes and disconnects devices through their admin endpoints"})
	}
	if opts.Cluster.GossipAddr == "" {
		errs = append(errs, &config.FieldError{Key: "cluster.gossip_addr", Value: "",
			Why: "the push API needs gossip: it finds the brokers through it"})
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	issuer, err := newSigner(opts.Auth.Keys())
	if err != nil {
		return nil, fmt.Errorf("pushapi: auth.token_keys: %w", err)
	}
	name, err := lifecycle.DefaultName("pushapi", "pushapi.name", cfg.Name)
	if err != nil {
		return nil, err
	}
	cfg.Name = name
	if opts.Version == "" {
		opts.Version = "dev"
	}
	groups := opts.Groups
	if groups.MaxMembers == 0 {
		groups.MaxMembers = config.Defaults().Groups.MaxMembers
	}
	if groups.RefreshInterval == 0 {
		groups.RefreshInterval = config.Defaults().Groups.RefreshInterval
	}
	if err := groups.Validate(); err != nil {
		return nil, err
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
	log = log.With("component", "pushapi", "node", cfg.Name)
	m := newMetrics()
	p := &PushAPI{cfg: cfg, groups: groups, opts: opts, log: log, reg: reg, m: m, st: opts.Store, issuer: issuer,
		tokenTTL: opts.Auth.TokenTTL, admin: newNodeAdmin(opts.AdminKey), storeSem: make(chan struct{}, storeSlots)}
	if p.tokenTTL == 0 {
		p.tokenTTL = config.Defaults().Auth.TokenTTL
	}
	for _, k := range cfg.Keys() {
		p.keys = append(p.keys, sha256.Sum256([]byte(k)))
		p.keyNames = append(p.keyNames, KeyName(k))
	}
	p.pub = newPublisher(cfg.Name, cfg.PublishTimeout, issuer, log, m)
	if opts.ServiceTokenTTL > 0 {
		p.pub.tokenTTL = opts.ServiceTokenTTL
	}
	p.e = p.routes()
	return p, nil
}

// routes builds the Echo instance: every endpoint, the error handler and
// the middleware.
func (p *PushAPI) routes() *echo.Echo {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = p.errorHandler
	// Outermost first: count every request (with the status its error
	// gets), then turn panics into errors.
	e.Use(p.m.observe, p.recoverer)

	// Public: liveness, readiness, and the API description (no secret in
	// it, and tools fetch it without credentials).
	e.GET("/healthz", p.healthz)
	e.GET("/readyz", p.readyz)
	e.GET("/openapi.json", serveOpenAPI)

	key := p.requireKey
	e.GET("/metrics", echo.WrapHandler(promhttp.HandlerFor(p.reg, promhttp.HandlerOpts{Registry: p.reg})), key)
	e.POST("/v1/messages", p.postMessage, key)
	e.POST("/v1/messages/batch", p.postBatch, key)
	e.POST("/v1/channels/:channel/messages", p.postChannelMessage, key)
	e.GET("/v1/channels/:channel/subscribers", p.getSubscribers, key)
	e.GET("/v1/devices/:id", p.getDevice, key)
	e.PUT("/v1/devices/:id/channels/:channel", p.putDeviceChannel, key)
	e.DELETE("/v1/devices/:id/channels/:channel", p.deleteDeviceChannel, key)
	e.POST("/v1/devices/:id/messages", p.postDeviceMessage, key)
	e.POST("/v1/devices/:id/token", p.postDeviceToken, key)
	e.DELETE("/v1/devices/:id/connection", p.deleteDeviceConnection, key)
	e.POST("/v1/groups", p.postGroup, key)
	e.GET("/v1/groups", p.listGroups, key)
	e.GET("/v1/groups/:id", p.getGroup, key)
	e.PATCH("/v1/groups/:id", p.patchGroup, key)
	e.DELETE("/v1/groups/:id", p.deleteGroup, key)
	e.GET("/v1/groups/:id/members", p.listMembers, key)
	e.PUT("/v1/groups/:id/members/:deviceId", p.putMember, key)
	e.DELETE("/v1/groups/:id/members/:deviceId", p.deleteMember, key)
	e.POST("/v1/groups/:id/messages", p.postGroupMessage, key)
	e.GET("/v1/history", p.getHistory, key)
	e.GET("/v1/messages/:id", p.getStoredMessage, key)
	e.GET("/v1/groups/:id/messages", p.getGroupMessages, key)
	return e
}

// requireKey accepts requests with "Authorization: Bearer <key>" for one of
// the API keys. Keys are compared as SHA-256 digests in constant time, all
// of them every time, so neither a key's content nor its length leaks
// through timing.
func (p *PushAPI) requireKey(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		h := c.Request().Header.Get(echo.HeaderAuthorization)
		scheme, given, ok := strings.Cut(h, " ")
		if h == "" || !ok || !strings.EqualFold(scheme, "Bearer") {
			c.Response().Header().Set(echo.HeaderWWWAuthenticate, `Bearer realm="rtm"`)
			return apiErr(CodeUnauthorized, "want the header Authorization: Bearer <API key>")
		}
		sum := sha256.Sum256([]byte(strings.TrimSpace(given)))
		match, which := 0, 0
		for i := range p.keys {
			m := subtle.ConstantTimeCompare(sum[:], p.keys[i][:])
			match |= m
			which = subtle.ConstantTimeSelect(m, i, which)
		}
		if match != 1 {
			c.Response().Header().Set(echo.HeaderWWWAuthenticate, `Bearer realm="rtm", error="invalid_token"`)
			return apiErr(CodeUnauthorized, "the API key is not valid")
		}
		c.Set(ctxKeyName, p.keyNames[which])
		return next(c)
	}
}

// Start binds the HTTP listener, joins gossip as a member with role
// "pushapi", starts the broker connection loop and starts serving. It does
// not wait for a broker: publishes fail with 503 broker_unavailable until
// one is connected. Seeds that do not answer yet are retried in the
// background. On error nothing is left running.
func (p *PushAPI) Start(ctx context.Context) (err error) {
	if p.st == nil {
		return ErrNoStore
	}
	if !p.started.CompareAndSwap(false, true) {
		return ErrStarted
	}
	if err := p.m.register(p.reg); err != nil {
		return fmt.Errorf("pushapi: metrics: %w", err)
	}
	ln, err := net.Listen("tcp", p.cfg.Addr)
	if err != nil {
		return &config.ListenError{Key: "pushapi.addr", Addr: p.cfg.Addr, Err: err}
	}
	defer func() {
		if err != nil {
			_ = ln.Close()
		}
	}()
	cc := p.opts.Cluster
	seeds := cc.Seeds()
	if p.opts.Seeds != nil {
		seeds = p.opts.Seeds()
	}
	tags := cluster.Tags{Role: cluster.RolePushAPI, Version: p.opts.Version, Admin: ln.Addr().String()}
	copts := cluster.Options{
		NodeName:      p.cfg.Name,
		BindAddr:      cc.GossipAddr,
		Join:          seeds,
		Secret:        cc.Secret,
		Timing:        p.opts.GossipTiming,
		ProbeInterval: cc.ProbeInterval,
		Tags:          tags,
		Logger:        p.opts.Logger,
	}
	if cc.AdvertiseHost != "" {
		if _, port, err := net.SplitHostPort(cc.GossipAddr); err == nil && port != "0" {
			copts.AdvertiseAddr = net.JoinHostPort(cc.AdvertiseHost, port)
		}
	}
	if cc.Secret == "" {
		p.log.Warn("cluster.secret is not set: gossip is not encrypted; any process that reaches the gossip port can pose as a broker")
	}
	node, err := cluster.New(copts)
	if err != nil {
		return fmt.Errorf("pushapi: %w", err)
	}
	// Subscribe before Start, so the first joins are events too.
	events, unsubscribe := node.Subscribe(256)
	if err := node.Start(ctx); err != nil {
		unsubscribe()
		return fmt.Errorf("pushapi: %w", err)
	}
	p.node, p.ln = node, ln
	// The API address needs the advertised host when the listener binds to
	// every interface: publish it now that the gossip address is known.
	tags.Admin = p.publicAddr(ln.Addr().String())
	if err := node.SetTags(tags); err != nil {
		p.log.Warn("gossip tags not updated", "error", err)
	}
	p.pub.members = node.Members

	p.srv = &http.Server{
		Handler:           p.e,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
	}
	runCtx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	p.wg.Add(4)
	go func() {
		defer p.wg.Done()
		lifecycle.Serve(p.srv, ln, &p.fault, "pushapi: HTTP server")
	}()
	go func() {
		defer p.wg.Done()
		lifecycle.Watch(node, runCtx.Done(), &p.fault, "pushapi: gossip")
	}()
	go func() {
		defer p.wg.Done()
		p.pub.run(runCtx)
	}()
	go func() {
		defer p.wg.Done()
		defer unsubscribe()
		p.pub.watch(runCtx, events)
	}()
	p.ready.Store(true)
	p.log.Info("push API started", "addr", ln.Addr().String(), "gossip", node.Addr(), "seeds", cc.Seeds(),
		"api_keys", len(p.keys), "publish_timeout", p.cfg.PublishTimeout)
	return nil
}

// publicAddr is the address others reach a listener at.
func (p *PushAPI) publicAddr(bound string) string {
	return cluster.PublicAddr(bound, p.opts.Cluster.AdvertiseHost, p.node.Addr())
}

// Addr returns the bound HTTP address, or "" before Start.
func (p *PushAPI) Addr() string {
	if p.ln == nil {
		return ""
	}
	return p.ln.Addr().String()
}

// GossipAddr returns the gossip address the push API advertises, or ""
// before Start.
func (p *PushAPI) GossipAddr() string {
	if p.node == nil {
		return ""
	}
	return p.node.Addr()
}

// Done is closed when the push API failed while running (its HTTP server
// or gossip member stopped); Err says why.
func (p *PushAPI) Done() <-chan struct{} { return p.fault.Done() }

// Err is the reason Done was closed, or nil.
func (p *PushAPI) Err() error { return p.fault.Err() }

// Addrs returns the bound addresses ("http", "gossip"), empty before Start.
func (p *PushAPI) Addrs() lifecycle.Addrs {
	if p.ln == nil {
		return lifecycle.Addrs{}
	}
	return lifecycle.Addrs{"http": p.Addr(), "gossip": p.GossipAddr()}
}

// Name returns the push API's gossip member name, also its MQTT client ID.
func (p *PushAPI) Name() string { return p.cfg.Name }

// Broker returns the name of the broker the push API is connected to, or ""
// while it has no connection.
func (p *PushAPI) Broker() string { return p.pub.connected() }

// Shutdown stops the HTTP server, waiting (bounded by ctx) for requests in
// progress, disconnects from the broker, leaves gossip (bounded) and shuts
// it down. It is idempotent and returns ctx's error if ctx ends first.
func (p *PushAPI) Shutdown(ctx context.Context) error {
	p.stopOnce.Do(func() {
		// /readyz turns 503 at once.
		p.ready.Store(false)
		if !p.started.Load() || p.srv == nil {
			return // never started, or Start failed and cleaned up
		}
		p.stopErr = lifecycle.Within(ctx, "pushapi", func() error {
			// 1. Stop answering: requests in progress finish (their
			// publishes still have the broker connection and gossip), idle
			// keep-alive connections close. Past ctx, close the rest.
			errs := []error{lifecycle.ShutdownHTTP(ctx, p.srv, "pushapi")}
			// 2. Disconnect from the broker (DISCONNECT 0), end the gossip
			// watch.
			p.cancel()
			// 3. Leave gossip, so peers see "left", not "failed".
			lifecycle.Leave(ctx, p.node, p.log)
			if err := p.node.Shutdown(); err != nil {
				errs = append(errs, fmt.Errorf("pushapi: gossip shutdown: %w", err))
			}
			p.wg.Wait()
			p.admin.close()
			p.log.Info("push API stopped")
			return errors.Join(errs...)
		})
	})
	return p.stopErr
}

// healthz answers 200 while the process serves HTTP.
func (p *PushAPI) healthz(c echo.Context) error {
	return c.JSON(http.StatusOK, map[string]string{"status": "ok"})
}

// Readiness is the body of GET /readyz.
type Readiness struct {
	Status string `json:"status"` // "ready" or "not ready"
	Broker string `json:"broker"` // the broker connected to, "" if none
	Store  string `json:"store"`  // "ok" or why not
	Reason string `json:"reason,omitempty"`
}

// Ready reports whether the push API can serve every endpoint: started and
// not shutting down, connected to a broker, and the store answers a ping.
// The error says what is missing.
func (p *PushAPI) Ready(ctx context.Context) error {
	if r := p.readiness(ctx); r.Reason != "" {
		return fmt.Errorf("pushapi: not ready: %s", r.Reason)
	}
	return nil
}

func (p *PushAPI) readiness(ctx context.Context) Readiness {
	r := Readiness{Status: "ready", Broker: p.pub.connected(), Store: "ok"}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if p.st == nil {
		r.Store = "no store"
	} else if err := p.st.Ping(ctx); err != nil {
		r.Store = err.Error()
	}
	switch {
	case !p.ready.Load():
		r.Reason = "shutting down"
	case r.Broker == "":
		r.Reason = "no broker connection"
	case r.Store != "ok":
		r.Reason = "store unavailable"
	default:
		return r
	}
	r.Status = "not ready"
	return r
}

// readyz is Ready as JSON: 200 or 503 with the reason.
func (p *PushAPI) readyz(c echo.Context) error {
	r := p.readiness(c.Request().Context())
	if r.Reason != "" {
		return c.JSON(http.StatusServiceUnavailable, r)
	}
	return c.JSON(http.StatusOK, r)
}
