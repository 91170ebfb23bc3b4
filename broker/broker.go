package broker

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/lifecycle"
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/plugins"
)

// Listener IDs, also the keys of Stats.Listeners.
const (
	ListenerTCP   = "tcp"
	ListenerWS    = "ws"
	ListenerTLS   = "tls"
	ListenerWSS   = "wss"
	ListenerAdmin = "admin"
)

// listenerKeys are the configuration keys of the listeners' addresses, by
// listener ID, named when an address cannot be bound.
var listenerKeys = map[string]string{
	ListenerTCP: "broker.mqtt_addr", ListenerWS: "broker.ws_addr", ListenerTLS: "broker.tls_addr",
	ListenerWSS: "broker.wss_addr", ListenerAdmin: "broker.admin_addr",
}

// idlePark is how long an MQTT connection over plain TCP waits for a packet
// on a goroutine of its own before it is parked (mochi patch 86). Long
// enough that a device exchanging packets every few seconds keeps its
// goroutine (parking and waking cost two epoll_ctl calls and a goroutine
// start), short enough that the idle majority of a fleet costs no stack.
const idlePark = 5 * time.Second

// shutdownWriteGrace bounds each write to a client once Shutdown starts.
const shutdownWriteGrace = time.Second

// ErrStarted reports a second call to Start.
var ErrStarted = errors.New("broker: already started")

// Options are a broker's dependencies besides its configuration.
type Options struct {
	Config config.Broker
	Auth   config.Auth
	// Cluster configures gossip and node links; an empty GossipAddr runs
	// the broker alone.
	Cluster config.Cluster
	// GossipTiming selects gossip timers; tests use cluster.TimingFast.
	GossipTiming cluster.Timing
	// Version is reported in /v1/stats; "" means "dev".
	Version string
	// Logger receives the broker's logs; nil discards them.
	Logger *slog.Logger
	// Registry receives the broker's metrics and is served on /metrics;
	// nil means a new registry with the Go and process collectors.
	Registry *prometheus.Registry
	// Store, when set, receives device presence and push subscriptions
	// made over MQTT, and is asked for a device's push subscriptions when
	// it connects (see devicesHook), and holds group memberships (without
	// it, group topics are closed to devices).
	Store *store.Store
	// Groups configures the group membership cache; zero values mean the
	// defaults.
	Groups config.Groups
	// History configures message history, captured with a Store
	// (docs/history.md); empty Topics disables it.
	History config.History
	// DataDir is the node's directory for local state: the history spool
	// goes in DataDir/history. "" keeps history in memory only.
	DataDir string
}

// Broker is one MQTT broker node.
type Broker struct {
	cfg     config.Broker
	opts    Options
	log     *slog.Logger
	reg     *prometheus.Registry
	mq      *mqtt.Server
	limits  *limitsHook
	cluster *clusterNode // nil when the broker runs alone
	drain   *drainer
	devices *devicesHook        // nil without a store
	groups  *plugins.GroupCache // nil without a store
	history *plugins.History    // nil without a store or history topics
	durable *durableHook        // nil without a store or with broker.durability off
	// incarnation tells this process's connections from an earlier one's
	// with the same node name (presence records).
	incarnation uint64
	admin       *adminServer
	started     atomic.Bool
	serving     atomic.Bool // Start succeeded: there is something to shut down
	ready       atomic.Bool
	addrs       map[string]string // listener ID → bound address, written by Start only

	rejectedFull atomic.Int64 // CONNECTs refused at capacity
	connects     atomic.Int64 // CONNECTs seen (releaseAfterStorms)

	// collectors are registered on reg by Start (New registers nothing).
	collectors []prometheus.Collector
	fault      lifecycle.Fault

	stopOnce sync.Once
	stopErr  error
	loopStop context.CancelFunc
	loopDone chan struct{}
	startAt  time.Time
}

