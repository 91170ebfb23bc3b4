package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/app"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/obs"
	"github.com/rtm-dev/rtm/internal/procs"
	"github.com/rtm-dev/rtm/internal/store"
)

func devCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run every role in one process with the embedded store (for development)",
		Long: `Run every role of rtm in one process: the MQTT broker, the router, the push
API, the watchdog (dashboard) and the embedded MongoDB-compatible store (in <data>/store, default
./data/store). Unless configured, an API key, a device-token key and an admin
key are generated at start; the banner prints the API and admin keys.

Listeners bind to 127.0.0.1 by default and anonymous devices are allowed, so
do not expose 'rtm dev' to a network. Stop it with Ctrl-C.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runRoles(cmd, config.DevDefaults(), true, app.RoleBroker, app.RoleRouter, app.RolePushAPI, app.RoleWatchdog)
		},
	}
	addConfigFlags(cmd, config.DevDefaults(), append(commonFlags, brokerFlags...)...)
	return cmd
}

// pushFlags are the push API's own, besides the gossip ones.
var pushFlags = []string{"pushapi.addr", "pushapi.api_keys", "gossip-addr", "advertise-host", "join", "cluster-secret"}

func pushapiCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pushapi",
		Short: "Run the push API: HTTP for applications to reach devices",
		Long: `Run the push API (HTTP, Echo): publish, push to channels, direct messages to
device inboxes, server-side channel subscriptions, presence, device tokens,
kick. Every endpoint but /healthz needs 'Authorization: Bearer <key>' with a
key of pushapi.api_keys (--api-key, comma-separated). It reaches the brokers
as an MQTT 5 client (found through gossip: --join a broker's gossip address)
with a service token signed by auth.token_keys, which must be the brokers'.
See docs/api.md.

On a host that also runs a broker, give it another gossip port
(--gossip-addr :7949).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runRoles(cmd, config.Defaults(), false, app.RolePushAPI)
		},
	}
	addConfigFlags(cmd, config.Defaults(), append(commonFlags, pushFlags...)...)
	return cmd
}

// devSecrets fills the keys rtm dev needs and the user did not set: an API
// key and an admin key (printed in the banner) and a device-token key
// (which the push API signs its own connection with).
func devSecrets(cfg *config.Config) {
	random := func() string {
		var b [24]byte
		_, _ = rand.Read(b[:])
		return hex.EncodeToString(b[:])
	}
	if cfg.PushAPI.APIKeys == "" {
		cfg.PushAPI.APIKeys = "dev-" + random()
	}
	if cfg.Auth.TokenKeys == "" {
		cfg.Auth.TokenKeys = random()
	}
	if cfg.Broker.AdminKeys == "" {
		cfg.Broker.AdminKeys = "admin-" + random()
	}
}

// watchdogFlags are the watchdog's own, besides the gossip ones.
var watchdogFlags = []string{"watchdog.addr", "gossip-addr", "advertise-host", "join", "cluster-secret"}

func watchdogCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "watchdog",
		Short: "Run the watchdog: polls every broker, raises alerts, serves the dashboard",
		Long: `Run the watchdog. It joins the gossip cluster (--join a broker's gossip
address) and watches every broker that joins, with nothing configured per
broker: it polls each one's admin /v1/stats every watchdog.interval (it needs
the brokers' admin key, broker.admin_keys), evaluates the alert rules of
watchdog.rules, keeps alerts in the store (--store-uri), notifies
watchdog.webhooks, $SYS/rtm/alerts and the log, and serves the dashboard at /
and its API (/v1/alerts, /v1/nodes, /v1/series, /v1/events). See
docs/watchdog.md.

On a host that also runs a broker, give it another gossip port
(--gossip-addr :7950).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runRoles(cmd, config.Defaults(), false, app.RoleWatchdog)
		},
	}
	addConfigFlags(cmd, config.Defaults(), append(commonFlags, watchdogFlags...)...)
	return cmd
}

// routerFlags are the router role's own, besides the gossip ones it shares
// with the broker.
var routerFlags = []string{"router.addr", "gossip-addr", "advertise-host", "join", "cluster-secret"}

func routerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "router",
		Short: "Run a router: tells each device which broker to connect to",
		Long: `Run a router. It joins the gossip cluster (--join a broker's gossip address)
and learns the brokers and their load from it; devices ask it
GET /v1/route?client_id=ID&transport=tcp|ws|tls|wss and get the least-loaded
healthy broker. Several routers may run side by side; they share nothing.
See docs/router.md.

On a host that also runs a broker, give the router another gossip port
(--gossip-addr :7948).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runRoles(cmd, config.Defaults(), false, app.RoleRouter)
		},
	}
	addConfigFlags(cmd, config.Defaults(), append(commonFlags, routerFlags...)...)
	return cmd
}

func brokerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "broker",
		Short: "Run an MQTT broker node",
		Long: `Run one MQTT 3.1.1/5.0 broker node: TCP, WebSocket (/mqtt), and TLS and
secure WebSocket when broker.tls_cert and broker.tls_key are set, plus the
admin HTTP server (/healthz, /readyz, /metrics open; /v1/... with a key of
broker.admin_keys, required with auth.devices=token).

The broker uses the store given by --store-uri, or starts the embedded one in
<data>/store. SIGINT or SIGTERM stops it gracefully: it stops accepting,
disconnects clients (MQTT 5: reason 0x8B), closes the store and exits 0.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runRoles(cmd, config.Defaults(), false, app.RoleBroker)
		},
	}
	addConfigFlags(cmd, config.Defaults(), append(commonFlags, brokerFlags...)...)
	return cmd
}

// runRoles runs the roles until a signal, then shuts them down within
// broker.shutdown_timeout.
func runRoles(cmd *cobra.Command, base config.Config, banner bool, roles ...app.Role) error {
	cfg, err := loadConfig(cmd, base)
	if err != nil {
		return err
	}
	if banner {
		devSecrets(&cfg)
	}
	log, err := obs.NewLogger(cmd.ErrOrStderr(), cfg.Log.Level, cfg.Log.Format)
	if err != nil {
		return usageError{err}
	}
	a, err := app.New(cfg, app.Options{Roles: roles, Version: version, Logger: log})
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signalContext(cmd.ErrOrStderr())
	defer stop()
	if adaptProcs {
		pctx, pstop := context.WithCancel(ctx)
		defer pstop()
		go procs.Run(pctx, log)
	}
	if _, err := a.Start(ctx); err != nil {
		return err
	}
	if banner {
		printBanner(cmd.OutOrStdout(), cfg, a)
	}
	// A role that fails while running (its HTTP server or gossip died)
	// stops the process with exit code 1, so a supervisor restarts it.
	var failed error
	select {
	case <-ctx.Done():
		log.Info("signal received, shutting down", "timeout", cfg.Broker.ShutdownTimeout)
	case <-a.Done():
		failed = a.Err()
		log.Error("a role failed, shutting down", "error", failed, "timeout", cfg.Broker.ShutdownTimeout)
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.Broker.ShutdownTimeout)
	defer cancel()
	if err := a.Shutdown(sctx); err != nil {
		return errors.Join(failed, fmt.Errorf("shutdown: %w", err))
	}
	if failed != nil {
		return failed
	}
	log.Info("stopped")
	return nil
}

func printBanner(w io.Writer, cfg config.Config, a *app.App) {
	b := a.Broker()
	fmt.Fprintf(w, "\nrtm %s dev: all roles in one process, data in %s\n\n", version, cfg.Data)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  MQTT\tmqtt://%s\n", b.Addr(broker.ListenerTCP))
	if addr := b.Addr(broker.ListenerWS); addr != "" {
		fmt.Fprintf(tw, "  WebSocket\tws://%s/mqtt\n", addr)
	}
	if addr := b.Addr(broker.ListenerTLS); addr != "" {
		fmt.Fprintf(tw, "  TLS\tmqtts://%s\n", addr)
	}
	if addr := b.Addr(broker.ListenerWSS); addr != "" {
		fmt.Fprintf(tw, "  Secure WebSocket\twss://%s/mqtt\n", addr)
	}
	admin := "http://" + b.Addr(broker.ListenerAdmin)
	fmt.Fprintf(tw, "  Admin\t%s/healthz  %s/readyz  %s/metrics  %s/v1/stats\n", admin, admin, admin, admin)
	fmt.Fprintf(tw, "  Admin key\t%s\n", cfg.Broker.AdminKeyList()[0])
	if r := a.Router(); r != nil {
		fmt.Fprintf(tw, "  Router\thttp://%s/v1/route?client_id=ID  http://%s/v1/nodes\n", r.Addr(), r.Addr())
	}
	if p := a.PushAPI(); p != nil {
		fmt.Fprintf(tw, "  Push API\thttp://%s/v1/...  http://%s/openapi.json\n", p.Addr(), p.Addr())
		fmt.Fprintf(tw, "  API key\t%s\n", cfg.PushAPI.Keys()[0])
	}
	if wd := a.Watchdog(); wd != nil {
		fmt.Fprintf(tw, "  Dashboard\thttp://%s/  (watchdog: http://%s/v1/alerts  http://%s/v1/nodes)\n", wd.Addr(), wd.Addr(), wd.Addr())
	}
	kind := "external"
	if a.Store().Embedded() {
		kind = "embedded"
	}
	fmt.Fprintf(tw, "  Store\t%s (%s, database %s)\n", a.Store().URI(), kind, cfg.Store.Database)
	_ = tw.Flush()
	if cfg.Auth.Devices == "anonymous" {
		fmt.Fprint(w, "\n  !! ANONYMOUS DEVICES ALLOWED: any client can connect without credentials.\n")
	}
	fmt.Fprintf(w, "\nTry it:\n  mosquitto_sub -h %[1]s -p %[2]s -t 'demo/#' -v\n  mosquitto_pub -h %[1]s -p %[2]s -t demo/hello -m hi\n",
		hostOf(b.Addr(broker.ListenerTCP)), portOf(b.Addr(broker.ListenerTCP)))
	if p := a.PushAPI(); p != nil {
		fmt.Fprintf(w, "  mosquitto_sub -h %[1]s -p %[2]s -t push/news -v\n  curl -H 'Authorization: Bearer %[3]s' -d '{\"payload\":\"hello\"}' http://%[4]s/v1/channels/news/messages\n",
			hostOf(b.Addr(broker.ListenerTCP)), portOf(b.Addr(broker.ListenerTCP)), cfg.PushAPI.Keys()[0], p.Addr())
	}
	fmt.Fprint(w, "\nStop with Ctrl-C.\n\n")
}

func storeCmd() *cobra.Command {
	var addr, data string
	cmd := &cobra.Command{
		Use:   "store",
		Short: "Run the embedded MongoDB-compatible store alone, for several rtm processes to share",
		Long: `Run the embedded MongoDB-compatible store (FerretDB with SQLite files in
--data) as a process of its own, so that several rtm processes on this machine
share one store:

  rtm store --addr 127.0.0.1:27017 --data ./data/shared-store
  rtm broker --store-uri mongodb://127.0.0.1:27017/ ...

