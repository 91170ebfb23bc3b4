package store_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
)

func TestMain(m *testing.M) { storetest.Main(m) }

// testLogger sends slog records to t.Log, so a failing test shows the store's
// and the embedded server's logs.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openEmbedded opens a Store with its own embedded server in dir and closes
// it at cleanup.
func openEmbedded(t testing.TB, dir string) *store.Store {
	t.Helper()
	start := time.Now()
	s, err := store.Open(testContext(t), store.Options{DataDir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Open(DataDir=%s): %v", dir, err)
	}
	t.Logf("embedded store open in %s", time.Since(start))
	t.Cleanup(func() { closeStore(t, s) })
	return s
}

// closeStore closes s with a fresh context: it also runs in t.Cleanup, after
// t.Context is canceled.
func closeStore(t testing.TB, s *store.Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := s.Close(ctx); err != nil {
		t.Errorf("Close: %v", err)
	}
	t.Logf("store closed in %s", time.Since(start))
}

func TestOpenCreatesSchema(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	s := storetest.Open(t)
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	checkSchema(t, s.DB())

	// An index an earlier rtm created on FerretDB (checkSchema: none there)
	// goes at the next Open.
	if _, err := s.DB().Collection(store.CollHistory).Indexes().CreateOne(ctx, mongo.IndexModel{
		Keys: bson.D{{Key: "topic", Value: 1}, {Key: "_id", Value: -1}}, Options: options.Index().SetName("topic_id_desc")}); err != nil {
		t.Fatal(err)
	}

	// Opening the same database again creates everything again: a no-op.
	start := time.Now()
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name(), Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("second Open of %s: %v", s.DB().Name(), err)
	}
	t.Logf("second Open in %s", time.Since(start))
	t.Cleanup(func() { closeStore(t, s2) })
	checkSchema(t, s2.DB())

	// A unique index holds.
	subs := s.DB().Collection(store.CollPushSubscriptions)
	if _, err := subs.InsertOne(ctx, bson.D{{Key: "channel", Value: "c"}, {Key: "device", Value: "d1"}}); err != nil {
		t.Fatalf("insert push subscription: %v", err)
	}
	_, err = subs.InsertOne(ctx, bson.D{{Key: "channel", Value: "c"}, {Key: "device", Value: "d1"}})
	if !mongo.IsDuplicateKeyError(err) {
		t.Fatalf("second insert of c/d1: err = %v, want a duplicate key error", err)
	}
}

func TestOpenRefusesNewerSchema(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	s := storetest.Open(t)
	_, err := s.DB().Collection(store.CollMeta).UpdateOne(ctx,
		bson.D{{Key: "_id", Value: "schema"}},
		bson.D{{Key: "$set", Value: bson.D{{Key: "version", Value: store.SchemaVersion + 1}}}})
	if err != nil {
		t.Fatalf("bump schema version: %v", err)
	}
	s2, err := store.Open(ctx, store.Options{URI: storetest.URI(t), Database: s.DB().Name()})
	if err == nil {
		closeStore(t, s2)
		t.Fatal("Open succeeded on a database with a newer schema, want ErrSchemaTooNew")
	}
	if !errors.Is(err, store.ErrSchemaTooNew) {
		t.Fatalf("Open: err = %v, want ErrSchemaTooNew", err)
	}
	t.Log(err)
}

func TestOpenEmbeddedKeepsDataAcrossRestart(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := filepath.Join(t.TempDir(), "not", "yet", "there")

	s := openEmbedded(t, dir)
	if !s.Embedded() {
		t.Error("Embedded() = false, want true")
	}
	if got := s.DB().Name(); got != store.DefaultDatabase {
		t.Errorf("DB().Name() = %q, want %q", got, store.DefaultDatabase)
	}
	if _, err := s.DB().Collection("things").InsertOne(ctx, bson.D{{Key: "_id", Value: "a"}, {Key: "n", Value: 42}}); err != nil {
		t.Fatalf("insert: %v", err)
	}
	closeStore(t, s)
	if err := s.Ping(ctx); err == nil {
		t.Error("Ping after Close succeeded, want an error")
	}
	if err := s.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}

	s = openEmbedded(t, dir)
	var doc struct {
		N int `bson:"n"`
	}
	if err := s.DB().Collection("things").FindOne(ctx, bson.D{{Key: "_id", Value: "a"}}).Decode(&doc); err != nil {
		t.Fatalf("find after restart: %v", err)
	}
	if doc.N != 42 {
		t.Errorf("after restart n = %d, want 42", doc.N)
	}
}

