package app_test

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/rtm-dev/rtm/"

// TestImportRules keeps the architecture the layout shows: roles meet
// through protocols, not imports; leaf packages stay leaves; test helpers
// stay out of the binary. See the import rules in the README.
func TestImportRules(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps=false", "-json=ImportPath,Deps", module+"...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	roles := []string{"broker", "router", "pushapi", "watchdog"}
	for dec.More() {
		var p struct {
			ImportPath string
			Deps       []string
		}
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		pkg := strings.TrimPrefix(p.ImportPath, module)
		for _, dep := range p.Deps {
			if !strings.HasPrefix(dep, module) {
				continue
			}
			d := strings.TrimPrefix(dep, module)
			if why := forbidden(pkg, d, roles); why != "" {
				t.Errorf("%s imports %s: %s", pkg, d, why)
			}
		}
	}
}

func forbidden(pkg, dep string, roles []string) string {
	top := func(s string) string { return strings.SplitN(s, "/", 2)[0] }
	under := func(s, dir string) bool { return s == dir || strings.HasPrefix(s, dir+"/") }
	for _, r := range roles {
		if under(pkg, r) {
			if under(dep, "internal/app") {
				return "roles never import the composition root"
			}
			for _, other := range roles {
				if other != r && under(dep, other) {
					return "roles meet through gossip and wire protocols, not imports"
				}
			}
		}
	}
	if under(pkg, "plugins") && top(dep) == "broker" {
		return "plugins are wired by the broker, never the reverse"
	}
	switch pkg {
	case "internal/config", "internal/obs", "internal/token", "internal/lifecycle":
		return "a leaf package imports nothing from rtm"
	case "internal/store", "internal/cluster":
		if dep != "internal/config" && dep != "internal/lifecycle" {
			return "may import only internal/config and internal/lifecycle"
		}
	}
	if !strings.HasPrefix(pkg, "internal/testutil") && !strings.HasSuffix(pkg, "storetest") && !strings.HasPrefix(pkg, "internal/testcluster") &&
		(under(dep, "internal/testutil") || strings.HasSuffix(dep, "storetest") || under(dep, "internal/testcluster")) {
		return "test helpers are for _test.go files only"
	}
	if under(dep, "internal/app") && !under(pkg, "cmd/rtm") && !under(pkg, "internal/testcluster") {
		return "only cmd/rtm uses the composition root"
	}
	return ""
}

func TestImportRulesCatchViolations(t *testing.T) {
	roles := []string{"broker", "router"}
	for _, c := range []struct {
		pkg, dep string
		bad      bool
	}{
		{"router", "broker", true},
		{"broker/link", "router", true},
		{"broker", "internal/app", true},
		{"internal/config", "internal/obs", true},
		{"internal/store", "internal/obs", true},
		{"broker", "internal/testutil", true},
		{"plugins/auth", "broker", true},
		{"broker", "internal/store", false},
		{"internal/store", "internal/config", false},
		{"cmd/rtm", "internal/app", false},
		{"internal/store/storetest", "internal/store", false},
	} {
		if got := forbidden(c.pkg, c.dep, roles) != ""; got != c.bad {
			t.Errorf("forbidden(%s → %s) = %v, want %v", c.pkg, c.dep, got, c.bad)
		}
	}
}
