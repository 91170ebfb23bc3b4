package watchdog

import (
	"fmt"
	"slices"
	"time"

	"github.com/rtm-dev/rtm/internal/config"
)

// Rule names, as in the configuration (watchdog.rules.<name>) and in alerts.
const (
	RuleNodeDown       = "node_down"
	RuleNodeNotReady   = "node_not_ready"
	RuleClusterSize    = "cluster_size_below"
	RuleCapacityPct    = "connections_over_capacity_pct"
	RuleMemory         = "memory_over_bytes"
	RuleDroppedRate    = "dropped_messages_rate"
	RuleLinkDown       = "link_down"
	RuleLinkQueue      = "link_queue_over_bytes"
	RuleStore          = "store_unreachable"
	RuleHistoryBacklog = "history_backlog_over"
	RuleLoadImbalance  = "load_imbalance"
)

// rule is one configured rule.
type rule struct {
	name      string
	threshold float64
	dur       time.Duration
	severity  string
	action    string // "" or "drain"
	nodes     []string
}

func (r rule) appliesTo(node string) bool { return len(r.nodes) == 0 || slices.Contains(r.nodes, node) }

// rulesFrom reads the enabled rules of the configuration.
func rulesFrom(c config.WatchdogRules) map[string]rule {
	all := map[string]config.Rule{
		RuleNodeDown: c.NodeDown, RuleNodeNotReady: c.NodeNotReady, RuleClusterSize: c.ClusterSize,
		RuleCapacityPct: c.CapacityPct, RuleMemory: c.Memory, RuleDroppedRate: c.DroppedRate,
		RuleLinkDown: c.LinkDown, RuleLinkQueue: c.LinkQueue, RuleStore: c.Store,
		RuleHistoryBacklog: c.HistoryBacklog, RuleLoadImbalance: c.LoadImbalance,
	}
	out := map[string]rule{}
	for name, r := range all {
		if r.Severity == "off" || r.Severity == "" {
			continue
		}
		action := r.Action
		if action == "none" {
			action = ""
		}
		out[name] = rule{name: name, threshold: float64(r.Threshold), dur: r.For, severity: r.Severity, action: action, nodes: r.NodeList()}
	}
	return out
}

// condition is one rule evaluated for one node ("" for the cluster).
type condition struct {
	rule    rule
	node    string
	active  bool
	value   float64
	message string
}

func (c condition) key() string { return c.rule.name + "/" + c.node }

// view is what the rules are evaluated on.
type nodeView struct {
	name     string
	status   string // alive, failed, left
	polled   bool   // stats are from a poll that succeeded this round
	stats    NodeStats
	draining bool
}