func TestOpenEmbeddedLocksDataDir(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	dir := t.TempDir()
	s := openEmbedded(t, dir)

	s2, err := store.Open(ctx, store.Options{DataDir: dir})
	if err == nil {
		closeStore(t, s2)
		t.Fatal("second Open of the same data dir succeeded, want ErrDataDirLocked")
	}
	if !errors.Is(err, store.ErrDataDirLocked) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("second Open: err = %v, want ErrDataDirLocked naming %s", err, dir)
	}
	t.Log(err)

	// Close releases the lock.
	closeStore(t, s)
	openEmbedded(t, dir)
}

func TestOpenUnreachableFailsInTime(t *testing.T) {
	t.Parallel()
	const uri = "mongodb://rtm:s3cret@127.0.0.1:1/"
	timeout := time.Second
	start := time.Now()
	s, err := store.Open(testContext(t), store.Options{URI: uri, ConnectTimeout: timeout})
	elapsed := time.Since(start)
	if err == nil {
		closeStore(t, s)
		t.Fatal("Open of an unreachable server succeeded")
	}
	t.Logf("failed after %s: %v", elapsed, err)
	if !errors.Is(err, store.ErrUnreachable) {
		t.Errorf("err = %v, want ErrUnreachable", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "store: mongodb://rtm:xxxxx@127.0.0.1:1/ unreachable after") || strings.Contains(msg, "s3cret") {
		t.Errorf("err = %q, want the masked URI and no password", msg)
	}
	if elapsed < timeout || elapsed > timeout+3*time.Second {
		t.Errorf("Open failed after %s, want about %s", elapsed, timeout)
	}
}

func TestOpenCanceled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := store.Open(ctx, store.Options{URI: "mongodb://127.0.0.1:1/"})
	if !errors.Is(err, store.ErrUnreachable) || time.Since(start) > 3*time.Second {
		t.Fatalf("Open with a short context: err = %v after %s, want ErrUnreachable within 3s", err, time.Since(start))
	}
}

func TestOpenValidatesOptions(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	_, err := store.Open(ctx, store.Options{URI: "http://x", Database: "a.b", ConnectTimeout: -1})
	if !errors.Is(err, store.ErrInvalidOptions) {
		t.Fatalf("err = %v, want ErrInvalidOptions", err)
	}
	for _, want := range []string{"store.uri", "store.database", "store.connect_timeout"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("err = %q, want it to name %s", err, want)
		}
	}
	if _, err := store.Open(ctx, store.Options{}); !errors.Is(err, store.ErrInvalidOptions) || !strings.Contains(err.Error(), "store.data_dir") {
		t.Errorf("Open without URI and DataDir: err = %v, want ErrInvalidOptions naming store.data_dir", err)
	}
	for _, addr := range []string{":0", "0.0.0.0:0", "example.com:27017", "nonsense"} {
		_, err := store.StartEmbedded(ctx, store.EmbeddedOptions{Addr: addr, DataDir: t.TempDir()})
		if !errors.Is(err, store.ErrInvalidOptions) || !strings.Contains(err.Error(), "store.addr") {
			t.Errorf("StartEmbedded(Addr=%q): err = %v, want ErrInvalidOptions naming store.addr", addr, err)
		}
	}
}

