package check

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/validation"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// root is the repository, two levels up from deploy/check.
const root = "../.."

func path(p string) string { return filepath.Join(root, filepath.FromSlash(p)) }

// knownEnv is every RTM_* variable rtm reads, from docs/configuration.md
// (generated from internal/config, checked there by a golden test).
func knownEnv(t *testing.T) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(path("docs/configuration.md"))
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]bool{}
	for _, m := range regexp.MustCompile("`(RTM_[A-Z0-9_]+)`").FindAllStringSubmatch(string(b), -1) {
		env[m[1]] = true
	}
	if len(env) < 20 {
		t.Fatalf("only %d RTM_ variables in docs/configuration.md: table format changed?", len(env))
	}
	return env
}

// checkEnv fails the test for a variable rtm does not read: a typo there
// is silently ignored by rtm (unknown RTM_ variables are left alone).
func checkEnv(t *testing.T, where string, names []string) {
	t.Helper()
	known := knownEnv(t)
	watchdogKnown := false
	for k := range known {
		watchdogKnown = watchdogKnown || strings.HasPrefix(k, "RTM_WATCHDOG_")
	}
	for _, n := range names {
		if !strings.HasPrefix(n, "RTM_") || known[n] {
			continue
		}
		if !watchdogKnown && strings.HasPrefix(n, "RTM_WATCHDOG_") {
			// The watchdog role's configuration is not on this branch yet.
			t.Logf("%s: %s not checked: no watchdog keys in docs/configuration.md yet", where, n)
			continue
		}
		t.Errorf("%s: %s is not a configuration variable of rtm (docs/configuration.md)", where, n)
	}
}

// TestComposeFile loads deploy/compose.yaml with compose-go, the loader of
// Docker Compose: schema validation (the compose-spec JSON schema it
// embeds), interpolation, anchors and merges, and consistency checks.
func TestComposeFile(t *testing.T) {
	file := path("deploy/compose.yaml")
	body, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(filepath.Dir(file))
	p, err := loader.LoadWithContext(context.Background(), types.ConfigDetails{
		WorkingDir:  abs,
		ConfigFiles: []types.ConfigFile{{Filename: file, Content: body}},
		Environment: types.Mapping{}, // the defaults in the file must suffice
	}, func(o *loader.Options) { o.SetProjectName("rtm", true) })
	if err != nil {
		t.Fatalf("compose.yaml: %v", err)
	}
	want := []string{"broker1", "broker2", "broker3", "mongo-init", "mongo1", "mongo2", "mongo3", "pushapi", "router", "watchdog"}
	if got := p.ServiceNames(); !slices.Equal(sorted(got), want) {
		t.Errorf("services %v, want %v", sorted(got), want)
	}
	roles := map[string]int{}
	published := map[string]string{}
	for name, s := range p.Services {
		for _, port := range s.Ports {
			key := port.HostIP + ":" + port.Published + "/" + port.Protocol
			if other, dup := published[key]; dup {
				t.Errorf("%s and %s both publish host port %s", other, name, key)
			}
			published[key] = name
		}
	}
	for name, s := range p.Services {
		if strings.HasPrefix(name, "mongo") {
			if name != "mongo-init" && !slices.Contains(s.Command, "--replSet") {
				t.Errorf("%s: mongod without --replSet", name)
			}
			continue
		}
		if len(s.Command) != 1 {
			t.Errorf("%s: command %v, want one role", name, s.Command)
			continue
		}
		roles[s.Command[0]]++
		var names []string
		for k := range s.Environment {
			names = append(names, k)
		}
		checkEnv(t, "compose.yaml "+name, names)
		uri := s.Environment["RTM_STORE_URI"]
		if uri == nil || !strings.Contains(*uri, "replicaSet=rs0") {
			t.Errorf("%s: RTM_STORE_URI %v does not name the replica set", name, uri)
		}
		if s.Environment["RTM_CLUSTER_SECRET"] == nil {
			t.Errorf("%s: no RTM_CLUSTER_SECRET", name)
		}
		if s.Command[0] != "broker" || name != "broker1" {
			if j := s.Environment["RTM_CLUSTER_JOIN"]; j == nil || *j == "" {
				t.Errorf("%s: no RTM_CLUSTER_JOIN", name)
			}
		}
	}
	if roles["broker"] != 3 || roles["router"] != 1 || roles["pushapi"] != 1 || roles["watchdog"] != 1 {
		t.Errorf("roles %v, want 3 brokers and one router, push API and watchdog", roles)
	}
}

