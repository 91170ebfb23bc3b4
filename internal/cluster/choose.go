package cluster

import (
	"math/rand/v2"
	"net"
)

// Transports a broker may offer devices, and the router's transport names.
const (
	TransportTCP = "tcp"
	TransportWS  = "ws"
	TransportTLS = "tls"
	TransportWSS = "wss"
)

// Transports lists every transport name.
var Transports = []string{TransportTCP, TransportWS, TransportTLS, TransportWSS}

// Endpoint returns the public host:port of the broker's listener for
// transport, or "" if it does not offer it.
func (t Tags) Endpoint(transport string) string {
	switch transport {
	case TransportTCP:
		return t.MQTT
	case TransportWS:
		return t.WS
	case TransportTLS:
		return t.TLS
	case TransportWSS:
		return t.WSS
	}
	return ""
}

// URL is the URL a device connects to for transport at addr (host:port):
// mqtt://, ws://…/mqtt, mqtts:// or wss://…/mqtt.
func URL(transport, addr string) string {
	switch transport {
	case TransportWS:
		return "ws://" + addr + "/mqtt"
	case TransportTLS:
		return "mqtts://" + addr
	case TransportWSS:
		return "wss://" + addr + "/mqtt"
	}
	return "mqtt://" + addr
}

// SplitEndpoint splits host:port for a route answer; port is 0 if absent.
func SplitEndpoint(addr string) (host string, port int) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return addr, 0
	}
	for _, c := range p {
		if c < '0' || c > '9' {
			return h, 0
		}
		port = port*10 + int(c-'0')
	}
	return h, port
}

// Eligible reports whether m may be given new devices over transport: an
// alive broker, not draining, offering that transport, with room left.
func Eligible(m Member, transport string) bool {
	return m.Status == StatusAlive && m.Tags.Role == RoleBroker && !m.Tags.Draining &&
		m.Tags.Endpoint(transport) != "" && m.Tags.Capacity > 0
}

// PickOptions refine Pick.
type PickOptions struct {
	// Exclude names a member never to pick (the asking broker itself).
	Exclude string
	// Extra returns connections to add to a member's reported ones: the
	// router's own assignments since the member's last load report.
	Extra func(name string) int
	// Stale reports that a member's load figure is too old to trust: such
	// members are picked only when no member with a fresh figure is
	// eligible.
	Stale func(name string) bool
	// IntN picks among equally loaded members; nil means math/rand/v2.
	IntN func(n int) int
}

// Pick returns the least-loaded eligible broker for transport, by
// connections relative to capacity, so a broker that just joined (no
// connections) is picked first. Members at capacity are not picked. Ties are
// broken at random, so equal brokers share a burst evenly.
func Pick(members []Member, transport string, o PickOptions) (Member, bool) {
	intN := o.IntN
	if intN == nil {
		intN = rand.IntN
	}
	best, ties := -1, 0
	var bestLoad float64
	bestStale := true
	for i, m := range members {
		if m.Name == o.Exclude || !Eligible(m, transport) {
			continue
		}
		conns := m.Tags.Connections
		if o.Extra != nil {
			conns += o.Extra(m.Name)
		}
		if conns >= m.Tags.Capacity {
			continue
		}
		load := float64(conns) / float64(m.Tags.Capacity)
		stale := o.Stale != nil && o.Stale(m.Name)
		switch {
		case best < 0 || (bestStale && !stale) || (stale == bestStale && load < bestLoad):
			best, bestLoad, bestStale, ties = i, load, stale, 1
		case stale == bestStale && load == bestLoad:
			// Reservoir sampling: each of the tied members is kept with
			// probability 1/ties.
			ties++
			if intN(ties) == 0 {
				best = i
			}
		}
	}
	if best < 0 {
		return Member{}, false
	}
	return members[best], true
}
