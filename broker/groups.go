package broker

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/rtm-dev/rtm/plugins"
)

// groupChange is POST /v1/groups/changes: the push API tells the broker of
// a membership change it wrote to the store. The broker applies it to its
// membership cache and removes the group subscriptions of the devices that
// lost access, so their sessions stop holding and routing the group's
// messages (every delivery is also checked against the cache, which alone
// stops them receiving).
func (a *adminServer) groupChange(w http.ResponseWriter, r *http.Request) {
	if a.b.groups == nil {
		writeJSON(w, http.StatusConflict, map[string]string{"error": "no_store",
			"message": "this broker has no store: group topics are closed to devices"})
		return
	}
	var ch plugins.GroupChange
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 8<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ch); err != nil || ch.Group == "" || strings.ContainsAny(ch.Group, "/+#") {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "bad_request",
			"message": `want {"group": a group ID, "added": [...], "removed": [...], "deleted": bool}`})
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
