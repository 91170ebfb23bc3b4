// Package config owns rtm's configuration: the typed sections of every role,
// their defaults, validation, and the layering of a YAML file, RTM_*
// environment variables and command-line flags (flag > env > file > default).
//
// It is a leaf package: it imports nothing from rtm, so every role, the CLI,
// `rtm config` and the documentation table read one definition. A Config is a
// plain value; nothing here is safe for concurrent mutation, and nothing needs
// to be once Load has returned.
package config

import (
	"strings"
	"time"
)

// Config is the whole configuration of one rtm process. Each role reads the
// sections it needs.
type Config struct {
	// Data is the directory for local state: the embedded store's files.
	Data string `koanf:"data" doc:"Directory for local state (the embedded store's files)."`
	Log  Log    `koanf:"log"`
	// Store selects MongoDB: an external server, or the embedded one.
	Store    Store    `koanf:"store"`
	Auth     Auth     `koanf:"auth"`
	Broker   Broker   `koanf:"broker"`
	Cluster  Cluster  `koanf:"cluster"`
	Router   Router   `koanf:"router"`
	PushAPI  PushAPI  `koanf:"pushapi"`
	Groups   Groups   `koanf:"groups"`
	History  History  `koanf:"history"`
	Watchdog Watchdog `koanf:"watchdog"`
}

// Log configures the process-wide structured logger.
type Log struct {
	Level  string `koanf:"level" doc:"Minimum log level: debug, info, warn or error."`
	Format string `koanf:"format" doc:"Log line format: text or json."`
}

// Store configures persistence.
type Store struct {
	URI            string        `koanf:"uri" secret:"uri" doc:"MongoDB URI (mongodb:// or mongodb+srv://). Empty starts the embedded store in <data>/store."`
	Database       string        `koanf:"database" doc:"Database name."`
	ConnectTimeout time.Duration `koanf:"connect_timeout" doc:"How long to retry an unreachable store at start before failing."`
}

// Auth configures how devices prove who they are, and what they may do.
type Auth struct {
	Devices   string        `koanf:"devices" doc:"Device authentication: token (username = client ID, password = a token issued by the push API) or anonymous (any client may connect; logged loudly at start)."`
	TokenKeys string        `koanf:"token_keys" secret:"value" doc:"Comma-separated keys of at least 16 characters that sign and verify device tokens (HMAC-SHA256): the first signs, every one verifies, so a new key is rolled in first and an old one removed later. Required with devices=token and by the push API."`
	TokenTTL  time.Duration `koanf:"token_ttl" doc:"Lifetime of a device token when the request does not ask for a shorter one."`
	ACL       string        `koanf:"acl" doc:"Extra topic rules for devices, ';'-separated, checked in order before the built-in ones: allow|deny pub|sub|all FILTER, where FILTER may use %c (client ID) and %u (username), e.g. 'allow sub $SYS/#; deny all secret/#'."`
	// ACLSubscribeRefusal exists for clients and test suites that expect
	// 0x80 (the Eclipse Paho interoperability suite does); "" means
	// not_authorized.
	ACLSubscribeRefusal string `koanf:"acl_subscribe_refusal" doc:"Reason code of an MQTT 5 SUBACK for a filter the ACL refuses: not_authorized (0x87) or unspecified (0x80, which tells the client nothing about the rules). MQTT 3.1.1 clients always get 0x80."`
}

// Keys returns the token keys of auth.token_keys, the signing one first.
func (a Auth) Keys() []string { return splitList(a.TokenKeys) }

// PushAPI configures the push API role: the HTTP API applications use to
// reach devices.
type PushAPI struct {
	Name           string        `koanf:"name" doc:"Gossip member name of this push API, unique in the cluster. Empty: pushapi-<host name>."`
	Addr           string        `koanf:"addr" doc:"Push API HTTP listen address."`
	APIKeys        string        `koanf:"api_keys" secret:"value" doc:"Comma-separated API keys accepted as 'Authorization: Bearer <key>'. rtm dev generates one and prints it."`
	MaxBody        int           `koanf:"max_body" doc:"Largest request body accepted, in bytes (413 beyond)."`
	MaxPayload     int           `koanf:"max_payload" doc:"Largest message payload accepted, in bytes after base64 decoding (413 beyond)."`
	PublishTimeout time.Duration `koanf:"publish_timeout" doc:"How long a publish waits for a broker to acknowledge it before the request fails with 503."`
}

