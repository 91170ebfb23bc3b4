package router

import (
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/obs"
)

// fakeSource is a member list the test changes, with a clock it moves.
type fakeSource struct {
	members []cluster.Member
	now     time.Time
}

func newTestView(staleAfter time.Duration) (*view, *fakeSource) {
	src := &fakeSource{now: time.Unix(1_000_000, 0)}
	v := newView(staleAfter, obs.Discard())
	v.now = func() time.Time { return src.now }
	v.setSource(func() []cluster.Member { return append([]cluster.Member(nil), src.members...) })
	return v, src
}

func brokerMember(name string, conns, capacity int, loadAt int64) cluster.Member {
	return cluster.Member{Name: name, Status: cluster.StatusAlive, Tags: cluster.Tags{
		Role: cluster.RoleBroker, MQTT: name + ":1883", Capacity: capacity, Connections: conns, LoadAt: loadAt}}
}

func TestViewCountsAssignmentsUntilTheNextReport(t *testing.T) {
	v, src := newTestView(time.Minute)
	src.members = []cluster.Member{
		brokerMember("a", 10, 100, 1),
		brokerMember("b", 12, 100, 1),
		{Name: "r", Status: cluster.StatusAlive, Tags: cluster.Tags{Role: cluster.RoleRouter}},
	}
	// a is at 10, b at 12: a gets two, then they tie at 12.
	for i := range 2 {
		if m, _ := v.pick(cluster.TransportTCP); m.Name != "a" {
			t.Fatalf("pick %d = %s, want a", i, m.Name)
		}
	}
	if got := v.brokers["a"].assigned(); got != 2 {
		t.Fatalf("a assigned %d, want 2", got)
	}

	// A tag change that is not a load report keeps the count.
	src.members[0].Tags.Version = "2"
	v.sync()
	if got := v.brokers["a"].assigned(); got != 2 {
		t.Errorf("after a version change: a assigned %d, want 2", got)
	}
	// A report within connectGrace of the answers keeps them: those
	// devices may not have connected yet.
	src.now = src.now.Add(time.Second)
	src.members[0].Tags.LoadAt = 2
	v.sync()
	if st := v.brokers["a"]; st.assigned() != 2 || !st.changedAt.Equal(src.now) {
		t.Errorf("report 1 s after: a assigned %d changed %v, want 2 at %v", st.assigned(), st.changedAt, src.now)
	}
	// A later one forgets them: they are in its connections, or gone.
	src.now = src.now.Add(2 * time.Second)
	src.members[0].Tags.LoadAt = 3
	v.sync()
	if got := v.brokers["a"].assigned(); got != 0 {
		t.Errorf("report 3 s after: a assigned %d, want 0", got)
	}
	// So does a report with other connections, for answers that old.
	v.pick(cluster.TransportTCP)
	src.now = src.now.Add(3 * time.Second)
	src.members[0].Tags.Connections = 11
	v.sync()
	if got := v.brokers["a"].assigned(); got != 0 {
		t.Errorf("after a connections change: a assigned %d, want 0", got)
	}
	if _, ok := v.brokers["r"]; ok {
		t.Error("the router itself is in the view of brokers")
	}
}

func TestViewPicksStaleOnlyWithoutFresh(t *testing.T) {
	v, src := newTestView(10 * time.Second)
	src.members = []cluster.Member{brokerMember("busy", 50, 100, 1), brokerMember("quiet", 0, 100, 1)}
	if m, _ := v.pick(cluster.TransportTCP); m.Name != "quiet" {
		t.Fatalf("both fresh: pick = %s, want quiet", m.Name)
	}
	// busy keeps reporting, quiet falls silent.
	for i := range 11 {
		src.now = src.now.Add(time.Second)
		src.members[0].Tags.LoadAt = int64(i + 2)
		v.sync()
	}
	if m, _ := v.pick(cluster.TransportTCP); m.Name != "busy" {
		t.Fatalf("quiet stale: pick = %s, want busy", m.Name)
	}
	if n := v.nodes(); !n[1].Stale || n[0].Stale || n[1].LoadAge != 11 {
		t.Errorf("nodes = %+v, want quiet stale for 11s, busy fresh", n)
	}
	src.members[0].Tags.Draining = true
	if m, _ := v.pick(cluster.TransportTCP); m.Name != "quiet" {
		t.Fatalf("only quiet eligible: pick = %s, want quiet", m.Name)
	}
}

func TestViewForgetsReapedBrokers(t *testing.T) {
	v, src := newTestView(time.Minute)
	var forgotten []string
	v.forget = func(name string) { forgotten = append(forgotten, name) }
	src.members = []cluster.Member{brokerMember("a", 0, 100, 1), brokerMember("b", 0, 100, 1)}
	v.sync()
	src.members[1].Status = cluster.StatusFailed
	if n := v.nodes(); len(n) != 2 || n[1].Status != "failed" {
		t.Fatalf("nodes = %+v, want a alive, b failed", n)
	}
	for range 10 {
		if m, _ := v.pick(cluster.TransportTCP); m.Name != "a" {
			t.Fatalf("pick = %s, want a (b failed)", m.Name)
		}
	}
	src.members = src.members[:1]
	if n := v.nodes(); len(n) != 1 || len(forgotten) != 1 || forgotten[0] != "b" {
		t.Errorf("after b was reaped: nodes %+v, forgotten %v", n, forgotten)
	}
}
