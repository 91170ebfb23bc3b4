package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/testutil"
	"github.com/rtm-dev/rtm/internal/writebehind"
)

// TestHistorySpoolSurvivesKill: an `rtm broker` whose store is unreachable
// spools the history it captures; killed (kill -9) with its spool full of
// messages and a torn record at the spool's end (a write cut by the
// crash), then started again once the store is back, it writes every
// message, once, and cuts the torn record instead of replaying it.
func TestHistorySpoolSurvivesKill(t *testing.T) {
	t.Parallel()
	f := newClusterFixture(t)
	u, err := url.Parse(f.storeURI)
	if err != nil {
		t.Fatal(err)
	}
	target := u.Host
	px := testutil.NewTCPProxy(t)
	px.SetTarget(target)
	viaProxy := *f
	pu := *u
	pu.Host = px.Addr()
	q := pu.Query()
	q.Set("serverSelectionTimeoutMS", "2000")
	pu.RawQuery = q.Encode()
	viaProxy.storeURI = pu.String()

	n1 := viaProxy.start("h1", "RTM_HISTORY_TOPICS=chat/#", "RTM_HISTORY_QUEUE_LEN=50")
	px.SetTarget("")
	px.Cut()

	const n = 300
	dev := testutil.MustV5(t, n1.mqtt, "crash-dev")
	for i := range n {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := dev.Publish(ctx, &paho.Publish{Topic: "chat/crash", QoS: 1, Payload: fmt.Appendf(nil, "m%03d", i)})
		cancel()
		if err != nil {
			t.Fatalf("publish %d while the store is down: %v", i, err)
		}
	}
	testutil.WaitFor(t, 30*time.Second, func() error {
		h := brokerStats(t, n1.admin).History
		if h == nil || h.Captured != n || h.SpoolMessages != n {
			return fmt.Errorf("history %+v: want %d captured, all in the spool", h, n)
		}
		return nil
	})
	if err := syscall.Kill(n1.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-n1.p.done
	n1.p.done <- nil

	segs, _ := filepath.Glob(filepath.Join(n1.data, "history", "*.seg"))
	if len(segs) == 0 {
		t.Fatal("no spool segment in the killed broker's data directory")
	}
	slices.Sort(segs)
	fh, err := os.OpenFile(segs[len(segs)-1], os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	torn := writebehind.AppendRecord(nil, []byte("a record the crash cut short"))
	if _, err := fh.Write(torn[:len(torn)-5]); err != nil {
		t.Fatal(err)
	}
	fh.Close()

	px.SetTarget(target)
	viaProxy.restart(n1)

	ctx := testutil.Context(t, time.Minute)
	st, err := store.Open(ctx, store.Options{URI: f.storeURI, Database: "rtm"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close(context.Background())
	testutil.WaitFor(t, 60*time.Second, func() error {
		h := brokerStats(t, n1.admin).History
		if h == nil || h.Written != n || h.SpoolMessages != 0 {
			return fmt.Errorf("history after the restart: %+v, want %d written from the spool", h, n)
		}
		return nil
	})
	msgs, err := st.History(ctx, store.HistoryQuery{Topic: "chat/crash", Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != n {
		t.Fatalf("%d messages stored, want %d, each once", len(msgs), n)
	}
	for i, m := range msgs { // newest first
		if want := fmt.Sprintf("m%03d", n-1-i); string(m.Payload) != want || m.Node != "h1" || m.Publisher != "crash-dev" {
			t.Fatalf("message %d: %q from %s on %s, want %q from crash-dev on h1", i, m.Payload, m.Publisher, m.Node, want)
		}
	}
	if all, err := st.AllHistory(ctx); err != nil || len(all) != n {
		t.Fatalf("%d messages in history (%v), want %d: garbage replayed", len(all), err, n)
	}
	if !strings.Contains(n1.p.stderr.String(), "torn or corrupt tail cut") {
		t.Fatal("the torn record was not reported")
	}
}
