package store

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// Group is a named set of devices: one document of CollGroups keyed by the
// group ID, and one document of CollGroupMembers per member. Members are not
// an array in the group's document: FerretDB v1 applies concurrent updates
// of one document as read-modify-write without a lock, so concurrent adds
// to one group lost members (20 concurrent $push kept 2). Inserting and
// deleting documents with a unique _id is safe on every server.
type Group struct {
	ID         string            `bson:"_id"`
	Name       string            `bson:"name"`
	Attributes map[string]string `bson:"attributes,omitempty"`
	Created    time.Time         `bson:"created_at"`
	Updated    time.Time         `bson:"updated_at"`
}

// member is one document of CollGroupMembers. Group and device IDs are
// topic levels (no '/'), so "group/device" is a unique key.
type member struct {
	ID     string    `bson:"_id"`
	Group  string    `bson:"group"`
	Device string    `bson:"device"`
	Since  time.Time `bson:"since"`
}

func memberID(group, device string) string { return group + "/" + device }

// Errors of the group operations.
var (
	ErrGroupExists   = errors.New("store: a group with this ID exists")
	ErrGroupNotFound = errors.New("store: no such group")
	ErrGroupFull     = errors.New("store: the group has its maximum number of members")
)

func now() time.Time { return time.Now().UTC().Truncate(time.Millisecond) }

// CreateGroup inserts g with members (distinct device IDs, at most the
// caller's bound), stamping its times; ErrGroupExists if the ID is taken.
func (s *Store) CreateGroup(ctx context.Context, g *Group, members []string) error {
	g.Created, g.Updated = now(), now()
	_, err := s.db.Collection(CollGroups).InsertOne(ctx, g)
	if mongo.IsDuplicateKeyError(err) {
		return ErrGroupExists
	}
	if err != nil {
		return fmt.Errorf("store: create group %q: %w", g.ID, err)
	}
	mc := s.db.Collection(CollGroupMembers)
	// Members left by an earlier group of this ID whose deletion did not
	// finish (the process died between its two writes) are older than the
	// group; members added since it was inserted are not.
	if _, err := mc.DeleteMany(ctx, bson.D{{Key: "group", Value: g.ID}, {Key: "since", Value: bson.D{{Key: "$lt", Value: g.Created}}}}); err != nil {
		return fmt.Errorf("store: create group %q: %w", g.ID, err)
	}
	if len(members) == 0 {
		return nil
	}
	docs := make([]any, len(members))
	for i, d := range members {
		docs[i] = member{ID: memberID(g.ID, d), Group: g.ID, Device: d, Since: g.Created}
	}
	if _, err := mc.InsertMany(ctx, docs, options.InsertMany().SetOrdered(false)); err != nil && !mongo.IsDuplicateKeyError(err) {
		return fmt.Errorf("store: create group %q: members: %w", g.ID, err)
	}
	return nil
}

// GetGroup returns the group with the ID and its number of members, or
// ErrGroupNotFound.
func (s *Store) GetGroup(ctx context.Context, id string) (Group, int, error) {
	var g Group
	err := s.db.Collection(CollGroups).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&g)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return g, 0, ErrGroupNotFound
	}
	if err != nil {
		return g, 0, fmt.Errorf("store: group %q: %w", id, err)
	}
	n, err := s.db.Collection(CollGroupMembers).CountDocuments(ctx, bson.D{{Key: "group", Value: id}})
	if err != nil {
		return g, 0, fmt.Errorf("store: members of group %q: %w", id, err)
	}
	return g, int(n), nil
}

// GroupExists reports whether the group exists.
func (s *Store) GroupExists(ctx context.Context, id string) (bool, error) {
	n, err := s.db.Collection(CollGroups).CountDocuments(ctx, bson.D{{Key: "_id", Value: id}}, options.Count().SetLimit(1))
	if err != nil {
		return false, fmt.Errorf("store: group %q: %w", id, err)
	}
	return n == 1, nil
}

