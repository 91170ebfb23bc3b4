package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
	"go.mongodb.org/mongo-driver/v2/mongo/readpref"
	"go.mongodb.org/mongo-driver/v2/x/mongo/driver"

	"github.com/rtm-dev/rtm/internal/config"
)

// Defaults applied by Open to zero-valued Options fields.
const (
	DefaultDatabase       = "rtm"
	DefaultConnectTimeout = 30 * time.Second
)

// ErrUnreachable reports that Open could not reach the server within
// Options.ConnectTimeout (or before its context ended). The wrapping error
// names the URI, with any password masked, and the last cause.
var ErrUnreachable = errors.New("unreachable")

// ErrDataDirLocked reports that another process, or another Embedded in this
// process, is serving the embedded data directory (unix only: other platforms
// have no data directory lock).
var ErrDataDirLocked = errors.New("data directory is in use")

// ErrInvalidOptions reports Options or EmbeddedOptions that cannot work; the
// wrapping error names each bad field and its value.
var ErrInvalidOptions = errors.New("invalid options")

// Options configure Open. The zero value of each field is documented with it;
// only DataDir must be set when URI is empty.
type Options struct {
	// URI is the mongodb:// (or mongodb+srv://) URI of an external server.
	// "" starts an embedded FerretDB on 127.0.0.1 (random port) in DataDir.
	URI string

	// Database is the name of the database rtm uses. "" means "rtm".
	Database string

	// DataDir is the directory for the embedded store's SQLite files, created
	// (mode 0700) if missing. Required when URI is ""; ignored otherwise.
	DataDir string

	// ConnectTimeout bounds how long Open keeps retrying, with exponential
	// backoff, a server that does not answer a ping before it fails.
	// 0 means 30s.
	ConnectTimeout time.Duration

	// Logger receives the store's logs, and the embedded server's as
	// described at EmbeddedOptions.Logger. nil discards them.
	Logger *slog.Logger
}

