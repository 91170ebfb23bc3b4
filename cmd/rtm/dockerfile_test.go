package main

import (
	"bufio"
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDockerfileDefaultCommandStarts runs the image's default command with
// the image's environment, as `docker run rtm` would (no Docker engine here):
// it must start serving without any configuration and stop cleanly. Ports
// become 0 so the test runs beside anything else; the interfaces stay as the
// image sets them.
func TestDockerfileDefaultCommandStarts(t *testing.T) {
	t.Parallel()
	f, err := os.Open("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var env, cmd []string
	port := regexp.MustCompile(`:\d+$`)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "ENV "):
			for _, kv := range strings.Fields(strings.TrimPrefix(line, "ENV ")) {
				k, v, _ := strings.Cut(kv, "=")
				if k == "RTM_DATA" {
					v = t.TempDir()
				}
				env = append(env, k+"="+port.ReplaceAllString(v, ":0"))
			}
		case strings.HasPrefix(line, "CMD "):
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "CMD ")), &cmd); err != nil {
				t.Fatalf("CMD is not exec form: %v", err)
			}
		}
	}
	if len(cmd) == 0 {
		t.Fatal("Dockerfile has no CMD")
	}
	// RTM_AUTH_DEVICES is unset: the image's command must start with its
	// own defaults. The gossip and link ports of rtm dev stay on loopback in the image;
	// here they must not collide with other tests.
	env = append(env, "RTM_CLUSTER_GOSSIP_ADDR=127.0.0.1:0", "RTM_CLUSTER_LINK_ADDR=127.0.0.1:0", "RTM_LOG_FORMAT=json", "RTM_AUTH_DEVICES")
	p := start(t, env, cmd...)
	addrs := p.listeners(t)
	admin := addrs["admin"]
	if !strings.HasPrefix(admin, "[::]:") && !strings.HasPrefix(admin, "0.0.0.0:") {
		t.Errorf("admin listens on %s, want every interface (the container's published port)", admin)
	}
	_, portNum, _ := strings.Cut(admin, "]:")
	if code := httpStatus(t, "http://127.0.0.1:"+portNum+"/readyz"); code != 200 {
		t.Fatalf("/readyz: HTTP %d", code)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM", code)
	}
}
