// Package cluster is rtm's membership layer: every rtm process (broker,
// router, push API, watchdog) is a member of one Serf gossip cluster, tagged
// with its role, its public addresses and its load, so that roles discover
// each other with nothing configured but the seed addresses to join.
//
// A Node is created by New (no I/O), started by Start (binds the gossip port
// and begins joining the seeds, retrying with backoff in the background),
// and stopped by Leave then Shutdown. Its methods are safe for concurrent
// use. Events are delivered on channels from Subscribe; a subscriber that
// falls behind loses events (counted and logged) but can always read the
// current view with Members.
package cluster

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/serf/serf"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/lifecycle"
)

// ErrNameClash reports that another member already uses this node's name.
var ErrNameClash = errors.New("cluster: node name already in use")

// Timing selects gossip timers.
type Timing int

const (
	// TimingLAN is memberlist's LAN profile: a failed member is declared
	// dead within about 5 seconds on a small cluster.
	TimingLAN Timing = iota
	// TimingFast shrinks every timer for tests on loopback: failure is
	// detected within about 1.5 seconds.
	TimingFast
)

// Options configure a Node.
type Options struct {
	// NodeName is the member's unique name. Required.
	NodeName string
	// BindAddr is the gossip listen address, host:port; port 0 picks a free
	// port. "" means "0.0.0.0:7946".
	BindAddr string
	// AdvertiseAddr is the address other members reach this one at; "" lets
	// memberlist choose (the bind address, or a private IP when binding to
	// all interfaces).
	AdvertiseAddr string
	// Join lists seed addresses (host:port). Empty starts a new cluster.
	Join []string
	// Secret, when set, encrypts and authenticates gossip: only members
	// with the same secret can join or be heard. Its SHA-256 is the AES key.
	Secret string
	Tags   Tags
	Timing Timing
	// ProbeInterval, when set, replaces the LAN profile's failure-detection
	// probe interval (1 s); the time to declare a dead member failed scales
	// with it (about 4 intervals of suspicion after a missed probe).
	ProbeInterval time.Duration
	// JoinMaxWait bounds the backoff between join attempts; 0 means 30s.
	JoinMaxWait time.Duration
	Logger      *slog.Logger // nil discards
}

// Status of a member as gossip knows it.
type Status string

// Member statuses.
const (
	StatusAlive   Status = "alive"
	StatusLeaving Status = "leaving"
	StatusLeft    Status = "left"
	StatusFailed  Status = "failed"
)

// Member is one process of the cluster.
type Member struct {
	Name   string
	Addr   string // gossip host:port
	Status Status
	Tags   Tags
}

// EventType says what happened to a member.
type EventType string

// Event types.
const (
	EventJoin   EventType = "join"
	EventLeave  EventType = "leave"
	EventFail   EventType = "fail"
	EventUpdate EventType = "update"
	EventReap   EventType = "reap"
)

// Event is a change of one member.
type Event struct {
	Type   EventType
	Member Member
}

// Node is this process's membership in the cluster.
type Node struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	serf    *serf.Serf
	tags    Tags
	subs    map[chan Event]struct{}
	dropped int64
	clash   error         // set by mergeGuard when a join met a member of our name
	joined  chan struct{} // closed after the first successful join (or at once without seeds)
	// localAddr and localPort are this member's gossip address, cached at
	// Start for mergeGuard.
	localAddr net.IP
	localPort uint16

	// fault is set when the member stops working while running: its
	// background join found its name taken, or Serf shut down on its own.
	fault lifecycle.Fault

	events   chan serf.Event
	stop     chan struct{}
	wg       sync.WaitGroup
	stopOnce sync.Once
	leaves   sync.WaitGroup // goroutines of Leave, which may outlive its caller
	tagsMu   sync.Mutex     // serialises SetTags
}