// ListGroups returns up to limit groups whose ID sorts after after ("" for
// the first page), in ID order: every group, or those device (unless "")
// belongs to. next is the last ID of a full page, "" at the end.
func (s *Store) ListGroups(ctx context.Context, device, after string, limit int) (gs []Group, next string, err error) {
	if device == "" {
		filter := bson.D{}
		if after != "" {
			filter = bson.D{{Key: "_id", Value: bson.D{{Key: "$gt", Value: after}}}}
		}
		cur, err := s.db.Collection(CollGroups).Find(ctx, filter,
			options.Find().SetSort(bson.D{{Key: "_id", Value: 1}}).SetLimit(int64(limit)+1))
		if err != nil {
			return nil, "", fmt.Errorf("store: list groups: %w", err)
		}
		if err := cur.All(ctx, &gs); err != nil {
			return nil, "", fmt.Errorf("store: list groups: %w", err)
		}
		if len(gs) > limit {
			gs = gs[:limit]
			next = gs[limit-1].ID
		}
		return gs, next, nil
	}
	filter := bson.D{{Key: "device", Value: device}}
	if after != "" {
		filter = append(filter, bson.E{Key: "group", Value: bson.D{{Key: "$gt", Value: after}}})
	}
	cur, err := s.db.Collection(CollGroupMembers).Find(ctx, filter,
		options.Find().SetSort(bson.D{{Key: "group", Value: 1}}).SetLimit(int64(limit)+1))
	if err != nil {
		return nil, "", fmt.Errorf("store: groups of %q: %w", device, err)
	}
	var ms []member
	if err := cur.All(ctx, &ms); err != nil {
		return nil, "", fmt.Errorf("store: groups of %q: %w", device, err)
	}
	if len(ms) > limit {
		ms = ms[:limit]
		next = ms[limit-1].Group
	}
	if len(ms) == 0 {
		return nil, next, nil
	}
	ids := make([]string, len(ms))
	for i, m := range ms {
		ids[i] = m.Group
	}
	cur, err = s.db.Collection(CollGroups).Find(ctx, bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}}},
		options.Find().SetSort(bson.D{{Key: "_id", Value: 1}}))
	if err != nil {
		return nil, "", fmt.Errorf("store: groups of %q: %w", device, err)
	}
	if err := cur.All(ctx, &gs); err != nil {
		return nil, "", fmt.Errorf("store: groups of %q: %w", device, err)
	}
	return gs, next, nil
}

// GroupMembers returns up to limit members of the group whose device ID
// sorts after after, in device order, and the cursor of the next page ("" at
// the end).
func (s *Store) GroupMembers(ctx context.Context, id, after string, limit int) (devices []string, next string, err error) {
	filter := bson.D{{Key: "group", Value: id}}
	if after != "" {
		filter = append(filter, bson.E{Key: "device", Value: bson.D{{Key: "$gt", Value: after}}})
	}
	cur, err := s.db.Collection(CollGroupMembers).Find(ctx, filter,
		options.Find().SetSort(bson.D{{Key: "device", Value: 1}}).SetLimit(int64(limit)+1))
	if err != nil {
		return nil, "", fmt.Errorf("store: members of group %q: %w", id, err)
	}
	var ms []member
	if err := cur.All(ctx, &ms); err != nil {
		return nil, "", fmt.Errorf("store: members of group %q: %w", id, err)
	}
	if len(ms) > limit {
		ms = ms[:limit]
		next = ms[limit-1].Device
	}
	devices = make([]string, len(ms))
	for i, m := range ms {
		devices[i] = m.Device
	}
	return devices, next, nil
}

