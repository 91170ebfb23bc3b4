package pushapi

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/x/mongo/driver/topology"

	"github.com/rtm-dev/rtm/internal/cluster"
	"github.com/rtm-dev/rtm/internal/store"
)

// storeSlots bounds the store calls the push API makes at once; requests
// beyond it wait for a slot, in no particular order. The driver's
// connection pool is larger (100 by default), so a call that has a slot
// gets a connection at once: without the bound, thousands of concurrent
// requests spent their whole deadline waiting for a pooled connection, and
// the driver then refused to send the query ("calculated server-side
// timeout (0 ms)"), which answered 503 although the store was healthy.
const storeSlots = 64

// storeQueueWait bounds a request's wait for a slot. It is longer than
// storeTimeout: a burst of thousands of requests arriving together is
// served at the store's pace (about a thousand device reads a second on the
// embedded store of a small machine) rather than refused after a few
// seconds.
const storeQueueWait = 10 * time.Second

// errSlotTimeout reports a request that waited storeQueueWait for a slot.
var errSlotTimeout = errors.New("pushapi: no store slot free within the store timeout")

// withStore runs f, the store work of one request, once a slot is free:
// the wait for the slot gets storeQueueWait, f storeTimeout. A failure is
// returned as the API error to answer with.
func (p *PushAPI) withStore(c echo.Context, f func(ctx context.Context) error) error {
	ctx := c.Request().Context()
	wait := time.NewTimer(storeQueueWait)
	defer wait.Stop()
	select {
	case p.storeSem <- struct{}{}:
	case <-wait.C:
		p.m.storeTimeouts.Inc()
		return p.storeError(errSlotTimeout)
	case <-ctx.Done():
		return p.storeError(ctx.Err())
	}
	defer func() { <-p.storeSem }()
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	if err := f(ctx); err != nil {
		e := p.storeError(err)
		if e.Code == CodeStoreTimeout {
			p.m.storeTimeouts.Inc()
		}
		return e
	}
	return nil
}

// storeError turns a store failure into 503: store_timeout when the store
// (or the queue for it) took longer than the store timeout, store_unavailable
// when it could not be reached or failed. The cause is logged, not sent.
func (p *PushAPI) storeError(err error) *Error {
	var sel topology.ServerSelectionError
	switch {
	case errors.Is(err, context.Canceled):
		return &Error{Status: http.StatusServiceUnavailable, Code: CodeStoreUnavailable,
			Message: "the request ended before the store answered", cause: err}
	case errors.As(err, &sel) || mongo.IsNetworkError(err) && !mongo.IsTimeout(err):
		// No server to send to: down, or unreachable.
	case errors.Is(err, errSlotTimeout):
		return &Error{Status: http.StatusServiceUnavailable, Code: CodeStoreTimeout, cause: err,
			Message: "timed out: too many requests were waiting for the store; retry"}
	case mongo.IsTimeout(err) || errors.Is(err, context.DeadlineExceeded):
		return &Error{Status: http.StatusServiceUnavailable, Code: CodeStoreTimeout, cause: err,
			Message: "timed out: the store did not answer within " + storeTimeout.String() + "; retry"}
	}
	return &Error{Status: http.StatusServiceUnavailable, Code: CodeStoreUnavailable,
		Message: "the store is unavailable; retry", cause: err}
}

// online says whether the device is connected now: its record says so,
// the broker that wrote it is alive in gossip (not leaving, left or
// failed), and it is the same process. A broker that was killed and
// started again under the same name is alive, but the connections its
// previous process recorded are gone.
func online(pr store.Presence, members []cluster.Member) bool {
	if !pr.Seen || !pr.Online || pr.Node == "" {
		return false
	}
	for _, m := range members {
		if m.Name != pr.Node || m.Tags.Role != cluster.RoleBroker {
			continue
		}
		if m.Status != cluster.StatusAlive {
			return false
		}
		// A record or a broker from before incarnations were recorded
		// cannot be told apart: gossip alone decides.
		return pr.Incarnation == "" || m.Tags.Incarnation == "" || pr.Incarnation == m.Tags.Incarnation
	}
	return false
}
