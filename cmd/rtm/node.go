package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/rtm-dev/rtm/broker"
)

func nodeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Take a broker node out of service and back (drain, undrain)",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(nodeDrainCmd(true), nodeDrainCmd(false))
	return cmd
}

func nodeDrainCmd(drain bool) *cobra.Command {
	var admin, key string
	var evacuate bool
	cmd := &cobra.Command{
		Use:   "undrain NODE",
		Short: "Let a drained broker take new devices again (stops an evacuation)",
		Long: `Let a drained broker take new devices again, and stop an evacuation in
progress. NODE is found in the cluster view of the broker at --admin (any
node), and asked on its own admin address (POST /v1/undrain), with the
brokers' admin key (--admin-key, or the first key of $RTM_BROKER_ADMIN_KEYS).`,
		Args: cobra.ExactArgs(1),
	}
	if drain {
		cmd.Use = "drain NODE"
		cmd.Short = "Stop sending new devices to a broker; with --evacuate, move its devices away"
		cmd.Long = `Mark broker NODE as draining: routers, and brokers redirecting at capacity,
stop sending it devices (the flag travels in gossip, within a second). Its
connected devices stay. With --evacuate, NODE also disconnects its devices,
broker.evacuate_rate per second: MQTT 5 devices get DISCONNECT 0x9C (use
another server) with a Server Reference to the broker the router would pick,
MQTT 3.1.1 devices are disconnected and ask the router again.

NODE is found in the cluster view of the broker at --admin (any node), and
asked on its own admin address (POST /v1/drain), with the brokers' admin key
(--admin-key, or the first key of $RTM_BROKER_ADMIN_KEYS). 'rtm node undrain
NODE' reverses it.`
	}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
		defer cancel()
		k := adminKey(key)
		target, err := nodeAdmin(ctx, admin, args[0], k)
		if err != nil {
			return err
		}
		url := "http://" + target + "/v1/undrain"
		if drain {
			url = fmt.Sprintf("http://%s/v1/drain?evacuate=%t", target, evacuate)
		}
		var st broker.DrainState
		if err := postJSON(ctx, url, k, &st); err != nil {
			return err
		}
		switch {
		case st.Evacuating:
			fmt.Fprintf(cmd.OutOrStdout(), "%s is draining and evacuating its %d connections (%d moved so far)\n", st.Node, st.Connections, st.Evacuated)
		case st.Draining:
			fmt.Fprintf(cmd.OutOrStdout(), "%s is draining: no new devices; %d connections stay\n", st.Node, st.Connections)
		default:
			fmt.Fprintf(cmd.OutOrStdout(), "%s takes new devices again (%d connections)\n", st.Node, st.Connections)
		}
		return nil
	}
	cmd.Flags().StringVar(&admin, "admin", defaultAdmin, "admin address (host:port or http:// URL) of any broker of the cluster")
	addAdminKeyFlag(cmd, &key)
	if drain {
		cmd.Flags().BoolVar(&evacuate, "evacuate", false, "also disconnect the node's devices gradually, pointing them at other brokers")
	}
	return cmd
}

// nodeAdmin returns the admin address of broker name, from the cluster view
// of the broker at admin.
func nodeAdmin(ctx context.Context, admin, name, key string) (string, error) {
	url := clusterURL(admin)
	body, err := getOK(ctx, url, key)
	if err != nil {
		return "", err
	}
	var s broker.ClusterStats
	if err := json.Unmarshal(body, &s); err != nil {
		return "", fmt.Errorf("%s: not a cluster view: %w", url, err)
	}
	var names []string
	for _, m := range s.Members {
		if m.Role != "broker" {
			continue
		}
		if m.Name == name {
			if m.Admin == "" {
				return "", fmt.Errorf("broker %s publishes no admin address", name)
			}
			return m.Admin, nil
		}
		names = append(names, m.Name)
	}
	return "", usageError{fmt.Errorf("no broker named %q in the cluster seen by %s (brokers: %s)", name, admin, strings.Join(names, ", "))}
}

// postJSON POSTs to url with the admin key and decodes a 200 answer into v.
func postJSON(ctx context.Context, url, key string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, nil)
	if err != nil {
		return err
	}
	setAdminKey(req, key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return adminError(url, resp, body)
	}
	return json.Unmarshal(body, v)
}
