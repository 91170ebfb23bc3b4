package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/broker/link"
	"github.com/rtm-dev/rtm/internal/cluster"
)

func clusterCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Inspect a cluster, or start one on this machine to try rtm out",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(clusterStatusCmd(), clusterUpCmd())
	return cmd
}

// defaultAdmin is the admin address of a broker started with the defaults
// of `rtm dev` (and node n1 of `rtm cluster up`).
const defaultAdmin = "127.0.0.1:9101"

func clusterStatusCmd() *cobra.Command {
	var admin, key string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Print the cluster as one broker sees it: members, links, routes",
		Long: `Print the cluster as the broker at --admin sees it (GET /v1/cluster on its
admin address, with the admin key of --admin-key or $RTM_BROKER_ADMIN_KEYS):
every gossip member with its role, status (alive, leaving,
left, failed), MQTT address, connections and capacity, whether it drains,
and for brokers the state of this node's link to it and the messages queued
for it; then the routes (topic filters) of this node and of each peer.

Exits 1 when the broker cannot be reached or runs alone.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			url := clusterURL(admin)
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Second)
			defer cancel()
			body, err := getOK(ctx, url, adminKey(key))
			if err != nil {
				return err
			}
			if asJSON {
				_, err := cmd.OutOrStdout().Write(body)
				return err
			}
			var s broker.ClusterStats
			if err := json.Unmarshal(body, &s); err != nil {
				return fmt.Errorf("%s: not a cluster view: %w", url, err)
			}
			printClusterStatus(cmd.OutOrStdout(), &s)
			return nil
		},
	}
	cmd.Flags().StringVar(&admin, "admin", defaultAdmin, "admin address (host:port or http:// URL) of the broker to ask")
	addAdminKeyFlag(cmd, &key)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the JSON of /v1/cluster as served")
	return cmd
}

// clusterURL is the /v1/cluster URL of an admin address given as host:port
// or as a URL.
func clusterURL(admin string) string {
	if !strings.HasPrefix(admin, "http://") && !strings.HasPrefix(admin, "https://") {
		admin = "http://" + admin
	}
	admin = strings.TrimRight(admin, "/")
	if strings.HasSuffix(admin, "/v1/cluster") {
		return admin
	}
	return admin + "/v1/cluster"
}

// addAdminKeyFlag registers --admin-key.
func addAdminKeyFlag(cmd *cobra.Command, key *string) {
	cmd.Flags().StringVar(key, "admin-key", "", "the brokers' admin key (default: the first key of $"+adminKeysEnv+")")
}

// adminKeysEnv holds broker.admin_keys in the environment, as the brokers
// read it.
const adminKeysEnv = "RTM_BROKER_ADMIN_KEYS"

// adminKey is the key to send: the flag's, else the first of
// RTM_BROKER_ADMIN_KEYS.
func adminKey(flag string) string {
	if flag != "" {
		return flag
	}
	first, _, _ := strings.Cut(os.Getenv(adminKeysEnv), ",")
	return strings.TrimSpace(first)
}

// getOK fetches url with the admin key and returns the body of a 200
// answer. Any other status is an error carrying the API error's code and
// message.
func getOK(ctx context.Context, url, key string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, usageError{fmt.Errorf("bad admin address: %w", err)}
	}
	setAdminKey(req, key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		var ue *neturl.Error
		if errors.As(err, &ue) {
			err = ue.Err // it repeats the URL
		}
		return nil, fmt.Errorf("cannot reach %s (is a broker running there? --admin sets its address): %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, adminError(url, resp, body)
	}
	return body, nil
}

// setAdminKey authenticates req to a broker's admin port.
func setAdminKey(req *http.Request, key string) {
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
}

// adminError describes an admin answer other than 200, with a hint where
// the key is missing or wrong.
func adminError(url string, resp *http.Response, body []byte) error {
	var e struct{ Error, Message string }
	if json.Unmarshal(body, &e) == nil && e.Error != "" {
		err := fmt.Errorf("%s: %s (%s): %s", url, resp.Status, e.Error, e.Message)
		if resp.StatusCode == http.StatusUnauthorized {
			err = fmt.Errorf("%w; give a key of the brokers' broker.admin_keys with --admin-key or $%s", err, adminKeysEnv)
		}
		return err
	}
	return fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
}

const none = "—"

func printClusterStatus(w io.Writer, s *broker.ClusterStats) {
	links := map[string]link.LinkStats{}
	for _, l := range s.Links {
		links[l.Peer] = l
	}
	fmt.Fprintf(w, "Cluster as %s sees it (gossip %s, link %s)\n\n", s.Node, s.Gossip, s.Link)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tSTATUS\tMQTT\tCONNECTIONS\tDRAINING\tLINK\tQUEUE")
	for _, m := range s.Members {
		conns := strconv.Itoa(m.Connections)
		if m.Capacity > 0 {
			conns += "/" + strconv.Itoa(m.Capacity)
		}
		draining := "no"
		if m.Draining {
			draining = "yes"
		}
		state, queue := none, none
		switch {
		case m.Name == s.Node:
			state = "this node"
		case m.Role == cluster.RoleBroker:
			if l, ok := links[m.Name]; ok {
				state, queue = l.State, strconv.Itoa(l.QueueLen)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, m.Role, m.Status, orNone(m.MQTT), conns, draining, state, queue)
	}
	_ = tw.Flush()
	var remote []string
	for _, name := range slices.Sorted(maps.Keys(s.RemoteRoutes)) {
		remote = append(remote, fmt.Sprintf("%s %d", name, s.RemoteRoutes[name]))
	}
	if len(remote) == 0 {
		remote = []string{"none"}
	}
	fmt.Fprintf(w, "\nRoutes: %d local on %s; from peers: %s\n", s.LocalRoutes, s.Node, strings.Join(remote, ", "))
}

func orNone(s string) string {
	if s == "" {
		return none
	}
	return s
}

// upTimeout bounds `rtm cluster up` from the first process started to every
// broker ready.
const upTimeout = 60 * time.Second

// childStopTimeout bounds the graceful stop of a stage of children, after
// SIGTERM; past it they get SIGKILL. It exceeds the default
// broker.shutdown_timeout (15s).
const childStopTimeout = 20 * time.Second

func clusterUpCmd() *cobra.Command {
	var o upOptions
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Start a local cluster on this machine: one store and N brokers, to try rtm out",
		Long: `Start a cluster of rtm processes on 127.0.0.1 for trying rtm out: one
'rtm store' (shared by the brokers, data in <data>/store) and --brokers
'rtm broker' processes named n1..nN. n1 starts the cluster and the others
join it. Each process logs to <data>/<name>.log. Once every broker is ready
and sees the others, a table gives their addresses. Ctrl-C (SIGINT) or
SIGTERM stops every process and exits 0.

Ports of node i (1 to N):

  MQTT 1882+i, WebSocket 8082+i, admin 9100+i, gossip 7945+i, link 7955+i

so n1 has the MQTT, WebSocket, admin and gossip ports of 'rtm dev' (1883,
8083, 9101, 7946) and link port 7956. With --base-port P, node i takes the
five ports from P+5(i-1) instead, in the same order: --base-port 20000 gives
n1 20000-20004 and n2 20005-20009. The router serves HTTP on 8090, the
push API on 8080 and the watchdog (dashboard and alerts) on 8082 (with
--base-port, on the three ports after the brokers').
Every port is checked before anything starts.

The brokers share a cluster secret (gossip encryption, link
authentication), random unless --secret sets it; children get it in
RTM_CLUSTER_SECRET. Devices connect anonymously (RTM_AUTH_DEVICES=anonymous),
a random device-token key is shared (RTM_AUTH_TOKEN_KEYS), the brokers and
the push API and the watchdog share a random admin key (RTM_BROKER_ADMIN_KEYS), and the push
API gets a random API key; both keys are printed with the addresses. Other RTM_* variables
reach every child and can override these.

The processes run in process groups of their own, so only 'rtm cluster up'
sees Ctrl-C; should it be killed (SIGKILL), stop them by the PIDs it
printed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return usageError{err}
			}
			ctx, stop := signalContext(cmd.ErrOrStderr())
			defer stop()
			return runClusterUp(ctx, o, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	cmd.Flags().IntVar(&o.brokers, "brokers", 3, "number of brokers, 1 to 10")
	cmd.Flags().StringVar(&o.data, "data", "./data/cluster", "directory for the store's files, each broker's data and the logs")
	cmd.Flags().IntVar(&o.basePort, "base-port", 0, "first of 5 consecutive ports per node (see above); 0 uses the default ports")
	cmd.Flags().StringVar(&o.secret, "secret", "", "cluster secret (default: random)")
	return cmd
}

type upOptions struct {
	brokers  int
	data     string
	basePort int
	secret   string
}

func (o upOptions) validate() error {
	var errs []error
	if o.brokers < 1 || o.brokers > 10 {
		errs = append(errs, fmt.Errorf("--brokers %d: want 1 to 10", o.brokers))
	}
	if o.basePort != 0 && (o.basePort < 1024 || o.basePort+5*o.brokers-1 > 65535) {
		errs = append(errs, fmt.Errorf("--base-port %d: want 1024 to %d for %d brokers", o.basePort, 65536-5*o.brokers, o.brokers))
	}
	if o.data == "" {
		errs = append(errs, errors.New("--data: must not be empty"))
	}
	return errors.Join(errs...)
}

// nodePorts are the ports of one broker of `rtm cluster up`.
type nodePorts struct{ mqtt, ws, admin, gossip, link int }

// ports returns the ports of node i (1-based); see the command's help.
func (o upOptions) ports(i int) nodePorts {
	if o.basePort == 0 {
		return nodePorts{mqtt: 1882 + i, ws: 8082 + i, admin: 9100 + i, gossip: 7945 + i, link: 7955 + i}
	}
	p := o.basePort + 5*(i-1)
	return nodePorts{mqtt: p, ws: p + 1, admin: p + 2, gossip: p + 3, link: p + 4}
}

// child is one process of a local cluster.
type child struct {
	name, role string
	// stage orders the stop: the highest stage stops first, all its
	// children at once. Children start in the order of the plan, which
	// lists them by increasing stage.
	stage int
	// args returns the command line (after the executable); it runs when
	// the child starts, so it can use what earlier children made known.
	args func() []string
	env  []string
	// started, if set, gates the children after this one: it returns nil
	// once they may start.
	started func(ctx context.Context) error
	// ready, if set, returns nil once the child serves (polled).
	ready func(ctx context.Context) error
	// mqtt, ws and admin are the addresses of a broker, for the table.
	mqtt, ws, admin string

	log  string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited and err is set
	err  error
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// localCluster is the plan and the state of `rtm cluster up`.
type localCluster struct {
	o        upOptions
	exe      string
	secret   string
	tokenKey string // device tokens, shared by every node
	adminKey string // the brokers' admin endpoints, printed
	apiKey   string // the push API's, printed
	storeURI string
	children []*child
	exits    chan *child
	stdout   io.Writer
	stderr   io.Writer
}

func runClusterUp(ctx context.Context, o upOptions, stdout, stderr io.Writer) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("cannot find the rtm executable to start: %w", err)
	}
	secret := o.secret
	if secret == "" {
		var b [16]byte
		_, _ = rand.Read(b[:])
		secret = hex.EncodeToString(b[:])
	}
	var key [24]byte
	_, _ = rand.Read(key[:])
	var api, admin [16]byte
	_, _ = rand.Read(api[:])
	_, _ = rand.Read(admin[:])
	lc := &localCluster{o: o, exe: exe, secret: secret, tokenKey: hex.EncodeToString(key[:]), apiKey: "local-" + hex.EncodeToString(api[:]),
		adminKey: "admin-" + hex.EncodeToString(admin[:]),
		stdout:   stdout, stderr: stderr}
	lc.plan()
	lc.exits = make(chan *child, len(lc.children))
	if err := lc.checkPorts(); err != nil {
		return err
	}
	if err := os.MkdirAll(o.data, 0o755); err != nil {
		return err
	}

	fmt.Fprintf(stdout, "rtm cluster: starting a store, %d brokers, a router, a push API and a watchdog on 127.0.0.1, logs in %s\n", o.brokers, o.data)
	upCtx, cancel := context.WithTimeout(ctx, upTimeout)
	err = lc.start(upCtx)
	cancel()
	if err != nil {
		lc.stopAll()
		if ctx.Err() != nil {
			fmt.Fprintln(stdout, "rtm cluster: stopped before the cluster was up")
			return nil
		}
		return err
	}
	lc.printTable()

	for {
		select {
		case <-ctx.Done():
			fmt.Fprintln(stdout, "rtm cluster: stopping")
			lc.stopAll()
			fmt.Fprintln(stdout, "rtm cluster: stopped")
			return nil
		case c := <-lc.exits:
			fmt.Fprintf(stderr, "rtm cluster: %s (pid %d) exited on its own: %s; the others keep running (log: %s)\n",
				c.name, c.cmd.Process.Pid, exitStatus(c.err), c.log)
			if !slices.ContainsFunc(lc.children, func(c *child) bool { return !c.exited() }) {
				return errors.New("every process of the cluster has exited")
			}
		}
	}
}

