// Package ui is the watchdog's dashboard: static files embedded in the
// binary, served at / by the watchdog. This is a placeholder until the
// dashboard lands; it keeps the package path and signature the watchdog
// mounts.
package ui

import (
	"net/http"
)

const index = `<!doctype html><html><head><meta charset="utf-8"><title>rtm watchdog</title></head><body><h1>rtm watchdog</h1><p>Dashboard coming; the API is at /v1/nodes, /v1/alerts, /v1/series and /v1/events.</p></body></html>
`

// Handler serves the dashboard.
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" && r.URL.Path != "/index.html" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte(index))
	})
}
