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

	// unacked counts the QoS 1/2 messages of the connection not finally
	// acknowledged yet, so a renewal of the connection can wait until none
	// is (see drained). A PUBACK for an unknown packet ID can make it low:
	// a renewal then loses what any lost connection loses.
	amu     sync.Mutex
	unacked int
	idle    chan struct{} // closed when unacked drops to 0; nil if nobody waits
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
	s.resetUnacked()
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
	s.resetUnacked()
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
	if pub, ok := p.(*packets.Publish); ok && pub.QoS > 0 {
		s.amu.Lock()
		s.unacked++
		s.amu.Unlock()
	}
	return nil
}

// PacketReceived counts the final acknowledgements of QoS 1/2 messages.
func (s *mqttSession) PacketReceived(recv *packets.ControlPacket, pubChan chan<- *packets.Publish) error {
	err := s.State.PacketReceived(recv, pubChan)
	final := false
	switch c := recv.Content.(type) {
	case *packets.Puback, *packets.Pubcomp:
		final = true
	case *packets.Pubrec:
		final = c.ReasonCode >= 0x80
	}
	if final {
		s.amu.Lock()
		if s.unacked > 0 {
			s.unacked--
		}
		if s.unacked == 0 && s.idle != nil {
			close(s.idle)
			s.idle = nil
		}
		s.amu.Unlock()
	}
	return err
}

// drained returns a channel closed once no QoS 1/2 message of the
// connection awaits its acknowledgement (or the connection is gone).
func (s *mqttSession) drained() <-chan struct{} {
	s.amu.Lock()
	defer s.amu.Unlock()
	if s.unacked == 0 {
		ch := make(chan struct{})
		close(ch)
		return ch
	}
	if s.idle == nil {
		s.idle = make(chan struct{})
	}
	return s.idle
}

func (s *mqttSession) resetUnacked() {
	s.amu.Lock()
	s.unacked = 0
	if s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
	s.amu.Unlock()
}

var _ session.SessionManager = (*mqttSession)(nil)