// plan lists the processes: the store first, then n1, which starts the
// cluster, then the brokers that join it.
func (lc *localCluster) plan() {
	o := lc.o
	store := &child{name: "store", role: "store", stage: 0, log: filepath.Join(o.data, "store.log")}
	store.args = func() []string {
		return []string{"store", "--addr", "127.0.0.1:0", "--data", filepath.Join(o.data, "store")}
	}
	store.started = func(ctx context.Context) error { return lc.waitStoreURI(ctx, store) }
	lc.children = append(lc.children, store)
	seed := fmt.Sprintf("127.0.0.1:%d", o.ports(1).gossip)
	for i := 1; i <= o.brokers; i++ {
		p := o.ports(i)
		name := fmt.Sprintf("n%d", i)
		c := &child{
			name: name, role: "broker", stage: 1,
			// A local cluster is for trying rtm out: devices connect
			// without credentials (each broker warns), while the token keys
			// let the push API issue tokens to try token auth.
			env: []string{"RTM_CLUSTER_SECRET=" + lc.secret, "RTM_AUTH_DEVICES=anonymous", "RTM_AUTH_TOKEN_KEYS=" + lc.tokenKey,
				adminKeysEnv + "=" + lc.adminKey},
			mqtt:  fmt.Sprintf("127.0.0.1:%d", p.mqtt),
			ws:    fmt.Sprintf("127.0.0.1:%d", p.ws),
			admin: fmt.Sprintf("127.0.0.1:%d", p.admin),
			log:   filepath.Join(o.data, name+".log"),
		}
		c.args = func() []string {
			args := []string{"broker", "--node-name", name, "--data", filepath.Join(o.data, name), "--store-uri", lc.storeURI,
				"--mqtt-addr", c.mqtt, "--ws-addr", c.ws, "--admin-addr", c.admin,
				"--gossip-addr", fmt.Sprintf("127.0.0.1:%d", p.gossip), "--link-addr", fmt.Sprintf("127.0.0.1:%d", p.link)}
			if i > 1 {
				args = append(args, "--join", seed)
			}
			return args
		}
		c.ready = func(ctx context.Context) error { return lc.brokerReady(ctx, c) }
		if i == 1 {
			// The others join n1: start them once it serves, so
			// their first join attempt finds it.
			c.started = func(ctx context.Context) error {
				return poll(ctx, c, func(ctx context.Context) error { return httpOK(ctx, "http://"+c.admin+"/readyz") })
			}
		}
		lc.children = append(lc.children, c)
	}
	rp := lc.o.routerPort()
	rt := &child{name: "router", role: "router", stage: 2, env: []string{"RTM_CLUSTER_SECRET=" + lc.secret},
		admin: fmt.Sprintf("127.0.0.1:%d", rp), log: filepath.Join(o.data, "router.log")}
	rt.args = func() []string {
		return []string{"router", "--addr", rt.admin, "--gossip-addr", "127.0.0.1:0", "--join", seed}
	}
	rt.ready = func(ctx context.Context) error { return httpOK(ctx, "http://"+rt.admin+"/v1/route?client_id=probe") }
	lc.children = append(lc.children, rt)

	push := &child{name: "pushapi", role: "pushapi", stage: 2,
		env: []string{"RTM_CLUSTER_SECRET=" + lc.secret, "RTM_AUTH_TOKEN_KEYS=" + lc.tokenKey, "RTM_PUSHAPI_API_KEYS=" + lc.apiKey,
			adminKeysEnv + "=" + lc.adminKey},
		admin: fmt.Sprintf("127.0.0.1:%d", lc.o.pushPort()), log: filepath.Join(o.data, "pushapi.log")}
	push.args = func() []string {
		return []string{"pushapi", "--addr", push.admin, "--gossip-addr", "127.0.0.1:0", "--join", seed,
			"--store-uri", lc.storeURI, "--data", filepath.Join(o.data, "pushapi")}
	}
	push.ready = func(ctx context.Context) error { return httpOK(ctx, "http://"+push.admin+"/readyz") }
	lc.children = append(lc.children, push)

	wd := &child{name: "watchdog", role: "watchdog", stage: 2,
		env:   []string{"RTM_CLUSTER_SECRET=" + lc.secret, adminKeysEnv + "=" + lc.adminKey},
		admin: fmt.Sprintf("127.0.0.1:%d", lc.o.watchdogPort()), log: filepath.Join(o.data, "watchdog.log")}
	wd.args = func() []string {
		return []string{"watchdog", "--addr", wd.admin, "--gossip-addr", "127.0.0.1:0", "--join", seed,
			"--store-uri", lc.storeURI, "--data", filepath.Join(o.data, "watchdog")}
	}
	wd.ready = func(ctx context.Context) error { return httpOK(ctx, "http://"+wd.admin+"/readyz") }
	lc.children = append(lc.children, wd)
}

