package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// Collection names in rtm's database.
const (
	CollMeta              = "meta"               // one document per store-wide fact, e.g. the schema version
	CollDevices           = "devices"            // registered devices, keyed by MQTT client id
	CollPushSubscriptions = "push_subscriptions" // which device receives which push channel
	CollGroups            = "groups"             // named device groups
	CollGroupMembers      = "group_members"      // one document per device in a group
	CollHistory           = "history"            // every message on a history topic, by id (docs/history.md)
	CollHistoryGaps       = "history_gaps"       // messages history could not store: when, which filter, how many
	CollAlerts            = "alerts"             // watchdog alerts
	CollSessions          = "sessions"           // persistent MQTT sessions, keyed by client ID, with their owner broker
	CollSessionMessages   = "session_messages"   // QoS 1/2 messages held for persistent sessions, keyed by client ID and packet ID
	CollSessionClaims     = "session_claims"     // one document per adoption of a session under way (client ID and epoch): the insert that wins is the adoption; deleted once the session is taken
	CollRetained          = "retained"           // retained messages, keyed by topic, last writer wins
)

// SchemaVersion is the version of the database layout this code writes. Open
// records it in the meta collection and refuses a database written by a
// newer rtm (ErrSchemaTooNew).
//
// Version 2 keys device records (CollDevices) by client ID: _id is the
// client ID; Open rewrites version 1 records.
const SchemaVersion = 2

// schemaDocID is the _id of the schema-version document in CollMeta.
const schemaDocID = "schema"

// ErrSchemaTooNew reports a database whose recorded schema version is newer
// than SchemaVersion: it was written by a newer rtm, and this one may
// misread it.
var ErrSchemaTooNew = errors.New("database schema is newer than this rtm")

// index is one index Open creates. Name is explicit so that creating it
// again is a no-op on every server (MongoDB rejects the same keys under a
// different name).
type index struct {
	coll   string
	name   string
	keys   bson.D
	unique bool
}

// indexes lists every index rtm needs. Add new ones here; never change an
// existing entry in place (servers reject a changed spec under an existing
// name): add one with a new name instead. TTL indexes do not belong here:
// FerretDB v1 has none, and the history's takes its expiry from the
// configuration (EnsureHistoryTTL).
var indexes = []index{
	{CollDevices, "node_online", bson.D{{Key: "node", Value: 1}, {Key: "online", Value: 1}}, false},
	{CollPushSubscriptions, "channel_device_unique", bson.D{{Key: "channel", Value: 1}, {Key: "device", Value: 1}}, true},
	{CollPushSubscriptions, "device", bson.D{{Key: "device", Value: 1}}, false},
	// Unused: members live in CollGroupMembers (concurrent updates of one
	// document lose writes on FerretDB v1). Kept, as entries are never
	// changed in place.
	{CollGroups, "members", bson.D{{Key: "members", Value: 1}}, false},
	{CollGroupMembers, "group_device", bson.D{{Key: "group", Value: 1}, {Key: "device", Value: 1}}, false},
	{CollGroupMembers, "device_group", bson.D{{Key: "device", Value: 1}, {Key: "group", Value: 1}}, false},
	{CollHistory, "topic_id_desc", bson.D{{Key: "topic", Value: 1}, {Key: "_id", Value: -1}}, false},
	{CollAlerts, "state_fired_at", bson.D{{Key: "state", Value: 1}, {Key: "fired_at", Value: 1}}, false},
	{CollSessions, "owner", bson.D{{Key: "owner", Value: 1}}, false},
	{CollSessionMessages, "client_seq", bson.D{{Key: "c", Value: 1}, {Key: "seq", Value: 1}}, false},
}

