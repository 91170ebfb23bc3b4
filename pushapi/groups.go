package pushapi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/oklog/ulid/v2"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/plugins"
)

// Bounds of a group's fields.
const (
	maxGroupID        = 256
	maxGroupName      = 256
	maxAttributes     = 64
	maxAttributeKey   = 256
	maxAttributeValue = 4096
)

// Cursor prefixes of the group lists, so a cursor from another list is
// refused rather than misread.
const (
	groupsCursorPrefix  = "g1:"
	membersCursorPrefix = "m1:"
)

// GroupRequest is the body of POST /v1/groups.
type GroupRequest struct {
	// ID is the group's ID: one topic level (the group's topic is
	// groups/{id}). Absent: the push API makes one (a ULID).
	ID         *string           `json:"id,omitempty"`
	Name       string            `json:"name,omitempty"`
	Attributes map[string]string `json:"attributes,omitempty"`
	// Members are the group's first members (device IDs), at most
	// groups.max_members.
	Members []string `json:"members,omitempty"`
}

// GroupPatch is the body of PATCH /v1/groups/{id}: a JSON merge patch of
// the name and the attributes (an attribute set to null is removed).
type GroupPatch struct {
	Name       *string            `json:"name,omitempty"`
	Attributes map[string]*string `json:"attributes,omitempty"`
}

