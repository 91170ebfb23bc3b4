package broker

import (
	"encoding/json"
	"io"
	"net/http"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// SysAlertsTopic carries the watchdog's alerts to MQTT subscribers.
const SysAlertsTopic = "$SYS/rtm/alerts"

// maxSysAlertBody bounds a POST /v1/sys/alerts body.
const maxSysAlertBody = 64 << 10

// postSysAlert publishes the JSON body on $SYS/rtm/alerts to this node's
// subscribers (POST /v1/sys/alerts, admin key). Clients may not publish to
// $SYS, and $SYS is never forwarded between nodes (each node's $SYS is its
// own), so the watchdog posts each alert to every broker: a subscriber gets
// it once, from the node it is connected to.
func (a *adminServer) postSysAlert(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxSysAlertBody+1))
	if err != nil || len(body) > maxSysAlertBody || !json.Valid(body) {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "bad_request", "message": "want a JSON body of at most 64 KiB"})
		return
	}
	// A private inline client: mochi's own inline client would be listed
	// among the node's sessions and could be taken over by a device using
	// its client ID.
	cl := a.b.mq.NewClient(nil, mqtt.LocalListener, "$rtm-watchdog", true)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: SysAlertsTopic, Payload: body, PacketID: 1}
	if err := a.b.mq.InjectPacket(cl, pk); err != nil {
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "publish_failed", "message": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "published", "topic": SysAlertsTopic})
}