// New validates the configuration and builds a broker; it binds nothing.
func New(opts Options) (*Broker, error) {
	cfg := opts.Config
	if err := errors.Join(cfg.Validate(), opts.Auth.Validate(), cfg.RequireAdminKeys(opts.Auth), opts.Cluster.Validate()); err != nil {
		return nil, err
	}
	if cfg.NodeName == "" {
		host, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("broker: node name not set and host name unknown: %w", err)
		}
		cfg.NodeName = host
	}
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
	b := &Broker{cfg: cfg, opts: opts, log: log.With("component", "broker", "node", cfg.NodeName), reg: reg, addrs: map[string]string{}}
	b.drain = &drainer{b: b}
	if opts.Store != nil && len(opts.History.TopicList()) > 0 {
		if err := opts.History.Validate(); err != nil {
			return nil, err
		}
	}
	var seed [8]byte
	_, _ = rand.Read(seed[:])
	b.incarnation = binary.LittleEndian.Uint64(seed[:])

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumClients = math.MaxInt64 // enforced by limitsHook, which answers v5 with 0x97
	caps.MaximumPacketSize = uint32(cfg.MaxPacketSize)
	caps.ReceiveMaximum = uint16(cfg.MaxInflight)
	caps.MaximumInflight = uint16(cfg.MaxQueued)
	caps.MaximumClientWritesPending = int32(cfg.MaxQueued)
	caps.MaximumSessionExpiryInterval = uint32(cfg.SessionExpiry / time.Second)
	caps.MaximumMessageExpiryInterval = int64(cfg.MessageExpiry / time.Second)
	// Paho's interoperability suite, and the spec, forbid echoing a PUBLISH's
	// user properties on its acknowledgement.
	caps.Compatibilities.NoInheritedPropertiesOnAck = true
	caps.Compatibilities.ObscureNotAuthorized = opts.Auth.ACLSubscribeRefusal == "unspecified"
	// Topic aliases a client may set (advertised in the CONNACK, mochi patch
	// 33): each holds a topic name for the connection's life, so the bound
	// is per-connection memory. 10 is Mosquitto's default max_topic_alias.
	caps.TopicAliasMaximum = topicAliasMaximum
	b.mq = mqtt.New(&mqtt.Options{
		Capabilities:            caps,
		ClientNetReadBufferSize: 1024,
		// Packets queued for a client are collected into one write up to
		// this many bytes (mochi patch 70: a pooled buffer, held only
		// while writing); with write coalescing (patch 98) a batch of up
		// to 64 messages then goes out in one write(2), not one per KiB.
		ClientNetWriteBufferSize: 16 << 10,
		Logger:                   log.With("component", "mqtt", "node", cfg.NodeName),
		SysTopicResendInterval:   10,
		// Publishers wait (bounded) for congested subscribers instead of
		// losing messages they were acknowledged for; docs/broker.md,
		// "Overload policy".
		FlowControl: mqtt.FlowControl{MaxWait: cfg.BackpressureMaxWait},
		// What a client, or a stranger, can make the node hold
		// (docs/broker.md "Limits", docs/security.md).
		Memory: mqtt.MemoryLimits{
			MaxClientBytes:  int64(cfg.MaxQueuedBytes),
			MaxTotalBytes:   int64(cfg.MaxQueuedBytesTotal),
			MaxReadingBytes: int64(cfg.MaxReadingBytes),
			MaxConnectSize:  uint32(cfg.MaxConnectSize),
			ConnectTimeout:  cfg.ConnectTimeout,
			ReadTimeout:     cfg.ReadTimeout,
		},
		// An MQTT connection idle this long gives up its goroutine (mochi
		// patch 86: a shared epoll poller waits for its socket), so an idle
		// device costs no stack; docs/broker.md "Memory per connection".
		IdlePark: idlePark,
		// A subscriber receiving at a high rate gets its packets in fewer,
		// larger writes (mochi patch 98); docs/broker.md "Write coalescing".
		WriteCoalesce: cfg.WriteCoalesce,
		// A client publishing QoS 1/2 at a high rate gets its
		// acknowledgements in fewer writes (mochi patch 102); docs/broker.md
		// "Write coalescing".
		AckCoalesce: cfg.AckCoalesce,
	})
	b.limits = &limitsHook{b: b}
	if err := b.mq.AddHook(b.limits, nil); err != nil {
		return nil, err
	}
	// Authentication and topic rights (token or anonymous devices, ACL):
	// one set of hooks chosen from the configuration, never an allow-all
	// hook beside them (mochi ORs auth hooks).
	popts := plugins.Options{Auth: opts.Auth, Logger: log.With("node", cfg.NodeName)}
	if opts.Store != nil {
		b.groups = plugins.NewGroupCache(opts.Store.GroupsOf, log.With("node", cfg.NodeName))
		popts.Groups = b.groups
	}
	authHooks, err := plugins.Hooks(popts)
	if err != nil {
		return nil, err
	}
	service := func(*mqtt.Client) bool { return false }
	for _, h := range authHooks {
		if err := b.mq.AddHook(h, nil); err != nil {
			return nil, err
		}
		if a, ok := h.(*plugins.AuthHook); ok {
			service = a.IsService
		}
	}
	if opts.Store != nil {
		spool := ""
		if opts.DataDir != "" {
			spool = filepath.Join(opts.DataDir, "history")
		}
		b.history, err = plugins.NewHistory(plugins.HistoryOptions{
			Config: opts.History, Node: cfg.NodeName, Store: opts.Store, SpoolDir: spool, Service: service,
			Logger: log.With("node", cfg.NodeName), Registerer: reg,
		})
		if err != nil {
			return nil, err
		}
	}
	if b.history != nil {
		// Before the cluster hook: a message is forwarded with its id.
		if err := b.mq.AddHook(b.history.StampHook(), nil); err != nil {
			return nil, err
		}
	}
	if opts.Store != nil {
		b.devices = newDevicesHook(b, opts.Store)
		if err := b.mq.AddHook(b.devices, nil); err != nil {
			return nil, err
		}
		b.collectors = append(b.collectors, storeCollector{b.devices}, groupsCollector{b.groups})
	}
	if opts.Store != nil && cfg.Durability != "off" {
		// Before the cluster hook: a PUBLISH is marked (OnPublish) before
		// it is forwarded.
		if b.durable, err = newDurableHook(b, opts.Store); err != nil {
			return nil, err
		}
		if err := b.mq.AddHook(b.durable, nil); err != nil {
			return nil, err
		}
	}
	if opts.Cluster.GossipAddr != "" {
		// Last, so it sees a publish only once every other hook let it through.
		b.cluster = newClusterNode(b, opts.Cluster, opts.GossipTiming)
		b.mq.Options.FlowControl.PeerMaxWait = b.cluster.peerMaxWait()
		b.mq.Topics.OnRoute = b.cluster.onRoute
		if err := b.mq.AddHook(b.cluster, nil); err != nil {
			return nil, err
		}
	}
	if b.durable != nil {
		// After the cluster hook, which may refuse the session.
		if err := b.mq.AddHook(&durableWillHook{d: b.durable}, nil); err != nil {
			return nil, err
		}
	}
	if b.history != nil {
		// Last: it captures a message once every other hook accepted it.
		if err := b.mq.AddHook(b.history.CaptureHook(), nil); err != nil {
			return nil, err
		}
	}
	b.collectors = append(b.collectors, &collector{b: b})
	return b, nil
}

