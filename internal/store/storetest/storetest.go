// Package storetest gives tests a store.Store on a database of their own.
//
// By default every test binary shares one embedded FerretDB server, started
// on first use in a temporary directory; with RTM_TEST_MONGODB_URI set, the
// same tests run against that external MongoDB instead. Each Open call gets a
// unique database that is dropped when the test ends, so tests using it may
// call t.Parallel. All functions are safe for concurrent use.
//
// Import it only from _test.go files.
package storetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/store"
)

// EnvURI names the environment variable that points the tests at an external
// MongoDB, e.g. RTM_TEST_MONGODB_URI=mongodb://127.0.0.1:27017/.
const EnvURI = "RTM_TEST_MONGODB_URI"

// timeout bounds connecting, and dropping the database at cleanup.
const timeout = 30 * time.Second

var shared struct {
	once sync.Once
	dir  string
	e    *store.Embedded
	err  error
}

// URI returns the server tests should use: $RTM_TEST_MONGODB_URI, or the
// shared embedded server, started on the first call. The embedded server and
// its directory live until Main's cleanup or the end of the process.
func URI(t testing.TB) string {
	t.Helper()
	if uri := os.Getenv(EnvURI); uri != "" {
		return uri
	}
	shared.once.Do(func() {
		shared.dir, shared.err = os.MkdirTemp("", "rtm-storetest-")
		if shared.err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		// No logger: the server outlives the test that starts it, and
		// t.Log after a test ends panics.
		shared.e, shared.err = store.StartEmbedded(ctx, store.EmbeddedOptions{DataDir: shared.dir})
	})
	if shared.err != nil {
		t.Fatalf("storetest: start shared embedded store: %v", shared.err)
	}
	return shared.e.URI()
}

// Open returns a Store on a new database named after the test (see DBName),
// connected to URI(t). Cleanup drops the database and closes the Store.
func Open(t testing.TB) *store.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	s, err := store.Open(ctx, store.Options{
		URI:            URI(t),
		Database:       DBName(t),
		ConnectTimeout: timeout,
	})
	if err != nil {
		t.Fatalf("storetest: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		if err := s.DB().Drop(ctx); err != nil {
			t.Errorf("storetest: drop database %s: %v", s.DB().Name(), err)
		}
		if err := s.Close(ctx); err != nil {
			t.Errorf("storetest: %v", err)
		}
	})
	return s
}

// DBName returns a database name unique to this call: "t_", the test name
// lowercased with every character outside [a-z0-9] replaced by '_', and a
// random suffix, at most 63 characters in all (the limit of MongoDB and
// FerretDB).
func DBName(t testing.TB) string {
	var b [4]byte
	_, _ = rand.Read(b[:]) // never fails
	suffix := "_" + hex.EncodeToString(b[:])
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			return r
		}
		return '_'
	}, strings.ToLower(t.Name()))
	name = "t_" + name
	if max := 63 - len(suffix); len(name) > max {
		name = name[:max]
	}
	return name + suffix
}

// Main runs the tests of a package, then stops the shared embedded server
// and removes its directory. Call it from TestMain to leave nothing behind in
// the temporary directory; without it the server stops with the process and
// its directory stays:
//
//	func TestMain(m *testing.M) { storetest.Main(m) }
func Main(m *testing.M) {
	code := m.Run()
	if shared.e != nil {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		if err := shared.e.Close(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "storetest: %v\n", err)
		}
		cancel()
	}
	if shared.dir != "" {
		_ = os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}
