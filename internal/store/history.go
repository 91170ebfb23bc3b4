package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// HistoryMessage is one stored message of CollHistory. _id is the message
// id, a ULID: time-ordered, so sorting by _id is newest first, and an
// insert of the same message again is a duplicate key (idempotent writes).
type HistoryMessage struct {
	ID          string         `bson:"_id"`
	Topic       string         `bson:"topic"`
	Payload     []byte         `bson:"payload"`
	QoS         int            `bson:"qos"`
	Retain      bool           `bson:"retain,omitempty"`
	Publisher   string         `bson:"publisher"`
	Node        string         `bson:"node"`
	Time        time.Time      `bson:"ts"`
	ContentType string         `bson:"content_type,omitempty"`
	User        []UserProperty `bson:"user,omitempty"`
}

// UserProperty is an MQTT 5 user property, kept in order (keys may repeat).
type UserProperty struct {
	Key   string `bson:"k" json:"key"`
	Value string `bson:"v" json:"value"`
}

// HistoryGap records messages that were not stored: a spool full while the
// store was down, or a batch the store refused. Filter is the history
// filter the topics matched (docs/history.md).
type HistoryGap struct {
	ID     string    `bson:"_id"`
	Filter string    `bson:"filter"`
	From   time.Time `bson:"from"`
	To     time.Time `bson:"to"`
	Count  int64     `bson:"count"`
	Node   string    `bson:"node"`
	Reason string    `bson:"reason"`
}

// historyTTLIndex is the TTL index on CollHistory's ts, where the server
// has TTL indexes. Not in the indexes list: its option comes from the
// configuration and FerretDB v1 has no TTL.
const historyTTLIndex = "ts_ttl"

// InsertHistory writes messages in one unordered insert, one document
// each. Messages already stored (duplicate _id: a batch written again
// after an error, a spool replayed after a crash) are skipped, so a batch
// may be retried whole.
//
// On FerretDB it writes them in buckets instead, a few documents a batch,
// with the history index (historybucket.go, historyindex.go); a message
// written twice is stored twice there, and read once. Each node's batches must come from one caller at a
// time (its history writer): the index keeps one chain per node and topic.
func (s *Store) InsertHistory(ctx context.Context, msgs []HistoryMessage) error {
	if len(msgs) == 0 {
		return nil
	}
	idx, err := s.useHistoryIndex(ctx)
	if err != nil {
		return err
	}
	if idx {
		// Buckets, with the index (historybucket.go).
		return s.indexHistory(ctx, msgs)
	}
	// Encoded once, without reflection; the driver copies bson.Raw as is.
	docs := make([]any, len(msgs))
	var buf []byte
	for i := range msgs {
		start := len(buf)
		buf = AppendHistoryBSON(buf, &msgs[i])
		docs[i] = bson.Raw(buf[start:len(buf):len(buf)])
	}
	_, err = s.db.Collection(CollHistory).InsertMany(ctx, docs, options.InsertMany().SetOrdered(false))
	if err != nil && !onlyDuplicates(err) {
		return fmt.Errorf("store: insert history: %w", err)
	}
	return nil
}

// onlyDuplicates reports an insert whose every failure is a duplicate key.
func onlyDuplicates(err error) bool {
	var bwe mongo.BulkWriteException
	if !errors.As(err, &bwe) || bwe.WriteConcernError != nil || len(bwe.WriteErrors) == 0 {
		return false
	}
	for _, we := range bwe.WriteErrors {
		if we.Code != 11000 && we.Code != 11001 && we.Code != 12582 {
			return false
		}
	}
	return true
}

// HistoryQuery selects a page of a topic's history, newest first. Before
// and After are exclusive id bounds ("" for none).
type HistoryQuery struct {
	Topic  string
	Before string
	After  string
	Limit  int
}

// HistoryFilter is the filter of a HistoryQuery, for explain in tests.
func HistoryFilter(q HistoryQuery) bson.D {
	f := bson.D{{Key: "topic", Value: q.Topic}}
	var id bson.D
	if q.Before != "" {
		id = append(id, bson.E{Key: "$lt", Value: q.Before})
	}
	if q.After != "" {
		id = append(id, bson.E{Key: "$gt", Value: q.After})
	}
	if len(id) > 0 {
		f = append(f, bson.E{Key: "_id", Value: id})
	}
	return f
}

// History returns a page of a topic's messages, newest first: the index
// topic_id_desc answers it without reading the rest of the topic; on
// FerretDB, which would read the whole collection, the history index.
func (s *Store) History(ctx context.Context, q HistoryQuery) ([]HistoryMessage, error) {
	if idx, err := s.useHistoryIndex(ctx); err != nil {
		return nil, fmt.Errorf("store: history: %w", err)
	} else if idx {
		return s.indexedHistory(ctx, q)
	}
	o := options.Find().SetSort(bson.D{{Key: "_id", Value: -1}}).SetLimit(int64(q.Limit))
	cur, err := s.db.Collection(CollHistory).Find(ctx, HistoryFilter(q), o)
	if err != nil {
		return nil, fmt.Errorf("store: history: %w", err)
	}
	var out []HistoryMessage
	if err := cur.All(ctx, &out); err != nil {
		return nil, fmt.Errorf("store: history: %w", err)
	}
	return out, nil
}