// Groups configures device groups: the push API enforces max_members,
// every broker refreshes its membership cache at refresh_interval.
type Groups struct {
	// MaxMembers bounds a group: its members live in one store document,
	// which MongoDB caps at 16 MiB (10,000 IDs of 256 bytes fit).
	MaxMembers int `koanf:"max_members" doc:"Most members a group may have; adding one more answers 409 group_full. 1-10000. Read by the push API."`
	// RefreshInterval is the safety net of the brokers' membership caches:
	// the push API tells every broker of each change at once, and a broker
	// it could not reach re-reads the memberships it holds within this.
	RefreshInterval time.Duration `koanf:"refresh_interval" doc:"How often a broker re-reads from the store the group memberships it caches, in case it missed a change notice from the push API (changes normally apply on every broker before the API answers). 1s-10m. Read by brokers."`
}

// Keys returns the API keys of pushapi.api_keys.
func (p PushAPI) Keys() []string { return splitList(p.APIKeys) }

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

// History configures message history: what brokers capture, how they
// write it, and how long the store keeps it (docs/history.md).
type History struct {
	Topics string `koanf:"topics" doc:"Comma-separated MQTT topic filters whose messages are stored, once, by the broker they were published to (brokers with a store). Empty disables history."`
	// Retention is SPEC 7's default: 30 days.
	Retention time.Duration `koanf:"retention" doc:"How long a stored message is kept: a TTL index where the server has them (MongoDB), and a periodic purge in any case (the embedded store has none)."`
	// BatchSize: an insert costs the broker a fixed ~0.5 ms besides
	// ~0.75 µs a message (the driver's copies, the socket), so batches of
	// 4,096 cost ~0.9 µs a message against ~1.25 at 1,024 (BENCHMARKS.md,
	// History, session 10). The history index flushes by ids as well, so
	// its segments do not grow with it.
	BatchSize int `koanf:"batch_size" doc:"Most messages written to the store in one insert."`
	// BatchLinger: a batch that fills is written at once, so under load
	// batches are full whatever the rate; the linger only bounds how long
	// a light load's messages wait (BENCHMARKS.md, History, session 8).
	BatchLinger time.Duration `koanf:"batch_linger" doc:"Longest a message waits for its batch to fill before it is written; a batch that fills is written at once (0: at once; batches still grow while a write is in flight)."`
	// QueueLen and QueueBytes hold a burst in memory: a burst faster than
	// the store that went to the spool cost about 4 µs of CPU a message
	// (encoded, written, read back, decoded; BENCHMARKS.md, History).
	// 100,000 small messages are about 30 MiB; QueueBytes keeps large
	// ones from taking 100,000 times their size.
	QueueLen   int `koanf:"queue_len" doc:"Messages held in memory for the store; beyond it, or beyond queue_bytes, they go to the spool file in <data>/history, in order."`
	QueueBytes int `koanf:"queue_bytes" doc:"Bytes of messages (payload, topic, properties and about 200 bytes of bookkeeping each) held in memory for the store; beyond it, or beyond queue_len, they go to the spool file, in order."`
	// SpoolMaxBytes bounds the disk a store outage may take: 1 GiB is about
	// a million 1 KB messages.
	SpoolMaxBytes int           `koanf:"spool_max_bytes" doc:"Bytes the history spool may hold on disk while the store is slow or down. Beyond it messages are not stored (counted, and a gap record says which topics and when)."`
	FlushTimeout  time.Duration `koanf:"flush_timeout" doc:"How long a graceful shutdown waits for queued history to reach the store; what is left stays in the spool for the next start."`
	PurgeInterval time.Duration `koanf:"purge_interval" doc:"How often each broker deletes messages older than history.retention."`
}

// TopicList returns the filters of history.topics.
func (h History) TopicList() []string { return splitList(h.Topics) }