// watchdogPort is the watchdog's HTTP port: 8082, or the one after the
// push API's with --base-port.
func (o upOptions) watchdogPort() int {
	if o.basePort == 0 {
		return 8082
	}
	return o.basePort + 5*o.brokers + 2
}

// pushPort is the push API's HTTP port: 8080, or the one after the
// router's with --base-port.
func (o upOptions) pushPort() int {
	if o.basePort == 0 {
		return 8080
	}
	return o.basePort + 5*o.brokers + 1
}

// routerPort is the router's HTTP port: 8090, or the one after the
// brokers' ports with --base-port.
func (o upOptions) routerPort() int {
	if o.basePort == 0 {
		return 8090
	}
	return o.basePort + 5*o.brokers
}

// checkPorts fails, before anything starts, if a port of the plan is taken.
func (lc *localCluster) checkPorts() error {
	var errs []error
	for i := 1; i <= lc.o.brokers; i++ {
		p := lc.o.ports(i)
		for _, q := range []struct {
			what string
			port int
			udp  bool
		}{{"MQTT", p.mqtt, false}, {"WebSocket", p.ws, false}, {"admin", p.admin, false}, {"gossip", p.gossip, true}, {"link", p.link, false}} {
			addr := fmt.Sprintf("127.0.0.1:%d", q.port)
			ln, err := net.Listen("tcp", addr)
			if err == nil {
				ln.Close()
				if q.udp {
					var pc net.PacketConn
					if pc, err = net.ListenPacket("udp", addr); err == nil {
						pc.Close()
					}
				}
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("port %d (n%d %s) is not free: %w", q.port, i, q.what, err))
			}
		}
	}
	for _, q := range []struct {
		what string
		port int
	}{{"router", lc.o.routerPort()}, {"push API", lc.o.pushPort()}, {"watchdog", lc.o.watchdogPort()}} {
		if ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", q.port)); err != nil {
			errs = append(errs, fmt.Errorf("port %d (%s) is not free: %w", q.port, q.what, err))
		} else {
			ln.Close()
		}
	}
	if len(errs) > 0 {
		errs = append(errs, errors.New("stop what uses them, or choose other ports with --base-port"))
	}
	return errors.Join(errs...)
}