func sorted(s []string) []string { s = slices.Clone(s); sort.Strings(s); return s }

// TestKubernetesManifests decodes every object of deploy/k8s strictly into
// the Kubernetes API types (unknown or duplicate fields and wrong types
// fail, as kubectl's client-side validation does), then checks what ties
// the objects together: selectors, the headless Service of the StatefulSet,
// the Secret's keys, and the variables rtm reads.
func TestKubernetesManifests(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := appsv1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := corev1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := policyv1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	decoder := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()

	var kust struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Resources  []string `json:"resources"`
	}
	kb, err := os.ReadFile(path("deploy/k8s/kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(kb, &kust); err != nil || kust.Kind != "Kustomization" {
		t.Fatalf("kustomization.yaml: %v (kind %q)", err, kust.Kind)
	}
	files, _ := filepath.Glob(path("deploy/k8s/*.yaml"))
	var listed []string
	for _, f := range files {
		if filepath.Base(f) != "kustomization.yaml" {
			listed = append(listed, filepath.Base(f))
		}
	}
	if !slices.Equal(sorted(kust.Resources), sorted(listed)) {
		t.Errorf("kustomization lists %v, the directory has %v", kust.Resources, listed)
	}

	var (
		services     []*corev1.Service
		secrets      = map[string]*corev1.Secret{}
		statefulSets []*appsv1.StatefulSet
		deployments  []*appsv1.Deployment
		budgets      []*policyv1.PodDisruptionBudget
	)
	for _, f := range listed {
		body, err := os.ReadFile(path("deploy/k8s/" + f))
		if err != nil {
			t.Fatal(err)
		}
		r := utilyaml.NewYAMLReader(bufioReader(body))
		for i := 0; ; i++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			obj, gvk, err := decoder.Decode(doc, nil, nil)
			if err != nil {
				t.Errorf("%s document %d: %v", f, i, err)
				continue
			}
			if m, ok := obj.(interface {
				GetName() string
				GetLabels() map[string]string
			}); ok {
				apiChecks(t, fmt.Sprintf("%s %s", gvk.Kind, m.GetName()), m.GetName(), m.GetLabels(), gvk.Kind == "Service")
			}
			switch o := obj.(type) {
			case *corev1.Service:
				services = append(services, o)
			case *corev1.Secret:
				secrets[o.Name] = o
			case *appsv1.StatefulSet:
				statefulSets = append(statefulSets, o)
			case *appsv1.Deployment:
				deployments = append(deployments, o)
			case *policyv1.PodDisruptionBudget:
				budgets = append(budgets, o)
			default:
				t.Errorf("%s document %d: unexpected kind %v", f, i, gvk)
			}
		}
	}
	if len(statefulSets) != 1 || len(deployments) != 3 {
		t.Fatalf("%d StatefulSets and %d Deployments, want the brokers' and router, pushapi, watchdog", len(statefulSets), len(deployments))
	}

	type workload struct {
		name     string
		selector map[string]string
		tmpl     corev1.PodTemplateSpec
	}
	var workloads []workload
	for _, s := range statefulSets {
		workloads = append(workloads, workload{"StatefulSet " + s.Name, s.Spec.Selector.MatchLabels, s.Spec.Template})
		var headless *corev1.Service
		for _, svc := range services {
			if svc.Name == s.Spec.ServiceName {
				headless = svc
			}
		}
		switch {
		case headless == nil:
			t.Errorf("StatefulSet %s: serviceName %q is no Service here", s.Name, s.Spec.ServiceName)
		case headless.Spec.ClusterIP != corev1.ClusterIPNone:
			t.Errorf("Service %s: the StatefulSet's service must be headless (clusterIP: None) for gossip join", headless.Name)
		case !headless.Spec.PublishNotReadyAddresses:
			t.Errorf("Service %s: publishNotReadyAddresses must be true, or the first broker finds no one to join", headless.Name)
		}
	}
	for _, d := range deployments {
		workloads = append(workloads, workload{"Deployment " + d.Name, d.Spec.Selector.MatchLabels, d.Spec.Template})
	}
	for _, w := range workloads {
		if len(w.selector) == 0 || !subset(w.selector, w.tmpl.Labels) {
			t.Errorf("%s: selector %v does not match its pod labels %v", w.name, w.selector, w.tmpl.Labels)
		}
		apiChecks(t, w.name+" pod template", "", w.tmpl.Labels, false)
		for _, c := range w.tmpl.Spec.Containers {
			for _, p := range c.Ports {
				for _, msg := range validation.IsValidPortName(p.Name) {
					t.Errorf("%s: port name %q: %s", w.name, p.Name, msg)
				}
			}
			for _, e := range c.Env {
				for _, msg := range validation.IsEnvVarName(e.Name) {
					t.Errorf("%s: variable %q: %s", w.name, e.Name, msg)
				}
			}
			var names []string
			defined := map[string]bool{}
			for _, e := range c.Env {
				names = append(names, e.Name)
				for _, ref := range regexp.MustCompile(`\$\(([A-Z_]+)\)`).FindAllStringSubmatch(e.Value, -1) {
					if !defined[ref[1]] {
						t.Errorf("%s: %s uses $(%s) before it is defined", w.name, e.Name, ref[1])
					}
				}
				defined[e.Name] = true
				if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
					ref := e.ValueFrom.SecretKeyRef
					s := secrets[ref.Name]
					if s == nil {
						t.Errorf("%s: %s from Secret %q, which is not here", w.name, e.Name, ref.Name)
					} else if _, ok := s.StringData[ref.Key]; !ok {
						t.Errorf("%s: %s from key %q that Secret %s lacks", w.name, e.Name, ref.Key, ref.Name)
					}
				}
			}
			checkEnv(t, w.name, names)
			if !defined["RTM_CLUSTER_JOIN"] || !defined["RTM_CLUSTER_SECRET"] {
				t.Errorf("%s: needs RTM_CLUSTER_JOIN and RTM_CLUSTER_SECRET", w.name)
			}
			ports := map[string]bool{}
			for _, p := range c.Ports {
				ports[p.Name] = true
			}
			for _, probe := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe} {
				if probe == nil || probe.HTTPGet == nil {
					t.Errorf("%s: container %s lacks an HTTP readiness or liveness probe", w.name, c.Name)
				} else if !ports[probe.HTTPGet.Port.StrVal] {
					t.Errorf("%s: probe port %q is no named port of %s", w.name, probe.HTTPGet.Port.StrVal, c.Name)
				}
			}
		}
	}
	for _, svc := range services {
		var pods []corev1.PodTemplateSpec
		for _, w := range workloads {
			if subset(svc.Spec.Selector, w.tmpl.Labels) {
				pods = append(pods, w.tmpl)
			}
		}
		if len(pods) == 0 {
			t.Errorf("Service %s: selector %v matches no pods here", svc.Name, svc.Spec.Selector)
		}
		// A named target port must be a port of every pod it selects.
		for _, sp := range svc.Spec.Ports {
			if sp.TargetPort.StrVal == "" {
				continue
			}
			for _, pod := range pods {
				found := false
				for _, c := range pod.Spec.Containers {
					for _, cp := range c.Ports {
						found = found || cp.Name == sp.TargetPort.StrVal
					}
				}
				if !found {
					t.Errorf("Service %s: target port %q is not a port of its pods", svc.Name, sp.TargetPort.StrVal)
				}
			}
		}
	}
	for _, b := range budgets {
		if b.Spec.Selector == nil || !subset(b.Spec.Selector.MatchLabels, statefulSets[0].Spec.Template.Labels) {
			t.Errorf("PodDisruptionBudget %s does not select the brokers", b.Name)
		}
	}
	if len(budgets) != 1 {
		t.Errorf("%d PodDisruptionBudgets, want one for the brokers", len(budgets))
	}
	for _, s := range secrets {
		for k, v := range s.StringData {
			if !strings.Contains(v, "change-me") {
				t.Errorf("Secret %s key %s: not a placeholder: never commit a real secret", s.Name, k)
			}
		}
	}
}

