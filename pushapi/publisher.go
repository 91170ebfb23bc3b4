package pushapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session"

	"github.com/rtm-dev/rtm/internal/cluster"
)

// Timers of the broker connection.
const (
	connectTimeout  = 5 * time.Second // TCP dial, then CONNECT to CONNACK
	keepAlive       = 30              // seconds; gossip detects a dead broker sooner
	serviceTokenTTL = 24 * time.Hour  // default; a fresh service token is issued for every connection
	backoffMin      = 50 * time.Millisecond
	backoffMax      = 2 * time.Second
)

// Publish failures; publishError maps them to API errors.
var (
	// errNoBroker reports that no broker connection is up.
	errNoBroker = errors.New("no broker connection")
	// errConnLost reports that the connection was lost before the broker
	// acknowledged the message: it may or may not have been delivered.
	errConnLost = errors.New("connection to the broker lost before it acknowledged the message")
	// errTooLarge reports a message larger than the broker's Maximum
	// Packet Size.
	errTooLarge = errors.New("message larger than the broker's maximum packet size")
)

// rejectError reports a broker's negative acknowledgement.
type rejectError struct {
	Code   byte
	Reason string
}

func (e *rejectError) Error() string {
	return fmt.Sprintf("broker refused the message: reason 0x%02X %s", e.Code, e.Reason)
}

// publisher keeps the push API's one MQTT 5 connection to a broker and
// publishes over it. See the package documentation for why it drives
// paho.Client itself instead of using autopaho.
type publisher struct {
	name     string
	timeout  time.Duration // pushapi.publish_timeout
	tokenTTL time.Duration // of the service token of each connection
	issuer   tokenIssuer
	log      *slog.Logger
	m        *metrics
	sess     *mqttSession
	members  func() []cluster.Member
	wake     chan struct{} // cap 1: gossip changed, retry a pick now

	mu        sync.Mutex
	renewing  chan struct{} // non-nil while the connection is renewed: new sends wait, closed after
	sending   int           // send calls using cli
	sendsDone chan struct{} // closed when sending drops to 0; nil if nobody waits
	cli       *paho.Client  // nil while down
	broker    string        // the broker of cli
	conn      net.Conn      // cli's connection, closed when gossip says its broker failed
	maxPacket uint32        // the broker's Maximum Packet Size; 0 means none
}

func newPublisher(name string, timeout time.Duration, issuer tokenIssuer, log *slog.Logger, m *metrics) *publisher {
	return &publisher{name: name, timeout: timeout, tokenTTL: serviceTokenTTL, issuer: issuer, log: log.With("component", "publisher"), m: m,
		sess: newMQTTSession(), wake: make(chan struct{}, 1)}
}

// connected returns the broker the connection is up to, or "".
func (p *publisher) connected() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cli == nil {
		return ""
	}
	return p.broker
}

// run connects to a broker, waits for the connection to end, and connects
// again, until ctx ends; then it disconnects.
func (p *publisher) run(ctx context.Context) {
	defer p.endRenewal()
	attempt, avoid := 0, ""
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval, bo.MaxInterval, bo.RandomizationFactor = backoffMin, backoffMax, 0.2
	for {
		if attempt > 0 {
			t := time.NewTimer(bo.NextBackOff())
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-p.wake:
			case <-t.C:
			}
			t.Stop()
		}
		if ctx.Err() != nil {
			return
		}
		m, ok := p.pick(avoid)
		if !ok {
			p.endRenewal()
			if attempt == 0 {
				p.log.Warn("no broker to connect to yet: publishes fail with 503 until one is alive in the gossip view")
			}
			attempt++
			continue
		}
		cli, ca, exp, conn, err := p.connect(ctx, m)
		if err != nil {
			p.endRenewal()
			if ctx.Err() != nil {
				return
			}
			p.log.Warn("broker connection failed", "broker", m.Name, "mqtt", m.Tags.MQTT, "attempt", attempt+1, "error", err)
			p.m.connectFailures.Inc()
			avoid = m.Name
			attempt++
			continue
		}
		attempt, avoid = 0, m.Name
		bo.Reset()
		var maxPacket uint32
		if ca.Properties != nil && ca.Properties.MaximumPacketSize != nil {
			maxPacket = *ca.Properties.MaximumPacketSize
		}
		p.mu.Lock()
		p.cli, p.broker, p.conn, p.maxPacket = cli, m.Name, conn, maxPacket
		p.mu.Unlock()
		p.endRenewal()
		p.m.brokerUp.Set(1)
		p.m.connects.Inc()
		p.log.Info("connected to broker", "broker", m.Name, "mqtt", m.Tags.MQTT, "max_packet_size", maxPacket)

		renew := time.NewTimer(renewIn(exp, p.tokenTTL))
		renewed := false
		select {
		case <-cli.Done():
		case <-ctx.Done():
			// Requests have drained (Shutdown stops HTTP first): say
			// goodbye properly so the broker publishes no will and logs a
			// normal disconnect.
			_ = cli.Disconnect(&paho.Disconnect{ReasonCode: 0})
			<-cli.Done()
		case <-renew.C:
			p.renew(cli, exp)
			renewed = true
		}
		renew.Stop()
		p.mu.Lock()
		p.cli, p.broker, p.conn, p.maxPacket = nil, "", nil, 0
		p.mu.Unlock()
		p.m.brokerUp.Set(0)
		if ctx.Err() != nil {
			p.log.Info("disconnected from broker", "broker", m.Name)
			return
		}
		if renewed {
			p.log.Info("service token renewed: connecting again", "broker", m.Name, "token_expiry", exp)
			avoid = ""
			continue
		}
		p.log.Warn("broker connection lost, picking a broker again", "broker", m.Name)
	}
}