func TestStartEmbeddedServesOtherStores(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	start := time.Now()
	e, err := store.StartEmbedded(ctx, store.EmbeddedOptions{DataDir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Logf("embedded server ready in %s", time.Since(start))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := e.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	host, port, err := net.SplitHostPort(e.Addr())
	if err != nil || host != "127.0.0.1" || port == "0" {
		t.Fatalf("Addr() = %q, want 127.0.0.1 with a resolved port", e.Addr())
	}
	if want := "mongodb://" + e.Addr() + "/"; e.URI() != want {
		t.Errorf("URI() = %q, want %q", e.URI(), want)
	}

	// Two stores, as two rtm processes would, share the server.
	var stores [2]*store.Store
	for i := range stores {
		s, err := store.Open(ctx, store.Options{URI: e.URI(), Logger: testLogger(t)})
		if err != nil {
			t.Fatalf("Open(%s): %v", e.URI(), err)
		}
		if s.Embedded() {
			t.Error("Embedded() = true for a store on a URI, want false")
		}
		stores[i] = s
	}
	if _, err := stores[0].DB().Collection("things").InsertOne(ctx, bson.D{{Key: "_id", Value: "x"}}); err != nil {
		t.Fatalf("insert: %v", err)
	}
	if n, err := stores[1].DB().Collection("things").CountDocuments(ctx, bson.D{}); err != nil || n != 1 {
		t.Fatalf("count through the second store = %d, %v; want 1", n, err)
	}
	for _, s := range stores {
		closeStore(t, s)
	}

	start = time.Now()
	if err := e.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	t.Logf("embedded server closed in %s", time.Since(start))
	if err := e.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if c, err := net.Dial("tcp", e.Addr()); err == nil {
		c.Close()
		t.Errorf("%s still accepts connections after Close", e.Addr())
	}
}

// checkSchema asserts, through the driver, the indexes and the schema
// document that Open creates.
func checkSchema(t *testing.T, db *mongo.Database) {
	t.Helper()
	ctx := testContext(t)
	want := []struct {
		coll, name, keys string
		unique           bool
	}{
		{"devices", "node_online", `{"node": 1,"online": 1}`, false},
		{"push_subscriptions", "channel_device_unique", `{"channel": 1,"device": 1}`, true},
		{"push_subscriptions", "device", `{"device": 1}`, false},
		{"groups", "members", `{"members": 1}`, false},
		{"history", "topic_id_desc", `{"topic": 1,"_id": -1}`, false},
		{"alerts", "state_fired_at", `{"state": 1,"fired_at": 1}`, false},
	}
	var info struct {
		FerretDB *string `bson:"ferretdbVersion"` // "unknown" when built into rtm
	}
	if err := db.RunCommand(ctx, bson.D{{Key: "buildInfo", Value: 1}}).Decode(&info); err != nil {
		t.Fatal(err)
	}
	ferret := info.FerretDB != nil && !strings.HasPrefix(strings.TrimPrefix(*info.FerretDB, "v"), "2.")
	for _, w := range want {
		specs, err := db.Collection(w.coll).Indexes().ListSpecifications(ctx)
		if err != nil {
			t.Fatalf("list indexes of %s: %v", w.coll, err)
		}
		var found *mongo.IndexSpecification
		var names []string
		for i := range specs {
			names = append(names, specs[i].Name)
			if specs[i].Name == w.name {
				found = &specs[i]
			}
		}
		if ferret && !w.unique {
			// FerretDB v1 never reads a secondary index and every write pays
			// for it: none but the unique ones.
			if found != nil {
				t.Errorf("%s: index %q kept on FerretDB v1, which never reads it", w.coll, w.name)
			}
			continue
		}
		if found == nil {
			t.Errorf("%s: index %q missing; have %v", w.coll, w.name, names)
			continue
		}
		if got := compactJSON(found.KeysDocument); got != w.keys {
			t.Errorf("%s.%s keys = %s, want %s", w.coll, w.name, got, w.keys)
		}
		if got := found.Unique != nil && *found.Unique; got != w.unique {
			t.Errorf("%s.%s unique = %v, want %v", w.coll, w.name, got, w.unique)
		}
	}

	var meta struct {
		Version   int       `bson:"version"`
		CreatedAt time.Time `bson:"created_at"`
	}
	if err := db.Collection("meta").FindOne(ctx, bson.D{{Key: "_id", Value: "schema"}}).Decode(&meta); err != nil {
		t.Fatalf("read schema document: %v", err)
	}
	if meta.Version != store.SchemaVersion || meta.CreatedAt.IsZero() {
		t.Errorf("schema document = %+v, want version %d and a created_at", meta, store.SchemaVersion)
	}
}

func compactJSON(raw bson.Raw) string {
	// Raw.String gives relaxed extended JSON, e.g. {"client_id": {"$numberInt":"1"}}
	// for some servers and {"client_id": 1} for others; normalise the ints.
	s := raw.String()
	s = strings.ReplaceAll(s, `{"$numberInt":"1"}`, "1")
	s = strings.ReplaceAll(s, `{"$numberInt":"-1"}`, "-1")
	s = strings.ReplaceAll(s, `, `, `,`)
	return s
}
