package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Validate reports every invalid value of c at once, each naming its key and
// value.
func (c Config) Validate() error {
	v := &validator{}
	if c.Data == "" {
		v.bad("data", c.Data, "a directory is required")
	}
	v.oneOf("log.level", c.Log.Level, "debug", "info", "warn", "error")
	v.oneOf("log.format", c.Log.Format, "text", "json")

	if c.Store.URI != "" {
		u, err := url.Parse(c.Store.URI)
		if err != nil || (u.Scheme != "mongodb" && u.Scheme != "mongodb+srv") || u.Host == "" {
			v.bad("store.uri", MaskURI(c.Store.URI), "want mongodb://host:port/ or mongodb+srv://host/")
		}
	}
	if c.Store.Database == "" || strings.ContainsAny(c.Store.Database, "/\\. \"$") {
		v.bad("store.database", c.Store.Database, "want a MongoDB database name (no spaces, dots, slashes, quotes or $)")
	}
	if c.Store.ConnectTimeout <= 0 {
		v.bad("store.connect_timeout", c.Store.ConnectTimeout.String(), "must be positive")
	}
	c.Auth.check(v)
	c.Broker.check(v)
	c.Cluster.check(v)
	c.Router.check(v)
	c.PushAPI.check(v)
	c.Groups.check(v)
	c.Watchdog.check(v)
	c.History.check(v)
	if (c.Broker.Durability == "on" || c.History.Topics != "") && c.Broker.MaxPacketSize > MaxStoredPacketSize {
		// Else one such message stops the store writer: retried forever,
		// it holds back every write (and acknowledgement) behind it.
		v.bad("broker.max_packet_size", c.Broker.MaxPacketSize, fmt.Sprintf(
			"must be at most %d with broker.durability on or history.topics set: a message is stored as one document, and MongoDB stores none over 16 MiB", MaxStoredPacketSize))
	}
	return v.err()
}

// MaxStoredPacketSize is the largest broker.max_packet_size a broker that
// stores messages accepts: MongoDB's 16 MiB document limit, less room for
// the fields stored beside the packet's payload, topic and properties.
const MaxStoredPacketSize = 16<<20 - 64<<10

// Validate reports every invalid value of the watchdog section.
func (w Watchdog) Validate() error {
	v := &validator{}
	w.check(v)
	return v.err()
}

func (w Watchdog) check(v *validator) {
	v.addr("watchdog.addr", w.Addr, false)
	if strings.ContainsAny(w.Name, " /#+\t\n") {
		v.bad("watchdog.name", w.Name, "must not contain spaces, '/', '#' or '+'")
	}
	if w.Interval < 100*time.Millisecond {
		v.bad("watchdog.interval", w.Interval.String(), "must be at least 100ms")
	}
	if w.PollTimeout < 0 {
		v.bad("watchdog.poll_timeout", w.PollTimeout.String(), "must not be negative")
	}
	if w.WebhookTimeout <= 0 {
		v.bad("watchdog.webhook_timeout", w.WebhookTimeout.String(), "must be positive")
	}
	if w.WebhookRetry < 0 {
		v.bad("watchdog.webhook_retry_for", w.WebhookRetry.String(), "must not be negative")
	}
	if w.MaxDrained < 0 {
		v.bad("watchdog.max_drained", strconv.Itoa(w.MaxDrained), "must not be negative")
	}
	for _, u := range w.WebhookList() {
		p, err := url.Parse(u)
		if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
			v.bad("watchdog.webhooks", u, "want http:// or https:// URLs, comma-separated")
		}
	}
	rules := []struct {
		name string
		r    Rule
	}{
		{"node_down", w.Rules.NodeDown}, {"node_not_ready", w.Rules.NodeNotReady}, {"cluster_size_below", w.Rules.ClusterSize},
		{"connections_over_capacity_pct", w.Rules.CapacityPct}, {"memory_over_bytes", w.Rules.Memory},
		{"dropped_messages_rate", w.Rules.DroppedRate}, {"link_down", w.Rules.LinkDown}, {"link_queue_over_bytes", w.Rules.LinkQueue},
		{"store_unreachable", w.Rules.Store}, {"history_backlog_over", w.Rules.HistoryBacklog}, {"load_imbalance", w.Rules.LoadImbalance},
	}
	for _, x := range rules {
		k := "watchdog.rules." + x.name + "."
		v.oneOf(k+"severity", x.r.Severity, "critical", "warning", "info", "off")
		if x.r.Action != "" {
			v.oneOf(k+"action", x.r.Action, "none", "drain")
		}
		if x.r.For < 0 {
			v.bad(k+"for", x.r.For.String(), "must not be negative")
		}
		if x.r.Threshold < 0 {
			v.bad(k+"threshold", strconv.Itoa(x.r.Threshold), "must not be negative")
		}
	}
	if w.Rules.NodeDown.Action == "drain" || w.Rules.ClusterSize.Action == "drain" || w.Rules.LoadImbalance.Action == "drain" {
		v.bad("watchdog.rules", "action: drain", "drain applies to a sick node that is alive: not to node_down, cluster_size_below or load_imbalance")
	}
}

