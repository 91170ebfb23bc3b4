package watchdog

import (
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/config"
)

// history_backlog_over (the default rule) fires on a backlog that left
// memory for the spool, not on one that memory holds: the history queue
// holds 100,000 messages by default so that a burst stays in memory, and
// a backlog of 50,000 there is that burst, not a store that does not keep
// up. Before, the rule fired past 10,000 waiting anywhere.
func TestHistoryBacklogRuleIsAboutTheSpool(t *testing.T) {
	rules := rulesFrom(config.Defaults().Watchdog.Rules)
	r, ok := rules[RuleHistoryBacklog]
	if !ok {
		t.Fatal("history_backlog_over is not a default rule")
	}
	hist := func(queued, spooled int64) nodeView {
		s := convertHistory(map[string]any{"queued": float64(queued), "spool_messages": float64(spooled), "spool_bytes": float64(spooled * 100)})
		return nodeView{name: "b0", status: "alive", polled: true, stats: s}
	}
	for _, c := range []struct {
		queued, spooled int64
		active          bool
	}{
		{50000, 0, false}, // a burst in memory
		{99999, 0, false}, // memory nearly full: still absorbed
		{100000, 1, true}, // the backlog left memory
		{0, 5000, true},   // the store failed: memory moved to the spool
		{0, 0, false},
	} {
		var got *condition
		for _, cd := range evaluate(map[string]rule{RuleHistoryBacklog: r}, []nodeView{hist(c.queued, c.spooled)}, 0) {
			if cd.rule.name == RuleHistoryBacklog {
				got = &cd
			}
		}
		if got == nil {
			t.Fatalf("queued %d, spooled %d: the rule was not evaluated", c.queued, c.spooled)
		}
		if got.active != c.active {
			t.Errorf("queued %d, spooled %d: active %v, want %v (%s)", c.queued, c.spooled, got.active, c.active, got.message)
		}
	}
}

// convertHistory is convert's reading of /v1/stats' history section.
func convertHistory(h map[string]any) NodeStats {
	ns, _ := convert(brokerStats{History: h}, time.Now(), nil)
	return ns
}