// Group is a group as the API shows it.
type Group struct {
	ID         string            `json:"id"`
	Name       string            `json:"name"`
	Attributes map[string]string `json:"attributes"`
	// MemberCount is given by GET /v1/groups/{id} and POST /v1/groups only.
	MemberCount *int      `json:"member_count,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// Groups is the answer of GET /v1/groups.
type Groups struct {
	Groups []Group `json:"groups"`
	// NextCursor fetches the next page; null on the last one.
	NextCursor *string `json:"next_cursor"`
}

// GroupMembers is the answer of GET /v1/groups/{id}/members.
type GroupMembers struct {
	Members    []string `json:"members"`
	NextCursor *string  `json:"next_cursor"`
}

// GroupMembership is the answer of PUT /v1/groups/{id}/members/{deviceId}.
type GroupMembership struct {
	Group  string `json:"group"`
	Device string `json:"device"`
	// Added is false when the device was a member already.
	Added bool `json:"added"`
}

func groupView(g store.Group, count *int) Group {
	attrs := g.Attributes
	if attrs == nil {
		attrs = map[string]string{}
	}
	return Group{ID: g.ID, Name: g.Name, Attributes: attrs, MemberCount: count, CreatedAt: g.Created.UTC(), UpdatedAt: g.Updated.UTC()}
}

func groupTopic(id string) string { return "groups/" + id }

// checkGroupID returns why id cannot be a group ID, or nil.
func checkGroupID(id string) *Error {
	if why := checkLevel(id, maxGroupID); why != "" {
		return apiErr(CodeInvalidGroupID, "group ID %s", why)
	}
	return nil
}

// groupParam returns the {id} path parameter, checked as a group ID.
func groupParam(c echo.Context) (string, error) {
	id, err := pathParam(c, "id")
	if err != nil {
		return "", err
	}
	if e := checkGroupID(id); e != nil {
		return "", e
	}
	return id, nil
}

func checkName(name string) *Error {
	if len(name) > maxGroupName {
		return apiErr(CodeInvalidGroup, "name has %d bytes, more than %d", len(name), maxGroupName)
	}
	if why := checkUTF8(name); why != "" {
		return apiErr(CodeInvalidGroup, "name %s", why)
	}
	return nil
}

func checkAttribute(k string, v *string) *Error {
	switch {
	case k == "" || len(k) > maxAttributeKey:
		return apiErr(CodeInvalidGroup, "attribute keys have 1 to %d bytes, got %d", maxAttributeKey, len(k))
	case strings.ContainsRune(k, '.') || k[0] == '$':
		return apiErr(CodeInvalidGroup, "attribute key %q: no '.' and no leading '$'", k)
	}
	if why := checkUTF8(k); why != "" {
		return apiErr(CodeInvalidGroup, "attribute key %q %s", k, why)
	}
	if v == nil {
		return nil
	}
	if len(*v) > maxAttributeValue {
		return apiErr(CodeInvalidGroup, "attribute %q has %d bytes, more than %d", k, len(*v), maxAttributeValue)
	}
	if why := checkUTF8(*v); why != "" {
		return apiErr(CodeInvalidGroup, "attribute %q %s", k, why)
	}
	return nil
}

// groupStoreError maps the store's group errors to API errors; others go
// to withStore.
func groupStoreError(id string, err error) error {
	switch {
	case errors.Is(err, store.ErrGroupNotFound):
		return apiErr(CodeNotFound, "no group %q", id)
	case errors.Is(err, store.ErrGroupExists):
		return apiErr(CodeGroupExists, "a group %q exists already", id)
	}
	return err
}

// storeCall runs f with withStore, keeping the group errors of f as they
// are (withStore would answer 503 for them).
func (p *PushAPI) storeCall(c echo.Context, f func(ctx context.Context) error) error {
	var apiE error
	err := p.withStore(c, func(ctx context.Context) error {
		err := f(ctx)
		var e *Error
		if errors.As(err, &e) {
			apiE = e
			return nil
		}
		return err
	})
	if err != nil {
		return err
	}
	return apiE
}

// postGroup is POST /v1/groups.
func (p *PushAPI) postGroup(c echo.Context) error {
	var req GroupRequest
	if err := decodeBody(c, p.cfg.MaxBody, &req); err != nil {
		return err
	}
	g := store.Group{Name: req.Name}
	if req.ID != nil {
		if e := checkGroupID(*req.ID); e != nil {
			return e
		}
		g.ID = *req.ID
	} else {
		g.ID = ulid.Make().String()
	}
	if e := checkName(req.Name); e != nil {
		return e
	}
	if len(req.Attributes) > maxAttributes {
		return apiErr(CodeInvalidGroup, "a group has at most %d attributes, got %d", maxAttributes, len(req.Attributes))
	}
	for k, v := range req.Attributes {
		if e := checkAttribute(k, &v); e != nil {
			return e
		}
	}
	g.Attributes = req.Attributes
	members := slices.Clone(req.Members)
	for _, d := range members {
		if e := checkDeviceID(d); e != nil {
			return apiErr(CodeInvalidDeviceID, "members: %s", e.Message)
		}
	}
	slices.Sort(members)
	members = slices.Compact(members)
	if len(members) > p.groups.MaxMembers {
		return apiErr(CodeGroupFull, "%d members, more than groups.max_members (%d)", len(members), p.groups.MaxMembers)
	}
	err := p.storeCall(c, func(ctx context.Context) error {
		return groupStoreError(g.ID, p.st.CreateGroup(ctx, &g, members))
	})
	if err != nil {
		return err
	}
	if len(members) > 0 {
		// Brokers may hold these devices as not members of the group (they
		// asked before it existed). The group exists either way: a broker
		// that does not confirm (logged) applies it at its next refresh.
		_ = p.notifyGroup(c.Request().Context(), plugins.GroupChange{Group: g.ID, Added: members})
	}
	n := len(members)
	c.Response().Header().Set(echo.HeaderLocation, "/v1/groups/"+url.PathEscape(g.ID))
	return c.JSON(http.StatusCreated, groupView(g, &n))
}

// getGroup is GET /v1/groups/{id}.
func (p *PushAPI) getGroup(c echo.Context) error {
	id, err := groupParam(c)
	if err != nil {
		return err
	}
	var (
		g store.Group
		n int
	)
	err = p.storeCall(c, func(ctx context.Context) (err error) {
		g, n, err = p.st.GetGroup(ctx, id)
		return groupStoreError(id, err)
	})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, groupView(g, &n))
}

// pageParams reads limit and cursor, the cursor made with prefix.
func pageParams(c echo.Context, prefix string) (limit int, after string, err error) {
	limit = defaultLimit
	if v := c.QueryParam("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxLimit {
			return 0, "", apiErr(CodeBadParameter, "limit must be an integer from 1 to %d, got %q", maxLimit, v)
		}
		limit = n
	}
	if v := c.QueryParam("cursor"); v != "" {
		b, err := base64.RawURLEncoding.DecodeString(v)
		if err != nil || !strings.HasPrefix(string(b), prefix) || len(b) == len(prefix) {
			return 0, "", apiErr(CodeBadCursor, "cursor %q was not returned by a previous page of this list", v)
		}
		after = string(b[len(prefix):])
	}
	return limit, after, nil
}

func pageCursor(prefix, next string) *string {
	if next == "" {
		return nil
	}
	s := base64.RawURLEncoding.EncodeToString([]byte(prefix + next))
	return &s
}

// listGroups is GET /v1/groups?member=&limit=&cursor=: every group, or
// those of a device, by ID. The cursor is the last ID of the page, so
// pages stay consistent while groups are created or deleted: none is
// skipped or repeated, except one created behind the cursor.
func (p *PushAPI) listGroups(c echo.Context) error {
	member := c.QueryParam("member")
	if member != "" {
		if e := checkDeviceID(member); e != nil {
			return apiErr(CodeBadParameter, "member: %s", e.Message)
		}
	} else if c.QueryParams().Has("member") {
		return apiErr(CodeBadParameter, "member is empty: give a device ID, or leave it out for every group")
	}
	limit, after, err := pageParams(c, groupsCursorPrefix)
	if err != nil {
		return err
	}
	var (
		gs   []store.Group
		next string
	)
	err = p.withStore(c, func(ctx context.Context) (err error) {
		gs, next, err = p.st.ListGroups(ctx, member, after, limit)
		return err
	})
	if err != nil {
		return err
	}
	out := Groups{Groups: make([]Group, 0, len(gs)), NextCursor: pageCursor(groupsCursorPrefix, next)}
	for _, g := range gs {
		out.Groups = append(out.Groups, groupView(g, nil))
	}
	return c.JSON(http.StatusOK, out)
}

// listMembers is GET /v1/groups/{id}/members?limit=&cursor=.
func (p *PushAPI) listMembers(c echo.Context) error {
	id, err := groupParam(c)
	if err != nil {
		return err
	}
	limit, after, err := pageParams(c, membersCursorPrefix)
	if err != nil {
		return err
	}
	var (
		ms   []string
		next string
	)
	err = p.storeCall(c, func(ctx context.Context) (err error) {
		if ok, err := p.st.GroupExists(ctx, id); err != nil {
			return err
		} else if !ok {
			return groupStoreError(id, store.ErrGroupNotFound)
		}
		ms, next, err = p.st.GroupMembers(ctx, id, after, limit)
		return err
	})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, GroupMembers{Members: ms, NextCursor: pageCursor(membersCursorPrefix, next)})
}

// patchGroup is PATCH /v1/groups/{id}.
func (p *PushAPI) patchGroup(c echo.Context) error {
	id, err := groupParam(c)
	if err != nil {
		return err
	}
	var req GroupPatch
	if err := decodeBody(c, p.cfg.MaxBody, &req); err != nil {
		return err
	}
	if req.Name != nil {
		if e := checkName(*req.Name); e != nil {
			return e
		}
	}
	if len(req.Attributes) > maxAttributes {
		return apiErr(CodeInvalidGroup, "a group has at most %d attributes, got %d in the patch", maxAttributes, len(req.Attributes))
	}
	for k, v := range req.Attributes {
		if e := checkAttribute(k, v); e != nil {
			return e
		}
	}
	var g store.Group
	err = p.storeCall(c, func(ctx context.Context) (err error) {
		g, err = p.st.UpdateGroup(ctx, id, req.Name, req.Attributes)
		if err != nil {
			return groupStoreError(id, err)
		}
		if len(g.Attributes) > maxAttributes {
			// Concurrent patches may pass the bound; this one answers
			// with it and its values stay (remove some with null).
			return apiErr(CodeInvalidGroup, "the group now has %d attributes, more than %d: remove some (set them to null)", len(g.Attributes), maxAttributes)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, groupView(g, nil))
}

// deleteGroup is DELETE /v1/groups/{id}: the group and its memberships go,
// and every broker removes its members' subscriptions to the group.
func (p *PushAPI) deleteGroup(c echo.Context) error {
	id, err := groupParam(c)
	if err != nil {
		return err
	}
	var members []string
	err = p.storeCall(c, func(ctx context.Context) (err error) {
		members, err = p.st.DeleteGroup(ctx, id)
		return groupStoreError(id, err)
	})
	if err != nil {
		return err
	}
	if err := p.notifyGroup(c.Request().Context(), plugins.GroupChange{Group: id, Removed: members, Deleted: true}); err != nil {
		return err
	}
	return c.NoContent(http.StatusNoContent)
}

// memberParams returns the {id} and {deviceId} path parameters, checked.
func memberParams(c echo.Context) (string, string, error) {
	id, err := groupParam(c)
	if err != nil {
		return "", "", err
	}
	dev, err := deviceParamNamed(c, "deviceId")
	if err != nil {
		return "", "", err
	}
	return id, dev, nil
}

// putMember is PUT /v1/groups/{id}/members/{deviceId}: 201 when the device
// is added, 200 when it was a member already. Adding does not subscribe
// the device (docs/api.md "Groups").
func (p *PushAPI) putMember(c echo.Context) error {
	id, dev, err := memberParams(c)
	if err != nil {
		return err
	}
	var added bool
	err = p.storeCall(c, func(ctx context.Context) (err error) {
		added, err = p.st.AddGroupMember(ctx, id, dev, p.groups.MaxMembers)
		if errors.Is(err, store.ErrGroupFull) {
			return apiErr(CodeGroupFull, "group %q is full: it has groups.max_members (%d) members", id, p.groups.MaxMembers)
		}
		return groupStoreError(id, err)
	})
	if err != nil {
		return err
	}
	// Also when it was a member: a retry after a 503 tells the brokers
	// that missed it.
	if err := p.notifyGroup(c.Request().Context(), plugins.GroupChange{Group: id, Added: []string{dev}}); err != nil {
		return err
	}
	status := http.StatusOK
	if added {
		status = http.StatusCreated
	}
	return c.JSON(status, GroupMembership{Group: id, Device: dev, Added: added})
}

// deleteMember is DELETE /v1/groups/{id}/members/{deviceId}: 204 whether
// or not the device was a member. Once it answers, every broker denies
// the device the group's topic and has removed its subscriptions to it.
func (p *PushAPI) deleteMember(c echo.Context) error {
	id, dev, err := memberParams(c)
	if err != nil {
		return err
	}
	err = p.storeCall(c, func(ctx context.Context) (err error) {
		_, err = p.st.RemoveGroupMember(ctx, id, dev)
		return groupStoreError(id, err)
	})
	if err != nil {
		return err
	}
	if err := p.notifyGroup(c.Request().Context(), plugins.GroupChange{Group: id, Removed: []string{dev}}); err != nil {
		return err
	}
	return c.NoContent(http.StatusNoContent)
}

// postGroupMessage is POST /v1/groups/{id}/messages: a message to
// groups/{id}, for an existing group.
func (p *PushAPI) postGroupMessage(c echo.Context) error {
	id, err := groupParam(c)
	if err != nil {
		return err
	}
	var req MessageBody
	if err := decodeBody(c, p.cfg.MaxBody, &req); err != nil {
		return err
	}
	m, e := p.build(groupTopic(id), &req)
	if e != nil {
		return e
	}
	err = p.storeCall(c, func(ctx context.Context) error {
		ok, err := p.st.GroupExists(ctx, id)
		if err == nil && !ok {
			return groupStoreError(id, store.ErrGroupNotFound)
		}
		return err
	})
	if err != nil {
		return err
	}
	return p.publishOne(c, m)
}

// notifyGroup tells every broker of a membership change written to the
// store, in parallel, and returns once each has applied it. A broker that
// does not confirm makes the answer 503 node_unavailable: the change is in
// the store, and that broker applies it at its next refresh
// (groups.refresh_interval) at the latest; the request may be retried.
func (p *PushAPI) notifyGroup(ctx context.Context, ch plugins.GroupChange) error {
	body, err := json.Marshal(ch)
	if err != nil {
		return err
	}
	var (
		mu     sync.Mutex
		failed []string
		cause  error
		wg     sync.WaitGroup
	)
	for _, m := range p.members() {
		if m.Tags.Role != cluster.RoleBroker || m.Tags.Admin == "" ||
			(m.Status != cluster.StatusAlive && m.Status != cluster.StatusLeaving) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.admin.call(ctx, http.MethodPost, m.Tags.Admin, "/v1/groups/changes", body); err != nil {
				mu.Lock()
				failed, cause = append(failed, m.Name), err
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(failed) == 0 {
		return nil
	}
	slices.Sort(failed)
	p.log.Warn("group change not confirmed by every broker", "group", ch.Group, "brokers", failed, "error", cause)
	return &Error{Status: http.StatusServiceUnavailable, Code: CodeNodeUnavailable, cause: cause,
		Message: fmt.Sprintf("the change is recorded, but broker(s) %s did not confirm it: they apply it within groups.refresh_interval (%s); adding or removing a member again is safe and tells them again",
			strings.Join(failed, ", "), p.groups.RefreshInterval)}
}
