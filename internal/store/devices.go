package store

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// Presence is where a device is, as the brokers record it in CollDevices:
// one document per client ID (its _id, so that reading one is a lookup by
// key on every server, FerretDB's SQLite backend included), written when it
// connects and disconnects.
type Presence struct {
	ClientID string    `bson:"client_id"`
	Online   bool      `bson:"online"`
	Node     string    `bson:"node"`       // broker of the last connection
	Since    time.Time `bson:"since"`      // when the last connection started
	LastSeen time.Time `bson:"last_seen"`  // last connect or disconnect
	Conn     string    `bson:"conn"`       // ID of the last connection
	Seen     bool      `bson:"-"`          // a document exists
	Created  time.Time `bson:"created_at"` // first connect
	// Incarnation is the broker process that recorded the last connection
	// (Node names the broker, which may have restarted since): "" in
	// records written before rtm recorded it.
	Incarnation string `bson:"incarnation,omitempty"`
}

// PresenceUpdate is one connect or disconnect to record.
type PresenceUpdate struct {
	ClientID    string
	Online      bool
	Node        string
	Incarnation string // the broker process, recorded with a connect
	Conn        string // unique per connection, e.g. node/incarnation/sequence
	At          time.Time
}

// WritePresence records connects and disconnects in one round trip. A
// disconnect marks the device offline only if it is the connection last
// recorded: after a takeover by another node, the old connection's
// disconnect may arrive after the new connect. Writing the same updates
// again changes nothing, so a failed batch may be retried whole.
func (s *Store) WritePresence(ctx context.Context, ups []PresenceUpdate) error {
	if len(ups) == 0 {
		return nil
	}
	// On FerretDB v1 the disconnect's filter on _id and conn scans the
	// collection, once per disconnect: a fleet disconnecting at once (a
	// node's death, its devices moving to the survivors) cost a scan of
	// every device per device. There, the batch's disconnected records are
	// read in one query and each disconnect is written by _id alone if the
	// connection it ends is still the one recorded, which is what
	// FerretDB's conditional update does itself (a read, then a write).
	var conns map[string]string
	if s.idOnly {
		var err error
		if conns, err = s.recordedConns(ctx, ups); err != nil {
			return fmt.Errorf("store: record presence: %w", err)
		}
	}
	if s.testAfterConns != nil {
		s.testAfterConns()
	}
	models := make([]mongo.WriteModel, 0, len(ups))
	var offs []PresenceUpdate // disconnects written by _id alone
	for _, u := range ups {
		at := u.At.UTC()
		if conns != nil {
			if u.Online {
				conns[u.ClientID] = u.Conn
			} else if conns[u.ClientID] != u.Conn {
				continue // a later connection is recorded (or none)
			}
		}
		filter := bson.D{{Key: "_id", Value: u.ClientID}, {Key: "conn", Value: u.Conn}}
		if conns != nil {
			filter = filter[:1]
		}
		if u.Online {
			models = append(models, mongo.NewUpdateOneModel().
				SetFilter(bson.D{{Key: "_id", Value: u.ClientID}}).
				SetUpdate(bson.D{
					{Key: "$set", Value: bson.D{{Key: "client_id", Value: u.ClientID}, {Key: "online", Value: true}, {Key: "node", Value: u.Node},
						{Key: "incarnation", Value: u.Incarnation}, {Key: "since", Value: at}, {Key: "last_seen", Value: at}, {Key: "conn", Value: u.Conn}}},
					{Key: "$setOnInsert", Value: bson.D{{Key: "created_at", Value: at}}},
				}).SetUpsert(true))
			continue
		}
		if conns != nil {
			offs = append(offs, u)
		}
		// off_conn: the connection whose disconnect wrote offline.
		models = append(models, mongo.NewUpdateOneModel().
			SetFilter(filter).
			SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "online", Value: false}, {Key: "last_seen", Value: at}, {Key: "off_conn", Value: u.Conn}}}}))
	}
	if len(models) == 0 {
		return nil
	}
	// Ordered: a connect and a disconnect of one client in one batch must
	// apply in that order.
	if err := BulkWrite(ctx, s.db.Collection(CollDevices), models, true); err != nil {
		return fmt.Errorf("store: record presence: %w", err)
	}
	if err := s.reassertConnects(ctx, offs); err != nil {
		return fmt.Errorf("store: record presence: %w", err)
	}
	return nil
}

