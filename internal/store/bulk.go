package store

import (
	"context"
	"errors"

	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// MaxStatementsPerCommand bounds the statements of one write command sent
// by BulkWrite.
//
// FerretDB v1.24.2 keeps the SQLite query of every update statement of a
// command open until the whole command ends (a defer inside its loop over
// the statements, handler/msg_update.go), and its SQLite pool holds 100
// connections: an update command of about 100 statements waits for a
// connection that it holds itself, and with it every other command of the
// server, until the caller's context ends (3,000 devices disconnecting
// within a presence batch stalled the store for minutes). Small commands
// cost one round trip each, which group commit amortises anyway.
const MaxStatementsPerCommand = 32

// BulkWrite is mongo.Collection.BulkWrite in commands of at most
// MaxStatementsPerCommand statements (see there). Ordered stops at the
// first error, as one ordered command would; unordered writes every chunk
// and returns the write errors of all of them as one
// mongo.BulkWriteException (another error, if any, first).
func BulkWrite(ctx context.Context, c *mongo.Collection, models []mongo.WriteModel, ordered bool) error {
	var (
		merged mongo.BulkWriteException
		other  error
	)
	for len(models) > 0 {
		n := min(len(models), MaxStatementsPerCommand)
		_, err := c.BulkWrite(ctx, models[:n], options.BulkWrite().SetOrdered(ordered))
		models = models[n:]
		if err == nil {
			continue
		}
		if ordered {
			return err
		}
		var bwe mongo.BulkWriteException
		if errors.As(err, &bwe) && bwe.WriteConcernError == nil {
			merged.WriteErrors = append(merged.WriteErrors, bwe.WriteErrors...)
			continue
		}
		if other == nil {
			other = err
		}
	}
	if other != nil {
		return other
	}
	if len(merged.WriteErrors) > 0 {
		return merged
	}
	return nil
}