// HistoryByID returns one stored message; ErrNotFound if there is none.
func (s *Store) HistoryByID(ctx context.Context, id string) (HistoryMessage, error) {
	m, err := s.historyDoc(ctx, id)
	if !errors.Is(err, ErrNotFound) {
		return m, err
	}
	if idx, err := s.useHistoryIndex(ctx); err != nil {
		return m, fmt.Errorf("store: history message: %w", err)
	} else if !idx {
		return m, ErrNotFound
	}
	return s.bucketedByID(ctx, id)
}

// historyDoc reads a message of the per-message layout (CollHistory).
func (s *Store) historyDoc(ctx context.Context, id string) (HistoryMessage, error) {
	var m HistoryMessage
	err := s.db.Collection(CollHistory).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&m)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return m, ErrNotFound
	}
	if err != nil {
		return m, fmt.Errorf("store: history message: %w", err)
	}
	return m, nil
}

// ErrNotFound reports a lookup by id that found nothing.
var ErrNotFound = errors.New("store: not found")

// InsertHistoryGaps records gaps; one already recorded (same _id) is
// skipped.
func (s *Store) InsertHistoryGaps(ctx context.Context, gaps []HistoryGap) error {
	if len(gaps) == 0 {
		return nil
	}
	docs := make([]any, len(gaps))
	for i := range gaps {
		docs[i] = &gaps[i]
	}
	_, err := s.db.Collection(CollHistoryGaps).InsertMany(ctx, docs, options.InsertMany().SetOrdered(false))
	if err == nil || onlyDuplicates(err) {
		return nil
	}
	return fmt.Errorf("store: insert history gaps: %w", err)
}

// HistoryGaps returns the gaps whose time range meets [from, to] (zero
// times: unbounded), oldest first. Gaps are rare, so the collection is
// small: the caller matches their filters against a topic.
func (s *Store) HistoryGaps(ctx context.Context, from, to time.Time) ([]HistoryGap, error) {
	f := bson.D{}
	if !from.IsZero() {
		f = append(f, bson.E{Key: "to", Value: bson.D{{Key: "$gte", Value: from}}})
	}
	if !to.IsZero() {
		f = append(f, bson.E{Key: "from", Value: bson.D{{Key: "$lte", Value: to}}})
	}
	cur, err := s.db.Collection(CollHistoryGaps).Find(ctx, f, options.Find().SetSort(bson.D{{Key: "from", Value: 1}}).SetLimit(1000))
	if err != nil {
		return nil, fmt.Errorf("store: history gaps: %w", err)
	}
	var out []HistoryGap
	if err := cur.All(ctx, &out); err != nil {
		return nil, fmt.Errorf("store: history gaps: %w", err)
	}
	return out, nil
}

// PurgeHistory deletes messages stored before cutoff, and gaps that ended
// before it, and returns how many messages it deleted.
func (s *Store) PurgeHistory(ctx context.Context, cutoff time.Time) (int64, error) {
	r, err := s.db.Collection(CollHistory).DeleteMany(ctx, bson.D{{Key: "ts", Value: bson.D{{Key: "$lt", Value: cutoff}}}})
	if err != nil {
		return 0, fmt.Errorf("store: purge history: %w", err)
	}
	if _, err := s.db.Collection(CollHistoryGaps).DeleteMany(ctx, bson.D{{Key: "to", Value: bson.D{{Key: "$lt", Value: cutoff}}}}); err != nil {
		return r.DeletedCount, fmt.Errorf("store: purge history gaps: %w", err)
	}
	if idx, err := s.useHistoryIndex(ctx); err != nil {
		return r.DeletedCount, err
	} else if idx {
		n, err := s.purgeHistoryIndex(ctx, cutoff)
		return r.DeletedCount + n, err
	}
	return r.DeletedCount, nil
}

// EnsureHistoryTTL asks the server to expire messages retention after
// their ts with a TTL index, changing its expiry if it exists with another
// one. It reports whether the server has TTL indexes: FerretDB v1 answers
// an error, or accepts the index and never expires anything; both count as
// no (the caller purges periodically in any case).
func (s *Store) EnsureHistoryTTL(ctx context.Context, retention time.Duration) (bool, error) {
	if idx, err := s.useHistoryIndex(ctx); err != nil {
		return false, err
	} else if idx {
		return false, nil
	}
	secs := int32(retention / time.Second)
	coll := s.db.Collection(CollHistory)
	_, err := coll.Indexes().CreateOne(ctx, mongo.IndexModel{
		Keys:    bson.D{{Key: "ts", Value: 1}},
		Options: options.Index().SetName(historyTTLIndex).SetExpireAfterSeconds(secs),
	})
	var ce mongo.CommandError
	if errors.As(err, &ce) && (ce.Code == 85 || ce.Code == 86) { // IndexOptionsConflict, IndexKeySpecsConflict
		err = s.db.RunCommand(ctx, bson.D{{Key: "collMod", Value: CollHistory}, {Key: "index", Value: bson.D{
			{Key: "name", Value: historyTTLIndex}, {Key: "expireAfterSeconds", Value: secs}}}}).Err()
	}
	if err != nil {
		return false, fmt.Errorf("store: history TTL index: %w", err)
	}
	return true, nil
}
