package plugins

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Membership answers the ACL's question for groups/{group}: is the device
// a member? It is asked on every SUBSCRIBE, PUBLISH and delivery on a group
// topic, so an answer it holds must cost no allocation and no round trip.
type Membership interface {
	Member(clientID, group string) bool
}

// GroupsLoader reads the groups each of devices belongs to (store.GroupsOf).
type GroupsLoader func(ctx context.Context, devices []string) (map[string][]string, error)

// GroupChange is a membership change the push API made in the store and
// tells every broker of: devices added to or removed from a group, or the
// group deleted (Removed then lists its members).
type GroupChange struct {
	Group   string   `json:"group"`
	Added   []string `json:"added,omitempty"`
	Removed []string `json:"removed,omitempty"`
	Deleted bool     `json:"deleted,omitempty"`
}

// loadTimeout bounds the store read of one device's groups. A read can
// happen in a delivery (a session moved here from another node before
// Warm read it), on a publisher's or a node link's goroutine: well under
// the link's 3 s silence limit.
const loadTimeout = 2 * time.Second

// retryAfterFailure is how long a device whose read failed is denied
// without another read, so a store outage costs a delivery path at most
// one loadTimeout per device per second, not one per message.
const retryAfterFailure = time.Second

// GroupCache is a broker's Membership: the groups of each device this
// broker was asked about, read from the store the first time and kept
// while the device has a session here.
//
// Why a cache: the ACL is consulted on every delivery of every message on a
// group topic, in the publisher's goroutine; a store round trip there
// (about a millisecond on the embedded store) would cap a group of 1,000
// members at a message a second. Why per device and lazy: a broker only
// needs the devices it holds sessions for, read once each, and a
// connection storm does not reach the store (only devices that use a group
// topic cause a read).
//
// How it stays true: the push API writes a change to the store, then tells
// every broker (Apply, through their admin endpoints) before it answers, so
// a change is enforced everywhere when the API call returns. A broker it
// could not reach (the API answers 503 then) re-reads every cached device
// at the refresh interval (Refresh). Each entry has a version that every
// change notice for its device bumps; a read from the store is kept only if
// no notice arrived while it was in flight (else it is read again), so a
// read that started before a change cannot overwrite the change.
type GroupCache struct {
	load    GroupsLoader
	log     *slog.Logger
	entries sync.Map // client ID → *groupEntry

	loads, loadErrors, notices, denied atomic.Int64
	limit                              logLimiter
}

type groupEntry struct {
	loadMu sync.Mutex // one store read at a time per device
	mu     sync.Mutex // guards ver and the swap of groups
	ver    uint64
	groups atomic.Pointer[map[string]struct{}] // nil until read
	failed atomic.Int64                        // unix nanoseconds of the last failed read
}

// NewGroupCache returns an empty cache reading from load.
func NewGroupCache(load GroupsLoader, log *slog.Logger) *GroupCache {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &GroupCache{load: load, log: log.With("component", "groups")}
}

// Member reports whether the device belongs to the group. The first
// question about a device reads its groups from the store (bounded by
// loadTimeout); if the store cannot answer, the answer is no (fail closed:
// a denied SUBSCRIBE or PUBLISH says so to the client, who retries).
func (c *GroupCache) Member(clientID, group string) bool {
	e := c.entry(clientID)
	s := e.groups.Load()
	if s == nil {
		var err error
		if s, err = c.read(e, clientID); err != nil {
			c.denied.Add(1)
			if ok, left := c.limit.allow(time.Now()); ok {
				args := []any{"client_id", truncate(clientID), "group", group, "error", err}
				if left > 0 {
					args = append(args, "not_logged", left)
				}
				c.log.Warn("group membership not read from the store: denying", args...)
			}
			return false
		}
	}
	_, ok := (*s)[group]
	return ok
}

// Warm reads the device's groups unless they are cached, so that a
// session that arrives with group subscriptions (moved from another node)
// does not make its first delivery wait for the store.
func (c *GroupCache) Warm(clientID string) {
	e := c.entry(clientID)
	if e.groups.Load() == nil {
		_, _ = c.read(e, clientID)
	}
}

func (c *GroupCache) entry(clientID string) *groupEntry {
	if v, ok := c.entries.Load(clientID); ok {
		return v.(*groupEntry)
	}
	v, _ := c.entries.LoadOrStore(clientID, new(groupEntry))
	return v.(*groupEntry)
}

// errChanging reports a device whose membership changed during every read.
var errChanging = errors.New("membership changed during every read")

// read reads the device's groups unless another call did meanwhile.
func (c *GroupCache) read(e *groupEntry, clientID string) (*map[string]struct{}, error) {
	e.loadMu.Lock()
	defer e.loadMu.Unlock()
	if s := e.groups.Load(); s != nil {
		return s, nil
	}
	if f := e.failed.Load(); f != 0 && time.Since(time.Unix(0, f)) < retryAfterFailure {
		return nil, errRecentFailure
	}
	s, err := c.readLocked(e, clientID)
	if err != nil {
		c.loadErrors.Add(1)
		e.failed.Store(time.Now().UnixNano())
	}
	return s, err
}