// UpdateGroup sets the name (when name is not nil) and the attributes (a
// value sets, nil removes) of the group and returns it as updated, or
// ErrGroupNotFound. Keys are checked by the caller (no '.', no leading
// '$').
func (s *Store) UpdateGroup(ctx context.Context, id string, name *string, attrs map[string]*string) (Group, error) {
	set := bson.D{{Key: "updated_at", Value: now()}}
	unset := bson.D{}
	if name != nil {
		set = append(set, bson.E{Key: "name", Value: *name})
	}
	keys := make([]string, 0, len(attrs))
	for k := range attrs {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if v := attrs[k]; v == nil {
			unset = append(unset, bson.E{Key: "attributes." + k, Value: ""})
		} else {
			set = append(set, bson.E{Key: "attributes." + k, Value: *v})
		}
	}
	update := bson.D{{Key: "$set", Value: set}}
	if len(unset) > 0 {
		update = append(update, bson.E{Key: "$unset", Value: unset})
	}
	var g Group
	err := s.db.Collection(CollGroups).FindOneAndUpdate(ctx, bson.D{{Key: "_id", Value: id}}, update,
		options.FindOneAndUpdate().SetReturnDocument(options.After)).Decode(&g)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return g, ErrGroupNotFound
	}
	if err != nil {
		return g, fmt.Errorf("store: update group %q: %w", id, err)
	}
	return g, nil
}

// DeleteGroup deletes the group, then its members, and returns the members
// it had (the devices that lose access), or ErrGroupNotFound. Should the
// second write not happen, the members left behind grant nothing (GroupsOf
// skips groups that do not exist) and a new group of the same ID does not
// inherit them (CreateGroup).
func (s *Store) DeleteGroup(ctx context.Context, id string) ([]string, error) {
	res, err := s.db.Collection(CollGroups).DeleteOne(ctx, bson.D{{Key: "_id", Value: id}})
	if err != nil {
		return nil, fmt.Errorf("store: delete group %q: %w", id, err)
	}
	mc := s.db.Collection(CollGroupMembers)
	cur, err := mc.Find(ctx, bson.D{{Key: "group", Value: id}}, options.Find().SetProjection(bson.D{{Key: "device", Value: 1}}))
	if err != nil {
		return nil, fmt.Errorf("store: delete group %q: %w", id, err)
	}
	var ms []member
	if err := cur.All(ctx, &ms); err != nil {
		return nil, fmt.Errorf("store: delete group %q: %w", id, err)
	}
	if _, err := mc.DeleteMany(ctx, bson.D{{Key: "group", Value: id}}); err != nil {
		return nil, fmt.Errorf("store: delete group %q: members: %w", id, err)
	}
	if res.DeletedCount == 0 {
		return nil, ErrGroupNotFound
	}
	devices := make([]string, len(ms))
	for i, m := range ms {
		devices[i] = m.Device
	}
	return devices, nil
}

// AddGroupMember adds device to the group unless the group has max members:
// added is false if the device was a member already (nothing changes, also
// when the group is full). ErrGroupFull and ErrGroupNotFound say why not
// otherwise.
//
// The bound holds under concurrent adds without a transaction: each add
// inserts first and counts after, and withdraws if the count is over max.
// The last add that stays counted every other one that stays, so they are
// at most max; concurrent adds at the bound may all withdraw (the client
// retries), never all stay.
func (s *Store) AddGroupMember(ctx context.Context, id, device string, max int) (added bool, err error) {
	if ok, err := s.GroupExists(ctx, id); err != nil {
		return false, err
	} else if !ok {
		return false, ErrGroupNotFound
	}
	// Adds racing for the last places may all count each other and
	// withdraw; each tries again after a random pause, so one of them
	// usually gets in. A group that is full costs the extra tries.
	for try := 1; ; try++ {
		added, err = s.addGroupMember(ctx, id, device, max)
		if !errors.Is(err, ErrGroupFull) || try == addTries {
			return added, err
		}
		select {
		case <-time.After(time.Duration(rand.Int64N(int64(addPause)))):
		case <-ctx.Done():
			return false, err
		}
	}
}

// addTries and addPause bound AddGroupMember's retries after a race.
const (
	addTries = 4
	addPause = 30 * time.Millisecond
)