// reassertConnects marks online again the devices whose disconnect offs
// wrote (by _id alone, after reading their connection) over a connect of a
// newer connection recorded between that read and the write: a client
// moving from node A to node B whose connect from B landed there would be
// recorded offline while connected (and a survivor would adopt a session
// live elsewhere). Their records are read again in one query; a record
// whose offline was written by one of offs (off_conn) while it names
// another connection was overwritten. The repair is itself a read and a
// write on FerretDB: it leaves a window only if the newer connection also
// ends in the few milliseconds between them.
func (s *Store) reassertConnects(ctx context.Context, offs []PresenceUpdate) error {
	if len(offs) == 0 {
		return nil
	}
	ids := make([]string, len(offs))
	for i, u := range offs {
		ids[i] = u.ClientID
	}
	filter := bson.D{{Key: "_id", Value: ids[0]}}
	if len(ids) > 1 {
		filter = bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}}}
	}
	cur, err := s.db.Collection(CollDevices).Find(ctx, filter,
		options.Find().SetProjection(bson.D{{Key: "conn", Value: 1}, {Key: "online", Value: 1}, {Key: "off_conn", Value: 1}}))
	if err != nil {
		return err
	}
	var recs []struct {
		ID      string `bson:"_id"`
		Conn    string `bson:"conn"`
		Online  bool   `bson:"online"`
		OffConn string `bson:"off_conn"`
	}
	if err := cur.All(ctx, &recs); err != nil {
		return err
	}
	var models []mongo.WriteModel
	for _, r := range recs {
		if r.Online || r.OffConn == "" || r.OffConn == r.Conn {
			continue
		}
		models = append(models, mongo.NewUpdateOneModel().
			SetFilter(bson.D{{Key: "_id", Value: r.ID}, {Key: "conn", Value: r.Conn}, {Key: "off_conn", Value: r.OffConn}}).
			SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "online", Value: true}, {Key: "off_conn", Value: ""}}}}))
	}
	if len(models) == 0 {
		return nil
	}
	return BulkWrite(ctx, s.db.Collection(CollDevices), models, false)
}

// recordedConns returns the connection recorded for each client that ups
// disconnects, read in one query ("" for a client with no record).
func (s *Store) recordedConns(ctx context.Context, ups []PresenceUpdate) (map[string]string, error) {
	var ids []string
	for _, u := range ups {
		if !u.Online {
			ids = append(ids, u.ClientID)
		}
	}
	conns := make(map[string]string, len(ids))
	if len(ids) == 0 {
		return conns, nil
	}
	filter := bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}}}
	if len(ids) == 1 {
		filter = bson.D{{Key: "_id", Value: ids[0]}}
	}
	cur, err := s.db.Collection(CollDevices).Find(ctx, filter, options.Find().SetProjection(bson.D{{Key: "conn", Value: 1}}))
	if err != nil {
		return nil, err
	}
	var recs []struct {
		ID   string `bson:"_id"`
		Conn string `bson:"conn"`
	}
	if err := cur.All(ctx, &recs); err != nil {
		return nil, err
	}
	for _, r := range recs {
		conns[r.ID] = r.Conn
	}
	return conns, nil
}

// Presences returns the presence of each of ids that a broker recorded, in
// one query (on FerretDB v1, one pass over the collection instead of one
// lookup per device).
func (s *Store) Presences(ctx context.Context, ids []string) (map[string]Presence, error) {
	out := make(map[string]Presence, len(ids))
	if len(ids) == 0 {
		return out, nil
	}
	cur, err := s.db.Collection(CollDevices).Find(ctx, bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}}})
	if err != nil {
		return nil, fmt.Errorf("store: presence of %d devices: %w", len(ids), err)
	}
	var ps []Presence
	if err := cur.All(ctx, &ps); err != nil {
		return nil, fmt.Errorf("store: presence of %d devices: %w", len(ids), err)
	}
	for _, p := range ps {
		p.Seen = true
		out[p.ClientID] = p
	}
	return out, nil
}

// SweepPresence marks offline every device recorded online at node by a
// process other than incarnation: a broker that starts again under the
// same name calls it, because the connections of its previous process
// ended with that process, which may not have recorded it (kill -9, a
// crash, a store outage). last_seen is left as it was: when they ended is
// not known. It returns how many records it changed.
func (s *Store) SweepPresence(ctx context.Context, node, incarnation string) (int64, error) {
	res, err := s.db.Collection(CollDevices).UpdateMany(ctx,
		bson.D{{Key: "node", Value: node}, {Key: "online", Value: true}, {Key: "incarnation", Value: bson.D{{Key: "$ne", Value: incarnation}}}},
		bson.D{{Key: "$set", Value: bson.D{{Key: "online", Value: false}, {Key: "off_conn", Value: ""}}}})
	if err != nil {
		return 0, fmt.Errorf("store: sweep presence of %s: %w", node, err)
	}
	return res.ModifiedCount, nil
}