// errRecentFailure reports a read not tried because the last one failed
// less than retryAfterFailure ago.
var errRecentFailure = errors.New("the last read failed less than a second ago")

func (c *GroupCache) readLocked(e *groupEntry, clientID string) (*map[string]struct{}, error) {
	ctx, cancel := context.WithTimeout(context.Background(), loadTimeout)
	defer cancel()
	for range 5 {
		e.mu.Lock()
		v := e.ver
		e.mu.Unlock()
		c.loads.Add(1)
		m, err := c.load(ctx, []string{clientID})
		if err != nil {
			return nil, err
		}
		set := make(map[string]struct{}, len(m[clientID]))
		for _, g := range m[clientID] {
			set[g] = struct{}{}
		}
		e.mu.Lock()
		if e.ver == v {
			e.groups.Store(&set)
			e.mu.Unlock()
			return &set, nil
		}
		e.mu.Unlock()
	}
	return nil, errChanging
}

// Apply applies a change notice to the devices cached here; devices not
// cached read the store (which holds the change) when first asked.
func (c *GroupCache) Apply(ch GroupChange) {
	c.notices.Add(1)
	edit := func(e *groupEntry, add bool) {
		e.mu.Lock()
		defer e.mu.Unlock()
		e.ver++
		cur := e.groups.Load()
		if cur == nil {
			return // a read is in flight: it sees ver changed and reads again
		}
		if _, has := (*cur)[ch.Group]; has == add {
			return
		}
		next := make(map[string]struct{}, len(*cur)+1)
		for g := range *cur {
			next[g] = struct{}{}
		}
		if add {
			next[ch.Group] = struct{}{}
		} else {
			delete(next, ch.Group)
		}
		e.groups.Store(&next)
	}
	for _, d := range ch.Added {
		if v, ok := c.entries.Load(d); ok {
			edit(v.(*groupEntry), true)
		}
	}
	if ch.Deleted {
		// Every device, not only the members listed: a member added while
		// the group was being deleted may be missing from the list.
		c.entries.Range(func(_, v any) bool {
			edit(v.(*groupEntry), false)
			return true
		})
		return
	}
	for _, d := range ch.Removed {
		if v, ok := c.entries.Load(d); ok {
			edit(v.(*groupEntry), false)
		}
	}
}

// Forget drops a device's entry (its session ended).
func (c *GroupCache) Forget(clientID string) { c.entries.Delete(clientID) }

// Refresh re-reads the groups of every cached device that keep says is
// still here, and forgets the others. Use it periodically: it repairs an
// entry that missed a change notice.
func (c *GroupCache) Refresh(ctx context.Context, keep func(clientID string) bool) error {
	type snap struct {
		e   *groupEntry
		ver uint64
	}
	var ids []string
	snaps := map[string]snap{}
	c.entries.Range(func(k, v any) bool {
		id, e := k.(string), v.(*groupEntry)
		if !keep(id) {
			c.entries.Delete(id)
			return true
		}
		e.mu.Lock()
		loaded, ver := e.groups.Load() != nil, e.ver
		e.mu.Unlock()
		if loaded {
			ids = append(ids, id)
			snaps[id] = snap{e, ver}
		}
		return true
	})
	if len(ids) == 0 {
		return nil
	}
	c.loads.Add(1)
	m, err := c.load(ctx, ids)
	if err != nil {
		c.loadErrors.Add(1)
		return err
	}
	for _, id := range ids {
		s := snaps[id]
		set := make(map[string]struct{}, len(m[id]))
		for _, g := range m[id] {
			set[g] = struct{}{}
		}
		s.e.mu.Lock()
		if s.e.ver == s.ver { // else a notice came meanwhile: the next refresh
			s.e.groups.Store(&set)
		}
		s.e.mu.Unlock()
	}
	return nil
}

// GroupCacheStats are a cache's counters.
type GroupCacheStats struct {
	Devices    int   `json:"devices"`     // devices cached
	Loads      int64 `json:"loads"`       // store reads (one per device first asked about, one per refresh)
	LoadErrors int64 `json:"load_errors"` // failed store reads (a first read that failed denied)
	Notices    int64 `json:"notices"`     // change notices applied
	// Denied counts checks refused because the device's groups could not
	// be read (the store was down at its first use of a group topic here).
	Denied int64 `json:"denied_unread"`
}

// Stats returns the cache's counters.
func (c *GroupCache) Stats() GroupCacheStats {
	n := 0
	c.entries.Range(func(_, _ any) bool { n++; return true })
	return GroupCacheStats{Devices: n, Loads: c.loads.Load(), LoadErrors: c.loadErrors.Load(), Notices: c.notices.Load(), Denied: c.denied.Load()}
}
