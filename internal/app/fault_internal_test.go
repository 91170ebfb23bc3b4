package app

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/rtm-dev/rtm/internal/lifecycle"
)

// fakeRole fails when told to.
type fakeRole struct {
	lifecycle.Fault
	stopped bool
}

func (f *fakeRole) Start(context.Context) (lifecycle.Addrs, error) {
	return lifecycle.Addrs{"http": "127.0.0.1:1"}, nil
}
func (f *fakeRole) Shutdown(context.Context) error { f.stopped = true; return nil }

func TestRoleFailureClosesDone(t *testing.T) {
	a, err := New(config.Defaults(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	fr := &fakeRole{}
	a.running = append(a.running, named{RoleRouter, fr})
	addrs, err := a.Start(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if addrs[RoleRouter]["http"] != "127.0.0.1:1" {
		t.Fatalf("Start addresses = %v", addrs)
	}
	select {
	case <-a.Done():
		t.Fatal("Done closed before a failure")
	default:
	}
	fr.Fail(errors.New("listener closed"))
	select {
	case <-a.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed after a role failed")
	}
	if err := a.Err(); err == nil || !strings.Contains(err.Error(), "router") || !strings.Contains(err.Error(), "listener closed") {
		t.Fatalf("Err = %v, want the role and its cause", err)
	}
	if err := a.Shutdown(context.Background()); err != nil || !fr.stopped {
		t.Fatalf("Shutdown = %v, stopped %v", err, fr.stopped)
	}
	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatalf("second Shutdown = %v", err)
	}
}
