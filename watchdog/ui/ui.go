// Package ui is the watchdog's dashboard: static HTML, CSS and JavaScript
// embedded in the binary and served by Handler. It has no build step and
// loads nothing from outside the watchdog, so it works offline; its data
// comes from the watchdog's /v1 API (docs/monitoring.md).
package ui

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/base64"
	"fmt"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"time"
)

//go:embed static
var static embed.FS

type file struct {
	body        []byte
	contentType string
	etag        string
}

// contentTypes are fixed here rather than taken from mime.TypeByExtension,
// which reads the system's tables: on some systems .js maps to text/plain,
// and with nosniff the browser would refuse the script.
var contentTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".svg":  "image/svg+xml",
}

// contentSecurityPolicy allows nothing but the watchdog itself: scripts and
// styles from its own files (no inline script), API calls to its own origin.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the dashboard: "/" is the page, the other files are beside
// it. Anything else is 404, so a mistyped API path is not answered with HTML.
func Handler() http.Handler {
	files := map[string]file{}
	err := fs.WalkDir(static, "static", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		body, err := static.ReadFile(p)
		if err != nil {
			return err
		}
		ct, ok := contentTypes[path.Ext(p)]
		if !ok {
			return fmt.Errorf("%s: no content type for its extension", p)
		}
		sum := sha256.Sum256(body)
		name := "/" + strings.TrimPrefix(p, "static/")
		files[name] = file{body: body, contentType: ct, etag: `"` + base64.RawURLEncoding.EncodeToString(sum[:12]) + `"`}
		return nil
	})
	if err != nil {
		// Only a file added to static/ with an extension missing from
		// contentTypes gets here, and every test of the package fails on it.
		panic("ui: " + err.Error())
	}
	files["/"] = files["/index.html"]
	delete(files, "/index.html")
	modTime := time.Time{} // ETags decide freshness; embedded files have no time
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		h := w.Header()
		h.Set("Content-Type", f.contentType)
		// The file names carry no version, so the browser revalidates every
		// time; an unchanged file costs a 304 (ETag is the content's hash,
		// so a new binary's files are fetched at once).
		h.Set("Cache-Control", "no-cache")
		h.Set("ETag", f.etag)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		if r.URL.Path == "/" {
			h.Set("Content-Security-Policy", contentSecurityPolicy)
			h.Set("X-Frame-Options", "DENY")
		}
		http.ServeContent(w, r, r.URL.Path, modTime, bytes.NewReader(f.body))
	})
}
