package broker_test

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/broker"
	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/testcluster"
	"github.com/rtm-dev/rtm/internal/testutil"
)

func post(t testing.TB, url string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url, nil)
	req.Header.Set("Authorization", "Bearer "+testcluster.AdminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: %s", url, resp.Status)
	}
}

func mqttAddrs(nodes ...*broker.Broker) []string {
	var out []string
	for _, b := range nodes {
		out = append(out, b.Addr(broker.ListenerTCP))
	}
	return out
}

// TestDrainEvacuatesToOtherNodes: a drained node is marked so in gossip;
// evacuating, it sends its MQTT 5 clients away one by one with 0x9C and a
// Server Reference to another node, where they reconnect.
func TestDrainEvacuatesToOtherNodes(t *testing.T) {
	nodes := startCluster(t, 3)
	admin := "http://" + nodes[0].Addr(broker.ListenerAdmin)
	const n = 10
	var clients []*testutil.V5
	for i := range n {
		c, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: fmt.Sprintf("d%d", i), CleanStart: true})
		clients = append(clients, c)
	}

	post(t, admin+"/v1/drain")
	testutil.WaitFor(t, waitCond, func() error {
		for _, m := range nodes[1].Stats().Cluster.Members {
			if m.Name == "n0" && !m.Draining {
				return fmt.Errorf("n1 does not see n0 draining yet")
			}
		}
		return nil
	})
	if got := nodes[0].Stats().Connections; got != n {
		t.Fatalf("draining without evacuate disconnected clients: %d left of %d", got, n)
	}

	start := time.Now()
	post(t, admin+"/v1/drain?evacuate=true")
	others := mqttAddrs(nodes[1], nodes[2])
	moved := map[string]int{}
	for i, c := range clients {
		select {
		case d := <-c.Disconnects:
			ref := ""
			if d.Properties != nil {
				ref = d.Properties.ServerReference
			}
			if d.ReasonCode != 0x9C || !slices.Contains(others, ref) {
				t.Fatalf("client %d: DISCONNECT 0x%02X reference %q, want 0x9C to one of %v", i, d.ReasonCode, ref, others)
			}
			moved[ref]++
			if _, _, err := testutil.DialV5(t, ref, &paho.Connect{ClientID: fmt.Sprintf("d%d", i), CleanStart: true}); err != nil {
				t.Fatalf("client %d: reconnect to %s: %v", i, ref, err)
			}
		case <-time.After(waitCond):
			t.Fatalf("client %d not evacuated", i)
		}
	}
	took := time.Since(start)
	testutil.WaitFor(t, waitCond, func() error {
		if c := nodes[0].Stats().Connections; c != 0 {
			return fmt.Errorf("%d clients still on n0", c)
		}
		if c := nodes[1].Stats().Connections + nodes[2].Stats().Connections; c != n {
			return fmt.Errorf("%d clients on n1 and n2, want %d", c, n)
		}
		return nil
	})
	t.Logf("evacuated %d clients in %v (rate %d/s), to %v", n, took.Round(time.Millisecond), config.Defaults().Broker.EvacuateRate, moved)

	post(t, admin+"/v1/undrain")
	testutil.WaitFor(t, waitCond, func() error {
		for _, m := range nodes[1].Stats().Cluster.Members {
			if m.Name == "n0" && m.Draining {
				return fmt.Errorf("n1 still sees n0 draining")
			}
		}
		return nil
	})
}

// TestCapacityRedirect: a full node answers an MQTT 5 CONNECT with 0x9C and
// a Server Reference to the node the router would pick.
func TestCapacityRedirect(t *testing.T) {
	n0 := startClusterNode(t, "n0", "", func(b *config.Broker, _ *config.Cluster) { b.Capacity = 2 })
	n1 := startClusterNode(t, "n1", n0.Stats().Cluster.Gossip, nil)
	waitMesh(t, n0, n1)
	for i := range 2 {
		dialV5(t, n0, &paho.Connect{ClientID: fmt.Sprintf("c%d", i), CleanStart: true})
	}
	_, ca, err := testutil.DialV5(t, n0.Addr(broker.ListenerTCP), &paho.Connect{ClientID: "third", CleanStart: true})
	if err == nil || ca == nil {
		t.Fatalf("third client on a full node: err %v, CONNACK %+v", err, ca)
	}
	if ca.ReasonCode != 0x9C || ca.Properties == nil || ca.Properties.ServerReference != n1.Addr(broker.ListenerTCP) {
		t.Fatalf("CONNACK 0x%02X %+v, want 0x9C with Server Reference %s", ca.ReasonCode, ca.Properties, n1.Addr(broker.ListenerTCP))
	}
	if _, _, err := testutil.DialV5(t, ca.Properties.ServerReference, &paho.Connect{ClientID: "third", CleanStart: true}); err != nil {
		t.Fatalf("following the reference: %v", err)
	}
	// MQTT 3.1.1 has no reference: code 3, server unavailable.
	_, _, code, _ := dialV3(t, "tcp://"+n0.Addr(broker.ListenerTCP), "v3", nil)
	if code != 3 {
		t.Errorf("v3.1.1 client on a full node: code %d, want 3", code)
	}
}

// TestShutdownPointsClientsElsewhere: SIGTERM's disconnect (0x8B) names a
// live node for MQTT 5 clients (SPEC 4).
func TestShutdownPointsClientsElsewhere(t *testing.T) {
	nodes := startCluster(t, 2)
	c, _ := dialV5(t, nodes[0], &paho.Connect{ClientID: "c", CleanStart: true})
	stopped := make(chan error, 1)
	go func() { stopped <- nodes[0].Shutdown(testutil.Context(t, waitCond)) }()
	defer func() {
		if err := <-stopped; err != nil {
			t.Errorf("shutdown: %v", err)
		}
	}()
	select {
	case d := <-c.Disconnects:
		if d.ReasonCode != 0x8B || d.Properties == nil || d.Properties.ServerReference != nodes[1].Addr(broker.ListenerTCP) {
			t.Fatalf("DISCONNECT 0x%02X %+v, want 0x8B with Server Reference %s", d.ReasonCode, d.Properties, nodes[1].Addr(broker.ListenerTCP))
		}
	case <-time.After(waitCond):
		t.Fatal("no DISCONNECT")
	}
}