func (s *Store) addGroupMember(ctx context.Context, id, device string, max int) (added bool, err error) {
	mc := s.db.Collection(CollGroupMembers)
	mid := memberID(id, device)
	_, err = mc.InsertOne(ctx, member{ID: mid, Group: id, Device: device, Since: now()})
	if mongo.IsDuplicateKeyError(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("store: add %q to group %q: %w", device, id, err)
	}
	withdraw := func(why error) (bool, error) {
		if _, err := mc.DeleteOne(ctx, bson.D{{Key: "_id", Value: mid}}); err != nil {
			return false, fmt.Errorf("store: add %q to group %q: withdraw (%v): %w", device, id, why, err)
		}
		return false, why
	}
	n, err := mc.CountDocuments(ctx, bson.D{{Key: "group", Value: id}})
	if err != nil {
		return withdraw(fmt.Errorf("store: add %q to group %q: count: %w", device, id, err))
	}
	if n > int64(max) {
		return withdraw(ErrGroupFull)
	}
	// The group may have been deleted after the first check: its deletion
	// removes members after the group, so this one would stay behind.
	if ok, err := s.GroupExists(ctx, id); err != nil {
		return withdraw(err)
	} else if !ok {
		return withdraw(ErrGroupNotFound)
	}
	return true, nil
}

// RemoveGroupMember removes device from the group: removed is false if it
// was not a member; ErrGroupNotFound if there is no such group.
func (s *Store) RemoveGroupMember(ctx context.Context, id, device string) (removed bool, err error) {
	res, err := s.db.Collection(CollGroupMembers).DeleteOne(ctx, bson.D{{Key: "_id", Value: memberID(id, device)}})
	if err != nil {
		return false, fmt.Errorf("store: remove %q from group %q: %w", device, id, err)
	}
	ok, err := s.GroupExists(ctx, id)
	if err != nil {
		return false, err
	}
	if !ok {
		return false, ErrGroupNotFound
	}
	return res.DeletedCount == 1, nil
}

// GroupsOf returns, for each of devices, the IDs of the existing groups it
// belongs to (a device in no group is absent), in two round trips per 500
// devices.
func (s *Store) GroupsOf(ctx context.Context, devices []string) (map[string][]string, error) {
	out := make(map[string][]string, len(devices))
	const chunk = 500
	for len(devices) > 0 {
		n := min(chunk, len(devices))
		part := devices[:n]
		devices = devices[n:]
		filter := bson.D{{Key: "device", Value: part[0]}}
		if n > 1 {
			filter = bson.D{{Key: "device", Value: bson.D{{Key: "$in", Value: part}}}}
		}
		cur, err := s.db.Collection(CollGroupMembers).Find(ctx, filter)
		if err != nil {
			return nil, fmt.Errorf("store: groups of %d devices: %w", n, err)
		}
		var ms []member
		if err := cur.All(ctx, &ms); err != nil {
			return nil, fmt.Errorf("store: groups of %d devices: %w", n, err)
		}
		if len(ms) == 0 {
			continue
		}
		var ids []string
		for _, m := range ms {
			ids = append(ids, m.Group)
		}
		slices.Sort(ids)
		ids = slices.Compact(ids)
		cur, err = s.db.Collection(CollGroups).Find(ctx, bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}}},
			options.Find().SetProjection(bson.D{{Key: "_id", Value: 1}}))
		if err != nil {
			return nil, fmt.Errorf("store: groups of %d devices: %w", n, err)
		}
		var gs []struct {
			ID string `bson:"_id"`
		}
		if err := cur.All(ctx, &gs); err != nil {
			return nil, fmt.Errorf("store: groups of %d devices: %w", n, err)
		}
		exists := make(map[string]bool, len(gs))
		for _, g := range gs {
			exists[g.ID] = true
		}
		for _, m := range ms {
			if exists[m.Group] {
				out[m.Device] = append(out[m.Device], m.Group)
			}
		}
	}
	return out, nil
}