// Broker configures one MQTT broker node.
type Broker struct {
	NodeName      string `koanf:"node_name" doc:"Unique name of this node. Empty means the host name."`
	MQTTAddr      string `koanf:"mqtt_addr" doc:"MQTT over TCP listen address (host:port, port 0 picks a free port)."`
	WSAddr        string `koanf:"ws_addr" doc:"MQTT over WebSocket listen address, path /mqtt. Empty disables it."`
	TLSAddr       string `koanf:"tls_addr" doc:"MQTT over TLS listen address; used only when tls_cert and tls_key are set."`
	WSSAddr       string `koanf:"wss_addr" doc:"MQTT over secure WebSocket listen address, path /mqtt; used only when tls_cert and tls_key are set."`
	TLSCert       string `koanf:"tls_cert" doc:"PEM certificate file (chain) for the TLS and WSS listeners."`
	TLSKey        string `koanf:"tls_key" secret:"path" doc:"PEM private key file for the TLS and WSS listeners."`
	AdminAddr     string `koanf:"admin_addr" doc:"Admin HTTP listen address: /healthz, /readyz and /metrics (open), /v1/... (need an admin key)."`
	AdminKeys     string `koanf:"admin_keys" secret:"value" doc:"Comma-separated keys of at least 16 characters accepted on the admin /v1 endpoints as 'Authorization: Bearer <key>' (drain, server-side subscriptions, kicks, stats, cluster view); the push API and rtm node send the first. Required with auth.devices=token; without one the /v1 endpoints answer 403. rtm dev and rtm cluster up generate one."`
	Capacity      int    `koanf:"capacity" doc:"Maximum concurrent client connections of this node; CONNECTs beyond it are refused (v5 0x97, v3 code 3)."`
	MaxPacketSize int    `koanf:"max_packet_size" doc:"Largest MQTT packet accepted, in bytes; larger packets close the connection (v5 0x95). At most 16711680 (16 MiB less 64 KiB) with durability on or history.topics set: a message is stored as one document."`
	MaxInflight   int    `koanf:"max_inflight" doc:"Receive Maximum: QoS 1/2 messages a client may have unacknowledged in each direction (1-65535)."`
	MaxQueued     int    `koanf:"max_queued" doc:"Messages held per client: queued for writing, plus QoS 1/2 kept while offline or unacknowledged (1-65535). Beyond it messages are dropped and counted."`
	// MaxQueuedBytes is max_queued in bytes (payload and topic of each
	// message held). The default, 4 MiB, is four messages of the default
	// max_packet_size, or the whole max_queued of 4 KiB messages: typical
	// telemetry (under 1 KiB) never meets it, while one client that stops
	// reading 1 MB messages no longer pins gigabytes (issue 12).
	MaxQueuedBytes int `koanf:"max_queued_bytes" doc:"Bytes of messages (payload and topic) held per client, counted like max_queued; a client holding nothing always takes one message. Beyond it messages are dropped and counted (reason queue_bytes). Flow control's high-water mark is half of it."`
	// MaxQueuedBytesTotal bounds the bytes held for all clients of this
	// node. The default, 256 MiB, is 64 clients stuck at max_queued_bytes;
	// it keeps a node sized for its 100,000-connection capacity (about
	// 2 GiB of connections) within a few GiB, and a healthy node holds
	// almost nothing (subscribers keep up; publishers are paced).
	MaxQueuedBytesTotal int `koanf:"max_queued_bytes_total" doc:"Bytes of messages held for all clients of this node together. Clients already holding messages may fill half of it; the other half is for clients holding nothing, so stuck clients cannot stop delivery to healthy ones. Beyond it messages are dropped and counted (reason memory_budget)."`
	// MaxReadingBytes bounds the bytes of packets being received, for
	// all connections together: 64 MiB is 64 packets of the default
	// max_packet_size arriving at once.
	MaxReadingBytes int `koanf:"max_reading_bytes" doc:"Bytes of partly received packets held for all connections together (bodies over 4 KiB, counted as they arrive). A packet that would exceed it closes its connection (v5 DISCONNECT 0x97). CONNECTs (not yet authenticated) may use a quarter of it. At least max_packet_size."`
	// MaxConnectSize bounds the one packet an unauthenticated client can
	// send. 64 KiB holds a token, a client ID and a will with a 60 KiB
	// payload.
	MaxConnectSize int `koanf:"max_connect_size" doc:"Largest CONNECT accepted, in bytes (what a client that is not yet authenticated can send); a larger one closes the connection."`
	// ConnectTimeout and ReadTimeout bound how long half-sent packets are
	// held (docs/security.md).
	ConnectTimeout time.Duration `koanf:"connect_timeout" doc:"Time a new connection has to send its whole CONNECT; then it is closed. 1s-5m."`
	ReadTimeout    time.Duration `koanf:"read_timeout" doc:"Time a packet's body has to arrive once its first bytes have (also with keepalive 0); then the connection is closed. A 1 MiB packet needs 35 KB/s at 30s. 1s-10m."`
	// BackpressureMaxWait bounds how long a publish waits for a connected
	// subscriber whose session or write queue is half full (docs/broker.md,
	// "Overload policy"). The default, 1 s, is far above what a subscriber
	// that keeps up ever needs (waits end at its next acknowledgement or
	// write, milliseconds), above a GC pause or a TCP retransmission, and
	// short enough that a subscriber that stopped reading costs the
	// publishers feeding it one second once, and that a node link blocked
	// by it keeps within its 3 s silence limit.
	BackpressureMaxWait time.Duration `koanf:"backpressure_max_wait" doc:"Longest a publish waits for a connected subscriber whose session or write queue is over half of max_queued (the publisher's socket is not read and its PUBACK is held meanwhile). A subscriber still over it after this long is marked stalled: messages to it are no longer waited for, and dropped and counted beyond max_queued, until it drains below a quarter. 0 disables waiting (drop at max_queued). 0-30s."`
	// WriteCoalesce lets the packets for a client that receives at a high
	// rate gather for this long before they are written, so one write(2)
	// and one TCP segment carry several (mochi patch 98; docs/broker.md,
	// "Write coalescing").
	WriteCoalesce time.Duration `koanf:"write_coalesce" doc:"How long the packets for a client wait to be written together, when they arrive for it on average more often than this (a subscriber receiving thousands of messages a second): one write and one TCP segment then carry all of the window's packets, at the cost of up to this much latency for them (about 1 ms when the node is otherwise idle: Go timers sleep in whole milliseconds). Clients receiving less often are never delayed. 0 writes every packet at once. 0-10ms."`
	// AckCoalesce lets the acknowledgements to a client that publishes
	// QoS 1/2 at a high rate gather for up to this long, so one write(2)
	// carries several (mochi patch 102; docs/broker.md, "Write
	// coalescing").
	AckCoalesce     time.Duration `koanf:"ack_coalesce" doc:"How long the acknowledgements (PUBACK, PUBREC) to a client may wait to be written together, when its QoS 1/2 messages arrive on average more often than this (a device publishing hundreds of messages a second or more): one write then carries several, at the cost of up to this much latency for them (typically one gap between its messages, as with Nagle's algorithm). A client that waits for each acknowledgement before publishing again is delayed at most 3 times a second. 0 writes every acknowledgement at once. 0-10ms."`
	KeepaliveMin    time.Duration `koanf:"keepalive_min" doc:"Smallest keepalive a v5 client may use; lower requests are raised (Server Keep Alive). 0 disables the floor."`
	KeepaliveMax    time.Duration `koanf:"keepalive_max" doc:"Largest keepalive a v5 client may use (0 = none requested also gets this); higher requests are lowered (Server Keep Alive)."`
	SessionExpiry   time.Duration `koanf:"session_expiry_max" doc:"Longest time a disconnected persistent session is kept (v5 requests are capped; v3.1.1 clean_session=false sessions get this)."`
	MessageExpiry   time.Duration `koanf:"message_expiry_max" doc:"Longest time a queued or retained message is kept; 0 keeps messages without an expiry of their own forever."`
	EvacuateRate    int           `koanf:"evacuate_rate" doc:"Clients per second a draining node disconnects when asked to evacuate (rtm node drain --evacuate); MQTT 5 clients get 0x9C with a Server Reference."`
	ShutdownTimeout time.Duration `koanf:"shutdown_timeout" doc:"Bound on a graceful shutdown; past it the process exits anyway."`
	// Durability writes persistent sessions, their queued QoS 1/2 messages
	// and retained messages to the store (docs/broker.md, "Persistence").
	Durability string `koanf:"durability" doc:"on: retained messages, persistent sessions (subscriptions, will, queued QoS 1/2 messages) are written to the store in batches and restored after a restart or adopted by a survivor when a node dies; the PUBACK/PUBREC of a QoS 1/2 message waits for its write for a persistent session, and for every other live node it was forwarded to to acknowledge it safe there. off: kept in memory only, lost with the process."`
}

