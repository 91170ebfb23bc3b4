// Package lifecycle is the contract every rtm role (broker, router, push
// API, watchdog) keeps with the process that runs it:
//
//   - New validates options and builds the role: no I/O, no goroutine, no
//     metric registration, so a composition root can build every role once,
//     before it opens anything, and report configuration errors first;
//   - Start(ctx) binds listeners, joins gossip, registers metrics and
//     returns the bound addresses; on error nothing is left running;
//   - Shutdown(ctx) is idempotent and bounded by ctx;
//   - Done() is closed, and Err() says why, when the role stopped on its own
//     while running (its HTTP server or its gossip member died), so the
//     process exits non-zero instead of carrying on half alive.
package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

// Addrs are a role's bound addresses, by listener ("http", "gossip", "tcp",
// "admin", ...).
type Addrs map[string]string

// Role is the lifecycle every role shares.
type Role interface {
	Start(ctx context.Context) (Addrs, error)
	Shutdown(ctx context.Context) error
	// Done is closed when the role failed while running; Err then returns
	// the cause. A Shutdown does not close it.
	Done() <-chan struct{}
	Err() error
}

// Fault records the first fatal error of a running role. The zero value is
// ready to use; it is safe for concurrent use.
type Fault struct {
	once sync.Once
	mu   sync.Mutex
	done chan struct{}
	err  error
}

func (f *Fault) init() {
	f.mu.Lock()
	if f.done == nil {
		f.done = make(chan struct{})
	}
	f.mu.Unlock()
}

// Fail records err (the first one only) and closes Done.
func (f *Fault) Fail(err error) {
	if err == nil {
		return
	}
	f.init()
	f.once.Do(func() {
		f.mu.Lock()
		f.err = err
		f.mu.Unlock()
		close(f.done)
	})
}

// Done is closed by the first Fail.
func (f *Fault) Done() <-chan struct{} {
	f.init()
	return f.done
}

// Err returns the error of the first Fail, or nil.
func (f *Fault) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// Serve runs srv on ln until it is shut down; any other end is reported to
// f as a failure of what (e.g. "router: HTTP server").
func Serve(srv *http.Server, ln net.Listener, f *Fault, what string) {
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		f.Fail(&ServeError{What: what, Err: err})
	}
}

// Watch reports to f a failure of a dependency (a gossip member) that ends
// while stop is open.
func Watch(dep interface {
	Done() <-chan struct{}
	Err() error
}, stop <-chan struct{}, f *Fault, what string) {
	select {
	case <-dep.Done():
		f.Fail(&ServeError{What: what, Err: dep.Err()})
	case <-stop:
	}
}

// ServeError is a part of a role that stopped while it should run.
type ServeError struct {
	What string
	Err  error
}

func (e *ServeError) Error() string { return e.What + " stopped: " + e.Err.Error() }
func (e *ServeError) Unwrap() error { return e.Err }

// DefaultName is a role's gossip name: name, or role-<host name> when it is
// empty (key names the setting in the error).
func DefaultName(role, key, name string) (string, error) {
	if name != "" {
		return name, nil
	}
	host, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("%s: %s not set and host name unknown: %w", role, key, err)
	}
	return role + "-" + host, nil
}

// LeaveTimeout bounds a role's graceful leave from gossip at shutdown: a
// peer that misses it sees a failure later.
const LeaveTimeout = 3 * time.Second

// Leave leaves gossip gracefully, within LeaveTimeout and ctx, so peers see
// "left", not "failed"; an unconfirmed leave is only logged.
func Leave(ctx context.Context, node interface{ Leave(context.Context) error }, log *slog.Logger) {
	lctx, cancel := context.WithTimeout(ctx, LeaveTimeout)
	defer cancel()
	if err := node.Leave(lctx); err != nil {
		log.Warn("gossip leave not confirmed", "error", err)
	}
}

// ShutdownHTTP stops srv answering: requests in progress finish, idle
// keep-alive connections close; past ctx the rest are closed.
func ShutdownHTTP(ctx context.Context, srv *http.Server, role string) error {
	if err := srv.Shutdown(ctx); err != nil {
		_ = srv.Close()
		return fmt.Errorf("%s: HTTP shutdown: %w", role, err)
	}
	return nil
}

// Within runs stop on a goroutine of its own and returns its error, or,
// when ctx ends first, an error naming role (stop carries on meanwhile).
func Within(ctx context.Context, role string, stop func() error) error {
	done := make(chan error, 1)
	go func() { done <- stop() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%s: shutdown: %w", role, ctx.Err())
	}
}