// New checks opts; it binds nothing.
func New(opts Options) (*Node, error) {
	if opts.NodeName == "" {
		return nil, errors.New("cluster: node name is required")
	}
	if opts.BindAddr == "" {
		opts.BindAddr = "0.0.0.0:7946"
	}
	if _, _, err := net.SplitHostPort(opts.BindAddr); err != nil {
		return nil, fmt.Errorf("cluster: gossip address %q: %w", opts.BindAddr, err)
	}
	if opts.JoinMaxWait == 0 {
		opts.JoinMaxWait = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Node{
		opts:   opts,
		log:    opts.Logger.With("component", "cluster", "node", opts.NodeName),
		tags:   opts.Tags,
		subs:   map[chan Event]struct{}{},
		joined: make(chan struct{}),
		events: make(chan serf.Event, 1024),
		stop:   make(chan struct{}),
	}, nil
}

// Start binds the gossip port and starts joining the seeds. It returns
// ErrNameClash if the first seed that answers knows another member by this
// node's name; other join failures are retried in the background with
// backoff, so members may start in any order.
func (n *Node) Start(ctx context.Context) error {
	conf := serf.DefaultConfig()
	conf.NodeName = n.opts.NodeName
	conf.Tags = n.tags.Encode()
	conf.EventCh = n.events
	conf.Merge = &mergeGuard{n: n}
	conf.Logger = log.New(io.Discard, "", 0)
	conf.EnableNameConflictResolution = false
	ml := memberlist.DefaultLANConfig()
	if n.opts.Timing == TimingFast {
		// Fast, but not so fast that a test process starved by -race on
		// a loaded 2-core machine declares its own live members failed: a
		// 50 ms probe timeout did (a broker dropped out of a push API test).
		ml = memberlist.DefaultLocalConfig()
		ml.ProbeInterval = 250 * time.Millisecond
		ml.ProbeTimeout = 200 * time.Millisecond
		ml.GossipInterval = 20 * time.Millisecond
		ml.PushPullInterval = time.Second
		ml.SuspicionMult = 3
		ml.TCPTimeout = time.Second
		conf.ReapInterval = time.Second
		conf.ReconnectInterval = 200 * time.Millisecond
		conf.ReconnectTimeout = 10 * time.Second
		conf.TombstoneTimeout = 10 * time.Second
		conf.LeavePropagateDelay = 100 * time.Millisecond
	}
	if p := n.opts.ProbeInterval; p > 0 && n.opts.Timing != TimingFast {
		ml.ProbeInterval = p
		ml.ProbeTimeout = p / 2
		ml.GossipInterval = min(ml.GossipInterval, p/5)
	}
	host, port, _ := net.SplitHostPort(n.opts.BindAddr)
	p, err := strconv.Atoi(port)
	if err != nil {
		return fmt.Errorf("cluster: gossip port %q: %w", port, err)
	}
	ml.Name = n.opts.NodeName
	ml.BindAddr, ml.BindPort = host, p
	ml.AdvertisePort = p
	if n.opts.AdvertiseAddr != "" {
		ah, ap, err := net.SplitHostPort(n.opts.AdvertiseAddr)
		if err != nil {
			return fmt.Errorf("cluster: advertise address %q: %w", n.opts.AdvertiseAddr, err)
		}
		ml.AdvertiseAddr = ah
		if ml.AdvertisePort, err = strconv.Atoi(ap); err != nil {
			return fmt.Errorf("cluster: advertise port %q: %w", ap, err)
		}
	}
	if n.opts.Secret != "" {
		key := sha256.Sum256([]byte(n.opts.Secret))
		ml.SecretKey = key[:]
	}
	ml.LogOutput = io.Discard
	conf.MemberlistConfig = ml

	s, err := serf.Create(conf)
	if err != nil {
		// memberlist's bind errors are formatted, not wrapped; binding the
		// gossip address is what fails here in practice.
		return &config.ListenError{Key: "cluster.gossip_addr", Addr: n.opts.BindAddr, Err: err}
	}
	local := s.Memberlist().LocalNode()
	n.mu.Lock()
	n.serf = s
	n.localAddr, n.localPort = local.Addr, local.Port
	n.mu.Unlock()

	n.wg.Add(2)
	go n.dispatch()
	go func() {
		defer n.wg.Done()
		select {
		case <-s.ShutdownCh():
			select {
			case <-n.stop:
			default:
				n.fault.Fail(errors.New("cluster: gossip shut down unexpectedly"))
			}
		case <-n.stop:
		}
	}()

	if len(n.opts.Join) == 0 {
		close(n.joined)
		n.log.Info("gossip started, new cluster", "addr", n.Addr())
		return nil
	}
	// A clash is detected on the first contact; everything else (seed not
	// up yet, network) is worth retrying.
	_, err = s.Join(n.opts.Join, true)
	n.mu.Lock()
	clash := n.clash
	n.mu.Unlock()
	switch {
	case clash != nil:
		_ = n.Shutdown()
		return clash
	case err == nil:
		close(n.joined)
		n.log.Info("joined cluster", "addr", n.Addr(), "seeds", n.opts.Join, "members", len(s.Members()))
		return nil
	default:
		n.log.Warn("seeds not reachable yet, retrying in the background", "seeds", n.opts.Join, "error", err)
	}
	n.wg.Add(1)
	go n.joinLoop()
	return nil
}

func (n *Node) joinLoop() {
	defer n.wg.Done()
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 200 * time.Millisecond
	b.MaxInterval = n.opts.JoinMaxWait
	for {
		select {
		case <-n.stop:
			return
		case <-time.After(b.NextBackOff()):
		}
		_, err := n.serf.Join(n.opts.Join, true)
		n.mu.Lock()
		clash := n.clash
		n.mu.Unlock()
		if clash != nil {
			n.log.Error("not joining: node name in use", "error", clash)
			n.fault.Fail(clash)
			return
		}
		if err != nil {
			n.log.Warn("join failed, will retry", "seeds", n.opts.Join, "error", err)
			continue
		}
		close(n.joined)
		n.log.Info("joined cluster", "seeds", n.opts.Join, "members", len(n.serf.Members()))
		return
	}
}

// Done is closed when the member stopped working on its own: a join in the
// background found its name in use, or gossip shut down without Shutdown.
// Err says why.
func (n *Node) Done() <-chan struct{} { return n.fault.Done() }

// Err is the reason Done was closed, or nil.
func (n *Node) Err() error { return n.fault.Err() }

// Joined is closed once the node has joined its seeds (at once without).
func (n *Node) Joined() <-chan struct{} { return n.joined }

// Addr returns the gossip address the node advertises. It is the one
// cached at Start: memberlist's LocalNode returns its live record, which
// it rewrites (without a lock the caller could take) on every tag update.
func (n *Node) Addr() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return net.JoinHostPort(n.localAddr.String(), strconv.Itoa(int(n.localPort)))
}