// Start binds every configured listener, starts serving, and returns once
// clients can connect. On error nothing is left running.
func (b *Broker) Start(ctx context.Context) (err error) {
	if !b.started.CompareAndSwap(false, true) {
		return ErrStarted
	}
	b.startAt = time.Now()
	for _, c := range b.collectors {
		if err := b.reg.Register(c); err != nil {
			return fmt.Errorf("broker: metrics: %w", err)
		}
	}
	var bound []net.Listener
	defer func() {
		if err != nil {
			for _, ln := range bound {
				_ = ln.Close()
			}
			if b.cluster != nil {
				b.cluster.shutdown()
			}
		}
	}()
	bind := func(id, addr string, tlsConf *tls.Config) (net.Listener, error) {
		ln, err := listen(addr, tlsConf)
		if err != nil {
			return nil, &config.ListenError{Key: listenerKeys[id], Addr: addr, Err: err}
		}
		bound = append(bound, ln)
		b.addrs[id] = ln.Addr().String()
		return ln, nil
	}

	var mls []listeners.Listener
	ln, err := bind(ListenerTCP, b.cfg.MQTTAddr, nil)
	if err != nil {
		return err
	}
	mls = append(mls, &streamListener{id: ListenerTCP, ln: ln})
	if b.cfg.WSAddr != "" {
		ln, err := bind(ListenerWS, b.cfg.WSAddr, nil)
		if err != nil {
			return err
		}
		mls = append(mls, newWSListener(ListenerWS, ln))
	}
	if b.cfg.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(b.cfg.TLSCert, b.cfg.TLSKey)
		if err != nil {
			return fmt.Errorf("broker: broker.tls_cert %s / broker.tls_key: %w", b.cfg.TLSCert, err)
		}
		tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		if b.cfg.TLSAddr != "" {
			ln, err := bind(ListenerTLS, b.cfg.TLSAddr, tlsConf)
			if err != nil {
				return err
			}
			mls = append(mls, &streamListener{id: ListenerTLS, ln: ln})
		}
		if b.cfg.WSSAddr != "" {
			ln, err := bind(ListenerWSS, b.cfg.WSSAddr, tlsConf)
			if err != nil {
				return err
			}
			mls = append(mls, newWSListener(ListenerWSS, ln))
		}
	}
	adminLn, err := bind(ListenerAdmin, b.cfg.AdminAddr, nil)
	if err != nil {
		return err
	}

	if b.history != nil {
		if err := b.history.Start(); err != nil {
			return err
		}
		defer func() {
			if err != nil {
				_ = b.history.Close(context.Background())
			}
		}()
	}
	if b.cluster != nil {
		if err := b.cluster.start(ctx); err != nil {
			return err
		}
	}
	for _, l := range mls {
		if err := b.mq.AddListener(l); err != nil {
			return fmt.Errorf("broker: %w", err)
		}
	}
	if b.durable != nil {
		// Before clients connect: a reconnecting client finds its session.
		t0 := time.Now()
		sessions, msgs, retained, err := b.durable.load(ctx)
		if err != nil {
			return fmt.Errorf("broker: restore persistent sessions from the store: %w", err)
		}
		b.log.Info("restored from the store", "sessions", sessions, "messages", msgs, "retained", retained, "took", time.Since(t0).String())
	}
	if err := b.mq.Serve(); err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	b.admin = newAdminServer(b, adminLn)
	go b.admin.serve()

	loopCtx, cancel := context.WithCancel(context.Background())
	b.loopStop, b.loopDone = cancel, make(chan struct{})
	go b.loop(loopCtx)
	go b.releaseAfterStorms(loopCtx)
	if b.cluster != nil {
		go lifecycle.Watch(b.cluster.node, loopCtx.Done(), &b.fault, "broker: gossip")
	}
	if b.devices != nil {
		go b.devices.run(loopCtx.Done())
	}
	if b.groups != nil {
		every := b.opts.Groups.RefreshInterval
		if every <= 0 {
			every = config.Defaults().Groups.RefreshInterval
		}
		go b.refreshGroups(loopCtx, every)
	}
	if b.durable != nil && b.cluster != nil {
		go b.durable.watchFailures(loopCtx.Done())
		go b.durable.purgeClaimsEvery(loopCtx.Done())
	}

	b.serving.Store(true)
	b.ready.Store(true)
	if b.opts.Auth.Devices == "anonymous" {
		b.log.Warn("ANONYMOUS DEVICES ALLOWED: any client may connect without credentials (auth.devices=anonymous)")
	}
	b.log.Info("broker started", "listeners", b.addrs, "capacity", b.cfg.Capacity)
	return nil
}