// start starts the children in order and waits until every one is ready.
func (lc *localCluster) start(ctx context.Context) error {
	for _, c := range lc.children {
		if err := lc.startChild(c); err != nil {
			return err
		}
		if c.started != nil {
			if err := c.started(ctx); err != nil {
				return lc.notUp(c, err)
			}
		}
	}
	for _, c := range lc.children {
		if c.ready == nil {
			continue
		}
		if err := poll(ctx, c, c.ready); err != nil {
			return lc.notUp(c, err)
		}
		fmt.Fprintf(lc.stdout, "  %-5s up (pid %d)\n", c.name, c.cmd.Process.Pid)
	}
	return nil
}

func (lc *localCluster) startChild(c *child) error {
	f, err := os.OpenFile(c.log, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer f.Close() // the child holds its own descriptor
	c.cmd = exec.Command(lc.exe, c.args()...)
	c.cmd.Env = append(os.Environ(), c.env...)
	c.cmd.Stdout, c.cmd.Stderr = f, f
	c.cmd.SysProcAttr = ownProcessGroup()
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", c.name, err)
	}
	c.done = make(chan struct{})
	go func() {
		c.err = c.cmd.Wait()
		close(c.done)
		lc.exits <- c
	}()
	return nil
}

// notUp is the error of a child that did not come up: what was last wrong,
// and the end of its log.
func (lc *localCluster) notUp(c *child, err error) error {
	why := c.name + " did not come up"
	if errors.Is(err, context.DeadlineExceeded) {
		why += " within " + upTimeout.String()
	}
	return fmt.Errorf("%s: %w\nlast lines of %s:\n%s", why, err, c.log, tail(c.log, 20))
}