// OnlineAt returns the records of devices online at node (client ID,
// connection, incarnation), for a broker that reconciles the store with the
// clients it holds.
func (s *Store) OnlineAt(ctx context.Context, node string) ([]Presence, error) {
	cur, err := s.db.Collection(CollDevices).Find(ctx, bson.D{{Key: "node", Value: node}, {Key: "online", Value: true}},
		options.Find().SetProjection(bson.D{{Key: "client_id", Value: 1}, {Key: "conn", Value: 1}, {Key: "incarnation", Value: 1}, {Key: "node", Value: 1}, {Key: "online", Value: 1}}))
	if err != nil {
		return nil, fmt.Errorf("store: devices online at %s: %w", node, err)
	}
	var out []Presence
	if err := cur.All(ctx, &out); err != nil {
		return nil, fmt.Errorf("store: devices online at %s: %w", node, err)
	}
	return out, nil
}

// Presence returns the device's presence; Seen is false if no broker ever
// recorded it.
func (s *Store) Presence(ctx context.Context, clientID string) (Presence, error) {
	var p Presence
	err := s.db.Collection(CollDevices).FindOne(ctx, bson.D{{Key: "_id", Value: clientID}}).Decode(&p)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		return Presence{ClientID: clientID}, nil
	case err != nil:
		return p, fmt.Errorf("store: presence of %q: %w", clientID, err)
	}
	p.Seen = true
	return p, nil
}

// migratePresenceIDs rewrites device records written before schema
// version 2, whose _id was generated, under their client ID. Idempotent;
// a record already rewritten wins over the old one.
func migratePresenceIDs(ctx context.Context, db *mongo.Database) error {
	c := db.Collection(CollDevices)
	cur, err := c.Find(ctx, bson.D{{Key: "_id", Value: bson.D{{Key: "$type", Value: "objectId"}}}})
	if err != nil {
		return err
	}
	var old []bson.D
	if err := cur.All(ctx, &old); err != nil {
		return err
	}
	for _, doc := range old {
		var id any
		clientID := ""
		for _, e := range doc {
			switch e.Key {
			case "_id":
				id = e.Value
			case "client_id":
				clientID, _ = e.Value.(string)
			}
		}
		// The new copy first: a failure leaves the old record, rewritten
		// at the next Open, instead of neither.
		if clientID != "" {
			doc := append(bson.D{{Key: "_id", Value: clientID}}, slices.DeleteFunc(doc, func(e bson.E) bool { return e.Key == "_id" })...)
			if _, err := c.InsertOne(ctx, doc); err != nil && !mongo.IsDuplicateKeyError(err) {
				return err
			}
		}
		if _, err := c.DeleteOne(ctx, bson.D{{Key: "_id", Value: id}}); err != nil {
			return err
		}
	}
	return nil
}

// How a push subscription was made.
const (
	ViaMQTT = "mqtt" // the device subscribed to push/{channel} itself
	ViaAPI  = "api"  // the push API subscribed it (server side)
)

// PushSubscription says a device receives a push channel.
type PushSubscription struct {
	Channel string    `bson:"channel" json:"channel"`
	Device  string    `bson:"device" json:"device"`
	Via     string    `bson:"via" json:"via"`
	Since   time.Time `bson:"since" json:"since"`
}

// AddPushSubscription records that device receives channel; created is
// false if it did already (the first record's via and since are kept).
func (s *Store) AddPushSubscription(ctx context.Context, device, channel, via string) (created bool, err error) {
	res, err := s.db.Collection(CollPushSubscriptions).UpdateOne(ctx,
		bson.D{{Key: "channel", Value: channel}, {Key: "device", Value: device}},
		bson.D{{Key: "$setOnInsert", Value: bson.D{{Key: "via", Value: via}, {Key: "since", Value: time.Now().UTC()}}}},
		options.UpdateOne().SetUpsert(true))
	if err != nil {
		if mongo.IsDuplicateKeyError(err) { // two upserts raced: the other one created it
			return false, nil
		}
		return false, fmt.Errorf("store: add push subscription %s/%s: %w", device, channel, err)
	}
	return res.UpsertedCount == 1, nil
}

