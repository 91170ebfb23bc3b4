package lifecycle_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/lifecycle"
)

func TestServeReportsAnUnexpectedEnd(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var f lifecycle.Fault
	srv := &http.Server{ReadHeaderTimeout: time.Second}
	go lifecycle.Serve(srv, ln, &f, "test: HTTP server")
	_ = ln.Close() // the listener dies under the server
	select {
	case <-f.Done():
		var se *lifecycle.ServeError
		if !errors.As(f.Err(), &se) || se.What != "test: HTTP server" {
			t.Fatalf("Err = %v, want a ServeError naming the server", f.Err())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after the listener died")
	}
}

func TestServeShutdownIsNotAFailure(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var f lifecycle.Fault
	srv := &http.Server{ReadHeaderTimeout: time.Second}
	ended := make(chan struct{})
	go func() { lifecycle.Serve(srv, ln, &f, "x"); close(ended) }()
	time.Sleep(50 * time.Millisecond) // let Serve begin; a Shutdown before it is fine too
	_ = srv.Shutdown(context.Background())
	<-ended
	if f.Err() != nil {
		t.Fatalf("Err after Shutdown = %v, want nil", f.Err())
	}
}

func TestFaultKeepsTheFirstError(t *testing.T) {
	var f lifecycle.Fault
	first := errors.New("first")
	f.Fail(first)
	f.Fail(errors.New("second"))
	<-f.Done()
	if f.Err() != first {
		t.Fatalf("Err = %v, want the first", f.Err())
	}
}

// A shutdown that outlives its context is reported as the role's, and the
// stop function's own error otherwise.
func TestWithin(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	release := make(chan struct{})
	defer close(release)
	err := lifecycle.Within(ctx, "router", func() error { <-release; return nil })
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "router: shutdown") {
		t.Fatalf("Within past its context: %v", err)
	}
	boom := errors.New("boom")
	if err := lifecycle.Within(context.Background(), "router", func() error { return boom }); err != boom {
		t.Fatalf("Within: %v, want the stop function's error", err)
	}
}

func TestDefaultName(t *testing.T) {
	if n, err := lifecycle.DefaultName("router", "router.name", "r1"); err != nil || n != "r1" {
		t.Fatalf("set name: %q %v", n, err)
	}
	if n, err := lifecycle.DefaultName("router", "router.name", ""); err != nil || !strings.HasPrefix(n, "router-") || len(n) == len("router-") {
		t.Fatalf("default name: %q %v", n, err)
	}
}
