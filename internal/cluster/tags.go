package cluster

import (
	"fmt"
	"net"
	"strconv"
)

// Roles a member can have (the Serf tag "role").
const (
	RoleBroker   = "broker"
	RoleRouter   = "router"
	RolePushAPI  = "pushapi"
	RoleWatchdog = "watchdog"
)

// Tags are what a member tells the cluster about itself. They travel as Serf
// tags, whose total encoded size is limited to 512 bytes, so keys are short.
type Tags struct {
	Role        string // one of the Role constants
	Version     string
	MQTT        string // public host:port of the MQTT/TCP listener, brokers only
	WS          string // public host:port of the WebSocket listener
	TLS         string // public host:port of the TLS listener
	WSS         string // public host:port of the secure WebSocket listener
	Link        string // host:port of the node link, brokers only
	Admin       string // host:port of the admin HTTP server
	Capacity    int    // connections the broker accepts
	Connections int    // connections at the last tag update
	LoadAt      int64  // unix seconds when Connections was measured; refreshed even when unchanged
	Draining    bool   // the broker takes no new devices
	// Incarnation identifies the broker process: it changes when a broker
	// starts again under the same name, so the connections the previous
	// process recorded in the store can be told from the current ones.
	Incarnation string
	// Protocol is the version of the node-link messages the broker
	// understands (0: a release from before it was advertised). A sender
	// uses a message or field only when the receiver's version has it.
	Protocol int
}

// Encode returns the tags as a Serf tag map; empty fields are left out.
func (t Tags) Encode() map[string]string {
	m := map[string]string{"role": t.Role}
	set := func(k, v string) {
		if v != "" {
			m[k] = v
		}
	}
	set("ver", t.Version)
	set("mqtt", t.MQTT)
	set("ws", t.WS)
	set("tls", t.TLS)
	set("wss", t.WSS)
	set("link", t.Link)
	set("admin", t.Admin)
	set("inc", t.Incarnation)
	if t.Capacity > 0 {
		m["cap"] = strconv.Itoa(t.Capacity)
	}
	if t.Connections > 0 {
		m["conns"] = strconv.Itoa(t.Connections)
	}
	if t.LoadAt > 0 {
		m["lt"] = strconv.FormatInt(t.LoadAt, 10)
	}
	if t.Draining {
		m["drain"] = "1"
	}
	if t.Protocol > 0 {
		m["cp"] = strconv.Itoa(t.Protocol)
	}
	return m
}

// DecodeTags reads tags written by Encode. Unknown keys are ignored, so a
// newer member's extra tags do not break an older one.
func DecodeTags(m map[string]string) (Tags, error) {
	t := Tags{Role: m["role"], Version: m["ver"], MQTT: m["mqtt"], WS: m["ws"], TLS: m["tls"], WSS: m["wss"],
		Link: m["link"], Admin: m["admin"], Draining: m["drain"] == "1", Incarnation: m["inc"]}
	num := func(k string) (int, error) {
		v, ok := m[k]
		if !ok {
			return 0, nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("cluster: tag %s=%q: want a non-negative integer", k, v)
		}
		return n, nil
	}
	var err error
	if t.Capacity, err = num("cap"); err != nil {
		return t, err
	}
	if t.Connections, err = num("conns"); err != nil {
		return t, err
	}
	if t.Protocol, err = num("cp"); err != nil {
		return t, err
	}
	if v, ok := m["lt"]; ok {
		if t.LoadAt, err = strconv.ParseInt(v, 10, 64); err != nil || t.LoadAt < 0 {
			return t, fmt.Errorf("cluster: tag lt=%q: want unix seconds", v)
		}
	}
	return t, nil
}

// PublicAddr is the address other members and devices reach a listener
// bound at bound: bound itself, or, when it binds to every interface, the
// same port on advertiseHost, else on the host of gossip (the member's
// advertised gossip address). "" stays "".
func PublicAddr(bound, advertiseHost, gossip string) string {
	host, port, err := net.SplitHostPort(bound)
	if err != nil {
		return bound
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		h := advertiseHost
		if h == "" {
			h, _, _ = net.SplitHostPort(gossip)
		}
		if h != "" {
			return net.JoinHostPort(h, port)
		}
	}
	return bound
}
