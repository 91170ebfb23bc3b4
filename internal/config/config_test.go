package config_test

import (
	"flag"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rtm-dev/rtm/internal/config"
	"github.com/spf13/pflag"
)

var update = flag.Bool("update", false, "rewrite golden files and docs/configuration.md")

const testdata = "../../testdata/config"

func TestPrecedenceFlagOverEnvOverFileOverDefault(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "rtm.yaml")
	if err := os.WriteFile(file, []byte("broker:\n  capacity: 10\n  node_name: from-file\n  admin_addr: 127.0.0.1:9999\nlog:\n  level: warn\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	config.AddFlags(fs, config.Defaults(), "capacity", "node-name", "log-level")
	if err := fs.Parse([]string{"--capacity", "30"}); err != nil {
		t.Fatal(err)
	}
	env := []string{"RTM_BROKER_CAPACITY=20", "RTM_BROKER_NODE_NAME=from-env", "RTM_UNRELATED=1"}
	cfg, err := config.Load(config.Defaults(), config.Source{File: file, Env: env, Flags: fs})
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		key       string
		got, want any
	}{
		{"broker.capacity (flag)", cfg.Broker.Capacity, 30},
		{"broker.node_name (env)", cfg.Broker.NodeName, "from-env"},
		{"broker.admin_addr (file)", cfg.Broker.AdminAddr, "127.0.0.1:9999"},
		{"log.level (file; flag registered but not set)", cfg.Log.Level, "warn"},
		{"broker.mqtt_addr (default)", cfg.Broker.MQTTAddr, ":1883"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.key, c.got, c.want)
		}
	}
}

func TestFullFile(t *testing.T) {
	cfg, err := config.Load(config.Defaults(), config.Source{File: filepath.Join(testdata, "full.yaml")})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Store.ConnectTimeout != 5*time.Second || cfg.Broker.KeepaliveMax != 10*time.Minute || cfg.Broker.BackpressureMaxWait != 250*time.Millisecond || cfg.Broker.WriteCoalesce != 100*time.Microsecond || cfg.Log.Format != "json" {
		t.Fatalf("durations or strings not loaded: %+v", cfg)
	}
}

// TestInvalidValues checks that every problem is reported at once, each with
// its key, its value and its origin.
func TestInvalidValues(t *testing.T) {
	file := filepath.Join(testdata, "bad.yaml")
	_, err := config.Load(config.Defaults(), config.Source{File: file})
	if err == nil {
		t.Fatal("bad.yaml loaded without error")
	}
	lines := strings.Split(strings.ReplaceAll(err.Error(), file, "testdata/config/bad.yaml"), "\n")
	sort.Strings(lines)
	golden(t, filepath.Join(testdata, "bad.golden"), strings.Join(lines, "\n")+"\n")
}

func TestInvalidEnvAndFlag(t *testing.T) {
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	config.AddFlags(fs, config.Defaults(), "mqtt-addr")
	if err := fs.Parse([]string{"--mqtt-addr", "nonsense"}); err != nil {
		t.Fatal(err)
	}
	_, err := config.Load(config.Defaults(), config.Source{Env: []string{"RTM_STORE_CONNECT_TIMEOUT=soon"}, Flags: fs})
	for _, want := range []string{
		`store.connect_timeout: invalid value "soon" (from environment RTM_STORE_CONNECT_TIMEOUT)`,
		`broker.mqtt_addr: invalid value "nonsense" (from flag --mqtt-addr): want host:port`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not contain %q", err, want)
		}
	}
}

func TestMaskedHidesPasswords(t *testing.T) {
	cfg := config.Defaults()
	cfg.Store.URI = "mongodb://rtm:hunter2@db.example:27017/?replicaSet=rs0"
	out := string(cfg.Masked().YAML())
	if strings.Contains(out, "hunter2") {
		t.Fatalf("password printed:\n%s", out)
	}
	if !strings.Contains(out, "mongodb://rtm:xxxxx@db.example:27017/?replicaSet=rs0") {
		t.Fatalf("masked URI not readable:\n%s", out)
	}
	if cfg.Store.URI != "mongodb://rtm:hunter2@db.example:27017/?replicaSet=rs0" {
		t.Fatal("Masked changed its receiver")
	}
}

// TestYAMLRoundTrip proves that `rtm config` output is a valid config file
// that loads back to the same values.
func TestYAMLRoundTrip(t *testing.T) {
	want, err := config.Load(config.Defaults(), config.Source{File: filepath.Join(testdata, "full.yaml")})
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "effective.yaml")
	if err := os.WriteFile(file, want.YAML(), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := config.Load(config.Defaults(), config.Source{File: file})
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("round trip changed the config:\n got %+v\nwant %+v", got, want)
	}
	golden(t, filepath.Join(testdata, "defaults.golden.yaml"), string(config.Defaults().YAML()))
}

func TestMaskURI(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"mongodb://127.0.0.1:27017/", "mongodb://127.0.0.1:27017/"},
		{"mongodb://user@h/", "mongodb://user@h/"},
		{"mongodb://user:@h/", "mongodb://user:@h/"},
		{"mongodb://user:pass@h:27017/db", "mongodb://user:xxxxx@h:27017/db"},
		{"mongodb://user:pass@h1:1,h2:2,h3:3/db?replicaSet=rs0&authSource=admin", "mongodb://user:xxxxx@h1:1,h2:2,h3:3/db?replicaSet=rs0&authSource=admin"},
		{"mongodb+srv://user:p%40ss@cluster.example.com/?retryWrites=true", "mongodb+srv://user:xxxxx@cluster.example.com/?retryWrites=true"},
		{"mongodb://user:p@ss:w@rd@h/db", "mongodb://user:xxxxx@h/db"},
		{"mongodb://user:pa/ss?#@h/db", "mongodb://user:xxxxx@h/db"},
		{"mongodb://user:pass@h/db?appName=a@b", "mongodb://user:xxxxx@h/db?appName=a@b"},
		{"mongodb://h", "mongodb://h"},
		{"not a uri", "not a uri"},
	} {
		if got := config.MaskURI(tc.in); got != tc.want {
			t.Errorf("MaskURI(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestDocsTable keeps docs/configuration.md equal to the code's keys and
// defaults; run with -update to regenerate it.
func TestDocsTable(t *testing.T) {
	const path = "../../docs/configuration.md"
	const begin, end = "<!-- BEGIN GENERATED TABLE -->\n", "<!-- END GENERATED TABLE -->"
	doc, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := string(doc)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		t.Fatalf("%s lacks the generated-table markers", path)
	}
	want := s[:i+len(begin)] + config.Markdown() + s[j:]
	if s == want {
		return
	}
	if *update {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("%s is out of date with the code: run go test ./internal/config -update", path)
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Fatalf("%s differs (run with -update if the change is right)\n got:\n%s\nwant:\n%s", path, got, want)
	}
}