// Validate reports every invalid value of the history section.
func (h History) Validate() error {
	v := &validator{}
	h.check(v)
	return v.err()
}

func (h History) check(v *validator) {
	for _, f := range h.TopicList() {
		if !validFilter(f) {
			v.bad("history.topics", f, "not an MQTT topic filter ('+' and '#' only as whole levels, '#' last)")
		}
	}
	if h.Retention < time.Minute {
		v.bad("history.retention", h.Retention.String(), "must be at least 1m")
	}
	v.between("history.batch_size", h.BatchSize, 1, 10000)
	v.between("history.queue_len", h.QueueLen, 1, 10_000_000)
	v.between("history.queue_bytes", h.QueueBytes, 64<<10, 1<<40)
	if h.SpoolMaxBytes < 0 {
		v.bad("history.spool_max_bytes", h.SpoolMaxBytes, "must not be negative (0 disables the spool)")
	}
	v.nonNegative("history.batch_linger", h.BatchLinger)
	if h.BatchLinger > time.Second {
		v.bad("history.batch_linger", h.BatchLinger.String(), "must be at most 1s")
	}
	v.nonNegative("history.flush_timeout", h.FlushTimeout)
	if h.PurgeInterval < time.Second {
		v.bad("history.purge_interval", h.PurgeInterval.String(), "must be at least 1s")
	}
}

// validFilter reports whether f is an MQTT topic filter.
func validFilter(f string) bool {
	if f == "" {
		return false
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		if strings.Contains(l, "#") && (l != "#" || i != len(levels)-1) {
			return false
		}
		if strings.Contains(l, "+") && l != "+" {
			return false
		}
	}
	return true
}

// Validate reports every invalid value of the router section.
func (r Router) Validate() error {
	v := &validator{}
	r.check(v)
	return v.err()
}

func (r Router) check(v *validator) {
	v.addr("router.addr", r.Addr, false)
	if strings.ContainsAny(r.Name, " /#+\t\n") {
		v.bad("router.name", r.Name, "must not contain spaces, '/', '#' or '+'")
	}
	if r.StaleAfter < time.Second {
		v.bad("router.load_stale_after", r.StaleAfter.String(), "must be at least 1s")
	}
}

// Validate reports every invalid value of the cluster section.
func (c Cluster) Validate() error {
	v := &validator{}
	c.check(v)
	return v.err()
}

