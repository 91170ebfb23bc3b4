// Package loadgen is rtm's MQTT load generator, the engine of `rtm bench`
// and of the harnesses under bench/: it drives any MQTT 3.1.1 or 5 broker
// over TCP, TLS or WebSocket with a fixed topology of publishers and
// subscribers for a bounded time, and counts what was sent, acknowledged,
// delivered, lost and duplicated, with latencies from a send time and a
// sequence number carried in each payload.
package loadgen

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
)

// Scenarios, by name.
const (
	ScenarioConn   = "conn"
	ScenarioPub    = "pub"
	ScenarioSub    = "sub"
	ScenarioFanIn  = "fanin"
	ScenarioFanOut = "fanout"
	ScenarioPairs  = "pairs"
)

// Scenarios lists every scenario with what it runs; Clients means what -c
// counts in it.
var Scenarios = []struct{ Name, Clients, What string }{
	{ScenarioConn, "connections", "open N connections at --rate per second (source addresses spread over 127.0.0.0/8 when the broker is on loopback), hold them idle until --duration ends"},
	{ScenarioPub, "publishers", "N publishers on TOPIC/<i>; nothing subscribes (pair it with `sub` in another process)"},
	{ScenarioSub, "subscribers", "N subscribers on TOPIC/#, counting and timing what arrives (from `rtm bench pub` or anything sending its payload format)"},
	{ScenarioFanIn, "publishers", "N publishers on TOPIC/<i>, one subscriber on TOPIC/+"},
	{ScenarioFanOut, "subscribers", "one publisher on TOPIC/all, N subscribers on it: each message is delivered N times"},
	{ScenarioPairs, "pairs", "N publishers, each with its own subscriber on TOPIC/<i>"},
}

// HeaderSize is the bytes every payload starts with: run ID (4), publisher
// index (4), sequence number (8) and send time in Unix nanoseconds (8),
// big-endian. The payload size must be at least this.
const HeaderSize = 24

// Config is one run.
type Config struct {
	Scenario string
	// Addrs are the brokers; clients are spread over them round-robin.
	// PubAddrs and SubAddrs, when set, replace them for publishers and
	// subscribers (e.g. publishers on one cluster node, subscribers on
	// others).
	Addrs, PubAddrs, SubAddrs []string
	Version                   byte // V311 or V5
	QoS                       byte
	Clients                   int // 0: the scenario's default
	Size                      int // payload bytes
	// Rate is messages per second over all publishers, or connections per
	// second in the conn scenario; 0 is as fast as possible.
	Rate     float64
	Duration time.Duration
	// Count, when set, is the messages to publish over all publishers:
	// publishing ends when they are sent or the duration ends, whichever
	// comes first.
	Count int64
	// Drain is how long to wait after the publishers stop for messages
	// still on their way; what has not arrived then is lost.
	Drain time.Duration
	// Inflight is each QoS 1/2 publisher's window of unacknowledged
	// publishes (capped by the broker's Receive Maximum).
	Inflight int
	// Topic is the prefix of every topic; empty: "bench/<run ID>" (pub and
	// sub: "bench", so two processes meet).
	Topic              string
	Username, Password string
	// TokenKey is a key of rtm's auth.token_keys: each client connects
	// with a device token signed for its client ID.
	TokenKey string
	TLSCA    string
	Insecure bool
	// BrokerPIDs are processes on this machine whose CPU time and RSS the
	// report includes (all nodes of a cluster, summed).
	BrokerPIDs []int
	// Settle is a pause between the last SUBACK and the first publish,
	// for subscriptions to reach the other nodes of a cluster.
	Settle time.Duration
	// RSSAfter (conn scenario) is how long after the last connection is
	// made the brokers' RSS is read for RSSPerConn: long enough for a
	// broker to settle into its idle state (rtm parks a connection idle
	// for 5 s and returns a connect storm's garbage 10-15 s after it
	// ends). RSS is also read 1 s after the last connection
	// (RSSPerConnFresh).
	RSSAfter time.Duration
	// ConnectConcurrency bounds the connections being set up at once.
	ConnectConcurrency int
	// SetupTimeout bounds connecting and subscribing before the clock
	// starts.
	SetupTimeout time.Duration
	// Progress, when set, is called about once a second.
	Progress func(Progress)
}

