package broker

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rtm-dev/rtm/plugins"
)

// groupChange is POST /v1/groups/changes: the push API tells the broker of
// a membership change it wrote to the store. The broker applies it to its
// membership cache and removes the group subscriptions of the devices that
// lost access, so their sessions stop holding and routing the group's
// messages (every delivery is also checked against the cache, which alone
// stops them receiving).
func (a *adminServer) groupChange(w http.ResponseWriter, r *http.Request) {
	var ch plugins.GroupChange
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 8<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ch); err != nil || ch.Group == "" || strings.ContainsAny(ch.Group, "/+#") {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "bad_request",
			"message": `want {"group": a group ID, "added": [...], "removed": [...], "deleted": bool}`})
		return
	}
	if a.b.groups == nil {
		// Nothing to apply: without a store, group topics are closed to
		// devices here.
		writeJSON(w, http.StatusOK, map[string]any{"applied": false, "node": a.b.cfg.NodeName,
			"reason": "this broker has no store: group topics are closed to devices"})
		return
	}
	a.b.groups.Apply(ch)
	n := 0
	if ch.Deleted {
		for _, cl := range a.b.mq.Clients.GetAll() {
			n += a.b.unsubscribeGroup(cl, ch.Group)
		}
	} else {
		for _, id := range ch.Removed {
			if cl, ok := a.b.mq.Clients.Get(id); ok {
				n += a.b.unsubscribeGroup(cl, ch.Group)
			}
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"group": ch.Group, "applied": true, "unsubscribed": n, "node": a.b.cfg.NodeName})
}

// unsubscribeGroup removes cl's subscriptions to groups/{group} and to
// filters under it; wildcard filters for the group level (groups/+) stay,
// as they cover other groups, and deliver nothing of this one any more.
func (b *Broker) unsubscribeGroup(cl *mqtt.Client, group string) int {
	topic := "groups/" + group
	n := 0
	for filter := range cl.State.Subscriptions.GetAll() {
		f := filter
		if s, shared := strings.CutPrefix(f, "$share/"); shared {
			if _, rest, ok := strings.Cut(s, "/"); ok {
				f = rest
			}
		}
		if (f == topic || strings.HasPrefix(f, topic+"/")) && b.mq.UnsubscribeClientFilter(cl, filter) {
			n++
		}
	}
	return n
}

// mayCoverGroups reports whether a subscription filter can match a group
// topic (groups/...), its shared-subscription prefix aside.
func mayCoverGroups(filter string) bool {
	if s, shared := strings.CutPrefix(filter, "$share/"); shared {
		_, filter, _ = strings.Cut(s, "/")
	}
	first, _, _ := strings.Cut(filter, "/")
	return first == "groups" || first == "+" || first == "#"
}

// refreshGroups re-reads the cached memberships every interval, the safety
// net for a change notice the broker missed.
func (b *Broker) refreshGroups(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, every)
		err := b.groups.Refresh(rctx, func(id string) bool {
			_, ok := b.mq.Clients.Get(id)
			return ok
		})
		cancel()
		if err != nil && ctx.Err() == nil {
			b.log.Warn("group memberships not refreshed", "error", err)
		}
	}
}

var (
	descGroupDevices = prometheus.NewDesc("rtm_broker_group_cache_devices", "Devices whose group memberships this broker caches (those that used a group topic here and still have a session).", nil, nil)
	descGroupReads   = prometheus.NewDesc("rtm_broker_group_membership_reads_total", "Store reads of group memberships: one per device first asked about, one per refresh.", nil, nil)
	descGroupErrors  = prometheus.NewDesc("rtm_broker_group_membership_read_errors_total", "Store reads of group memberships that failed.", nil, nil)
	descGroupDenied  = prometheus.NewDesc("rtm_broker_group_denied_unread_total", "Group topic checks refused because the device's memberships could not be read (store down at its first use of a group topic on this broker).", nil, nil)
	descGroupNotices = prometheus.NewDesc("rtm_broker_group_change_notices_total", "Group membership changes the push API told this broker of.", nil, nil)
)

// groupsCollector exports the membership cache's counters at scrape time.
type groupsCollector struct{ c *plugins.GroupCache }

func (g groupsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descGroupDevices, descGroupReads, descGroupErrors, descGroupDenied, descGroupNotices} {
		ch <- d
	}
}

func (g groupsCollector) Collect(ch chan<- prometheus.Metric) {
	s := g.c.Stats()
	ch <- prometheus.MustNewConstMetric(descGroupDevices, prometheus.GaugeValue, float64(s.Devices))
	ch <- prometheus.MustNewConstMetric(descGroupReads, prometheus.CounterValue, float64(s.Loads))
	ch <- prometheus.MustNewConstMetric(descGroupErrors, prometheus.CounterValue, float64(s.LoadErrors))
	ch <- prometheus.MustNewConstMetric(descGroupDenied, prometheus.CounterValue, float64(s.Denied))
	ch <- prometheus.MustNewConstMetric(descGroupNotices, prometheus.CounterValue, float64(s.Notices))
}