// apiChecks applies the API server's rules for names and labels, which
// strict decoding does not: a Service's name is a DNS-1035 label, other
// names DNS-1123 subdomains, label keys qualified names.
func apiChecks(t *testing.T, what, name string, labels map[string]string, service bool) {
	t.Helper()
	if name != "" {
		msgs := validation.IsDNS1123Subdomain(name)
		if service {
			msgs = validation.IsDNS1035Label(name)
		}
		for _, msg := range msgs {
			t.Errorf("%s: name: %s", what, msg)
		}
	}
	for k, v := range labels {
		for _, msg := range append(validation.IsQualifiedName(k), validation.IsValidLabelValue(v)...) {
			t.Errorf("%s: label %s=%s: %s", what, k, v, msg)
		}
	}
}

func subset(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func stripComments(doc []byte) []byte {
	var out []byte
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l...)
			out = append(out, '\n')
		}
	}
	return out
}

// definedMetrics scans rtm's sources for the metric names it defines.
func definedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	re := regexp.MustCompile(`"(rtm_[a-z0-9_]+)"`)
	names := map[string]bool{}
	for _, dir := range []string{"broker", "router", "pushapi", "plugins", "internal", "watchdog"} {
		err := filepath.WalkDir(path(dir), func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			src := string(b)
			// Only names given to the Prometheus client count.
			if !strings.Contains(src, "prometheus.") {
				return nil
			}
			for _, m := range re.FindAllStringSubmatch(src, -1) {
				names[m[1]] = true
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(names) < 40 {
		t.Fatalf("found only %d rtm_ metrics in the sources: scan broken?", len(names))
	}
	return names
}

// watchdogDefined tells whether the sources define the watchdog's metrics.
// Until the watchdog role is merged, its names (docs/watchdog.md) are taken
// on trust; from then on they are checked like every other.
func watchdogDefined(defined map[string]bool) bool {
	for name := range defined {
		if strings.HasPrefix(name, "rtm_watchdog_") {
			return true
		}
	}
	return false
}

// metricExists tells whether a series name of a query is one rtm exports:
// a defined metric, a histogram's series, or the Go and process
// collectors' (every role registers them) and Prometheus's own up.
func metricExists(defined map[string]bool, name string) bool {
	if strings.HasPrefix(name, "rtm_watchdog_") && !watchdogDefined(defined) {
		return true // the watchdog role is not on this branch yet
	}
	if defined[name] || name == "up" || strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") {
		return true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if strings.HasSuffix(name, suffix) && defined[strings.TrimSuffix(name, suffix)] {
			return true
		}
	}
	return false
}

func queryMetrics(t *testing.T, p parser.Parser, expr string) []string {
	t.Helper()
	e, err := p.ParseExpr(expr)
	if err != nil {
		t.Errorf("query %q: %v", expr, err)
		return nil
	}
	var names []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			names = append(names, vs.Name)
		}
		return nil
	})
	return names
}