// AdminKeyList returns the keys of broker.admin_keys, the one to send first.
func (b Broker) AdminKeyList() []string { return splitList(b.AdminKeys) }

// Cluster configures membership (Serf gossip) and the node link between
// brokers.
type Cluster struct {
	GossipAddr     string        `koanf:"gossip_addr" doc:"Gossip (Serf) listen address, TCP and UDP. Empty disables clustering: the broker runs alone."`
	AdvertiseHost  string        `koanf:"advertise_host" doc:"Host other nodes and devices reach this node at (published in gossip tags). Empty: the gossip bind IP, or a private IP of this machine when bound to all interfaces."`
	Join           string        `koanf:"join" doc:"Comma-separated gossip addresses (host:port) of members to join, retried with backoff until one answers. Empty starts a new cluster."`
	Secret         string        `koanf:"secret" secret:"value" doc:"Shared cluster secret: encrypts gossip, authenticates node links and (without link_tls_cert) keys their TLS. Empty: no authentication and no link encryption (warned at start)."`
	LinkAddr       string        `koanf:"link_addr" doc:"Node link listen address: forwarded messages, routes, retained messages and sessions between brokers."`
	LinkTLS        string        `koanf:"link_tls" doc:"Node link encryption: auto (mutual TLS 1.3 with link_tls_cert/key/ca when set, else with a certificate derived from cluster.secret and pinned by every node, else plaintext, warned) or off (plaintext, warned: only while upgrading a cluster whose older nodes speak plaintext). Every node of a cluster must agree."`
	LinkTLSCert    string        `koanf:"link_tls_cert" doc:"PEM certificate (chain) this node presents on node links; with link_tls_key and link_tls_ca."`
	LinkTLSKey     string        `koanf:"link_tls_key" secret:"path" doc:"PEM private key of link_tls_cert."`
	LinkTLSCA      string        `koanf:"link_tls_ca" doc:"PEM CA certificate(s) that node link peers' certificates must chain to: any certificate it issued is accepted as a node, so use a CA of the cluster's own."`
	LinkAdvertise  string        `koanf:"link_advertise_addr" doc:"Node link address published to peers (host:port), when it differs from link_addr as they see it (NAT, port mapping, a proxy). Empty: link_addr with advertise_host."`
	LinkQueueBytes int           `koanf:"link_queue_bytes" doc:"Bytes of messages held per peer while its link is slow or down. Beyond it a QoS 1/2 publish that needs that peer is refused (v5 PUBACK/PUBREC 0x97, v3.1.1 connection closed) and QoS 0 is dropped; both are counted (rtm_broker_messages_dropped_total{reason=\"link_queue_full\"})."`
	FailedPeerHold time.Duration `koanf:"failed_peer_hold" doc:"How long the messages queued for a peer that gossip marks failed are kept, and resent if the same process comes back; after it, or at once if the peer leaves or comes back restarted, they are dropped and counted. 0 drops them when the peer is marked failed."`
	ProbeInterval  time.Duration `koanf:"probe_interval" doc:"Gossip failure-detection probe interval; a dead node is declared failed after a few intervals (about 6 s at 1s, 1.5 s at 200ms)."`
	ClaimTimeout   time.Duration `koanf:"claim_timeout" doc:"How long a CONNECT waits for the other brokers to end a connection with the same client ID and hand over its session."`
}

