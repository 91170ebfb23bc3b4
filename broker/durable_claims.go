package broker

import (
	"context"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/rtm-dev/rtm/internal/store"
)

// Claims of stored sessions (store.CollSessionClaims) are only there to let
// one node win an adoption (see durableHook.claim). Their purpose is over
// once the winner wrote itself the session's owner: the owner and epoch in
// the claim's _id then no longer match the document, so no node claims
// that _id again (and one that inserts it late, after the delete, reads
// the document again before taking it, sees the new owner, and drops its
// claim). So a taken session's claim is deleted right after the take, and
// what a crash or a failed delete leaves is purged once no adoption can
// still be using it. The collection holds the claims of adoptions under
// way, not one per adoption ever made: the leftover check (a query that
// reads the whole collection on FerretDB v1) stays cheap.

const (
	// claimMaxAge: a claim older than this belongs to no adoption under
	// way (a round's store calls are bounded by adoptTimeout, a CONNECT's
	// claim by connectClaimWait), with ample margin for clock skew.
	claimMaxAge = 10 * adoptTimeout
	// claimPurgeEvery is how often each broker purges old claims.
	claimPurgeEvery = 10 * time.Minute
)

// dropTakenClaims deletes the claims of docs, sessions this node has
// taken, by _id alone: the claim is this node's (it won it), and a lookup
// by _id is the only one FerretDB v1 does not answer with a scan. In
// commands of store.MaxStatementsPerCommand. A claim not deleted is purged
// later (purgeClaims).
func (d *durableHook) dropTakenClaims(docs []sessionDoc) {
	if len(docs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	models := make([]mongo.WriteModel, len(docs))
	for i := range docs {
		models[i] = mongo.NewDeleteOneModel().SetFilter(bson.D{{Key: "_id", Value: claimID(&docs[i])}})
	}
	if err := store.BulkWrite(ctx, d.st.DB().Collection(store.CollSessionClaims), models, false); err != nil {
		d.log.Warn("claims of adopted sessions not removed: purged later", "sessions", len(docs), "error", err)
	}
}

// purgeClaims deletes the claims older than claimMaxAge (on FerretDB v1 a
// scan, of a collection that holds only the claims of adoptions under way
// and leftovers younger than claimMaxAge).
func (d *durableHook) purgeClaims(ctx context.Context, now time.Time) (int64, error) {
	res, err := d.st.DB().Collection(store.CollSessionClaims).DeleteMany(ctx,
		bson.D{{Key: "at", Value: bson.D{{Key: "$lt", Value: now.Add(-claimMaxAge).UTC()}}}})
	if err != nil {
		return 0, err
	}
	return res.DeletedCount, nil
}

// purgeClaimsEvery purges old claims every claimPurgeEvery, until stop
// closes. Every broker does it: the deletes are idempotent, and a cluster
// purges as long as one broker runs.
func (d *durableHook) purgeClaimsEvery(stop <-chan struct{}) {
	t := time.NewTicker(claimPurgeEvery)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(d.ctx, adoptTimeout)
		n, err := d.purgeClaims(ctx, time.Now())
		cancel()
		switch {
		case err != nil:
			d.log.Warn("old session claims not purged; retrying later", "error", err)
		case n > 0:
			d.log.Info("purged session claims left by adoptions that did not finish", "claims", n)
		}
	}
}
