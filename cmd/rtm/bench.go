package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/rtm-dev/rtm/internal/loadgen"
)

func benchCmd() *cobra.Command {
	cfg := loadgen.Defaults()
	var addrs, pubAddrs, subAddrs []string
	var version string
	var qos int
	var asJSON bool
	var pids []int
	var scenarios strings.Builder
	for _, s := range loadgen.Scenarios {
		fmt.Fprintf(&scenarios, "  %-7s -c %s: %s\n", s.Name, s.Clients, s.What)
	}
	cmd := &cobra.Command{
		Use:   "bench SCENARIO --addr host:port[,host:port...] [flags]",
		Short: "Load-test any MQTT broker: connections, publishers, subscribers, loss and latency",
		Long: `Drive an MQTT broker (rtm, or any other) with a fixed set of clients for a
bounded time and report what was sent, acknowledged, delivered, lost and
duplicated, with publish-to-delivery latency from a send time and sequence
number carried in each payload (so --size is at least 24 bytes).

Scenarios (TOPIC is --topic, default bench/<random run ID>):
` + scenarios.String() + `
Every run stops by itself: publishers stop after --duration (or once
--count messages are sent, if that comes first), then the run
waits up to --drain for messages on their way (less once all are in, or
nothing arrived for a second); what has not arrived then is lost. The conn
scenario holds its connections until --duration ends.

Addresses: host:port (TCP), tls://host:port, ws://host:port/mqtt or
wss://host:port/mqtt; a comma-separated list spreads the clients over
several brokers, and --pub-addr/--sub-addr put publishers and subscribers on
different ones (e.g. different nodes of a cluster). With --broker-pid
(comma-separated for a cluster) the report adds the brokers' CPU time,
messages per broker CPU-second and RSS, read from /proc.

A progress line goes to standard error every second (a bar on a terminal),
then a summary table to standard output, or with --json one JSON object:
scenario, mqtt_version, qos, publishers, subscribers, payload_bytes,
target_rate, duration_s, elapsed_s, sent, acked, refused, expected,
delivered, duplicated, lost, sent_per_s, delivered_per_s, latency_ms {p50,
p90, p99, p99_9, max, mean}, for conn: connections, conn_failed, conn_per_s,
conn_latency_ms, rss_per_conn_bytes (read --rss-after the last connect),
rss_per_conn_fresh_bytes (1 s after it), rss_after_s; broker {cpu_s, cpu_share, rss_bytes,
rss_before_bytes, msgs_per_cpu_s} with --broker-pid; generator {cpu_s,
cpu_share}: the generator's own CPU, to tell when it is the bottleneck; and
errors.

Exit codes: 0 when the run completed (read lost and errors for its
outcome), 1 when it could not run (no connection, a refused subscription),
2 for invalid flags.

Examples:
  rtm bench pairs --addr 127.0.0.1:1883 --qos 1 --rate 1000 --duration 10s
  rtm bench fanin --addr 127.0.0.1:1883 --duration 3s --json
  rtm bench fanout -c 100 --addr 127.0.0.1:1883 --version 3.1.1
  rtm bench conn -c 10000 --rate 2000 --duration 30s --addr 127.0.0.1:1883 --broker-pid 1234
  rtm bench pairs --pub-addr node1:1883 --sub-addr node2:1883,node3:1883 --qos 1
  rtm bench pairs --addr 127.0.0.1:1883 --token-key "$RTM_AUTH_TOKEN_KEYS"`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageError{fmt.Errorf("want one scenario (conn, pub, sub, fanin, fanout, pairs), got %d arguments", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg.Scenario = args[0]
			cfg.Addrs, cfg.PubAddrs, cfg.SubAddrs = splitAddrs(addrs), splitAddrs(pubAddrs), splitAddrs(subAddrs)
			cfg.BrokerPIDs = pids
			switch version {
			case "5", "5.0":
				cfg.Version = loadgen.V5
			case "3.1.1", "3", "4":
				cfg.Version = loadgen.V311
			default:
				return usageError{fmt.Errorf("--version: %q, want 3.1.1 or 5", version)}
			}
			if qos < 0 || qos > 2 {
				return usageError{fmt.Errorf("--qos: %d, want 0, 1 or 2", qos)}
			}
			cfg.QoS = byte(qos)
			if err := cfg.Validate(); err != nil {
				return usageError{err}
			}
			stderr := cmd.ErrOrStderr()
			print, done := loadgen.ProgressPrinter(stderr, isTerminal(stderr))
			cfg.Progress = print
			ctx, stop := signalContext(stderr)
			defer stop()
			res, err := loadgen.Run(ctx, cfg)
			done()
			if err != nil {
				return fmt.Errorf("bench %s: %w", cfg.Scenario, err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(res)
			}
			return loadgen.WriteTable(out, res)
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&addrs, "addr", nil, "broker address(es): host:port, tls://, ws://host:port/mqtt, wss://; comma-separated to spread clients")
	f.StringSliceVar(&pubAddrs, "pub-addr", nil, "publishers' broker address(es), instead of --addr")
	f.StringSliceVar(&subAddrs, "sub-addr", nil, "subscribers' broker address(es), instead of --addr")
	f.StringVar(&version, "version", "5", "MQTT version: 3.1.1 or 5")
	f.IntVar(&qos, "qos", 0, "QoS of publishes and subscriptions: 0, 1 or 2")
	f.IntVarP(&cfg.Clients, "clients", "c", 0, "clients: connections (conn, default 1000), publishers (pub, fanin), subscribers (sub, fanout), pairs (pairs); default 10")
	f.IntVar(&cfg.Size, "size", cfg.Size, "payload bytes (at least 24)")
	f.Float64Var(&cfg.Rate, "rate", 0, "messages per second over all publishers (conn: connections per second); 0 is unlimited")
	f.DurationVar(&cfg.Duration, "duration", cfg.Duration, "how long to publish (conn: to hold the connections)")
	f.Int64Var(&cfg.Count, "count", 0, "messages to publish over all publishers, then stop (0: publish until --duration ends, which bounds the run either way)")
	f.DurationVar(&cfg.Drain, "drain", cfg.Drain, "after publishing, how long to wait at most for messages on their way")
	f.IntVar(&cfg.Inflight, "inflight", cfg.Inflight, "QoS 1/2: unacknowledged publishes per publisher (capped by the broker's Receive Maximum)")
	f.StringVar(&cfg.Topic, "topic", "", "topic prefix (default bench/<run ID>; pub and sub: bench)")
	f.StringVar(&cfg.Username, "username", "", "MQTT user name")
	f.StringVar(&cfg.Password, "password", "", "MQTT password")
	f.StringVar(&cfg.TokenKey, "token-key", "", "a key of rtm's auth.token_keys: each client connects with a device token signed for its client ID")
	f.StringVar(&cfg.TLSCA, "tls-ca", "", "PEM file of the CA that signed the broker's certificate (tls://, wss://)")
	f.BoolVar(&cfg.Insecure, "insecure", false, "do not verify the broker's TLS certificate")
	f.IntSliceVar(&pids, "broker-pid", nil, "broker process ID(s) on this machine: report their CPU time and RSS")
	f.DurationVar(&cfg.Settle, "settle", 0, "pause between subscribing and publishing, for subscriptions to reach the other nodes of a cluster")
	f.DurationVar(&cfg.RSSAfter, "rss-after", 0, "conn: read the brokers' RSS this long after the last connection is made (default 1s), to see their idle state; --duration must leave the time")
	f.IntVar(&cfg.ConnectConcurrency, "concurrency", cfg.ConnectConcurrency, "connections being set up at once")
	f.BoolVar(&asJSON, "json", false, "print one JSON object at the end instead of the table")
	return cmd
}

func splitAddrs(list []string) []string {
	var out []string
	for _, a := range list {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}

// isTerminal reports whether w is a terminal, for the progress bar.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return !errors.Is(err, unix.ENOTTY) && err == nil
}
