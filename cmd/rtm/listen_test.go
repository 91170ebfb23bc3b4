package main

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestBusyPortExits2NamingTheKey: a listener address already in use stops
// every role with the bind error and the configuration key that sets the
// address, exit code 2, and no panic. Each case occupies one address and
// starts rtm with every other listener on a free port.
func TestBusyPortExits2NamingTheKey(t *testing.T) {
	t.Parallel()
	free := []string{"--mqtt-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
		"--gossip-addr", "127.0.0.1:0", "--link-addr", "127.0.0.1:0"}
	certFile, keyFile, _ := testutil.SelfSignedCert(t)
	free = append(free, "--tls-addr", "127.0.0.1:0", "--wss-addr", "127.0.0.1:0", "--tls-cert", certFile, "--tls-key", keyFile)
	freeEnv := []string{"RTM_ROUTER_ADDR=127.0.0.1:0", "RTM_PUSHAPI_ADDR=127.0.0.1:0", "RTM_WATCHDOG_ADDR=127.0.0.1:0"}
	cases := []struct {
		name, key string
		role      string
		flag      string // the flag that takes the busy address, or "" for env
		env       string // the variable that takes it when flag is ""
	}{
		{"dev mqtt", "broker.mqtt_addr", "dev", "--mqtt-addr", ""},
		{"dev websocket", "broker.ws_addr", "dev", "--ws-addr", ""},
		{"dev admin", "broker.admin_addr", "dev", "--admin-addr", ""},
		{"dev gossip", "cluster.gossip_addr", "dev", "--gossip-addr", ""},
		{"dev node link", "cluster.link_addr", "dev", "--link-addr", ""},
		{"dev router", "router.addr", "dev", "", "RTM_ROUTER_ADDR"},
		{"dev push API", "pushapi.addr", "dev", "", "RTM_PUSHAPI_ADDR"},
		{"dev watchdog", "watchdog.addr", "dev", "", "RTM_WATCHDOG_ADDR"},
		{"dev tls", "broker.tls_addr", "dev", "--tls-addr", ""},
		{"dev secure websocket", "broker.wss_addr", "dev", "--wss-addr", ""},
		{"broker mqtt", "broker.mqtt_addr", "broker", "--mqtt-addr", ""},
		{"router", "router.addr", "router", "--addr", ""},
		{"router gossip", "cluster.gossip_addr", "router", "--gossip-addr", ""},
		{"store", "--addr", "store", "--addr", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			busy := ln.Addr().String()
			var args []string
			env := append([]string(nil), freeEnv...)
			switch tc.role {
			case "dev", "broker":
				args = append([]string{tc.role, "--data", t.TempDir()}, free...)
			case "router":
				args = []string{"router", "--addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"}
			case "store":
				args = []string{"store", "--data", t.TempDir()}
			}
			if tc.flag != "" {
				args = append(args, tc.flag, busy)
			} else {
				env = append(env, tc.env+"="+busy)
			}
			p := start(t, env, args...)
			if code := p.wait(t, 60*time.Second); code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			errOut := p.stderr.String()
			if strings.Contains(errOut, "panic") {
				t.Fatalf("rtm panicked:\n%s", errOut)
			}
			want := tc.key + ": cannot listen on " + busy
			if !strings.Contains(errOut, want) || !strings.Contains(errOut, "address already in use") {
				t.Fatalf("stderr does not say %q ... address already in use:\n%s", want, errOut)
			}
		})
	}
}