// evaluate applies every rule to the nodes. A condition that cannot be
// evaluated (no fresh stats) is left out, so its alert keeps its state.
func evaluate(rules map[string]rule, nodes []nodeView, imbalanceMin int) []condition {
	var out []condition
	alive := 0
	for _, n := range nodes {
		if n.status == "alive" {
			alive++
		}
	}
	peerAlive := map[string]bool{}
	for _, n := range nodes {
		peerAlive[n.name] = n.status == "alive"
	}
	for _, n := range nodes {
		if n.status == "left" {
			continue // a graceful leave is no alert, and resolves the node's
		}
		if r, ok := rules[RuleNodeDown]; ok && r.appliesTo(n.name) {
			down := n.status == "failed"
			out = append(out, condition{rule: r, node: n.name, active: down, value: b2f(down),
				message: fmt.Sprintf("broker %s is %s in gossip", n.name, n.status)})
		}
		if n.status != "alive" || !n.polled {
			continue
		}
		s := n.stats
		add := func(name string, active func(r rule) bool, value float64, msg func(r rule) string) {
			r, ok := rules[name]
			if !ok || !r.appliesTo(n.name) {
				return
			}
			out = append(out, condition{rule: r, node: n.name, active: active(r), value: value, message: msg(r)})
		}
		add(RuleNodeNotReady, func(rule) bool { return !s.Ready }, b2f(!s.Ready),
			func(rule) string { return fmt.Sprintf("broker %s answers but is not ready", n.name) })
		pct := 0.0
		if s.Capacity > 0 {
			pct = 100 * float64(s.Connections) / float64(s.Capacity)
		}
		add(RuleCapacityPct, func(r rule) bool { return pct > r.threshold }, pct,
			func(r rule) string {
				return fmt.Sprintf("broker %s holds %d connections, %.0f%% of its capacity %d (threshold %.0f%%)", n.name, s.Connections, pct, s.Capacity, r.threshold)
			})
		add(RuleMemory, func(r rule) bool { return float64(s.MemoryBytes) > r.threshold }, float64(s.MemoryBytes),
			func(r rule) string {
				return fmt.Sprintf("broker %s uses %d bytes of heap (threshold %.0f)", n.name, s.MemoryBytes, r.threshold)
			})
		add(RuleDroppedRate, func(r rule) bool { return s.DroppedRate > r.threshold }, s.DroppedRate,
			func(r rule) string {
				return fmt.Sprintf("broker %s drops %.1f messages/s (threshold %.0f/s)", n.name, s.DroppedRate, r.threshold)
			})
		down, maxQueue := 0, int64(0)
		for _, l := range s.Links {
			if l.State != "up" && peerAlive[l.Peer] {
				down++
			}
			maxQueue = max(maxQueue, l.QueuedBytes)
		}
		add(RuleLinkDown, func(rule) bool { return down > 0 }, float64(down),
			func(rule) string {
				return fmt.Sprintf("broker %s has %d node link(s) down to live peers", n.name, down)
			})
		add(RuleLinkQueue, func(r rule) bool { return float64(maxQueue) > r.threshold }, float64(maxQueue),
			func(r rule) string {
				return fmt.Sprintf("broker %s holds %d bytes for a peer link (threshold %.0f)", n.name, maxQueue, r.threshold)
			})
		if s.hasStore {
			add(RuleStore, func(rule) bool { return !s.StoreUp }, b2f(!s.StoreUp),
				func(rule) string { return fmt.Sprintf("broker %s cannot reach the store", n.name) })
		}
		if s.hasHistory {
			// The spool, not the memory queue: memory (history.queue_len,
			// 100,000 by default) absorbs a burst by design; history is
			// behind once the backlog left it, the store down or slower
			// than the publishers.
			add(RuleHistoryBacklog, func(r rule) bool { return float64(s.HistorySpooled) > r.threshold }, float64(s.HistorySpooled),
				func(r rule) string {
					return fmt.Sprintf("broker %s has %d history messages in its spool, %d waiting in all: the store does not keep up (threshold %.0f)",
						n.name, s.HistorySpooled, s.HistoryQueue, r.threshold)
				})
		}
	}
	if r, ok := rules[RuleClusterSize]; ok {
		out = append(out, condition{rule: r, active: float64(alive) < r.threshold, value: float64(alive),
			message: fmt.Sprintf("%d broker(s) alive, fewer than %.0f", alive, r.threshold)})
	}
	if r, ok := rules[RuleLoadImbalance]; ok {
		var busy, idle *nodeView
		for i := range nodes {
			n := &nodes[i]
			if n.status != "alive" || !n.polled || n.draining || !r.appliesTo(n.name) {
				continue
			}
			if busy == nil || n.stats.Connections > busy.stats.Connections {
				busy = n
			}
			if idle == nil || n.stats.Connections < idle.stats.Connections {
				idle = n
			}
		}
		if busy != nil && idle != nil && busy != idle {
			ratio := float64(busy.stats.Connections) / float64(max(idle.stats.Connections, 1))
			active := busy.stats.Connections >= int64(imbalanceMin) && ratio > r.threshold
			out = append(out, condition{rule: r, active: active, value: ratio,
				message: fmt.Sprintf("busiest broker %s holds %d connections, %.1f× the idlest %s (%d)", busy.name, busy.stats.Connections, ratio, idle.name, idle.stats.Connections)})
		} else {
			out = append(out, condition{rule: r, active: false})
		}
	}
	return out
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