// Defaults returns the configuration `rtm bench` starts from.
func Defaults() Config {
	return Config{
		Version: V5, QoS: 0, Size: 64, Duration: 10 * time.Second, Drain: 5 * time.Second,
		Inflight: 64, ConnectConcurrency: 64, SetupTimeout: 60 * time.Second,
	}
}

// DefaultClients is -c for each scenario when not given.
func DefaultClients(scenario string) int {
	if scenario == ScenarioConn {
		return 1000
	}
	return 10
}

// Limits keep one run within what one machine can do and what the
// generator's counters hold.
const (
	MaxClients  = 200000
	MaxDuration = 24 * time.Hour
	MaxSize     = 1 << 20
)

// Validate checks c and fills its defaults; the error names the flag.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	known := false
	for _, s := range Scenarios {
		known = known || s.Name == c.Scenario
	}
	if !known {
		names := make([]string, len(Scenarios))
		for i, s := range Scenarios {
			names[i] = s.Name
		}
		bad("unknown scenario %q (want one of %s)", c.Scenario, strings.Join(names, ", "))
	}
	if len(c.Addrs) == 0 && (len(c.PubAddrs) == 0 || len(c.SubAddrs) == 0) {
		bad("--addr: no broker address")
	}
	for _, list := range [][]string{c.Addrs, c.PubAddrs, c.SubAddrs} {
		for _, a := range list {
			if _, err := ParseTarget(a); err != nil {
				bad("--addr: %v", err)
			}
		}
	}
	if c.Version != V311 && c.Version != V5 {
		bad("--version: %d is not 3.1.1 (4) or 5", c.Version)
	}
	if c.QoS > 2 {
		bad("--qos: %d, want 0, 1 or 2", c.QoS)
	}
	if c.Clients == 0 {
		c.Clients = DefaultClients(c.Scenario)
	}
	if c.Clients < 1 || c.Clients > MaxClients {
		bad("-c/--clients: %d, want 1 to %d", c.Clients, MaxClients)
	}
	if c.Size < HeaderSize || c.Size > MaxSize {
		bad("--size: %d bytes, want %d (the sequence and send time) to %d", c.Size, HeaderSize, MaxSize)
	}
	if c.Rate < 0 || c.Rate > 1e8 || c.Rate != c.Rate {
		bad("--rate: %v, want 0 (unlimited) or a positive rate up to 1e8", c.Rate)
	}
	if c.Duration <= 0 || c.Duration > MaxDuration {
		bad("--duration: %v, want more than 0 and at most %v", c.Duration, MaxDuration)
	}
	if c.Count < 0 {
		bad("--count: %d, want 0 (no limit) or more", c.Count)
	}
	if c.Drain < 0 || c.Drain > 10*time.Minute {
		bad("--drain: %v, want 0 to 10m", c.Drain)
	}
	if c.Inflight < 1 || c.Inflight > 65535 {
		bad("--inflight: %d, want 1 to 65535", c.Inflight)
	}
	if c.Settle < 0 || c.Settle > time.Minute {
		bad("--settle: %v, want 0 to 1m", c.Settle)
	}
	if c.RSSAfter < 0 || c.RSSAfter > 10*time.Minute {
		bad("--rss-after: %v, want 0 to 10m", c.RSSAfter)
	}
	if c.ConnectConcurrency < 1 {
		c.ConnectConcurrency = 64
	}
	if c.SetupTimeout <= 0 {
		c.SetupTimeout = 60 * time.Second
	}
	if c.TokenKey != "" && (c.Username != "" || c.Password != "") {
		bad("--token-key: not with --username/--password (the token is the password, the client ID the user name)")
	}
	if strings.ContainsAny(c.Topic, "+#") {
		bad("--topic: %q has a wildcard; give a topic prefix", c.Topic)
	}
	for _, p := range c.BrokerPIDs {
		if p <= 0 {
			bad("--broker-pid: %d is not a process ID", p)
		} else if _, err := os.Stat(fmt.Sprintf("/proc/%d/stat", p)); err != nil {
			bad("--broker-pid: no process %d on this machine", p)
		}
	}
	return errors.Join(errs...)
}

func (c *Config) tlsConfig() (*tls.Config, error) {
	cfg := &tls.Config{InsecureSkipVerify: c.Insecure} //nolint:gosec // only when the user asks for it
	if c.TLSCA != "" {
		pem, err := os.ReadFile(c.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca: no PEM certificate in %s", c.TLSCA)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}
