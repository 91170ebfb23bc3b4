package watchdog

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/oklog/ulid/v2"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/rtm-dev/rtm/internal/store"
)

// Alert states.
const (
	StatePending  = "pending"
	StateFiring   = "firing"
	StateResolved = "resolved"
)

// Alert is one incident of a rule on a node (node "" for the cluster).
type Alert struct {
	ID          string     `json:"id" bson:"id"`
	Rule        string     `json:"rule" bson:"rule"`
	Node        string     `json:"node" bson:"node"`
	Severity    string     `json:"severity" bson:"severity"`
	State       string     `json:"state" bson:"state"`
	Value       float64    `json:"value" bson:"value"`
	Threshold   float64    `json:"threshold" bson:"threshold"`
	Action      string     `json:"action" bson:"action"`
	ActionTaken string     `json:"action_taken" bson:"action_taken"`
	Message     string     `json:"message" bson:"message"`
	StartedAt   time.Time  `json:"started_at" bson:"started_at"`
	FiredAt     *time.Time `json:"fired_at,omitempty" bson:"fired_at,omitempty"`
	ResolvedAt  *time.Time `json:"resolved_at,omitempty" bson:"resolved_at,omitempty"`

	// drained: this watchdog drained the node for this alert.
	drained bool
	// owned: this watchdog fired it (and so acts and notifies for it); an
	// alert adopted from the store, fired by another watchdog or before a
	// restart, was notified already.
	owned bool
}

func (a *Alert) key() string { return a.Rule + "/" + a.Node }

// alertStore persists alerts in the alerts collection, so a restarted
// watchdog, or a second one, does not notify again what already fired.
//
// The alert in progress for a rule and node has _id "<rule>/<node>": the
// store, not the watchdog, decides which watchdog moved it from pending to
// firing (or firing to resolved), through a conditional update only one
// can win; only that one notifies. A resolved alert is moved to _id = its
// ULID, so the next incident of the same rule and node starts afresh.
type alertStore struct {
	st *store.Store // nil: memory only
}

var errNoStore = errors.New("no store")

func (s alertStore) coll() *mongo.Collection { return s.st.DB().Collection(store.CollAlerts) }

func storeCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 5*time.Second)
}

// open records a new pending alert, or returns the one in progress for the
// same rule and node (adopt it).
func (s alertStore) open(a *Alert) (*Alert, error) {
	if s.st == nil {
		return nil, errNoStore
	}
	ctx, cancel := storeCtx()
	defer cancel()
	for range 2 {
		doc := bson.M{"_id": a.key()}
		raw, _ := bson.Marshal(a)
		var m bson.M
		_ = bson.Unmarshal(raw, &m)
		for k, v := range m {
			doc[k] = v
		}
		_, err := s.coll().InsertOne(ctx, doc)
		if err == nil {
			return nil, nil
		}
		if !mongo.IsDuplicateKeyError(err) {
			return nil, err
		}
		var cur Alert
		if err := s.coll().FindOne(ctx, bson.M{"_id": a.key()}).Decode(&cur); err != nil {
			if errors.Is(err, mongo.ErrNoDocuments) {
				continue
			}
			return nil, err
		}
		if cur.State != StateResolved {
			return &cur, nil
		}
		// A resolved leftover of a watchdog that stopped between resolving
		// and archiving: archive it now and try again.
		s.archive(ctx, &cur)
	}
	return nil, fmt.Errorf("alert %s: could not be opened", a.key())
}

// transition moves the alert from state from to a's state; won reports
// whether this call made the change (others saw it already done).
//
// The claim is an insert of "<ULID>/<state>": FerretDB v1 has no
// transactions and runs a conditional update as a read then a write, so two
// watchdogs could both match "state: pending"; a duplicate _id, though, is
// refused atomically. The claim documents stay (a few bytes per change) so
// that a late watchdog still finds the change made.
func (s alertStore) transition(a *Alert, from string) (won bool, err error) {
	if s.st == nil {
		return true, errNoStore
	}
	ctx, cancel := storeCtx()
	defer cancel()
	_, err = s.coll().InsertOne(ctx, bson.M{"_id": a.ID + "/" + a.State, "claim": true, "at": time.Now().UTC()})
	if mongo.IsDuplicateKeyError(err) {
		return false, nil
	}
	if err != nil {
		return true, err // not recorded: tell rather than stay silent
	}
	set := bson.M{"state": a.State, "value": a.Value, "message": a.Message, "action_taken": a.ActionTaken}
	if a.FiredAt != nil {
		set["fired_at"] = *a.FiredAt
	}
	if a.ResolvedAt != nil {
		set["resolved_at"] = *a.ResolvedAt
	}
	if _, err := s.coll().UpdateOne(ctx, bson.M{"_id": a.key(), "id": a.ID, "state": from}, bson.M{"$set": set}); err != nil {
		return true, err
	}
	if a.State == StateResolved {
		s.archive(ctx, a)
	}
	return true, nil
}

// update records the alert's action without changing its state.
func (s alertStore) update(a *Alert) {
	if s.st == nil {
		return
	}
	ctx, cancel := storeCtx()
	defer cancel()
	_, _ = s.coll().UpdateOne(ctx, bson.M{"_id": a.key(), "id": a.ID}, bson.M{"$set": bson.M{"action_taken": a.ActionTaken}})
}

// drop forgets a pending alert whose condition ended before it fired.
func (s alertStore) drop(a *Alert) {
	if s.st == nil {
		return
	}
	ctx, cancel := storeCtx()
	defer cancel()
	_, _ = s.coll().DeleteOne(ctx, bson.M{"_id": a.key(), "id": a.ID, "state": StatePending})
}

// archive moves a resolved alert to its own _id.
func (s alertStore) archive(ctx context.Context, a *Alert) {
	raw, _ := bson.Marshal(a)
	var m bson.M
	_ = bson.Unmarshal(raw, &m)
	m["_id"] = a.ID
	if _, err := s.coll().InsertOne(ctx, m); err != nil && !mongo.IsDuplicateKeyError(err) {
		return
	}
	_, _ = s.coll().DeleteOne(ctx, bson.M{"_id": a.key(), "id": a.ID})
}

// load returns the alerts in progress and the most recent resolved ones.
func (s alertStore) load(limit int) ([]*Alert, error) {
	if s.st == nil {
		return nil, nil
	}
	ctx, cancel := storeCtx()
	defer cancel()
	cur, err := s.coll().Find(ctx, bson.M{"claim": bson.M{"$exists": false}}, options.Find().SetSort(bson.D{{Key: "id", Value: -1}}).SetLimit(int64(limit)))
	if err != nil {
		return nil, err
	}
	var all []*Alert
	if err := cur.All(ctx, &all); err != nil {
		return nil, err
	}
	sort.Slice(all, func(i, j int) bool { return all[i].ID > all[j].ID })
	if len(all) > limit {
		all = all[:limit]
	}
	return all, nil
}

// newAlert starts an alert for c.
func newAlert(c condition, now time.Time) *Alert {
	return &Alert{ID: ulid.Make().String(), Rule: c.rule.name, Node: c.node, Severity: c.rule.severity, State: StatePending,
		Value: c.value, Threshold: c.rule.threshold, Action: c.rule.action, Message: c.message, StartedAt: now.UTC(), owned: true}
}