// pollError is a poll that ended with its context: it says what the last
// check found and wraps the context's error.
type pollError struct{ last, ctx error }

func (e pollError) Error() string { return e.last.Error() }
func (e pollError) Unwrap() error { return e.ctx }

// poll runs check every 100ms until it returns nil, the child exits or ctx
// ends (then a pollError).
func poll(ctx context.Context, c *child, check func(context.Context) error) error {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	last := errors.New("not checked yet")
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := check(cctx)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() == nil {
			last = err
		}
		select {
		case <-c.done:
			return fmt.Errorf("%s exited: %s", c.name, exitStatus(c.err))
		case <-ctx.Done():
			return pollError{last: last, ctx: ctx.Err()}
		case <-t.C:
		}
	}
}

var storeURIRe = regexp.MustCompile(`use --store-uri (mongodb://\S+)`)

// waitStoreURI reads the store's URI from its log: the store picks a free
// port.
func (lc *localCluster) waitStoreURI(ctx context.Context, c *child) error {
	err := poll(ctx, c, func(context.Context) error {
		b, err := os.ReadFile(c.log)
		if err != nil {
			return err
		}
		m := storeURIRe.FindSubmatch(b)
		if m == nil {
			return errors.New("the store has not printed its URI yet")
		}
		lc.storeURI = string(m[1])
		return nil
	})
	if err == nil {
		fmt.Fprintf(lc.stdout, "  %-5s up (pid %d): %s\n", c.name, c.cmd.Process.Pid, lc.storeURI)
	}
	return err
}