// Router configures the router role, which tells devices which broker to
// connect to.
type Router struct {
	Name       string        `koanf:"name" doc:"Gossip member name of this router, unique in the cluster. Empty: router-<host name>."`
	Addr       string        `koanf:"addr" doc:"Router HTTP listen address: /v1/route, /v1/nodes, /healthz, /metrics."`
	StaleAfter time.Duration `koanf:"load_stale_after" doc:"A broker whose last load report is older than this is treated as of unknown load and picked last (brokers report at least every 5s)."`
}

// Watchdog configures the watchdog role, which polls every broker, raises
// alerts and serves the dashboard (docs/watchdog.md).
type Watchdog struct {
	Name           string        `koanf:"name" doc:"Gossip member name of this watchdog, unique in the cluster. Empty: watchdog-<host name>."`
	Addr           string        `koanf:"addr" doc:"Watchdog HTTP listen address: the dashboard (/), /v1/alerts, /v1/nodes, /v1/series, /v1/events, /healthz, /readyz, /metrics."`
	APIKeys        string        `koanf:"api_keys" secret:"value" doc:"Comma-separated keys for the watchdog's /v1 endpoints (Authorization: Bearer <key>). Empty: /v1 is open (bind addr to a private network)."`
	Interval       time.Duration `koanf:"interval" doc:"How often every broker's admin /v1/stats is polled and the rules evaluated."`
	PollTimeout    time.Duration `koanf:"poll_timeout" doc:"Bound on one poll of one broker; a broker that does not answer in time gets a poll error, the others are not delayed. 0: the interval."`
	Webhooks       string        `koanf:"webhooks" secret:"value" doc:"Comma-separated URLs that receive every alert change as a JSON POST, retried with exponential backoff. Masked by rtm config: such URLs often hold a token."`
	WebhookSecret  string        `koanf:"webhook_secret" secret:"value" doc:"When set, each webhook request carries X-RTM-Signature: sha256=<hex HMAC-SHA256 of the body with this secret>."`
	WebhookTimeout time.Duration `koanf:"webhook_timeout" doc:"Bound on one webhook request; a slower answer counts as a failure and is retried."`
	WebhookRetry   time.Duration `koanf:"webhook_retry_for" doc:"How long a failing webhook delivery is retried (exponential backoff from 500ms to 30s) before it is given up and logged."`
	MaxDrained     int           `koanf:"max_drained" doc:"At most this many brokers are drained by the watchdog's drain actions at once; it never drains the last healthy broker. 0 disables drain actions."`
	ImbalanceMin   int           `koanf:"imbalance_min_connections" doc:"load_imbalance is evaluated only when the busiest broker has at least this many connections."`
	Rules          WatchdogRules `koanf:"rules"`
}