// loop is the broker's periodic work.
func (b *Broker) loop(ctx context.Context) {
	defer close(b.loopDone)
	t := time.NewTicker(dropLogInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			b.limits.flushDrops(b.log)
			return
		case <-t.C:
			b.limits.flushDrops(b.log)
		}
	}
}

// Addr returns the bound address of a listener (ListenerTCP, ListenerWS, …),
// or "" when it is not running.
func (b *Broker) Addr(id string) string { return b.addrs[id] }

// Addrs returns the bound addresses by listener ID, plus "gossip" and
// "link" in a cluster; empty before Start.
func (b *Broker) Addrs() lifecycle.Addrs {
	out := lifecycle.Addrs(maps.Clone(b.addrs))
	if g := b.GossipAddr(); g != "" {
		out["gossip"] = g
		if l := b.cluster.links; l != nil {
			out["link"] = l.Addr()
		}
	}
	return out
}

// Done is closed when the broker failed while running (its admin server or
// gossip member stopped); Err says why.
func (b *Broker) Done() <-chan struct{} { return b.fault.Done() }

// Err is the reason Done was closed, or nil.
func (b *Broker) Err() error { return b.fault.Err() }

// GossipAddr returns the gossip address the node advertises, or "" when it
// runs alone.
func (b *Broker) GossipAddr() string {
	if b.cluster == nil || b.cluster.node == nil {
		return ""
	}
	return b.cluster.node.Addr()
}

