package main

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/internal/testutil"
)

// TestNodeDeathReconnectAtOnceFindsSession: devices whose node is killed
// reconnect at once to a survivor, before gossip has declared the node
// failed, and keep retrying while refused. Each must end up with its
// session and its queued message, on whichever survivor it reached; none
// is handed an empty session (which would also make the survivors skip its
// stored one as superseded).
func TestNodeDeathReconnectAtOnceFindsSession(t *testing.T) {
	const devices = 6
	f := newClusterFixture(t)
	n1, n2, n3 := f.start("n1"), f.start("n2"), f.start("n3")
	waitFormed(t, n1, n2, n3)
	for i := range devices {
		id := fmt.Sprintf("at-once-%d", i)
		c, _ := persistV5(t, n2.mqtt, id, 600)
		c.Sub(t, "at-once/"+id, 1)
		_ = c.Disconnect(&paho.Disconnect{})
	}
	// Published on n2: acknowledged once stored for the offline sessions.
	pub := testutil.MustV5(t, n2.mqtt, "at-once-pub")
	for i := range devices {
		id := fmt.Sprintf("at-once-%d", i)
		pub.Pub(t, "at-once/"+id, 1, false, "queued for "+id)
	}
	if err := syscall.Kill(n2.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n2.p.wait(t, 10*time.Second)
	for i := range devices {
		id := fmt.Sprintf("at-once-%d", i)
		addr := []string{n1.mqtt, n3.mqtt}[i%2]
		var c *testutil.V5
		var ca *paho.Connack
		refused := 0
		testutil.WaitFor(t, 60*time.Second, func() error {
			var err error
			c, ca, err = testutil.DialV5(t, addr, &paho.Connect{ClientID: id, CleanStart: false,
				Properties: &paho.ConnectProperties{SessionExpiryInterval: u32(600)}})
			if err != nil {
				refused++
			}
			return err
		})
		if !ca.SessionPresent {
			t.Fatalf("%s reconnected to a survivor after %d refusals with session present = 0", id, refused)
		}
		if m := c.Next(t, 30*time.Second); string(m.Payload) != "queued for "+id {
			t.Fatalf("%s got %q", id, m.Payload)
		}
		t.Logf("%s: session present after %d refused CONNECTs", id, refused)
	}
}
