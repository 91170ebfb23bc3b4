package router

import (
	"log/slog"
	"math"
	"sort"
	"sync"
	"time"

	"github.com/rtm-dev/rtm/internal/cluster"
)

// brokerState is one broker as the router sees it.
type brokerState struct {
	member cluster.Member
	// changedAt is the local time the broker's load figure (Tags.Connections
	// or Tags.LoadAt) last changed, or when the router first saw it. Local
	// time, so clock skew between machines does not matter.
	changedAt time.Time
	// recent counts the route answers that named this broker, by time
	// bucket: devices that may not be in its reported connections yet.
	// A load report forgets the answers given more than connectGrace
	// before it (those devices have connected, or will not), and keeps
	// the later ones, which a burst straddling the report would otherwise
	// forget and pile onto this broker again.
	recent []bucket
	gen    uint64 // the sync that last saw it in the member list
}

// bucket counts assignments made within bucketWidth after at.
type bucket struct {
	at time.Time
	n  int
}

const (
	// connectGrace is how long after its route answer a device is assumed
	// to be connected, and so counted in the broker's own report.
	connectGrace = 2 * time.Second
	bucketWidth  = 100 * time.Millisecond
)

// assign counts one route answer naming the broker at now.
func (st *brokerState) assign(now time.Time) {
	if k := len(st.recent); k > 0 && now.Sub(st.recent[k-1].at) < bucketWidth {
		st.recent[k-1].n++
		return
	}
	st.recent = append(st.recent, bucket{at: now, n: 1})
}

// reported forgets the answers older than connectGrace at a load report
// received at now.
func (st *brokerState) reported(now time.Time) {
	i := 0
	for i < len(st.recent) && now.Sub(st.recent[i].at) > connectGrace {
		i++
	}
	st.recent = append(st.recent[:0], st.recent[i:]...)
}

// assigned is the number of answers not yet covered by a load report.
func (st *brokerState) assigned() int {
	n := 0
	for _, b := range st.recent {
		n += b.n
	}
	return n
}

// view is the router's picture of the brokers: gossip's member list, plus
// when each broker's load figure last changed and how many devices the router
// sent it since.
//
// Every read first syncs from the member list, under mu, so the view only
// moves forward (a snapshot is never applied after a newer one) and an event
// lost to a slow reader costs nothing: events only make the sync happen
// sooner when nobody is asking. Pick and its assignment happen under the
// same lock, so concurrent requests see each other's assignments.
type view struct {
	staleAfter time.Duration
	log        *slog.Logger
	now        func() time.Time
	forget     func(name string) // called (under mu) when a broker leaves the view

	mu      sync.Mutex
	members func() []cluster.Member // nil until the router has started
	brokers map[string]*brokerState
	gen     uint64
}

func newView(staleAfter time.Duration, log *slog.Logger) *view {
	return &view{staleAfter: staleAfter, log: log, now: time.Now, forget: func(string) {}, brokers: map[string]*brokerState{}}
}

// setSource makes members the source of the view.
func (v *view) setSource(members func() []cluster.Member) {
	v.mu.Lock()
	v.members = members
	v.mu.Unlock()
}

// sync reads the member list into the view.
func (v *view) sync() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.syncLocked()
}

// syncLocked reads the member list into the view and returns it with the
// time it was read.
func (v *view) syncLocked() ([]cluster.Member, time.Time) {
	now := v.now()
	if v.members == nil {
		return nil, now
	}
	ms := v.members()
	v.gen++
	for _, m := range ms {
		if m.Tags.Role != cluster.RoleBroker {
			continue
		}
		st, ok := v.brokers[m.Name]
		if !ok {
			v.brokers[m.Name] = &brokerState{member: m, changedAt: now, gen: v.gen}
			if m.Status == cluster.StatusAlive {
				v.log.Info("broker joined", "broker", m.Name, "mqtt", m.Tags.MQTT, "capacity", m.Tags.Capacity,
					"connections", m.Tags.Connections, "draining", m.Tags.Draining)
			} else {
				v.log.Debug("broker seen", "broker", m.Name, "status", m.Status)
			}
			continue
		}
		st.gen = v.gen
		old := st.member
		st.member = m
		if m.Tags.Connections != old.Tags.Connections || m.Tags.LoadAt != old.Tags.LoadAt {
			st.changedAt = now
			st.reported(now)
		}
		if m.Status != old.Status {
			v.logStatus(m, old.Status)
		}
		if m.Tags.Draining != old.Tags.Draining {
			v.log.Info("broker draining changed", "broker", m.Name, "draining", m.Tags.Draining)
		}
	}
	for name, st := range v.brokers {
		if st.gen != v.gen {
			// Reaped by gossip (or no longer a broker).
			delete(v.brokers, name)
			v.forget(name)
			v.log.Debug("broker forgotten", "broker", name, "status", st.member.Status)
		}
	}
	return ms, now
}