// Name returns the node's name.
func (n *Node) Name() string { return n.opts.NodeName }

// Members returns every member this node knows of, itself included, with
// members that left or failed until Serf reaps them.
func (n *Node) Members() []Member {
	var out []Member
	for _, m := range n.serf.Members() {
		out = append(out, n.member(m))
	}
	return out
}

// Suspected reports whether gossip suspects member name (a probe went
// unanswered and the suspicion is not refuted yet) or holds it dead or
// gone. Serf shows a suspected member as alive until it is declared
// failed; callers that wait for a member's answer use this to stop waiting
// sooner.
func (n *Node) Suspected(name string) bool {
	for _, m := range n.serf.Memberlist().Members() {
		if m.Name == name {
			return m.State != memberlist.StateAlive
		}
	}
	return true
}

func (n *Node) member(m serf.Member) Member {
	t, err := DecodeTags(m.Tags)
	if err != nil {
		n.log.Warn("bad tags from member", "member", m.Name, "error", err)
	}
	return Member{Name: m.Name, Addr: net.JoinHostPort(m.Addr.String(), strconv.Itoa(int(m.Port))), Status: status(m.Status), Tags: t}
}

func status(s serf.MemberStatus) Status {
	switch s {
	case serf.StatusAlive:
		return StatusAlive
	case serf.StatusLeaving:
		return StatusLeaving
	case serf.StatusLeft:
		return StatusLeft
	default:
		return StatusFailed
	}
}