// Name returns the node's name.
func (b *Broker) Name() string { return b.cfg.NodeName }

// Incarnation identifies this process among those that run, or ran, under
// the broker's name: recorded with device presence and published in gossip.
func (b *Broker) Incarnation() string { return fmt.Sprintf("%016x", b.incarnation) }

// Ready reports whether the broker accepts clients.
func (b *Broker) Ready() bool { return b.ready.Load() }

// Shutdown stops accepting connections, disconnects every client (v5:
// DISCONNECT 0x8B server shutting down) and stops the admin server. It is
// idempotent and returns ctx's error if ctx ends first.
func (b *Broker) Shutdown(ctx context.Context) error {
	b.stopOnce.Do(func() {
		done := make(chan struct{})
		var err error // written by the goroutine, read once it is done
		go func() {
			defer close(done)
			// 1. /readyz turns 503 at once, so load balancers stop sending.
			b.ready.Store(false)
			if !b.serving.Load() {
				return // Start failed and left nothing running
			}
			// 2. Tell the cluster this node is going (the draining tag),
			// so routers and peers stop sending devices here. It stays a
			// member, with its links and routes, until its sessions are
			// handed over (step 4): peers keep forwarding what its
			// subscribers are owed meanwhile.
			if b.cluster != nil {
				b.cluster.setLeaving()
			}
			// 3. Each listener stops accepting, then sends its clients
			// DISCONNECT 0x8B and closes them; hooks stop. A client that
			// stopped reading leaves mochi's writer blocked in write(2)
			// holding the client's lock, which the DISCONNECT needs: bound
			// every write, or Shutdown waits for that client's keepalive.
			b.drain.stopEvacuation()
			refs := map[string]string{} // by listener: where its clients should go
			for _, cl := range b.mq.Clients.GetAll() {
				if cl.Net.Conn == nil || cl.Closed() {
					continue
				}
				_ = cl.Net.Conn.SetWriteDeadline(time.Now().Add(shutdownWriteGrace))
				// MQTT 5 clients are told where to go instead (SPEC 4).
				if cl.Properties.ProtocolVersion == 5 && b.cluster != nil {
					ref, ok := refs[cl.Net.Listener]
					if !ok {
						ref = b.reference(cl.Net.Listener)
						refs[cl.Net.Listener] = ref
					}
					if ref != "" {
						b.redirect(cl, packets.ErrServerShuttingDown, ref)
					}
				}
			}
			_ = b.mq.Close()
			b.loopStop()
			<-b.loopDone
			// The sessions' last state (disconnected, wills sent) is
			// written before the store closes.
			if b.durable != nil {
				if err := b.durable.close(ctx); err != nil {
					b.log.Error("persistent sessions not fully written at shutdown", "error", err)
				}
			}
			// The disconnects of step 3 are the last presence records.
			if b.devices != nil {
				<-b.devices.done
			}
			// Captured history reaches the store (history.flush_timeout);
			// what does not stays in the spool for the next start.
			if b.history != nil {
				if err := b.history.Close(ctx); err != nil {
					b.log.Warn("history not all written at shutdown", "err", err)
				}
			}
			// 4. Every session left (offline, or disconnected in step 3)
			// moves to a live peer (see clusterNode.handOver); only then
			// does the node leave gossip, so peers drop its routes once
			// nothing here needs them. Peers acknowledge what was
			// forwarded to them (bounded, so the messages acknowledged to
			// publishers here are delivered), then links and gossip close;
			// what a peer still has not acknowledged is dropped and counted
			// (link_closed), as are the messages of a session no peer took
			// (session_not_moved).
			if b.cluster != nil {
				hctx, cancel := handOverContext(ctx)
				for _, cl := range b.cluster.handOver(hctx, false) {
					b.limits.sessionNotMoved(cl)
				}
				cancel()
				b.cluster.leave(ctx)
				b.cluster.flush(ctx)
				b.cluster.shutdown()
			}
			// 5. The admin server goes last, so /metrics stays scrapeable
			// while clients are disconnected.
			err = b.admin.shutdown(ctx)
			b.log.Info("broker stopped")
		}()
		select {
		case <-done:
			b.stopErr = err
		case <-ctx.Done():
			b.stopErr = fmt.Errorf("broker: shutdown: %w", ctx.Err())
		}
	})
	return b.stopErr
}

