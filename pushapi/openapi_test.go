package pushapi

import (
	"encoding/json"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/rtm-dev/rtm/internal/config"
)

// openAPIDoc is the part of openapi.json these tests read without an
// OpenAPI library (openapi_kin_test.go validates the whole document).
type openAPIDoc struct {
	OpenAPI    string                                `json:"openapi"`
	Paths      map[string]map[string]json.RawMessage `json:"paths"`
	Components struct {
		Schemas struct {
			Error struct {
				Properties struct {
					Error struct {
						Properties struct {
							Code struct {
								Enum []string `json:"enum"`
							} `json:"code"`
						} `json:"properties"`
					} `json:"error"`
				} `json:"properties"`
			} `json:"Error"`
		} `json:"schemas"`
	} `json:"components"`
}

func loadDoc(t *testing.T) openAPIDoc {
	t.Helper()
	var d openAPIDoc
	if err := json.Unmarshal(OpenAPI, &d); err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	if !strings.HasPrefix(d.OpenAPI, "3.0.") {
		t.Fatalf("openapi.json is OpenAPI %q, want 3.0.x", d.OpenAPI)
	}
	return d
}

// operations returns "METHOD /path" for every operation of the document.
func (d openAPIDoc) operations() []string {
	var ops []string
	for path, item := range d.Paths {
		for method := range item {
			switch method {
			case "get", "put", "post", "delete", "patch", "head", "options", "trace":
				ops = append(ops, strings.ToUpper(method)+" "+path)
			}
		}
	}
	slices.Sort(ops)
	return ops
}

// newUnstarted builds a PushAPI that is never started (and has no store):
// its routes exist.
func newUnstarted(t testing.TB) *PushAPI {
	t.Helper()
	cfg := config.Defaults()
	cfg.PushAPI.APIKeys = "0123456789abcdef"
	cfg.Auth.TokenKeys = "0123456789abcdef"
	p, err := New(Options{Config: cfg.PushAPI, Auth: cfg.Auth, AdminKey: "0123456789abcdef", Cluster: cfg.Cluster})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var echoParam = regexp.MustCompile(`:([A-Za-z0-9_]+)`)

// TestOpenAPIMatchesRoutes: every route registered in Echo is in the
// document with the same method and path, and every operation of the
// document is a route.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	p := newUnstarted(t)
	var routes []string
	for _, r := range p.e.Routes() {
		routes = append(routes, r.Method+" "+echoParam.ReplaceAllString(r.Path, "{$1}"))
	}
	slices.Sort(routes)
	ops := loadDoc(t).operations()
	for _, r := range routes {
		if !slices.Contains(ops, r) {
			t.Errorf("route %s is not in openapi.json", r)
		}
	}
	for _, o := range ops {
		if !slices.Contains(routes, o) {
			t.Errorf("openapi.json has %s, which is not a route", o)
		}
	}
}

// TestErrorCodesDocumented: the codes of ErrorCodes are the codes of the
// document's Error schema, and docs/api.md's table gives each its status.
func TestErrorCodesDocumented(t *testing.T) {
	var codes []string
	for _, c := range ErrorCodes {
		codes = append(codes, c.Code)
		if c.Status < 400 || c.When == "" || http.StatusText(c.Status) == "" {
			t.Errorf("code %s: status %d, description %q", c.Code, c.Status, c.When)
		}
	}
	if enum := loadDoc(t).Components.Schemas.Error.Properties.Error.Properties.Code.Enum; !slices.Equal(enum, codes) {
		t.Errorf("openapi.json Error.code enum %v, want ErrorCodes %v", enum, codes)
	}
	docs := readDocs(t)
	for _, c := range ErrorCodes {
		row := regexp.MustCompile("(?m)^\\|\\s*" + strconv.Itoa(c.Status) + "\\s*\\|\\s*`" + regexp.QuoteMeta(c.Code) + "`\\s*\\|")
		if !row.MatchString(docs) {
			t.Errorf("docs/api.md has no error table row | %d | `%s` |", c.Status, c.Code)
		}
	}
}

// TestDocsCoverOpenAPI: docs/api.md mentions every operation of the
// document, as "METHOD /path".
func TestDocsCoverOpenAPI(t *testing.T) {
	docs := readDocs(t)
	for _, op := range loadDoc(t).operations() {
		if !strings.Contains(docs, op) {
			t.Errorf("docs/api.md does not mention %s", op)
		}
	}
}

func readDocs(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../docs/api.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