// renewIn returns when to replace a connection whose service token, of
// lifetime ttl, expires at exp: a third of ttl (at most an hour) before, so
// the broker never has to close it (0xA0).
func renewIn(exp time.Time, ttl time.Duration) time.Duration {
	return max(time.Until(exp)-min(ttl/3, time.Hour), 0)
}

// renew ends cli, whose service token expires at exp, without failing a
// request: new sends wait (see send) until the next connection is up or
// failed, and cli is closed once every send on it has returned and every
// QoS 1/2 message on it is acknowledged, or when the wait reaches the
// publish timeout or exp (then those requests fail as for a lost
// connection).
func (p *publisher) renew(cli *paho.Client, exp time.Time) {
	p.mu.Lock()
	p.renewing = make(chan struct{})
	sends := make(chan struct{})
	if p.sending == 0 {
		close(sends)
	} else {
		p.sendsDone = sends
	}
	p.mu.Unlock()
	limit := time.NewTimer(min(p.timeout, time.Until(exp)))
	defer limit.Stop()
	select {
	case <-sends:
		select {
		case <-p.sess.drained():
		case <-limit.C:
		case <-cli.Done():
		}
	case <-limit.C:
	case <-cli.Done():
	}
	_ = cli.Disconnect(&paho.Disconnect{ReasonCode: 0})
	<-cli.Done()
}

// endRenewal lets the sends held by renew go on.
func (p *publisher) endRenewal() {
	p.mu.Lock()
	if p.renewing != nil {
		close(p.renewing)
		p.renewing = nil
	}
	p.mu.Unlock()
}

// sendDone ends a send counted in p.sending.
func (p *publisher) sendDone() {
	p.mu.Lock()
	p.sending--
	if p.sending == 0 && p.sendsDone != nil {
		close(p.sendsDone)
		p.sendsDone = nil
	}
	p.mu.Unlock()
}

// pick returns the least-loaded alive broker, other than avoid unless it is
// the only one.
func (p *publisher) pick(avoid string) (cluster.Member, bool) {
	if p.members == nil {
		return cluster.Member{}, false
	}
	ms := p.members()
	if m, ok := cluster.Pick(ms, cluster.TransportTCP, cluster.PickOptions{Exclude: avoid}); ok {
		return m, true
	}
	if avoid == "" {
		return cluster.Member{}, false
	}
	return cluster.Pick(ms, cluster.TransportTCP, cluster.PickOptions{})
}

