package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
	"go.mongodb.org/mongo-driver/v2/mongo/readpref"
)

// DefaultEmbeddedAddr is the address of an embedded server whose
// EmbeddedOptions.Addr is empty: loopback, any free port.
const DefaultEmbeddedAddr = "127.0.0.1:0"

// embeddedReadyTimeout bounds StartEmbedded's readiness check when ctx has
// no earlier deadline.
const embeddedReadyTimeout = 30 * time.Second

// newMu serializes ferretdb.New, which writes package-level state
// (version.Get().Package) without synchronization.
var newMu sync.Mutex

// EmbeddedOptions configure StartEmbedded.
type EmbeddedOptions struct {
	// Addr is the host:port to listen on; port 0 picks a free port (see
	// Embedded.Addr). The host must be a loopback address (127.0.0.0/8, ::1,
	// localhost) unless AllowNonLoopback is set, because FerretDB v1 with
	// SQLite has no authentication. "" means "127.0.0.1:0".
	Addr string

	// AllowNonLoopback permits a non-loopback Addr, exposing the unauthenticated
	// store to the network. false refuses it.
	AllowNonLoopback bool

	// DataDir is the directory for the SQLite files, one per database,
	// created (mode 0700) if missing. Required.
	DataDir string

	// Logger receives the server's logs as component=ferretdb, at DEBUG
	// except for FerretDB's own errors, which come at WARN (FerretDB logs
	// every connection and every failed command at INFO or WARN). nil
	// discards them.
	Logger *slog.Logger
}

// Embedded is a running embedded FerretDB server holding the lock on its
// data directory. It is safe for concurrent use.
type Embedded struct {
	addr    string
	dataDir string

	cancel    context.CancelFunc
	done      chan struct{} // closed when the server goroutine has returned
	closeOnce sync.Once
}

// StartEmbedded starts a FerretDB server with the SQLite backend in
// opts.DataDir and returns once it answers a ping, or fails when ctx ends
// first (30s when ctx has no deadline). It fails with ErrDataDirLocked when
// another Embedded, in this process or another, holds the directory.
func StartEmbedded(ctx context.Context, opts EmbeddedOptions) (_ *Embedded, err error) {
	if opts.Addr == "" {
		opts.Addr = DefaultEmbeddedAddr
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := opts.validate(); err != nil {
		return nil, err
	}

	dir, err := filepath.Abs(opts.DataDir)
	if err != nil {
		return nil, fmt.Errorf("store: data dir %q: %w", opts.DataDir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: data dir: %w", err)
	}
	lock, err := lockDataDir(dir)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil && lock != nil {
			lock.release()
		}
	}()

	// FerretDB wants a file: URI of a directory, ending in '/'; url.URL
	// escapes whatever the path contains.
	sqliteURL := (&url.URL{Scheme: "file", Path: filepath.ToSlash(dir) + "/"}).String()
	newMu.Lock()
	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: opts.Addr},
		Logger:    slog.New(demoteHandler{opts.Logger.Handler()}).With("component", "ferretdb"),
		Handler:   "sqlite",
		SQLiteURL: sqliteURL,
	})
	newMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("store: start embedded server on %s in %s: %w", opts.Addr, dir, err)
	}

	// The listener is bound by ferretdb.New; Run accepts connections and
	// closes the backend when runCtx ends.
	runCtx, cancel := context.WithCancel(context.Background())
	e := &Embedded{
		dataDir: dir,
		cancel:  cancel,
		done:    make(chan struct{}),
	}
	srvLock := lock
	lock = nil // the server goroutine owns the lock from here
	idxDone := make(chan struct{})
	go func() {
		defer close(idxDone)
		e.indexIDs(runCtx, opts.Logger)
	}()
	go func() {
		defer close(e.done)
		defer srvLock.release()
		_ = f.Run(runCtx) // always nil
		<-idxDone
	}()
	defer func() {
		if err != nil {
			cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer ccancel()
			_ = e.Close(cctx)
		}
	}()

	u, err := url.Parse(f.MongoDBURI())
	if err != nil { // cannot happen: FerretDB builds it with url.URL
		return nil, fmt.Errorf("store: embedded server URI: %w", err)
	}
	e.addr = u.Host
	if err := e.waitReady(ctx); err != nil {
		return nil, err
	}
	opts.Logger.Info("embedded store started", "component", "store", "addr", e.addr, "data_dir", dir)
	return e, nil
}