func (v *view) logStatus(m cluster.Member, was cluster.Status) {
	switch m.Status {
	case cluster.StatusAlive:
		v.log.Info("broker joined", "broker", m.Name, "was", was, "mqtt", m.Tags.MQTT, "capacity", m.Tags.Capacity)
	case cluster.StatusLeaving, cluster.StatusLeft:
		if was == cluster.StatusLeaving || was == cluster.StatusLeft {
			v.log.Debug("broker left", "broker", m.Name, "status", m.Status)
			return
		}
		v.log.Info("broker left", "broker", m.Name, "status", m.Status)
	case cluster.StatusFailed:
		v.log.Info("broker failed", "broker", m.Name, "was", was)
	}
}

// pick chooses a broker for a device over transport with cluster.Pick and
// counts the assignment.
func (v *view) pick(transport string) (cluster.Member, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	ms, now := v.syncLocked()
	m, ok := cluster.Pick(ms, transport, cluster.PickOptions{
		Extra: func(name string) int {
			if st := v.brokers[name]; st != nil {
				return st.assigned()
			}
			return 0
		},
		Stale: func(name string) bool {
			st := v.brokers[name]
			return st == nil || now.Sub(st.changedAt) > v.staleAfter
		},
	})
	if ok {
		v.brokers[m.Name].assign(now)
	}
	return m, ok
}

// Node is one broker as a router sees it, served by /v1/nodes.
type Node struct {
	Name     string `json:"name"`
	Status   string `json:"status"` // gossip status: alive, leaving, left or failed
	Draining bool   `json:"draining"`
	Version  string `json:"version,omitempty"`
	// Endpoints maps each transport the broker offers (tcp, ws, tls, wss)
	// to its public host:port.
	Endpoints   map[string]string `json:"endpoints"`
	Connections int               `json:"connections"` // as last reported in gossip
	Capacity    int               `json:"capacity"`
	// Load is the figure the choice compares: (connections + assigned) /
	// capacity, at most 1; 1 when the capacity is unknown.
	Load float64 `json:"load"`
	// Assigned counts route answers naming this broker since its last load
	// report.
	Assigned int `json:"assigned_since_report"`
	// LoadAge is the time in seconds since the load report last changed (or
	// since the router first saw the broker).
	LoadAge float64 `json:"load_age_seconds"`
	// Stale is true when LoadAge exceeds router.load_stale_after: the
	// broker is then picked only when no broker with a fresh figure can be.
	Stale bool `json:"stale"`
}

// nodes returns the brokers of the view, sorted by name.
func (v *view) nodes() []Node {
	v.mu.Lock()
	defer v.mu.Unlock()
	_, now := v.syncLocked()
	out := make([]Node, 0, len(v.brokers))
	for _, st := range v.brokers {
		t := st.member.Tags
		n := Node{
			Name: st.member.Name, Status: string(st.member.Status), Draining: t.Draining, Version: t.Version,
			Endpoints: map[string]string{}, Connections: t.Connections, Capacity: t.Capacity, Load: 1,
			Assigned: st.assigned(),
		}
		for _, tr := range cluster.Transports {
			if e := t.Endpoint(tr); e != "" {
				n.Endpoints[tr] = e
			}
		}
		if t.Capacity > 0 {
			n.Load = min(1, float64(t.Connections+st.assigned())/float64(t.Capacity))
		}
		age := now.Sub(st.changedAt)
		n.LoadAge = math.Round(age.Seconds()*1000) / 1000
		n.Stale = age > v.staleAfter
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