// connect dials m and completes the MQTT handshake: clean start, session
// expiry 0, client ID and username the push API's name, password a fresh
// service token.
func (p *publisher) connect(ctx context.Context, m cluster.Member) (*paho.Client, *paho.Connack, time.Time, net.Conn, error) {
	// The broker closes the connection when this token expires (0xA0,
	// maximum connect time); run renews the connection before (renew), or
	// connects again after.
	token, exp, err := p.issuer.issueService(p.name, p.tokenTTL, time.Now())
	if err != nil {
		return nil, nil, exp, nil, fmt.Errorf("service token: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", m.Tags.MQTT)
	if err != nil {
		return nil, nil, exp, nil, err
	}
	log := p.log.With("broker", m.Name)
	conn := &boundedConn{Conn: raw, timeout: max(p.timeout, time.Second)}
	cli := paho.NewClient(paho.ClientConfig{
		ClientID: p.name,
		Conn:     packets.NewThreadSafeConn(conn),
		Session:  p.sess,
		// Bounds a publish's wait for a send quota slot (and the CONNECT,
		// which ctx bounds anyway): the request's own deadline decides.
		PacketTimeout: max(p.timeout, connectTimeout),
		OnServerDisconnect: func(d *paho.Disconnect) {
			attrs := []any{"reason_code", fmt.Sprintf("0x%02X", d.ReasonCode)}
			if d.Properties != nil {
				attrs = append(attrs, "reason", d.Properties.ReasonString, "server_reference", d.Properties.ServerReference)
			}
			log.Info("broker disconnected the push API", attrs...)
		},
		OnClientError: func(err error) { log.Debug("broker connection error", "error", err) },
	})
	ca, err := cli.Connect(ctx, &paho.Connect{
		ClientID: p.name, Username: p.name, UsernameFlag: true, Password: []byte(token), PasswordFlag: true,
		CleanStart: true, KeepAlive: keepAlive,
	})
	if err != nil {
		_ = raw.Close()
		if ca != nil {
			return nil, nil, exp, nil, fmt.Errorf("CONNACK reason 0x%02X: %w", ca.ReasonCode, err)
		}
		return nil, nil, exp, nil, err
	}
	return cli, ca, exp, raw, nil
}

// boundedConn bounds every write to the broker and closes the connection
// when one fails: a broker that stops reading (stopped, overloaded, a
// network partition without a reset) must not hold publishes, and the
// writers queued behind them, past their timeout; and a packet written in
// part leaves the stream unusable anyway.
type boundedConn struct {
	net.Conn
	timeout time.Duration
}

func (c *boundedConn) Write(b []byte) (int, error) {
	_ = c.Conn.SetWriteDeadline(time.Now().Add(c.timeout))
	n, err := c.Conn.Write(b)
	if err != nil {
		_ = c.Conn.Close()
	}
	return n, err
}

// watch closes the connection when gossip says its broker failed, so
// requests waiting for acknowledgements fail at once and the next broker is
// picked without waiting for keepalive; and wakes the connect loop when a
// broker joins. A broker that leaves gracefully disconnects its clients
// itself, after it stopped accepting new ones.
func (p *publisher) watch(ctx context.Context, events <-chan cluster.Event) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-events:
			if ev.Member.Tags.Role != cluster.RoleBroker {
				continue
			}
			switch ev.Type {
			case cluster.EventFail, cluster.EventReap:
				p.mu.Lock()
				conn := p.conn
				if p.broker != ev.Member.Name {
					conn = nil
				}
				p.mu.Unlock()
				if conn != nil {
					p.log.Warn("broker failed (gossip): dropping its connection", "broker", ev.Member.Name)
					_ = conn.Close()
				}
			case cluster.EventJoin, cluster.EventUpdate:
				select {
				case p.wake <- struct{}{}:
				default:
				}
			}
		}
	}
}

// message is one validated message, ready to publish.
type message struct {
	id  string
	pub *paho.Publish
}

// sent is a message written to the connection; for QoS 1 and 2, f awaits
// its acknowledgement.
type sent struct {
	f     *inflight
	start time.Time
	qos   byte
}