// TestPrometheusRules parses deploy/prometheus/alerts.yml with Prometheus's
// rule parser, as promtool check rules does (YAML fields, PromQL, label
// and annotation templates), and checks that every series it queries is
// one rtm exports.
func TestPrometheusRules(t *testing.T) {
	p := parser.NewParser(parser.Options{})
	groups, errs := rulefmt.ParseFile(path("deploy/prometheus/alerts.yml"), false, model.UTF8Validation, p, slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Error(err)
	}
	if groups == nil {
		t.FailNow()
	}
	defined := definedMetrics(t)
	rules := map[string]bool{}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			for _, name := range queryMetrics(t, p, r.Expr) {
				if !metricExists(defined, name) {
					t.Errorf("alert %s queries %s, which rtm does not export", r.Alert, name)
				}
			}
			if r.Labels["rule"] != "" {
				rules[r.Labels["rule"]] = true
			}
		}
	}
	// Each default rule of the watchdog has its mirror, except the one
	// without a metric (history_backlog_over; the file says why).
	for _, r := range []string{"node_down", "node_not_ready", "cluster_size_below", "connections_over_capacity_pct",
		"memory_over_bytes", "dropped_messages_rate", "link_down", "link_queue_over_bytes", "store_unreachable", "load_imbalance"} {
		if !rules[r] {
			t.Errorf("no alert mirrors the watchdog's rule %s", r)
		}
	}

	// The scrape configuration loads these rules and names the jobs they use.
	var cfg struct {
		RuleFiles     []string `json:"rule_files"`
		ScrapeConfigs []struct {
			JobName string `json:"job_name"`
		} `json:"scrape_configs"`
	}
	b, err := os.ReadFile(path("deploy/prometheus/prometheus.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("prometheus.yml: %v", err)
	}
	var jobs []string
	for _, s := range cfg.ScrapeConfigs {
		jobs = append(jobs, s.JobName)
	}
	if !slices.Equal(cfg.RuleFiles, []string{"alerts.yml"}) || !slices.Equal(sorted(jobs), []string{"rtm-broker", "rtm-pushapi", "rtm-router", "rtm-watchdog"}) {
		t.Errorf("prometheus.yml: rule files %v, jobs %v", cfg.RuleFiles, jobs)
	}
}