// WatchdogRules are the watchdog's alert rules, each with the meaning of its
// threshold given in docs/watchdog.md.
type WatchdogRules struct {
	NodeDown       Rule `koanf:"node_down"`
	NodeNotReady   Rule `koanf:"node_not_ready"`
	ClusterSize    Rule `koanf:"cluster_size_below"`
	CapacityPct    Rule `koanf:"connections_over_capacity_pct"`
	Memory         Rule `koanf:"memory_over_bytes"`
	DroppedRate    Rule `koanf:"dropped_messages_rate"`
	LinkDown       Rule `koanf:"link_down"`
	LinkQueue      Rule `koanf:"link_queue_over_bytes"`
	Store          Rule `koanf:"store_unreachable"`
	HistoryBacklog Rule `koanf:"history_backlog_over"`
	LoadImbalance  Rule `koanf:"load_imbalance"`
}

// Rule is one alert rule of the watchdog.
type Rule struct {
	Threshold int           `koanf:"threshold" doc:"Threshold of the rule (its unit is in the rule's name; docs/watchdog.md)."`
	For       time.Duration `koanf:"for" doc:"How long the condition must hold before the alert fires (pending until then); a shorter flap never fires."`
	Severity  string        `koanf:"severity" doc:"critical, warning or info; off disables the rule."`
	Action    string        `koanf:"action" doc:"none, or drain: the node is drained while the alert fires and undrained when it resolves (within watchdog.max_drained)."`
	Nodes     string        `koanf:"nodes" doc:"Comma-separated broker names the rule applies to. Empty: every broker."`
}

// Keys returns the API keys of the watchdog, split.
func (w Watchdog) Keys() []string { return splitList(w.APIKeys) }

// WebhookList returns the webhook URLs, split.
func (w Watchdog) WebhookList() []string { return splitList(w.Webhooks) }

// NodeList returns the node names a rule is limited to, or nil for all.
func (r Rule) NodeList() []string { return splitList(r.Nodes) }

