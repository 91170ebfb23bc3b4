package store_test

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	_ "modernc.org/sqlite"

	"github.com/rtm-dev/rtm/internal/store"
)

// The embedded server indexes each collection on the _id expression
// FerretDB queries with, so a lookup by _id searches an index instead of
// scanning the table (FerretDB's own _id index has another expression).
func TestEmbeddedLooksUpIDsThroughAnIndex(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := store.Open(ctx, store.Options{DataDir: dir, Database: "rtm"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(ctx)
	if _, err := s.DB().Collection("later").InsertOne(ctx, bson.D{{Key: "_id", Value: "a"}}); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "rtm.sqlite")+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	plan := func(coll string) (string, error) {
		var table string
		if err := db.QueryRowContext(ctx, `SELECT table_name FROM "_ferretdb_collections" WHERE name = ?`, coll).Scan(&table); err != nil {
			return "", err
		}
		// The query FerretDB runs for a filter on _id alone.
		rows, err := db.QueryContext(ctx, fmt.Sprintf(`EXPLAIN QUERY PLAN SELECT _ferretdb_sjson FROM %q WHERE _ferretdb_sjson->'$._id' = ?`, table), `"a"`)
		if err != nil {
			return "", err
		}
		defer rows.Close()
		var out []string
		for rows.Next() {
			var id, parent, unused int
			var detail string
			if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
				return "", err
			}
			out = append(out, detail)
		}
		return strings.Join(out, "; "), rows.Err()
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, coll := range []string{store.CollHistory, "later"} {
		for {
			p, err := plan(coll)
			if err == nil && strings.Contains(p, "USING INDEX") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: lookup by _id: plan %q (%v), want an index search", coll, p, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	var doc bson.M
	if err := s.DB().Collection("later").FindOne(ctx, bson.D{{Key: "_id", Value: "a"}}).Decode(&doc); err != nil || doc["_id"] != "a" {
		t.Fatalf("find by _id: %v %v", doc, err)
	}

	// A collection dropped and created again under its name (a table of
	// the same name, without the index) is indexed again: the server once
	// remembered the table as done, and a bench that dropped its database
	// and ran again read whole tables for every lookup.
	if err := s.DB().Collection("later").Drop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DB().Collection("later").InsertOne(ctx, bson.D{{Key: "_id", Value: "a"}}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		p, err := plan("later")
		if err == nil && strings.Contains(p, "USING INDEX") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("later, created again: lookup by _id: plan %q (%v), want an index search", p, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