// withDefaults returns o with zero values replaced by their defaults.
func (o Options) withDefaults() Options {
	if o.Database == "" {
		o.Database = DefaultDatabase
	}
	if o.ConnectTimeout == 0 {
		o.ConnectTimeout = DefaultConnectTimeout
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// validate reports every unusable field at once.
func (o Options) validate() error {
	var errs []error
	if o.URI == "" && o.DataDir == "" {
		errs = append(errs, errors.New(`store.data_dir: required when store.uri is empty (embedded store)`))
	}
	if o.URI != "" && !strings.HasPrefix(o.URI, "mongodb://") && !strings.HasPrefix(o.URI, "mongodb+srv://") {
		errs = append(errs, fmt.Errorf("store.uri: %q: want a mongodb:// or mongodb+srv:// URI", config.MaskURI(o.URI)))
	}
	if o.ConnectTimeout < 0 {
		errs = append(errs, fmt.Errorf("store.connect_timeout: %s: must not be negative", o.ConnectTimeout))
	}
	// Same rule as MongoDB and FerretDB: at most 63 bytes, no path or
	// namespace separators.
	if len(o.Database) > 63 || strings.ContainsAny(o.Database, `/\. "$`) {
		errs = append(errs, fmt.Errorf("store.database: %q: want at most 63 characters without /\\. \"$", o.Database))
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("store: %w: %w", ErrInvalidOptions, errors.Join(errs...))
}

// Store is an open connection to rtm's database, and the embedded server
// behind it when there is one. It is safe for concurrent use.
type Store struct {
	client   *mongo.Client
	db       *mongo.Database
	embedded *Embedded // nil with an external server
	uri      string    // masked
	log      *slog.Logger
	opts     Options // for Start, when made by New

	hidx histIndex // the history index on FerretDB (historyindex.go)

	// idOnly: the server is FerretDB v1, which pushes down to SQLite only
	// a filter that is an equality on _id alone and scans the collection
	// for any other, and which runs a conditional update as a read then a
	// write anyway (see IDOnly).
	idOnly bool

	testAfterConns func() // tests: between WritePresence's read and its write

	closeOnce sync.Once
	closeErr  error
}

// New checks opts and returns a store that Start opens; it does no I/O, so
// a composition root can hand the store to the roles it builds before it
// opens anything. Its methods other than Start, Close and URI need Start
// to have succeeded.
func New(opts Options) (*Store, error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	return &Store{opts: opts, log: opts.Logger.With("component", "store")}, nil
}

// Start opens a store made by New: see Open.
func (s *Store) Start(ctx context.Context) error {
	o, err := Open(ctx, s.opts)
	if err != nil {
		return err
	}
	s.client, s.db, s.embedded, s.uri, s.log, s.idOnly = o.client, o.db, o.embedded, o.uri, o.log, o.idOnly
	return nil
}

// Open connects to the server described by opts, starting an embedded one
// first if opts.URI is empty. It pings with exponential backoff until
// opts.ConnectTimeout, then creates the indexes and the schema-version
// document (idempotent: opening the same database again is fine).
//
// On failure Open leaves nothing running, and the error names the URI with
// its password masked, e.g.
//
//	store: mongodb://127.0.0.1:1/ unreachable after 2s: server selection error: ...
//
// which matches ErrUnreachable with errors.Is.
func Open(ctx context.Context, opts Options) (_ *Store, err error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	log := opts.Logger.With("component", "store")

	s := &Store{log: log}
	defer func() {
		if err != nil {
			// Never leave a half-open store behind; the cleanup gets its own
			// deadline because ctx may be what failed.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			_ = s.Close(cctx)
		}
	}()

	uri := opts.URI
	if uri == "" {
		e, err := StartEmbedded(ctx, EmbeddedOptions{
			Addr:    "127.0.0.1:0",
			DataDir: opts.DataDir,
			Logger:  opts.Logger,
		})
		if err != nil {
			return nil, err
		}
		s.embedded = e
		uri = e.URI()
	}
	s.uri = config.MaskURI(uri)

	s.client, err = mongo.Connect(options.Client().ApplyURI(uri).SetAppName("rtm"))
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", s.uri, err)
	}
	s.db = s.client.Database(opts.Database)

	if err := s.pingWithRetry(ctx, opts.ConnectTimeout); err != nil {
		return nil, err
	}
	if err := ensureSchema(ctx, s.db); err != nil {
		return nil, fmt.Errorf("store: %s: database %s: %w", s.uri, opts.Database, err)
	}
	if s.idOnly, err = isFerretDBv1(ctx, s.db); err != nil {
		return nil, fmt.Errorf("store: %s: %w", s.uri, err)
	}
	log.Info("store open", "uri", s.uri, "database", opts.Database, "embedded", s.embedded != nil)
	return s, nil
}

// pingWithRetry pings until success, timeout or the end of ctx. The driver
// itself waits for server selection within one attempt, so an attempt lasts
// up to the time left; the backoff covers servers that answer with errors
// (starting up, stepping down) rather than not at all.
func (s *Store) pingWithRetry(ctx context.Context, timeout time.Duration) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 50 * time.Millisecond
	b.MaxInterval = 2 * time.Second

	var lastErr error
	_, err := backoff.Retry(ctx, func() (struct{}, error) {
		lastErr = s.client.Ping(ctx, readpref.Primary())
		return struct{}{}, lastErr
	},
		backoff.WithBackOff(b),
		backoff.WithMaxElapsedTime(timeout),
		backoff.WithNotify(func(err error, next time.Duration) {
			s.log.Debug("store ping failed, retrying", "uri", s.uri, "retry_in", next, "error", err)
		}),
	)
	if err == nil {
		return nil
	}
	if lastErr == nil {
		lastErr = err
	}
	return fmt.Errorf("store: %s %w after %s: %w", s.uri, ErrUnreachable, time.Since(start).Round(100*time.Millisecond), lastErr)
}

// DB returns rtm's database.
func (s *Store) DB() *mongo.Database { return s.db }

// Client returns the driver client, for work outside rtm's database.
func (s *Store) Client() *mongo.Client { return s.client }

// IDOnly reports whether the server finds documents by key only for a
// filter that is an equality on _id alone (FerretDB v1, the embedded
// store): any other filter, a conditional update's included, reads the
// whole collection, and a conditional update is not atomic there anyway
// (a read, then a write). Callers with many such writes read by _id and
// write by _id instead; on MongoDB they keep the conditional filter, which
// is atomic and uses the _id index.
func (s *Store) IDOnly() bool { return s.idOnly }

// Embedded reports whether the store runs an embedded FerretDB server.
func (s *Store) Embedded() bool { return s.embedded != nil }

// Ping checks that the server answers, for readiness probes.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.client.Ping(ctx, readpref.Primary()); err != nil {
		return fmt.Errorf("store: ping %s: %w", s.uri, err)
	}
	return nil
}

// Close disconnects from the server and stops the embedded one, if any,
// waiting for it within ctx. It is idempotent; calls after the first return
// the first call's disconnect error, but still wait for the embedded server.
func (s *Store) Close(ctx context.Context) error {
	s.closeOnce.Do(func() {
		// Disconnect first: the embedded server gives open client connections
		// a grace period of a few seconds before it stops.
		if s.client != nil {
			if err := s.client.Disconnect(ctx); err != nil {
				s.closeErr = fmt.Errorf("store: disconnect %s: %w", s.uri, err)
			}
		}
	})
	var errs []error
	if s.closeErr != nil {
		errs = append(errs, s.closeErr)
	}
	if s.embedded != nil {
		if err := s.embedded.Close(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// URI returns the server's URI with any password masked.
func (s *Store) URI() string { return s.uri }

// MaxDocumentBytes is the largest document MongoDB stores (its
// maxBsonObjectSize). A message is stored as one document, so a packet
// near this size cannot be (config: broker.max_packet_size).
const MaxDocumentBytes = 16 << 20

// IsRefused reports a write error that retrying cannot fix: a document too
// large for the driver to send or for the server to store.
func IsRefused(err error) bool {
	if errors.Is(err, driver.ErrDocumentTooLarge) {
		return true
	}
	var se mongo.ServerError
	return errors.As(err, &se) && se.HasErrorCode(10334) // BSONObjectTooLarge
}
