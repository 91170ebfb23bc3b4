// Package store is rtm's persistence layer: a MongoDB database reached through
// the official driver (go.mongodb.org/mongo-driver/v2).
//
// With no URI configured, [Open] starts an embedded MongoDB-wire-compatible
// server in-process — FerretDB v1 with its SQLite backend, one file per
// database in a data directory — and connects to it over loopback TCP, so the
// embedded store and an external MongoDB (replica set or sharded cluster) go
// through the same driver and the same code. [StartEmbedded] runs that
// embedded server alone, so several rtm processes on one host can share it
// (`rtm store`).
//
// FerretDB v1 has no TTL indexes, change streams or transactions, so code in
// this package and its callers must not depend on them: retention is a
// periodic delete, and multi-document updates are written to be idempotent.
//
// On start, [Open] pings the server with exponential backoff until
// [Options.ConnectTimeout], then creates the collections' indexes and the
// schema-version document idempotently (see schema.go for the index table).
//
// # Concurrency
//
// A [Store] and an [Embedded] are safe for concurrent use by multiple
// goroutines, as are the [mongo.Client] and [mongo.Database] they hand out.
// Close methods are idempotent, bounded by their context, and may be called
// concurrently with other methods; operations started after Close fail with
// the driver's [mongo.ErrClientDisconnected]. Only one process at a time may
// serve an embedded data directory: a lock file in it enforces that, and a
// second attempt fails with [ErrDataDirLocked].
package store