// Defaults returns the configuration used for every key that no file,
// environment variable or flag sets.
func Defaults() Config {
	return Config{
		Data: "./data",
		Log:  Log{Level: "info", Format: "text"},
		Store: Store{
			Database:       "rtm",
			ConnectTimeout: 30 * time.Second,
		},
		Auth: Auth{Devices: "token", TokenTTL: 30 * 24 * time.Hour, ACLSubscribeRefusal: "not_authorized"},
		Broker: Broker{
			MQTTAddr:            ":1883",
			WSAddr:              ":8083",
			TLSAddr:             ":8883",
			WSSAddr:             ":8084",
			AdminAddr:           ":9101",
			Capacity:            100000,
			MaxPacketSize:       1 << 20,
			MaxInflight:         128,
			MaxQueued:           1000,
			MaxQueuedBytes:      4 << 20,
			MaxQueuedBytesTotal: 256 << 20,
			MaxReadingBytes:     64 << 20,
			MaxConnectSize:      64 << 10,
			ConnectTimeout:      10 * time.Second,
			ReadTimeout:         30 * time.Second,
			BackpressureMaxWait: time.Second,
			WriteCoalesce:       200 * time.Microsecond,
			AckCoalesce:         2 * time.Millisecond,
			KeepaliveMax:        20 * time.Minute,
			SessionExpiry:       24 * time.Hour,
			EvacuateRate:        100,
			ShutdownTimeout:     15 * time.Second,
			Durability:          "on",
		},
		Cluster: Cluster{
			GossipAddr:     ":7946",
			LinkAddr:       ":7947",
			LinkTLS:        "auto",
			LinkQueueBytes: 64 << 20,
			FailedPeerHold: 2 * time.Minute,
			ProbeInterval:  time.Second,
			ClaimTimeout:   2 * time.Second,
		},
		Router: Router{
			Addr:       ":8090",
			StaleAfter: 15 * time.Second,
		},
		PushAPI: PushAPI{
			Addr:           ":8080",
			MaxBody:        8 << 20,
			MaxPayload:     256 << 10,
			PublishTimeout: 5 * time.Second,
		},
		Groups: Groups{
			MaxMembers:      1000,
			RefreshInterval: 10 * time.Second,
		},
		Watchdog: Watchdog{
			Addr:           ":8082",
			Interval:       5 * time.Second,
			WebhookTimeout: 5 * time.Second,
			WebhookRetry:   10 * time.Minute,
			MaxDrained:     1,
			ImbalanceMin:   100,
			Rules: WatchdogRules{
				NodeDown:       Rule{Severity: "critical"},
				NodeNotReady:   Rule{For: 30 * time.Second, Severity: "critical"},
				ClusterSize:    Rule{Threshold: 1, Severity: "critical"},
				CapacityPct:    Rule{Threshold: 90, For: time.Minute, Severity: "warning"},
				Memory:         Rule{Threshold: 2 << 30, For: time.Minute, Severity: "warning"},
				DroppedRate:    Rule{Threshold: 10, For: time.Minute, Severity: "warning"},
				LinkDown:       Rule{For: 30 * time.Second, Severity: "critical"},
				LinkQueue:      Rule{Threshold: 32 << 20, For: 30 * time.Second, Severity: "warning"},
				Store:          Rule{For: 30 * time.Second, Severity: "critical"},
				HistoryBacklog: Rule{Threshold: 0, For: time.Minute, Severity: "warning"},
				LoadImbalance:  Rule{Threshold: 3, For: 5 * time.Minute, Severity: "info"},
			},
		},
		History: History{
			Topics:        "groups/#,push/#,devices/+/inbox",
			Retention:     30 * 24 * time.Hour,
			BatchSize:     4096,
			BatchLinger:   50 * time.Millisecond,
			QueueLen:      100000,
			QueueBytes:    64 << 20,
			SpoolMaxBytes: 1 << 30,
			FlushTimeout:  5 * time.Second,
			PurgeInterval: time.Hour,
		},
	}
}

// DevDefaults returns the defaults of `rtm dev`: everything on loopback, so
// an anonymous development broker is not exposed to the network by accident.
func DevDefaults() Config {
	c := Defaults()
	c.Broker.NodeName = "dev"
	c.Broker.MQTTAddr = "127.0.0.1:1883"
	c.Broker.WSAddr = "127.0.0.1:8083"
	c.Broker.TLSAddr = "127.0.0.1:8883"
	c.Broker.WSSAddr = "127.0.0.1:8084"
	c.Broker.AdminAddr = "127.0.0.1:9101"
	c.Cluster.GossipAddr = "127.0.0.1:7946"
	c.Cluster.LinkAddr = "127.0.0.1:7947"
	c.Router.Name = "dev-router"
	c.Router.Addr = "127.0.0.1:8090"
	c.PushAPI.Name = "dev-pushapi"
	c.PushAPI.Addr = "127.0.0.1:8080"
	c.Watchdog.Name = "dev-watchdog"
	c.Watchdog.Addr = "127.0.0.1:8082"
	c.Auth.Devices = "anonymous"
	return c
}
