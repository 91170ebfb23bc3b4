package broker

import (
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"strings"
)

// adminAuth guards the admin port: everything but the probes and the
// metrics (openAdminPaths) needs "Authorization: Bearer <key>" with a key
// of broker.admin_keys. It lists what is open rather than what is
// protected, so an endpoint added later is protected until someone decides
// otherwise.
type adminAuth struct {
	keys [][sha256.Size]byte // SHA-256 of each key
	next http.Handler
}

// openAdminPaths are served without a key: load balancers, orchestrators
// and Prometheus probe them, and they disclose no device data (docs/security.md).
var openAdminPaths = map[string]bool{"/healthz": true, "/readyz": true, "/metrics": true}

func newAdminAuth(keys []string, next http.Handler) *adminAuth {
	a := &adminAuth{next: next}
	for _, k := range keys {
		a.keys = append(a.keys, sha256.Sum256([]byte(k)))
	}
	return a
}

func (a *adminAuth) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if openAdminPaths[r.URL.Path] && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		a.next.ServeHTTP(w, r)
		return
	}
	if len(a.keys) == 0 {
		writeJSON(w, http.StatusForbidden, map[string]string{"error": "admin_disabled",
			"message": "this broker has no admin key (broker.admin_keys): its /v1 endpoints are disabled"})
		return
	}
	h := r.Header.Get("Authorization")
	scheme, given, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		w.Header().Set("WWW-Authenticate", `Bearer realm="rtm-admin"`)
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "unauthorized",
			"message": "want the header Authorization: Bearer <admin key> (a key of broker.admin_keys)"})
		return
	}
	// Compared as SHA-256 digests in constant time, all keys every time,
	// so neither a key's content nor its length leaks through timing.
	sum := sha256.Sum256([]byte(strings.TrimSpace(given)))
	match := 0
	for i := range a.keys {
		match |= subtle.ConstantTimeCompare(sum[:], a.keys[i][:])
	}
	if match != 1 {
		w.Header().Set("WWW-Authenticate", `Bearer realm="rtm-admin", error="invalid_token"`)
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "unauthorized",
			"message": "the admin key is not valid"})
		return
	}
	a.next.ServeHTTP(w, r)
}