// ensureSchema records the schema version and creates the indexes. Both
// steps are idempotent.
func ensureSchema(ctx context.Context, db *mongo.Database) error {
	var meta struct {
		Version int `bson:"version"`
	}
	now := time.Now().UTC()
	err := db.Collection(CollMeta).FindOneAndUpdate(ctx,
		bson.D{{Key: "_id", Value: schemaDocID}},
		bson.D{
			{Key: "$setOnInsert", Value: bson.D{{Key: "created_at", Value: now}}},
			{Key: "$max", Value: bson.D{{Key: "version", Value: SchemaVersion}}},
		},
		options.FindOneAndUpdate().SetUpsert(true).SetReturnDocument(options.After),
	).Decode(&meta)
	if err != nil {
		return fmt.Errorf("record schema version: %w", err)
	}
	if meta.Version > SchemaVersion {
		return fmt.Errorf("%w: database has version %d, this rtm writes %d", ErrSchemaTooNew, meta.Version, SchemaVersion)
	}

	// Version 1's unique index on client_id: _id is the client ID now, and
	// the index would make a broker's presence writes fail (and retry
	// forever) on any record a version 1 broker inserts during a rolling
	// upgrade; such records are rewritten at the next Open. Dropped first,
	// so the rewrite can insert a record's new copy before deleting the old.
	if err := db.Collection(CollDevices).Indexes().DropOne(ctx, "client_id_unique"); err != nil && !indexNotFound(err) {
		return fmt.Errorf("drop index client_id_unique on %s: %w", CollDevices, err)
	}
	if err := migratePresenceIDs(ctx, db); err != nil {
		return fmt.Errorf("rewrite device records under their client ID: %w", err)
	}

	// One createIndexes command per index: FerretDB v1.24 panics (and drops
	// the connection) when one command lists two or more indexes that already
	// exist, because it deletes them from its to-do list by their original
	// position.
	ferret, err := isFerretDBv1(ctx, db)
	if err != nil {
		return err
	}
	for _, ix := range indexes {
		if ferret && !ix.unique {
			// FerretDB v1 plans every query by _id alone (it pushes no other
			// filter down), so a secondary index is never read, yet every
			// insert and update maintains it: without history's
			// topic_id_desc, inserts ran 1.38 times as fast (docs/history.md).
			// Unique indexes stay: they enforce their constraint. Earlier
			// rtm versions created these, so they are dropped.
			if err := db.Collection(ix.coll).Indexes().DropOne(ctx, ix.name); err != nil && !indexNotFound(err) {
				return fmt.Errorf("drop index %s on %s: %w", ix.name, ix.coll, err)
			}
			// The collection exists from the start, as creating the index
			// made it do (the embedded server indexes its _id then).
			if err := db.CreateCollection(ctx, ix.coll); err != nil && !collectionExists(err) {
				return fmt.Errorf("create collection %s: %w", ix.coll, err)
			}
			continue
		}
		o := options.Index().SetName(ix.name)
		if ix.unique {
			o.SetUnique(true)
		}
		_, err := db.Collection(ix.coll).Indexes().CreateOne(ctx, mongo.IndexModel{Keys: ix.keys, Options: o})
		if err != nil {
			return fmt.Errorf("create index %s on %s: %w", ix.name, ix.coll, err)
		}
	}
	return nil
}

// indexNotFound reports the server's answer to dropping an index that does
// not exist (MongoDB: IndexNotFound, code 27; FerretDB answers the same, or
// NamespaceNotFound, 26, when the collection does not exist either).
func indexNotFound(err error) bool {
	var ce mongo.CommandError
	return errors.As(err, &ce) && (ce.Code == 27 || ce.Code == 26)
}

// isFerretDBv1 reports whether db is served by FerretDB before 2.0, which
// answers buildInfo with its own version beside the MongoDB one it
// emulates ("unknown" when built into a program, as rtm's embedded store
// is). FerretDB 2 runs on DocumentDB, which does use secondary indexes.
func isFerretDBv1(ctx context.Context, db *mongo.Database) (bool, error) {
	var info struct {
		FerretDBVersion *string `bson:"ferretdbVersion"`
	}
	if err := db.RunCommand(ctx, bson.D{{Key: "buildInfo", Value: 1}}).Decode(&info); err != nil {
		return false, fmt.Errorf("buildInfo: %w", err)
	}
	if info.FerretDBVersion == nil {
		return false, nil
	}
	v := strings.TrimPrefix(*info.FerretDBVersion, "v")
	return !strings.HasPrefix(v, "2.") && !strings.HasPrefix(v, "3."), nil
}

// collectionExists reports the server's answer to creating a collection
// that exists (NamespaceExists, code 48).
func collectionExists(err error) bool {
	var ce mongo.CommandError
	return errors.As(err, &ce) && ce.Code == 48
}