// SetTags replaces the node's tags and gossips them.
func (n *Node) SetTags(t Tags) error {
	// serf.SetTags writes its config unguarded: one caller at a time, and
	// the tags gossiped last are the ones recorded last.
	n.tagsMu.Lock()
	defer n.tagsMu.Unlock()
	n.mu.Lock()
	n.tags = t
	n.mu.Unlock()
	return n.serf.SetTags(t.Encode())
}

// Subscribe returns a channel of member events with room for buf of them,
// and a function that ends the subscription. Events for a subscriber whose
// channel is full are dropped, counted and logged: read Members to resync.
func (n *Node) Subscribe(buf int) (<-chan Event, func()) {
	ch := make(chan Event, buf)
	n.mu.Lock()
	n.subs[ch] = struct{}{}
	n.mu.Unlock()
	return ch, func() {
		n.mu.Lock()
		delete(n.subs, ch)
		n.mu.Unlock()
	}
}

// dispatch drains Serf's event channel, which must never block (Serf stalls
// gossip otherwise), and fans member events out to subscribers.
func (n *Node) dispatch() {
	defer n.wg.Done()
	for {
		select {
		case <-n.stop:
			return
		case e := <-n.events:
			me, ok := e.(serf.MemberEvent)
			if !ok {
				continue
			}
			var t EventType
			switch me.Type {
			case serf.EventMemberJoin:
				t = EventJoin
			case serf.EventMemberLeave:
				t = EventLeave
			case serf.EventMemberFailed:
				t = EventFail
			case serf.EventMemberUpdate:
				t = EventUpdate
			case serf.EventMemberReap:
				t = EventReap
			default:
				continue
			}
			for _, m := range me.Members {
				ev := Event{Type: t, Member: n.member(m)}
				n.log.Debug("member event", "event", t, "member", m.Name, "status", ev.Member.Status)
				n.mu.Lock()
				for ch := range n.subs {
					select {
					case ch <- ev:
					default:
						n.dropped++
						n.log.Warn("member event dropped: subscriber behind", "event", t, "member", m.Name)
					}
				}
				n.mu.Unlock()
			}
		}
	}
}

// Leave tells the cluster this node is going, and waits (bounded by ctx)
// until the message has propagated, so peers see "left", not "failed".
func (n *Node) Leave(ctx context.Context) error {
	done := make(chan error, 1)
	n.leaves.Add(1)
	go func() {
		defer n.leaves.Done()
		// A caller that gave up on the leave may shut the node down while
		// serf is still broadcasting it; memberlist then panics ("leave
		// after shutdown") when serf goes on to its own leave. The node is
		// gone either way: report it as the leave's failure.
		defer func() {
			if r := recover(); r != nil {
				done <- fmt.Errorf("gossip leave interrupted by shutdown: %v", r)
			}
		}()
		done <- n.serf.Leave()
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Shutdown stops gossip without telling anyone (peers will see the node
// fail); call Leave first for a graceful exit. It is idempotent.
func (n *Node) Shutdown() error {
	var err error
	n.stopOnce.Do(func() {
		close(n.stop)
		n.mu.Lock()
		s := n.serf
		n.mu.Unlock()
		if s != nil {
			err = s.Shutdown()
		}
		n.wg.Wait()
	})
	return err
}

// mergeGuard refuses to merge with a cluster that already has a member of
// this node's name at another address.
type mergeGuard struct{ n *Node }

func (g *mergeGuard) NotifyMerge(members []*serf.Member) error {
	// memberlist calls this with its state locked: use the address cached
	// at Start, never memberlist's accessors.
	g.n.mu.Lock()
	defer g.n.mu.Unlock()
	if g.n.localAddr == nil {
		return nil
	}
	for _, m := range members {
		if m.Name == g.n.opts.NodeName && (!m.Addr.Equal(g.n.localAddr) || m.Port != g.n.localPort) {
			g.n.clash = fmt.Errorf("%w: %q is %s:%d in the cluster, this node is %s:%d",
				ErrNameClash, m.Name, m.Addr, m.Port, g.n.localAddr, g.n.localPort)
			return g.n.clash
		}
	}
	return nil
}

var _ serf.MergeDelegate = (*mergeGuard)(nil)