func (c Cluster) check(v *validator) {
	v.addr("cluster.gossip_addr", c.GossipAddr, true)
	if c.GossipAddr == "" {
		return
	}
	v.addr("cluster.link_addr", c.LinkAddr, false)
	v.addr("cluster.link_advertise_addr", c.LinkAdvertise, true)
	if c.LinkTLS != "" { // "": a Cluster built in code, auto
		v.oneOf("cluster.link_tls", c.LinkTLS, "auto", "off")
	}
	if set := btoi(c.LinkTLSCert != "") + btoi(c.LinkTLSKey != "") + btoi(c.LinkTLSCA != ""); set != 0 && set != 3 {
		v.bad("cluster.link_tls_cert", c.LinkTLSCert, "link_tls_cert, link_tls_key and link_tls_ca must be set together")
	}
	if strings.ContainsAny(c.AdvertiseHost, " :/") && net.ParseIP(c.AdvertiseHost) == nil {
		v.bad("cluster.advertise_host", c.AdvertiseHost, "want a host name or IP address, without a port")
	}
	for _, seed := range c.Seeds() {
		if _, _, err := net.SplitHostPort(seed); err != nil {
			v.bad("cluster.join", c.Join, "want comma-separated host:port gossip addresses")
			break
		}
	}
	v.between("cluster.link_queue_bytes", c.LinkQueueBytes, 1<<20, 1<<40)
	if c.FailedPeerHold < 0 {
		v.bad("cluster.failed_peer_hold", c.FailedPeerHold.String(), "must not be negative")
	}
	if c.ProbeInterval < 10*time.Millisecond {
		v.bad("cluster.probe_interval", c.ProbeInterval.String(), "must be at least 10ms")
	}
	if c.ClaimTimeout <= 0 {
		v.bad("cluster.claim_timeout", c.ClaimTimeout.String(), "must be positive")
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Seeds returns the gossip addresses of cluster.join.
func (c Cluster) Seeds() []string {
	var out []string
	for _, s := range strings.Split(c.Join, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// Validate reports every invalid value of the auth section, for the roles
// that authenticate devices: unlike Config.Validate, it also requires token
// keys with auth.devices=token (a router, say, needs none).
func (a Auth) Validate() error {
	v := &validator{}
	a.check(v)
	if a.Devices == "token" && len(a.Keys()) == 0 {
		v.bad("auth.token_keys", "", "required with auth.devices=token (or set auth.devices=anonymous)")
	}
	return v.err()
}

func (a Auth) check(v *validator) {
	v.oneOf("auth.devices", a.Devices, "token", "anonymous")
	for _, k := range a.Keys() {
		if len(k) < 16 {
			v.bad("auth.token_keys", "xxxxx", "every key needs at least 16 characters")
			break
		}
	}
	if a.TokenTTL != 0 && a.TokenTTL < time.Minute { // 0: a role that issues no tokens
		v.bad("auth.token_ttl", a.TokenTTL.String(), "must be at least 1m")
	}
	if a.ACLSubscribeRefusal != "" {
		v.oneOf("auth.acl_subscribe_refusal", a.ACLSubscribeRefusal, "not_authorized", "unspecified")
	}
	for _, r := range strings.Split(a.ACL, ";") {
		if r = strings.TrimSpace(r); r == "" {
			continue
		}
		f := strings.Fields(r)
		if len(f) != 3 || (f[0] != "allow" && f[0] != "deny") || (f[1] != "pub" && f[1] != "sub" && f[1] != "all") {
			v.bad("auth.acl", r, "want 'allow|deny pub|sub|all FILTER'")
		}
	}
}

// Validate reports every invalid value of the push API section.
func (p PushAPI) Validate() error {
	v := &validator{}
	p.check(v)
	return v.err()
}

func (p PushAPI) check(v *validator) {
	v.addr("pushapi.addr", p.Addr, false)
	if strings.ContainsAny(p.Name, " /#+\t\n") {
		v.bad("pushapi.name", p.Name, "must not contain spaces, '/', '#' or '+'")
	} else if strings.HasPrefix(p.Name, "$") {
		// It is the push API's MQTT client ID: brokers refuse '$' IDs.
		v.bad("pushapi.name", p.Name, "must not start with '$'")
	}
	for _, k := range p.Keys() {
		if len(k) < 16 {
			v.bad("pushapi.api_keys", "xxxxx", "every key needs at least 16 characters")
			break
		}
	}
	v.between("pushapi.max_body", p.MaxBody, 1024, 1<<30)
	v.between("pushapi.max_payload", p.MaxPayload, 1, 268_435_455)
	if p.PublishTimeout <= 0 {
		v.bad("pushapi.publish_timeout", p.PublishTimeout.String(), "must be positive")
	}
}

// Validate reports every invalid value of the groups section.
func (g Groups) Validate() error {
	v := &validator{}
	g.check(v)
	return v.err()
}

func (g Groups) check(v *validator) {
	v.between("groups.max_members", g.MaxMembers, 1, 10000)
	if g.RefreshInterval < time.Second || g.RefreshInterval > 10*time.Minute {
		v.bad("groups.refresh_interval", g.RefreshInterval.String(), "must be between 1s and 10m")
	}
}

// Validate reports every invalid value of the broker section, for roles
// built from a Broker value rather than loaded by Load.
func (b Broker) Validate() error {
	v := &validator{}
	b.check(v)
	return v.err()
}

func (b Broker) check(v *validator) {
	v.addr("broker.mqtt_addr", b.MQTTAddr, false)
	v.addr("broker.ws_addr", b.WSAddr, true)
	v.addr("broker.tls_addr", b.TLSAddr, true)
	v.addr("broker.wss_addr", b.WSSAddr, true)
	v.addr("broker.admin_addr", b.AdminAddr, false)
	for _, k := range b.AdminKeyList() {
		if len(k) < 16 {
			v.bad("broker.admin_keys", "xxxxx", "every key needs at least 16 characters")
			break
		}
	}
	if (b.TLSCert == "") != (b.TLSKey == "") {
		v.bad("broker.tls_cert", b.TLSCert, "tls_cert and tls_key must be set together")
	}
	if strings.ContainsAny(b.NodeName, " /#+\t\n") {
		v.bad("broker.node_name", b.NodeName, "must not contain spaces, '/', '#' or '+'")
	}
	v.between("broker.capacity", b.Capacity, 1, 10_000_000)
	v.between("broker.evacuate_rate", b.EvacuateRate, 1, 100_000)
	v.between("broker.max_packet_size", b.MaxPacketSize, 64, 268_435_455)
	v.between("broker.max_inflight", b.MaxInflight, 1, 65535)
	v.between("broker.max_queued", b.MaxQueued, 1, 65535)
	if b.MaxQueued < b.MaxInflight {
		v.bad("broker.max_queued", b.MaxQueued, fmt.Sprintf("must be at least broker.max_inflight (%d)", b.MaxInflight))
	}
	v.between("broker.max_queued_bytes", b.MaxQueuedBytes, 64<<10, 1<<40)
	v.between("broker.max_queued_bytes_total", b.MaxQueuedBytesTotal, 1<<20, 1<<44)
	if b.MaxQueuedBytesTotal < b.MaxQueuedBytes {
		v.bad("broker.max_queued_bytes_total", b.MaxQueuedBytesTotal, fmt.Sprintf("must be at least broker.max_queued_bytes (%d)", b.MaxQueuedBytes))
	}
	v.between("broker.max_reading_bytes", b.MaxReadingBytes, 1<<20, 1<<44)
	if b.MaxReadingBytes < b.MaxPacketSize {
		v.bad("broker.max_reading_bytes", b.MaxReadingBytes, fmt.Sprintf("must be at least broker.max_packet_size (%d)", b.MaxPacketSize))
	}
	v.between("broker.max_connect_size", b.MaxConnectSize, 1024, 268_435_455)
	if b.ConnectTimeout < time.Second || b.ConnectTimeout > 5*time.Minute {
		v.bad("broker.connect_timeout", b.ConnectTimeout.String(), "must be between 1s and 5m")
	}
	if b.ReadTimeout < time.Second || b.ReadTimeout > 10*time.Minute {
		v.bad("broker.read_timeout", b.ReadTimeout.String(), "must be between 1s and 10m")
	}
	v.nonNegative("broker.backpressure_max_wait", b.BackpressureMaxWait)
	if b.BackpressureMaxWait > 30*time.Second {
		v.bad("broker.backpressure_max_wait", b.BackpressureMaxWait.String(), "must be at most 30s: a publisher's connection is not read while it waits")
	}
	v.nonNegative("broker.write_coalesce", b.WriteCoalesce)
	if b.WriteCoalesce > 10*time.Millisecond {
		v.bad("broker.write_coalesce", b.WriteCoalesce.String(), "must be at most 10ms: it is added to the latency of the messages it holds")
	}
	v.nonNegative("broker.ack_coalesce", b.AckCoalesce)
	if b.AckCoalesce > 10*time.Millisecond {
		v.bad("broker.ack_coalesce", b.AckCoalesce.String(), "must be at most 10ms: it is added to the latency of the acknowledgements it holds")
	}
	v.nonNegative("broker.keepalive_min", b.KeepaliveMin)
	v.nonNegative("broker.keepalive_max", b.KeepaliveMax)
	if b.KeepaliveMax > 65535*time.Second {
		v.bad("broker.keepalive_max", b.KeepaliveMax.String(), "MQTT keepalive is at most 65535s")
	}
	if b.KeepaliveMax > 0 && b.KeepaliveMin > b.KeepaliveMax {
		v.bad("broker.keepalive_min", b.KeepaliveMin.String(), "must not exceed broker.keepalive_max")
	}
	v.oneOf("broker.durability", b.Durability, "on", "off")
	v.nonNegative("broker.session_expiry_max", b.SessionExpiry)
	if b.SessionExpiry > (1<<32-1)*time.Second {
		v.bad("broker.session_expiry_max", b.SessionExpiry.String(), "MQTT session expiry is at most 4294967295s")
	}
	v.nonNegative("broker.message_expiry_max", b.MessageExpiry)
	if b.ShutdownTimeout <= 0 {
		v.bad("broker.shutdown_timeout", b.ShutdownTimeout.String(), "must be positive")
	}
}

// RequireAdminKeys reports a broker whose admin endpoints nobody could use
// although it runs in production mode (auth.devices=token): drain and the
// push API's server-side subscriptions and kicks need an admin key.
func (b Broker) RequireAdminKeys(a Auth) error {
	if a.Devices == "token" && len(b.AdminKeyList()) == 0 {
		return &FieldError{Key: "broker.admin_keys", Value: "",
			Why: "required with auth.devices=token: the admin /v1 endpoints (drain, server-side subscriptions, kicks) accept only a key of it (or set auth.devices=anonymous)"}
	}
	return nil
}

// validator collects FieldErrors.
type validator struct{ errs []error }

func (v *validator) err() error { return errors.Join(v.errs...) }

func (v *validator) bad(key string, val any, why string) {
	v.errs = append(v.errs, &FieldError{Key: key, Value: val, Why: why})
}

func (v *validator) oneOf(key, val string, allowed ...string) {
	for _, a := range allowed {
		if val == a {
			return
		}
	}
	v.bad(key, val, "want one of "+strings.Join(allowed, ", "))
}

func (v *validator) addr(key, val string, optional bool) {
	if val == "" {
		if !optional {
			v.bad(key, val, "an address is required (host:port)")
		}
		return
	}
	_, port, err := net.SplitHostPort(val)
	if err != nil {
		v.bad(key, val, "want host:port, e.g. :1883 or 127.0.0.1:1883")
		return
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		v.bad(key, val, "port must be 0-65535")
	}
}

func (v *validator) between(key string, val, lo, hi int) {
	if val < lo || val > hi {
		v.bad(key, val, fmt.Sprintf("must be between %d and %d", lo, hi))
	}
}

func (v *validator) nonNegative(key string, d time.Duration) {
	if d < 0 {
		v.bad(key, d.String(), "must not be negative")
	}
}

// FieldError reports an invalid value of one key; Origin says where the
// value came from when Load knows it.
type FieldError struct {
	Key    string
	Value  any
	Origin string // e.g. "environment RTM_LOG_LEVEL", "flag --capacity", a file name
	Why    string
}

func (e *FieldError) Error() string {
	if e.Origin != "" {
		return fmt.Sprintf("%s: invalid value %s (from %s): %s", e.Key, quote(e.Value), e.Origin, e.Why)
	}
	return fmt.Sprintf("%s: invalid value %s: %s", e.Key, quote(e.Value), e.Why)
}

// MaskURI returns uri with the password, if any, replaced by "xxxxx", so it
// can be logged and put into errors. It expects the userinfo to be
// percent-encoded as the MongoDB URI format requires, but also copes with an
// unescaped '@' in the password. Strings without "://" are returned as is.
func MaskURI(uri string) string {
	scheme, rest, ok := strings.Cut(uri, "://")
	if !ok {
		return uri
	}
	// The userinfo ends at the last '@' of the authority, which ends at the
	// first '/', '?' or '#' after that '@'.
	end := len(rest)
	at := -1
	for i := 0; i < end; i++ {
		switch rest[i] {
		case '@':
			at = i
		case '/', '?', '#':
			if at >= 0 || !strings.Contains(rest[i:], "@") {
				end = i
			}
		}
	}
	if at < 0 {
		return uri
	}
	user, pass, hasPass := strings.Cut(rest[:at], ":")
	if !hasPass || pass == "" {
		return uri
	}
	return scheme + "://" + user + ":xxxxx" + rest[at:]
}
