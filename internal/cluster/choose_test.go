package cluster_test

import (
	"testing"

	"github.com/rtm-dev/rtm/internal/cluster"
)

func broker(name string, conns, capacity int, mutate func(*cluster.Member)) cluster.Member {
	m := cluster.Member{Name: name, Status: cluster.StatusAlive, Tags: cluster.Tags{
		Role: cluster.RoleBroker, MQTT: name + ":1883", WS: name + ":8083", Connections: conns, Capacity: capacity}}
	if mutate != nil {
		mutate(&m)
	}
	return m
}

func TestPickLeastLoadedEligible(t *testing.T) {
	members := []cluster.Member{
		broker("busy", 50, 100, nil),
		broker("big", 60, 1000, nil), // 6 %: least loaded relative to capacity
		broker("failed", 0, 100, func(m *cluster.Member) { m.Status = cluster.StatusFailed }),
		broker("leaving", 0, 100, func(m *cluster.Member) { m.Status = cluster.StatusLeaving }),
		broker("draining", 0, 100, func(m *cluster.Member) { m.Tags.Draining = true }),
		broker("nows", 10, 100, func(m *cluster.Member) { m.Tags.WS = "" }),
		{Name: "router", Status: cluster.StatusAlive, Tags: cluster.Tags{Role: cluster.RoleRouter}},
	}
	if m, ok := cluster.Pick(members, cluster.TransportTCP, cluster.PickOptions{}); !ok || m.Name != "big" {
		t.Errorf("tcp: picked %q, want big", m.Name)
	}
	if m, _ := cluster.Pick(members, cluster.TransportTCP, cluster.PickOptions{Exclude: "big"}); m.Name != "nows" {
		t.Errorf("tcp excluding big: picked %q, want nows", m.Name)
	}
	if m, _ := cluster.Pick(members, cluster.TransportWS, cluster.PickOptions{Exclude: "big"}); m.Name != "busy" {
		t.Errorf("ws excluding big: picked %q, want busy (nows has no WebSocket)", m.Name)
	}
	if _, ok := cluster.Pick(members, cluster.TransportTLS, cluster.PickOptions{}); ok {
		t.Error("tls: picked a broker although none offers TLS")
	}
	// Extra load moves the choice; stale figures are used last; full is never picked.
	extra := func(name string) int {
		if name == "big" {
			return 900
		}
		return 0
	}
	if m, _ := cluster.Pick(members, cluster.TransportTCP, cluster.PickOptions{Extra: extra}); m.Name != "nows" {
		t.Errorf("with extra load on big: picked %q, want nows", m.Name)
	}
	stale := func(name string) bool { return name != "busy" }
	if m, _ := cluster.Pick(members, cluster.TransportTCP, cluster.PickOptions{Stale: stale}); m.Name != "busy" {
		t.Errorf("with stale figures: picked %q, want busy (the only fresh one)", m.Name)
	}
	full := []cluster.Member{broker("full", 100, 100, nil)}
	if _, ok := cluster.Pick(full, cluster.TransportTCP, cluster.PickOptions{}); ok {
		t.Error("picked a broker at capacity")
	}
}

func TestPickSpreadsTies(t *testing.T) {
	members := []cluster.Member{broker("a", 0, 100, nil), broker("b", 0, 100, nil), broker("c", 0, 100, nil)}
	got := map[string]int{}
	for range 3000 {
		m, _ := cluster.Pick(members, cluster.TransportTCP, cluster.PickOptions{})
		got[m.Name]++
	}
	for _, n := range []string{"a", "b", "c"} {
		if got[n] < 800 || got[n] > 1200 {
			t.Errorf("ties: %v, want each near 1000", got)
		}
	}
}