It listens on loopback only. For more than one machine, use MongoDB.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd, config.Defaults())
			if err != nil {
				return err
			}
			if data == "" {
				data = cfg.Data + "/store"
			}
			log, err := obs.NewLogger(cmd.ErrOrStderr(), cfg.Log.Level, cfg.Log.Format)
			if err != nil {
				return usageError{err}
			}
			ctx, stop := signalContext(cmd.ErrOrStderr())
			defer stop()
			// FerretDB formats its bind error instead of wrapping it: try
			// the address first, so a port in use is said as such.
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return &config.ListenError{Key: "--addr", Addr: addr, Err: err}
			}
			_ = ln.Close()
			e, err := store.StartEmbedded(ctx, store.EmbeddedOptions{Addr: addr, DataDir: data, Logger: log})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "rtm store: %s (data in %s); use --store-uri %s\n", e.URI(), data, e.URI())
			<-ctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), cfg.Broker.ShutdownTimeout)
			defer cancel()
			if err := e.Close(sctx); err != nil && !errors.Is(err, context.Canceled) {
				return fmt.Errorf("store shutdown: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "addr", "127.0.0.1:27017", "listen address (loopback; port 0 picks a free one)")
	cmd.Flags().StringVar(&data, "data", "", "directory of the store's files (default <data>/store from the configuration)")
	cmd.Flags().String("config", "", "YAML configuration file (for log.* and data)")
	config.AddFlags(cmd.Flags(), config.Defaults(), "log-level", "log-format")
	return cmd
}