// handOverContext bounds the session hand-over of a graceful stop so that
// leaving gossip and flushing the links still fit ctx: it gets all but 5 s
// of a longer deadline, half of a shorter one.
func handOverContext(ctx context.Context) (context.Context, context.CancelFunc) {
	dl, ok := ctx.Deadline()
	if !ok {
		return context.WithCancel(ctx)
	}
	left := time.Until(dl)
	if left > 10*time.Second {
		left -= 5 * time.Second
	} else {
		left /= 2
	}
	return context.WithTimeout(ctx, left)
}

// Stats is a snapshot of a broker's state and counters, served as JSON on
// /v1/stats and exported on /metrics.
type Stats struct {
	Node      string            `json:"node"`
	Version   string            `json:"version"`
	Started   time.Time         `json:"started"`
	Uptime    float64           `json:"uptime_seconds"`
	Ready     bool              `json:"ready"`
	Listeners map[string]string `json:"listeners"`

	Connections      int64 `json:"connections"`
	Parked           int64 `json:"connections_parked"` // idle connections no goroutine waits for (mochi patch 86)
	Capacity         int   `json:"capacity"`
	RejectedCapacity int64 `json:"connections_rejected_capacity"`
	Sessions         int64 `json:"sessions"`
	Subscriptions    int64 `json:"subscriptions"`
	// Retained counts retained messages held, mochi's $SYS topics included.
	Retained int64 `json:"retained"`
	// Inflight is mochi's Info.Inflight: the QoS 1/2 packets held in
	// sessions. Besides messages for subscribers it counts a publisher's
	// QoS 2 PUBREC until its PUBREL and, briefly, its QoS 1 PUBACK: mochi
	// holds it from receipt until just after it is written, so a client can
	// have its PUBACK while it is still counted.
	Inflight int64 `json:"inflight"`

	MessagesReceived int64 `json:"messages_received"`
	MessagesSent     int64 `json:"messages_sent"`
	// Messages not delivered to a client, each counted once, by the QoS it
	// was published with:
	//
	// MessagesDropped counts those dropped because the client's write queue
	// already held broker.max_queued packets (reason "queue_full"), by QoS
	// ("0", "1", "2").
	MessagesDropped map[string]int64 `json:"messages_dropped"`
	// InflightDropped counts the QoS 1/2 messages dropped because the
	// client's session already held broker.max_queued of them, unacknowledged
	// or kept while it is offline (reason "session_full"), or, in theory, had
	// no free packet identifier (reason "packet_ids").
	InflightDropped int64 `json:"inflight_dropped"`
	// DroppedByReason counts every message lost, by reason, then QoS (as
	// published; as held for "expired" and "session_expired"): the series
	// of rtm_broker_messages_dropped_total{reason,qos}, e.g.
	//
	//	{"queue_full": {"0": 12, "1": 0, "2": 0},
	//	 "session_full": {"1": 290, "2": 0}, "packet_ids": {"1": 0, "2": 0},
	//	 "offline": {"0": 3, ...}, "link_queue_full": {"0": 0, "1": 4, ...}, ...}
	//
	// The reasons are those above plus "offline" (QoS 0 to a client that
	// is not connected), "expired", "session_expired", "queue_bytes" (the
	// client held broker.max_queued_bytes), "memory_budget" (the node's
	// clients held broker.max_queued_bytes_total), and the node link
	// reasons "link_queue_full", "link_oversize", "no_link",
	// "link_closed", "link_reset" and "peer_restarted" (see
	// docs/clustering.md). A QoS 1/2 publish refused at a link (the
	// publisher got 0x97/0x80 or was disconnected) is counted too, once
	// per peer it could not be queued for. "too_large": bigger than the
	// Maximum Packet Size the client asked for (MQTT 5), so skipped for
	// that client as the specification requires.
	DroppedByReason map[string]map[string]int64 `json:"messages_dropped_by_reason"`
	BytesReceived   int64                       `json:"bytes_received"`
	BytesSent       int64                       `json:"bytes_sent"`
	PacketsReceived int64                       `json:"packets_received"`
	PacketsSent     int64                       `json:"packets_sent"`

	// Backpressure counts publishers paced by congested subscribers
	// (broker.backpressure_max_wait).
	Backpressure BackpressureStats `json:"backpressure"`
	// Memory is what the byte bounds count (docs/broker.md, "Limits").
	Memory MemoryStats `json:"memory"`
	// Groups is the group membership cache (docs/security.md, "Devices:
	// group topics"); nil without a store.
	Groups *plugins.GroupCacheStats `json:"groups,omitempty"`

	HeapBytes  uint64 `json:"heap_bytes"`
	Goroutines int    `json:"goroutines"`

	// Cluster is nil when the broker runs alone.
	Cluster *ClusterStats `json:"cluster,omitempty"`
	// Store is nil without a store.
	Store *StoreStats `json:"store,omitempty"`
	// History is nil without history capture (docs/history.md).
	History *plugins.HistoryStats `json:"history,omitempty"`
	// Durability is nil without a store or with broker.durability off.
	Durability *DurabilityStats `json:"durability,omitempty"`
}

