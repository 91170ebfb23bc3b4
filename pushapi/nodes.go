package pushapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/rtm-dev/rtm/internal/cluster"
)

// adminTimeout bounds one call to a broker's admin endpoint.
const adminTimeout = 3 * time.Second

// errUnknownClient reports that the broker holds no session (or, for a
// kick, no connection) for the client.
var errUnknownClient = errors.New("the broker holds no such client")

// nodeAdmin calls the admin HTTP endpoints of brokers (SPEC: the broker's
// Tags.Admin address), which act on the clients connected there.
type nodeAdmin struct {
	http *http.Client
	key  string // broker.admin_keys, sent as a bearer token
}

func newNodeAdmin(key string) *nodeAdmin {
	return &nodeAdmin{key: key, http: &http.Client{
		Timeout:   adminTimeout,
		Transport: &http.Transport{MaxIdleConnsPerHost: 8, IdleConnTimeout: 30 * time.Second},
	}}
}

func (a *nodeAdmin) close() { a.http.CloseIdleConnections() }

// subscribe makes the node subscribe the client to filter.
func (a *nodeAdmin) subscribe(ctx context.Context, admin, clientID, filter string, qos byte) error {
	body, _ := json.Marshal(map[string]any{"filter": filter, "qos": qos})
	return a.call(ctx, http.MethodPost, admin, "/v1/clients/"+url.PathEscape(clientID)+"/subscriptions", body)
}

// unsubscribe makes the node unsubscribe the client from filter; a client
// that is not subscribed is not an error.
func (a *nodeAdmin) unsubscribe(ctx context.Context, admin, clientID, filter string) error {
	return a.call(ctx, http.MethodDelete, admin,
		"/v1/clients/"+url.PathEscape(clientID)+"/subscriptions?filter="+url.QueryEscape(filter), nil)
}

// disconnect makes the node disconnect the client (v5: DISCONNECT 0x98).
func (a *nodeAdmin) disconnect(ctx context.Context, admin, clientID string) error {
	return a.call(ctx, http.MethodPost, admin, "/v1/clients/"+url.PathEscape(clientID)+"/disconnect", nil)
}

// call returns nil on 2xx, errUnknownClient on 404, another error
// otherwise (the node is unreachable or failing).
func (a *nodeAdmin) call(ctx context.Context, method, admin, path string, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, adminTimeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+admin+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+a.key)
	res, err := a.http.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
	switch {
	case res.StatusCode/100 == 2:
		return nil
	case res.StatusCode == http.StatusNotFound:
		var e struct {
			Error string `json:"error"`
		}
		_ = json.Unmarshal(msg, &e)
		return fmt.Errorf("%w (%s)", errUnknownClient, e.Error)
	}
	return fmt.Errorf("%s %s: status %d: %s", method, path, res.StatusCode, bytes.TrimSpace(msg))
}

// brokerAdmin returns the admin address of the broker called name if gossip
// sees it alive (or leaving: it still serves its clients while it drains).
func brokerAdmin(members []cluster.Member, name string) (string, bool) {
	if name == "" {
		return "", false
	}
	for _, m := range members {
		if m.Name == name && m.Tags.Role == cluster.RoleBroker && m.Tags.Admin != "" &&
			(m.Status == cluster.StatusAlive || m.Status == cluster.StatusLeaving) {
			return m.Tags.Admin, true
		}
	}
	return "", false
}