// TestGrafanaDashboard parses every query of deploy/grafana/rtm.json with
// the PromQL parser and checks its series exist, and that the panels are
// laid out without ids repeated.
func TestGrafanaDashboard(t *testing.T) {
	b, err := os.ReadFile(path("deploy/grafana/rtm.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string `json:"uid"`
		Title  string `json:"title"`
		Panels []struct {
			ID      int    `json:"id"`
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
			GridPos struct{ H, W, X, Y int } `json:"gridPos"`
		} `json:"panels"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&dash); err != nil {
		t.Fatalf("rtm.json: %v", err)
	}
	if dash.UID == "" || dash.Title == "" || len(dash.Panels) < 10 {
		t.Fatalf("rtm.json: uid %q title %q, %d panels", dash.UID, dash.Title, len(dash.Panels))
	}
	p := parser.NewParser(parser.Options{})
	defined := definedMetrics(t)
	ids := map[int]bool{}
	// Grafana's variables, replaced as Grafana would before the query runs.
	vars := strings.NewReplacer("$__rate_interval", "1m", "$__interval", "15s", "$__range", "1h")
	for _, panel := range dash.Panels {
		if ids[panel.ID] {
			t.Errorf("panel id %d repeated", panel.ID)
		}
		ids[panel.ID] = true
		if panel.GridPos.W <= 0 || panel.GridPos.X+panel.GridPos.W > 24 {
			t.Errorf("panel %q: gridPos %+v outside the 24 columns", panel.Title, panel.GridPos)
		}
		if panel.Type != "row" && len(panel.Targets) == 0 {
			t.Errorf("panel %q has no query", panel.Title)
		}
		for _, tg := range panel.Targets {
			for _, name := range queryMetrics(t, p, vars.Replace(tg.Expr)) {
				if !metricExists(defined, name) {
					t.Errorf("panel %q queries %s, which rtm does not export", panel.Title, name)
				}
			}
		}
	}
}

// TestMonitoringDocListsEveryMetric keeps docs/monitoring.md complete: each
// metric rtm defines is described there, and each one described exists.
func TestMonitoringDocListsEveryMetric(t *testing.T) {
	b, err := os.ReadFile(path("docs/monitoring.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	defined := definedMetrics(t)
	for name := range defined {
		if !strings.Contains(doc, "`"+name+"`") {
			t.Errorf("docs/monitoring.md does not describe %s", name)
		}
	}
	for _, m := range regexp.MustCompile("`(rtm_[a-z0-9_]+)`").FindAllStringSubmatch(doc, -1) {
		name := m[1]
		if defined[name] {
			continue
		}
		if !watchdogDefined(defined) && strings.HasPrefix(name, "rtm_watchdog_") {
			continue // the watchdog role is not on this branch yet
		}
		t.Errorf("docs/monitoring.md describes %s, which rtm does not define", name)
	}
}

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(b)) }