// brokerReady reports whether a broker serves (/readyz) and sees every
// broker alive with its link to each up.
func (lc *localCluster) brokerReady(ctx context.Context, c *child) error {
	if err := httpOK(ctx, "http://"+c.admin+"/readyz"); err != nil {
		return err
	}
	body, err := getOK(ctx, clusterURL(c.admin), lc.adminKey)
	if err != nil {
		return err
	}
	var s broker.ClusterStats
	if err := json.Unmarshal(body, &s); err != nil {
		return err
	}
	alive := 0
	for _, m := range s.Members {
		if m.Role == cluster.RoleBroker && m.Status == string(cluster.StatusAlive) {
			alive++
		}
	}
	if alive != lc.o.brokers {
		return fmt.Errorf("%s sees %d of %d brokers alive", c.name, alive, lc.o.brokers)
	}
	for _, l := range s.Links {
		if l.State != link.StateUp {
			return fmt.Errorf("%s's link to %s (%s) is %s, last error: %s", c.name, l.Peer, l.Addr, l.State, orNone(l.LastError))
		}
	}
	if len(s.Links) != lc.o.brokers-1 {
		return fmt.Errorf("%s has links to %d of the %d other brokers", c.name, len(s.Links), lc.o.brokers-1)
	}
	return nil
}