// BackpressureStats count the pacing of publishers by subscribers that do
// not keep up (docs/broker.md, "Overload policy").
type BackpressureStats struct {
	// Waits counts waits of a publish (or a message from a peer) for one
	// congested subscriber; WaitSeconds sums their durations.
	Waits       int64   `json:"waits"`
	WaitSeconds float64 `json:"wait_seconds"`
	// Stalls counts subscribers marked stalled: still congested after
	// broker.backpressure_max_wait.
	Stalls int64 `json:"stalls"`
	// StalledSkips counts messages to a stalled subscriber that were not
	// waited for (queued while it had room, else dropped and counted in
	// messages_dropped_by_reason).
	StalledSkips int64 `json:"stalled_skips"`
	// ReceiveQuotaWaits counts MQTT 3.1.1 publishers that reached
	// broker.max_inflight unacknowledged messages while acknowledgements
	// were held and were not read until one was released (mochi patch
	// 131; an MQTT 5 client is disconnected 0x93 instead).
	ReceiveQuotaWaits int64 `json:"receive_quota_waits"`
}

// topicAliasMaximum is the Topic Alias Maximum rtm accepts from an MQTT 5
// client.
const topicAliasMaximum = 10

// MemoryStats report the byte bounds on what clients make the node hold.
type MemoryStats struct {
	// QueuedBytes is the message bytes held for all clients
	// (broker.max_queued_bytes_total bounds it).
	QueuedBytes int64 `json:"queued_bytes"`
	// ReadingBytes is the bytes of partly received packets
	// (broker.max_reading_bytes).
	ReadingBytes int64 `json:"reading_bytes"`
	// ReadingConnectBytes is the part of ReadingBytes that is CONNECTs
	// (at most a quarter of broker.max_reading_bytes).
	ReadingConnectBytes int64 `json:"reading_connect_bytes"`
	// ReadRefused counts connections closed because a packet would have
	// exceeded broker.max_reading_bytes; ConnectTooLarge those whose
	// CONNECT exceeded broker.max_connect_size.
	ReadRefused     int64 `json:"read_refused"`
	ConnectTooLarge int64 `json:"connect_too_large"`
}

