package store_test

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/store"
	"github.com/rtm-dev/rtm/internal/store/storetest"
	"github.com/rtm-dev/rtm/internal/testutil"
)

func TestGroupMembership(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 30*time.Second)
	if err := s.CreateGroup(ctx, &store.Group{ID: "g1", Name: "one"}, []string{"a"}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateGroup(ctx, &store.Group{ID: "g1"}, nil); !errors.Is(err, store.ErrGroupExists) {
		t.Fatalf("create again: %v, want ErrGroupExists", err)
	}
	if added, err := s.AddGroupMember(ctx, "g1", "b", 3); err != nil || !added {
		t.Fatalf("add b: %t %v", added, err)
	}
	if added, err := s.AddGroupMember(ctx, "g1", "b", 3); err != nil || added {
		t.Fatalf("add b again: %t %v, want not added", added, err)
	}
	if added, err := s.AddGroupMember(ctx, "g1", "c", 3); err != nil || !added {
		t.Fatalf("add c: %t %v", added, err)
	}
	if _, err := s.AddGroupMember(ctx, "g1", "d", 3); !errors.Is(err, store.ErrGroupFull) {
		t.Fatalf("add d to a full group: %v, want ErrGroupFull", err)
	}
	// A member of a full group is added again without error.
	if added, err := s.AddGroupMember(ctx, "g1", "a", 3); err != nil || added {
		t.Fatalf("add a to its full group: %t %v", added, err)
	}
	if _, err := s.AddGroupMember(ctx, "nope", "a", 3); !errors.Is(err, store.ErrGroupNotFound) {
		t.Fatalf("add to unknown group: %v", err)
	}
	if removed, err := s.RemoveGroupMember(ctx, "g1", "b"); err != nil || !removed {
		t.Fatalf("remove b: %t %v", removed, err)
	}
	if removed, err := s.RemoveGroupMember(ctx, "g1", "b"); err != nil || removed {
		t.Fatalf("remove b again: %t %v", removed, err)
	}
	if _, err := s.RemoveGroupMember(ctx, "nope", "b"); !errors.Is(err, store.ErrGroupNotFound) {
		t.Fatalf("remove from unknown group: %v", err)
	}
	if err := s.CreateGroup(ctx, &store.Group{ID: "g2"}, []string{"c"}); err != nil {
		t.Fatal(err)
	}
	of, err := s.GroupsOf(ctx, []string{"a", "b", "c"})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(of["c"])
	if !slices.Equal(of["a"], []string{"g1"}) || len(of["b"]) != 0 || !slices.Equal(of["c"], []string{"g1", "g2"}) {
		t.Fatalf("GroupsOf: %v", of)
	}
	name, v := "renamed", "x"
	g, err := s.UpdateGroup(ctx, "g1", &name, map[string]*string{"k": &v, "gone": nil})
	if err != nil || g.Name != "renamed" || g.Attributes["k"] != "x" {
		t.Fatalf("update: %+v %v", g, err)
	}
	w := "w"
	if g, err = s.UpdateGroup(ctx, "g1", nil, map[string]*string{"k": nil, "w": &w}); err != nil || len(g.Attributes) != 1 || g.Attributes["w"] != "w" {
		t.Fatalf("set w, unset k: %+v %v", g, err)
	}
	if _, err := s.UpdateGroup(ctx, "g1", nil, map[string]*string{"w": nil}); err != nil {
		t.Fatal(err)
	}
	if g, n, _ := s.GetGroup(ctx, "g1"); len(g.Attributes) != 0 || g.Name != "renamed" || n != 2 {
		t.Fatalf("after unset: %+v, %d members", g, n)
	}
	if ms, next, err := s.GroupMembers(ctx, "g1", "", 1); err != nil || !slices.Equal(ms, []string{"a"}) || next != "a" {
		t.Fatalf("members page 1: %v %q %v", ms, next, err)
	}
	if ms, next, err := s.GroupMembers(ctx, "g1", "a", 1); err != nil || !slices.Equal(ms, []string{"c"}) || next != "" {
		t.Fatalf("members page 2: %v %q %v", ms, next, err)
	}
	if ms, err := s.DeleteGroup(ctx, "g1"); err != nil || !slices.Equal(ms, []string{"a", "c"}) {
		t.Fatalf("delete: %v %v", ms, err)
	}
	if _, err := s.DeleteGroup(ctx, "g1"); !errors.Is(err, store.ErrGroupNotFound) {
		t.Fatalf("delete again: %v", err)
	}
	if of, _ = s.GroupsOf(ctx, []string{"a"}); len(of) != 0 {
		t.Fatalf("a after delete: %v", of)
	}
}

// Concurrent adds never take a group past its bound: the bound is in the
// write's filter, not a count read before it.
func TestGroupBoundUnderConcurrentAdds(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 60*time.Second)
	if err := s.CreateGroup(ctx, &store.Group{ID: "g"}, nil); err != nil {
		t.Fatal(err)
	}
	const max, tries = 5, 20
	var wg sync.WaitGroup
	var mu sync.Mutex
	added := 0
	for i := range tries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok, err := s.AddGroupMember(ctx, "g", fmt.Sprintf("d%d", i), max)
			if err != nil && !errors.Is(err, store.ErrGroupFull) {
				t.Error(err)
			}
			mu.Lock()
			added += map[bool]int{true: 1}[ok]
			mu.Unlock()
		}()
	}
	wg.Wait()
	_, n, err := s.GetGroup(ctx, "g")
	if err != nil || n > max || added != n || added == 0 {
		t.Fatalf("%d added, %d members (%v), want as many, at most %d", added, n, err, max)
	}
}

func TestListGroupsPages(t *testing.T) {
	s := storetest.Open(t)
	ctx := testutil.Context(t, 30*time.Second)
	for i := range 7 {
		m := []string{"x"}
		if i%2 == 0 {
			m = append(m, "even")
		}
		if err := s.CreateGroup(ctx, &store.Group{ID: fmt.Sprintf("g%d", i)}, m); err != nil {
			t.Fatal(err)
		}
	}
	var ids []string
	after := ""
	for {
		gs, next, err := s.ListGroups(ctx, "even", after, 2)
		if err != nil {
			t.Fatal(err)
		}
		for _, g := range gs {
			ids = append(ids, g.ID)
		}
		if next == "" {
			break
		}
		after = next
	}
	if !slices.Equal(ids, []string{"g0", "g2", "g4", "g6"}) {
		t.Fatalf("pages of even: %v", ids)
	}
}