func httpOK(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

func (lc *localCluster) printTable() {
	w := lc.stdout
	store := lc.children[0]
	fmt.Fprintf(w, "\nrtm cluster: %d brokers up, sharing the store %s (pid %d, log %s)\n\n",
		lc.o.brokers, lc.storeURI, store.cmd.Process.Pid, store.log)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  NODE\tPID\tMQTT\tWEBSOCKET\tADMIN\tLOG")
	var brokers []*child
	for _, c := range lc.children {
		if c.role != "broker" {
			continue
		}
		brokers = append(brokers, c)
		fmt.Fprintf(tw, "  %s\t%d\tmqtt://%s\tws://%s/mqtt\thttp://%s\t%s\n", c.name, c.cmd.Process.Pid, c.mqtt, c.ws, c.admin, c.log)
	}
	for _, c := range lc.children {
		switch c.role {
		case "router":
			fmt.Fprintf(tw, "  %s\t%d\thttp://%s/v1/route?client_id=ID\t\t\t%s\n", c.name, c.cmd.Process.Pid, c.admin, c.log)
		case "pushapi":
			fmt.Fprintf(tw, "  %s\t%d\thttp://%s/v1/...\t\t\t%s\n", c.name, c.cmd.Process.Pid, c.admin, c.log)
		case "watchdog":
			fmt.Fprintf(tw, "  %s\t%d\thttp://%s/ (dashboard)\t\t\t%s\n", c.name, c.cmd.Process.Pid, c.admin, c.log)
		}
	}
	_ = tw.Flush()
	first, last := brokers[0], brokers[len(brokers)-1]
	fmt.Fprintf(w, "\nTry it: subscribe on %s, publish on %s:\n", first.name, last.name)
	fmt.Fprintf(w, "  mosquitto_sub -h 127.0.0.1 -p %s -t 'demo/#' -v\n", portOf(first.mqtt))
	fmt.Fprintf(w, "  mosquitto_pub -h 127.0.0.1 -p %s -t demo/hello -m hi\n", portOf(last.mqtt))
	fmt.Fprintf(w, "  rtm cluster status --admin %s --admin-key %s\n", first.admin, lc.adminKey)
	for _, c := range lc.children {
		switch c.role {
		case "router":
			fmt.Fprintf(w, "  curl 'http://%s/v1/route?client_id=dev1'\n", c.admin)
		case "pushapi":
			fmt.Fprintf(w, "  mosquitto_sub -h 127.0.0.1 -p %s -t push/news -v\n", portOf(first.mqtt))
			fmt.Fprintf(w, "  curl -H 'Authorization: Bearer %s' -d '{\"payload\":\"hello\"}' http://%s/v1/channels/news/messages\n", lc.apiKey, c.admin)
		}
	}
	fmt.Fprint(w, "\nCtrl-C stops the cluster.\n\n")
}

// stopAll stops the children stage by stage, the last started first: SIGTERM
// to each child of the stage, then SIGKILL to those still running after
// childStopTimeout.
func (lc *localCluster) stopAll() {
	for stage := slices.MaxFunc(lc.children, func(a, b *child) int { return a.stage - b.stage }).stage; stage >= 0; stage-- {
		var running []*child
		for _, c := range lc.children {
			if c.stage == stage && c.cmd != nil && !c.exited() {
				running = append(running, c)
				_ = c.cmd.Process.Signal(syscall.SIGTERM)
			}
		}
		timeout := time.After(childStopTimeout)
		expired := false
		for _, c := range running {
			if !expired {
				select {
				case <-c.done:
					continue
				case <-timeout:
					expired = true
				}
			}
			if !c.exited() {
				fmt.Fprintf(lc.stderr, "rtm cluster: %s (pid %d) still running %v after SIGTERM: killed\n", c.name, c.cmd.Process.Pid, childStopTimeout)
				_ = c.cmd.Process.Kill()
				<-c.done
			}
		}
		for _, c := range running {
			if c.err != nil {
				fmt.Fprintf(lc.stderr, "rtm cluster: %s (pid %d) stopped: %s (log: %s)\n", c.name, c.cmd.Process.Pid, exitStatus(c.err), c.log)
			}
		}
	}
}

func exitStatus(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// tail returns the last n lines of a file, indented.
func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return "    (" + err.Error() + ")"
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, "    "+sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	if len(lines) == 0 {
		return "    (empty)"
	}
	return strings.Join(lines, "\n")
}
