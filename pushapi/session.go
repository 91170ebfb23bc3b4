package pushapi

import (
	"context"
	"io"
	"sync"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho/session"
	"github.com/eclipse/paho.golang/paho/session/state"
)

// userPropMessageID is the MQTT user property that carries a message's id.
const userPropMessageID = "rtm-message-id"

// mqttSession is the session state of the push API's MQTT connection:
// paho's in-memory state, plus the link from each message to the request
// waiting for its acknowledgement.
//
// paho's state sends a message's acknowledgement to the channel given to
// AddToSession, but with a session expiry of 0 it forgets messages still
// unacknowledged when the connection drops, and tells nobody. Here every
// message carries the connection it was sent on (a connGen), whose down
// channel is closed when that connection is lost: its requests fail at
// once instead of waiting for their timeout.
//
// mu is held for reading across the inner AddToSession and for writing by
// ConAckReceived, so a message is never added to the state of a connection
// other than the one it was sent on. ConnectionLost releases blocked
// AddToSession calls (the inner state cancels them) before taking mu.
type mqttSession struct {
	*state.State

	mu      sync.RWMutex
	conn    *connGen             // the connection up now; nil while down
	waiting map[string]*inflight // messages about to be added, by message id
	wmu     sync.Mutex           // guards waiting
}

// connGen is one MQTT connection, as the session sees it.
type connGen struct {
	down chan struct{} // closed when the connection is lost
	once sync.Once
}

func (g *connGen) lost() { g.once.Do(func() { close(g.down) }) }

// inflight is a QoS 1 or 2 message between its publish and its final
// acknowledgement.
type inflight struct {
	id  string
	ack chan packets.ControlPacket // cap 1; paho's state writes it once
	// conn is the connection the message was added on; set by AddToSession
	// in the publishing goroutine, read by the same goroutine after.
	conn *connGen
}

func newMQTTSession() *mqttSession {
	return &mqttSession{State: state.NewInMemory(), waiting: map[string]*inflight{}}
}

// expect registers a message about to be published, so AddToSession links
// it to f. The caller must call forget once the publish call has returned.
func (s *mqttSession) expect(f *inflight) {
	s.wmu.Lock()
	s.waiting[f.id] = f
	s.wmu.Unlock()
}

func (s *mqttSession) forget(id string) {
	s.wmu.Lock()
	delete(s.waiting, id)
	s.wmu.Unlock()
}

// ConAckReceived starts a new connection generation.
func (s *mqttSession) ConAckReceived(w io.Writer, cp *packets.Connect, ca *packets.Connack) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		s.conn.lost()
	}
	if err := s.State.ConAckReceived(w, cp, ca); err != nil {
		s.conn = nil
		return err
	}
	s.conn = &connGen{down: make(chan struct{})}
	return nil
}

// ConnectionLost fails every message sent on the connection.
func (s *mqttSession) ConnectionLost(dp *packets.Disconnect) error {
	// First the inner state: it cancels AddToSession calls blocked for a
	// send quota slot, which hold mu for reading.
	err := s.State.ConnectionLost(dp)
	s.mu.Lock()
	if s.conn != nil {
		s.conn.lost()
		s.conn = nil
	}
	s.mu.Unlock()
	return err
}

// AddToSession links a registered PUBLISH to its request: the final
// acknowledgement goes to the inflight's channel.
func (s *mqttSession) AddToSession(ctx context.Context, p session.Packet, resp chan<- packets.ControlPacket) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	gen := s.conn
	if gen == nil {
		return session.ErrNoConnection
	}
	var f *inflight
	if pub, ok := p.(*packets.Publish); ok && pub.Properties != nil {
		for _, u := range pub.Properties.User {
			if u.Key == userPropMessageID {
				s.wmu.Lock()
				f = s.waiting[u.Value]
				s.wmu.Unlock()
				break
			}
		}
	}
	if f != nil {
		resp = f.ack
	}
	if err := s.State.AddToSession(ctx, p, resp); err != nil {
		return err
	}
	if f != nil {
		f.conn = gen
	}
	return nil
}

var _ session.SessionManager = (*mqttSession)(nil)