// Stats returns a snapshot of the broker's counters.
func (b *Broker) Stats() Stats {
	in := b.mq.Info
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	s := Stats{
		Node:             b.cfg.NodeName,
		Version:          b.opts.Version,
		Started:          b.startAt.UTC(),
		Uptime:           time.Since(b.startAt).Seconds(),
		Ready:            b.Ready(),
		Listeners:        maps.Clone(b.addrs), // callers may keep and change it
		Connections:      atomic.LoadInt64(&in.ClientsConnected),
		Parked:           int64(b.mq.ParkedClients()),
		Capacity:         b.cfg.Capacity,
		RejectedCapacity: b.rejectedFull.Load(),
		Sessions:         int64(b.mq.Clients.Len()),
		Subscriptions:    atomic.LoadInt64(&in.Subscriptions),
		// mochi's Info.Retained is updated only when a client retains a
		// message, so it misses $SYS topics and expiries; count live.
		Retained:         int64(b.mq.Topics.Retained.Len()),
		Inflight:         atomic.LoadInt64(&in.Inflight),
		MessagesReceived: atomic.LoadInt64(&in.MessagesReceived),
		MessagesSent:     atomic.LoadInt64(&in.MessagesSent),
		DroppedByReason:  b.limits.dropCounts(),
		BytesReceived:    atomic.LoadInt64(&in.BytesReceived),
		BytesSent:        atomic.LoadInt64(&in.BytesSent),
		PacketsReceived:  atomic.LoadInt64(&in.PacketsReceived),
		PacketsSent:      atomic.LoadInt64(&in.PacketsSent),
		Backpressure: BackpressureStats{
			Waits:        b.mq.Flow.Waits.Load(),
			WaitSeconds:  time.Duration(b.mq.Flow.WaitNanos.Load()).Seconds(),
			Stalls:       b.mq.Flow.Stalls.Load(),
			StalledSkips: b.mq.Flow.StalledSkips.Load(),

			ReceiveQuotaWaits: b.mq.Flow.QuotaWaits.Load(),
		},
		Memory: MemoryStats{
			QueuedBytes:         b.mq.Mem.Queued.Load(),
			ReadingBytes:        b.mq.Mem.Reading.Load(),
			ReadingConnectBytes: b.mq.Mem.ReadingConnect.Load(),
			ReadRefused:         b.mq.Mem.ReadRefused.Load(),
			ConnectTooLarge:     b.mq.Mem.ConnectTooLarge.Load(),
		},
		HeapBytes:  m.HeapInuse,
		Goroutines: runtime.NumGoroutine(),
	}
	if b.cluster != nil && b.started.Load() {
		s.Cluster = b.cluster.stats()
	}
	if b.devices != nil {
		s.Store = b.devices.stats()
	}
	if b.groups != nil {
		gs := b.groups.Stats()
		s.Groups = &gs
	}
	if b.history != nil {
		hs := b.history.Stats()
		s.History = &hs
	}
	if b.durable != nil {
		s.Durability = b.durable.stats()
	}
	s.MessagesDropped = maps.Clone(s.DroppedByReason[dropReasonNames[dropQueueFull]])
	for _, r := range []dropReason{dropSessionFull, dropPacketIDs} {
		for _, n := range s.DroppedByReason[dropReasonNames[r]] {
			s.InflightDropped += n
		}
	}
	return s
}
