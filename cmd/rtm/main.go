// Command rtm is the single binary of rtm, a clustered real-time messaging
// platform: one subcommand per role, and `rtm dev` for all of them at once.
//
// Exit codes: 0 after a clean stop, 1 when a role fails or a shutdown
// overruns its deadline, 2 for a usage or configuration error (an unknown
// command or flag, an invalid value, a listen address already in use).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/rtm-dev/rtm/internal/config"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

// usageError marks errors that exit with code 2.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// adaptProcs: the roles' process adapts GOMAXPROCS to its load
// (internal/procs). Set by main only: a test that runs the commands in its
// own process keeps its GOMAXPROCS.
var adaptProcs bool

func main() {
	adaptProcs = true
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	fmt.Fprintf(stderr, "rtm: %v\n", err)
	var ue usageError
	var le *config.ListenError
	if errors.As(err, &ue) || errors.As(err, &le) {
		return 2
	}
	return 1
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "rtm",
		Short: "rtm: a self-hosted, clustered real-time messaging platform (MQTT 3.1.1 and 5.0)",
		Long: `rtm runs MQTT brokers for IoT devices and phones, with MongoDB (or an
embedded MongoDB-compatible store) for persistence.

Start everything on this machine with 'rtm dev'. Each role also runs alone.
Configuration comes from a YAML file (--config), RTM_* environment variables
and flags, in increasing order of precedence; 'rtm config' prints the result.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(devCmd(), brokerCmd(), routerCmd(), pushapiCmd(), watchdogCmd(), storeCmd(), clusterCmd(), nodeCmd(), configCmd(), benchCmd(), versionCmd())
	refuseUnknownCommands(root)
	return root
}

// refuseUnknownCommands makes `rtm nosuch` (and `rtm cluster nosuch`) a
// usage error, exit code 2: cobra reports an unknown command of a group as a
// plain error. A group named alone prints its help.
func refuseUnknownCommands(cmd *cobra.Command) {
	if cmd.HasSubCommands() && !cmd.Runnable() {
		cmd.Args = cobra.ArbitraryArgs
		cmd.RunE = func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return cmd.Help()
			}
			return usageError{fmt.Errorf("unknown command %q for %q\nRun '%s --help' for usage", args[0], cmd.CommandPath(), cmd.CommandPath())}
		}
	}
	for _, c := range cmd.Commands() {
		refuseUnknownCommands(c)
	}
}

// commonFlags are taken by every role (SPEC section 9).
var commonFlags = []string{"data", "store-uri", "log-level", "log-format"}

// brokerFlags are the broker role's own.
var brokerFlags = []string{"node-name", "mqtt-addr", "ws-addr", "tls-addr", "wss-addr", "tls-cert", "tls-key", "admin-addr", "capacity", "auth-devices",
	"gossip-addr", "advertise-host", "join", "cluster-secret", "link-addr"}

// loadConfig reads the configuration of cmd: defaults, then --config,
// environment and flags.
func loadConfig(cmd *cobra.Command, base config.Config) (config.Config, error) {
	path, _ := cmd.Flags().GetString("config")
	cfg, err := config.Load(base, config.FromEnvironment(path, cmd.Flags()))
	if err != nil {
		return cfg, usageError{fmt.Errorf("invalid configuration:\n%w", err)}
	}
	return cfg, nil
}

func addConfigFlags(cmd *cobra.Command, base config.Config, flags ...string) {
	cmd.Flags().String("config", "", "YAML configuration file (keys: docs/configuration.md)")
	config.AddFlags(cmd.Flags(), base, flags...)
}

// signalContext ends on the first SIGINT or SIGTERM. A second one exits at
// once with code 1, for when a graceful stop takes too long for the user.
func signalContext(stderr io.Writer) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-ch
		cancel()
		<-ch
		fmt.Fprintln(stderr, "rtm: second signal, exiting now")
		os.Exit(1)
	}()
	return ctx, func() { signal.Stop(ch); cancel() }
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of rtm and of the Go toolchain that built it",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			rev := "unknown"
			if bi, ok := debug.ReadBuildInfo(); ok {
				for _, s := range bi.Settings {
					if s.Key == "vcs.revision" {
						rev = s.Value
					}
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "rtm %s (commit %s, %s, %s/%s)\n", version, rev, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		},
	}
}

func configCmd() *cobra.Command {
	var dev bool
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Print the effective configuration as YAML, secrets masked",
		Long: `Print the configuration a role would run with: defaults, overridden by
--config, then RTM_* environment variables, then flags. Passwords are masked.
The output is a valid configuration file. With --dev, the defaults are those
of 'rtm dev' (every listener on 127.0.0.1).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			base := config.Defaults()
			if dev {
				base = config.DevDefaults()
			}
			cfg, err := loadConfig(cmd, base)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(cfg.Masked().YAML())
			return err
		},
	}
	cmd.Flags().BoolVar(&dev, "dev", false, "start from the defaults of 'rtm dev'")
	addConfigFlags(cmd, config.Defaults(), append(commonFlags, brokerFlags...)...)
	return cmd
}
