package store

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	_ "modernc.org/sqlite" // the driver FerretDB's SQLite backend registers too
)

// FerretDB v1.24 on SQLite pushes a filter on _id alone down to SQLite as
// `WHERE _ferretdb_sjson->'$._id' = ?`, but indexes _id as
// `_ferretdb_sjson->"_id"`: SQLite uses an expression index only for an
// identical expression, so every lookup by _id scans the whole table (0.3 s
// at 100,000 history messages). The embedded server therefore adds, to each
// collection's table, an index on the expression FerretDB queries with.
// FerretDB does not know it (listIndexes does not show it); dropping the
// collection drops it with the table. Collections FerretDB creates later
// get theirs within idIndexEvery.
const idIndexEvery = time.Second

// idIndexName names rtm's index on a table; FerretDB's own are
// "<table>_<index name>".
func idIndexName(table string) string { return table + "__rtm_id_path" }

// indexIDs adds the _id path index to every collection of the data
// directory's databases until ctx ends.
func (e *Embedded) indexIDs(ctx context.Context, log *slog.Logger) {
	t := time.NewTicker(idIndexEvery)
	defer t.Stop()
	for {
		files, _ := filepath.Glob(filepath.Join(e.dataDir, "*.sqlite"))
		for _, f := range files {
			if err := indexFile(ctx, f, log); err != nil && ctx.Err() == nil {
				log.Debug("store: _id index", "file", f, "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// indexFile indexes the tables of file that have no _id path index. What
// the file holds is read each time, not remembered: a collection dropped
// and created again under its name gets a table of the same name, without
// the index (remembering tables done left it so until a restart: every
// lookup by _id then read the whole table).
func indexFile(ctx context.Context, file string, log *slog.Logger) error {
	// mode=rw: a database FerretDB just dropped is not created again.
	dsn := (&url.URL{Scheme: "file", Path: filepath.ToSlash(file)}).String() + "?mode=rw&_pragma=busy_timeout(5000)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	indexed := map[string]bool{}
	rows, err := db.QueryContext(ctx, `SELECT name FROM sqlite_master WHERE type = 'index'`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return err
		}
		indexed[n] = true
	}
	rows.Close()
	rows, err = db.QueryContext(ctx, `SELECT table_name FROM "_ferretdb_collections"`)
	if err != nil {
		return err
	}
	var tables []string
	for rows.Next() {
		var t string
		if err := rows.Scan(&t); err != nil {
			rows.Close()
			return err
		}
		if !indexed[idIndexName(t)] {
			tables = append(tables, t)
		}
	}
	rows.Close()
	for _, t := range tables {
		if strings.ContainsRune(t, '"') {
			continue // FerretDB's table names are [a-z0-9_]; never quote-escape
		}
		start := time.Now()
		q := fmt.Sprintf(`CREATE INDEX IF NOT EXISTS %q ON %q (_ferretdb_sjson->'$._id')`, idIndexName(t), t)
		if _, err := db.ExecContext(ctx, q); err != nil {
			return err
		}
		if d := time.Since(start); d > time.Second {
			log.Info("store: indexed _id of an existing collection", "table", t, "took", d.Round(time.Millisecond))
		}
	}
	return nil
}