// RemovePushSubscription deletes the record; removed is false if there was
// none.
func (s *Store) RemovePushSubscription(ctx context.Context, device, channel string) (removed bool, err error) {
	res, err := s.db.Collection(CollPushSubscriptions).DeleteOne(ctx,
		bson.D{{Key: "channel", Value: channel}, {Key: "device", Value: device}})
	if err != nil {
		return false, fmt.Errorf("store: remove push subscription %s/%s: %w", device, channel, err)
	}
	return res.DeletedCount == 1, nil
}

// ChannelSubscribers returns up to limit subscribers of channel whose device
// ID sorts after after ("" for the first page), in device order; next is
// the cursor of the following page, "" at the end.
func (s *Store) ChannelSubscribers(ctx context.Context, channel, after string, limit int) (subs []PushSubscription, next string, err error) {
	filter := bson.D{{Key: "channel", Value: channel}}
	if after != "" {
		filter = append(filter, bson.E{Key: "device", Value: bson.D{{Key: "$gt", Value: after}}})
	}
	cur, err := s.db.Collection(CollPushSubscriptions).Find(ctx, filter,
		options.Find().SetSort(bson.D{{Key: "device", Value: 1}}).SetLimit(int64(limit)+1))
	if err != nil {
		return nil, "", fmt.Errorf("store: subscribers of %s: %w", channel, err)
	}
	if err := cur.All(ctx, &subs); err != nil {
		return nil, "", fmt.Errorf("store: subscribers of %s: %w", channel, err)
	}
	if len(subs) > limit {
		subs = subs[:limit]
		next = subs[limit-1].Device
	}
	return subs, next, nil
}

// DevicesChannels returns the push subscriptions of each of devices, in
// one round trip (a broker re-applying them to devices that connected).
func (s *Store) DevicesChannels(ctx context.Context, devices []string) (map[string][]PushSubscription, error) {
	out := make(map[string][]PushSubscription, len(devices))
	if len(devices) == 0 {
		return out, nil
	}
	cur, err := s.db.Collection(CollPushSubscriptions).Find(ctx, bson.D{{Key: "device", Value: bson.D{{Key: "$in", Value: devices}}}})
	if err != nil {
		return nil, fmt.Errorf("store: channels of %d devices: %w", len(devices), err)
	}
	var subs []PushSubscription
	if err := cur.All(ctx, &subs); err != nil {
		return nil, fmt.Errorf("store: channels of %d devices: %w", len(devices), err)
	}
	for _, sub := range subs {
		out[sub.Device] = append(out[sub.Device], sub)
	}
	return out, nil
}

// AddPushSubscriptions records each subscription in one round trip, as
// AddPushSubscription does (an existing record keeps its via and since).
func (s *Store) AddPushSubscriptions(ctx context.Context, subs []PushSubscription) error {
	if len(subs) == 0 {
		return nil
	}
	models := make([]mongo.WriteModel, 0, len(subs))
	now := time.Now().UTC()
	for _, sub := range subs {
		models = append(models, mongo.NewUpdateOneModel().
			SetFilter(bson.D{{Key: "channel", Value: sub.Channel}, {Key: "device", Value: sub.Device}}).
			SetUpdate(bson.D{{Key: "$setOnInsert", Value: bson.D{{Key: "via", Value: sub.Via}, {Key: "since", Value: now}}}}).
			SetUpsert(true))
	}
	err := BulkWrite(ctx, s.db.Collection(CollPushSubscriptions), models, false)
	if err != nil && !mongo.IsDuplicateKeyError(err) { // a duplicate: two upserts raced, the other one created it
		return fmt.Errorf("store: add %d push subscriptions: %w", len(subs), err)
	}
	return nil
}

// DeviceChannels returns every push subscription of a device, by channel.
func (s *Store) DeviceChannels(ctx context.Context, device string) ([]PushSubscription, error) {
	cur, err := s.db.Collection(CollPushSubscriptions).Find(ctx, bson.D{{Key: "device", Value: device}},
		options.Find().SetSort(bson.D{{Key: "channel", Value: 1}}))
	if err != nil {
		return nil, fmt.Errorf("store: channels of %q: %w", device, err)
	}
	var subs []PushSubscription
	if err := cur.All(ctx, &subs); err != nil {
		return nil, fmt.Errorf("store: channels of %q: %w", device, err)
	}
	return subs, nil
}
