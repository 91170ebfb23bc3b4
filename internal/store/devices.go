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

// Presence is where a device is, as the brokers record it in CollDevices:
// one document per client ID, written when it connects and disconnects.
type Presence struct {
	ClientID string    `bson:"client_id"`
	Online   bool      `bson:"online"`
	Node     string    `bson:"node"`       // broker of the last connection
	Since    time.Time `bson:"since"`      // when the last connection started
	LastSeen time.Time `bson:"last_seen"`  // last connect or disconnect
	Conn     string    `bson:"conn"`       // ID of the last connection
	Seen     bool      `bson:"-"`          // a document exists
	Created  time.Time `bson:"created_at"` // first connect
}

// PresenceUpdate is one connect or disconnect to record.
type PresenceUpdate struct {
	ClientID string
	Online   bool
	Node     string
	Conn     string // unique per connection, e.g. node/incarnation/sequence
	At       time.Time
}

// WritePresence records connects and disconnects in one round trip. A
// disconnect marks the device offline only if it is the connection last
// recorded: after a takeover by another node, the old connection's
// disconnect may arrive after the new connect.
func (s *Store) WritePresence(ctx context.Context, ups []PresenceUpdate) error {
	if len(ups) == 0 {
		return nil
	}
	models := make([]mongo.WriteModel, 0, len(ups))
	for _, u := range ups {
		at := u.At.UTC()
		if u.Online {
			models = append(models, mongo.NewUpdateOneModel().
				SetFilter(bson.D{{Key: "client_id", Value: u.ClientID}}).
				SetUpdate(bson.D{
					{Key: "$set", Value: bson.D{{Key: "online", Value: true}, {Key: "node", Value: u.Node}, {Key: "since", Value: at},
						{Key: "last_seen", Value: at}, {Key: "conn", Value: u.Conn}}},
					{Key: "$setOnInsert", Value: bson.D{{Key: "created_at", Value: at}}},
				}).SetUpsert(true))
			continue
		}
		models = append(models, mongo.NewUpdateOneModel().
			SetFilter(bson.D{{Key: "client_id", Value: u.ClientID}, {Key: "conn", Value: u.Conn}}).
			SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "online", Value: false}, {Key: "last_seen", Value: at}}}}))
	}
	// Ordered: a connect and a disconnect of one client in one batch must
	// apply in that order.
	_, err := s.db.Collection(CollDevices).BulkWrite(ctx, models, options.BulkWrite().SetOrdered(true))
	if err != nil {
		return fmt.Errorf("store: record presence: %w", err)
	}
	return nil
}

// Presence returns the device's presence; Seen is false if no broker ever
// recorded it.
func (s *Store) Presence(ctx context.Context, clientID string) (Presence, error) {
	var p Presence
	err := s.db.Collection(CollDevices).FindOne(ctx, bson.D{{Key: "client_id", Value: clientID}}).Decode(&p)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		return Presence{ClientID: clientID}, nil
	case err != nil:
		return p, fmt.Errorf("store: presence of %q: %w", clientID, err)
	}
	p.Seen = true
	return p, nil
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