// validate checks opts, reporting every bad field at once.
func (o EmbeddedOptions) validate() error {
	var errs []error
	if o.DataDir == "" {
		errs = append(errs, errors.New("store.data_dir: required for the embedded store"))
	}
	host, _, err := net.SplitHostPort(o.Addr)
	switch {
	case err != nil:
		errs = append(errs, fmt.Errorf("store.addr: %q: %w", o.Addr, err))
	case !o.AllowNonLoopback && !isLoopback(host):
		errs = append(errs, fmt.Errorf("store.addr: %q: host must be a loopback address; the embedded store has no authentication", o.Addr))
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("store: %w: %w", ErrInvalidOptions, errors.Join(errs...))
}

// isLoopback reports whether host is "localhost" or a loopback IP literal.
// Other names are not resolved: an address that depends on DNS is not
// obviously local.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// waitReady pings the server until it answers or ctx (bounded by
// embeddedReadyTimeout) ends. The driver polls server selection itself, so
// one Ping call is the poll loop.
func (e *Embedded) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, embeddedReadyTimeout)
	defer cancel()
	c, err := mongo.Connect(options.Client().ApplyURI(e.URI()).SetDirect(true))
	if err != nil {
		return fmt.Errorf("store: embedded server %s: %w", e.addr, err)
	}
	defer func() { _ = c.Disconnect(context.WithoutCancel(ctx)) }()
	if err := c.Ping(ctx, readpref.Primary()); err != nil {
		return fmt.Errorf("store: embedded server %s not ready: %w", e.addr, err)
	}
	return nil
}

// Addr returns the host:port the server listens on, with port 0 resolved.
func (e *Embedded) Addr() string { return e.addr }

// URI returns the server's mongodb:// URI.
func (e *Embedded) URI() string { return "mongodb://" + e.addr + "/" }

// DataDir returns the absolute path of the data directory.
func (e *Embedded) DataDir() string { return e.dataDir }

// Close stops the server and waits, within ctx, for it to close its
// connections and SQLite files and release the data directory. FerretDB
// grants connected clients up to 3s to disconnect, so disconnect clients
// first. It is idempotent: later calls wait for the same shutdown.
func (e *Embedded) Close(ctx context.Context) error {
	e.closeOnce.Do(e.cancel)
	select {
	case <-e.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("store: stop embedded server %s: %w", e.addr, context.Cause(ctx))
	}
}

// demoteHandler quiets FerretDB: records below ERROR become DEBUG, the rest
// WARN. FerretDB logs every connection at INFO and every failed command,
// with a dump of the whole reply, at WARN — including duplicate-key errors,
// which rtm treats as normal, and the driver's endSessions, which FerretDB
// v1 does not implement. Its ERRORs (a recovered handler panic, for example)
// stay visible. slog has no built-in way to remap levels.
type demoteHandler struct{ h slog.Handler }

func demote(l slog.Level) slog.Level {
	if l < slog.LevelError {
		return slog.LevelDebug
	}
	return slog.LevelWarn
}

func (d demoteHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return d.h.Enabled(ctx, demote(l))
}

func (d demoteHandler) Handle(ctx context.Context, r slog.Record) error {
	r.Level = demote(r.Level)
	return d.h.Handle(ctx, r)
}

func (d demoteHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return demoteHandler{d.h.WithAttrs(as)}
}

func (d demoteHandler) WithGroup(name string) slog.Handler {
	return demoteHandler{d.h.WithGroup(name)}
}

var _ slog.Handler = demoteHandler{}