// send writes m to the broker connection without waiting for its
// acknowledgement: messages sent one after the other from one goroutine go
// on the wire in that order. It blocks while the broker's Receive Maximum
// of messages is unacknowledged.
func (p *publisher) send(ctx context.Context, m *message) (s sent, err error) {
	defer func() {
		if err != nil {
			p.m.publishes.WithLabelValues(sendResult(err)).Inc()
		}
	}()
	s = sent{start: time.Now(), qos: m.pub.QoS}
	p.mu.Lock()
	for p.renewing != nil {
		// The connection is being renewed (a fresh service token): wait
		// for the next one rather than fail.
		ch := p.renewing
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return s, ctx.Err()
		}
		p.mu.Lock()
	}
	cli, maxPacket := p.cli, p.maxPacket
	if cli != nil {
		p.sending++
		defer p.sendDone()
	}
	p.mu.Unlock()
	if cli == nil {
		return s, errNoBroker
	}
	if maxPacket > 0 && packetSize(m.pub) > int(maxPacket) {
		return s, fmt.Errorf("%w (%d bytes)", errTooLarge, maxPacket)
	}
	if m.pub.QoS > 0 {
		s.f = &inflight{id: m.id, ack: make(chan packets.ControlPacket, 1)}
		p.sess.expect(s.f)
		defer p.sess.forget(m.id)
	}
	_, err = cli.PublishWithOptions(ctx, m.pub, paho.PublishOptions{Method: paho.PublishMethod_AsyncSend})
	switch {
	case err == nil, errors.Is(err, paho.ErrNetworkErrorAfterStored):
		// Stored in the session: the acknowledgement, or the loss of the
		// connection, will tell.
	case errors.Is(err, paho.ErrInvalidArguments):
		return s, &rejectError{Code: 0x80, Reason: err.Error()}
	case errors.Is(err, session.ErrNoConnection):
		return s, errConnLost
	case ctx.Err() != nil:
		return s, ctx.Err()
	case errors.Is(err, context.DeadlineExceeded):
		return s, err
	default:
		return s, fmt.Errorf("%w: %w", errConnLost, err)
	}
	if s.f != nil && s.f.conn == nil {
		// Not linked to its request (cannot happen while every PUBLISH
		// carries its id): the outcome would never be known.
		return s, errors.New("publish not tracked by the session")
	}
	return s, nil
}

// wait waits for the acknowledgement of a sent message.
func (p *publisher) wait(ctx context.Context, s sent) error {
	err := p.await(ctx, s)
	result := "ok"
	var rej *rejectError
	switch {
	case err == nil:
		p.m.publishLatency.WithLabelValues(qosLabel[s.qos]).Observe(time.Since(s.start).Seconds())
	case errors.As(err, &rej):
		result = "rejected"
	case errors.Is(err, context.DeadlineExceeded):
		result = "timeout"
	default:
		result = "unavailable"
	}
	p.m.publishes.WithLabelValues(result).Inc()
	return err
}

func (p *publisher) await(ctx context.Context, s sent) error {
	if s.f == nil {
		return nil // QoS 0: written
	}
	select {
	case cp := <-s.f.ack:
		return ackResult(cp)
	case <-s.f.conn.down:
		select {
		case cp := <-s.f.ack: // acknowledged just before the loss
			return ackResult(cp)
		default:
			return errConnLost
		}
	case <-ctx.Done():
		return ctx.Err()
	}
}

// publish sends m and waits for its acknowledgement.
func (p *publisher) publish(ctx context.Context, m *message) error {
	s, err := p.send(ctx, m)
	if err != nil {
		return err
	}
	return p.wait(ctx, s)
}

func sendResult(err error) string {
	var rej *rejectError
	switch {
	case errors.As(err, &rej), errors.Is(err, errTooLarge):
		return "rejected"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	return "unavailable"
}

var qosLabel = [3]string{"0", "1", "2"}

// ackResult interprets the final acknowledgement of a QoS 1 or 2 message.
func ackResult(cp packets.ControlPacket) error {
	var code byte
	var reason string
	var props *packets.Properties
	switch c := cp.Content.(type) {
	case *packets.Puback:
		code, reason, props = c.ReasonCode, c.Reason(), c.Properties
	case *packets.Pubrec:
		code, reason, props = c.ReasonCode, c.Reason(), c.Properties
	case *packets.Pubcomp:
		code, reason, props = c.ReasonCode, c.Reason(), c.Properties
	default:
		// A zero packet: the session dropped the message (shutdown).
		return errConnLost
	}
	if code < 0x80 {
		return nil
	}
	if props != nil && props.ReasonString != "" {
		reason = props.ReasonString
	}
	return &rejectError{Code: code, Reason: reason}
}

// packetSize is an upper bound of the size of the PUBLISH packet for pub.
func packetSize(pub *paho.Publish) int {
	n := 1 + 4 + 2 + len(pub.Topic) + 2 + 4 + len(pub.Payload)
	if pr := pub.Properties; pr != nil {
		n += 3 + len(pr.ContentType) + 3 + len(pr.ResponseTopic) + 3 + len(pr.CorrelationData) + 5 + 2
		for _, u := range pr.User {
			n += 5 + len(u.Key) + len(u.Value)
		}
	}
	return n
}
