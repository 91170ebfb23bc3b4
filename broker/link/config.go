package link

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Defaults for the zero values of Config.
const (
	DefaultMaxFrame         = 16<<20 + 1<<10
	DefaultQueueBytes       = 64 << 20
	DefaultRedialMax        = 2 * time.Second
	DefaultHeartbeat        = time.Second
	DefaultHandshakeTimeout = 5 * time.Second
)

// ProtocolVersion is the link protocol version this package speaks.
const ProtocolVersion = 1

// MinMessageType is the lowest application message type; types below it are
// reserved for the link's own frames.
const MinMessageType = 16

// MaxNodeName is the longest node name the handshake accepts, in bytes.
const MaxNodeName = 255

// Link states reported by LinkStats.State.
const (
	StateConnecting = "connecting"
	StateUp         = "up"
	StateClosed     = "closed"
)

const (
	// redialMin is the first redial delay; it doubles up to RedialMax.
	redialMin = 50 * time.Millisecond
	// ackEvery and ackDelay bound how far acks lag behind deliveries.
	ackEvery = 256
	ackDelay = 10 * time.Millisecond
	// handshakeMaxFrame bounds frames before authentication (and acks, the
	// only frames a dialer reads), so an unauthenticated client cannot make
	// the server allocate MaxFrame bytes.
	handshakeMaxFrame = 4 << 10
	// maxReason bounds the reason text of a reject frame.
	maxReason = 1 << 10
	// dataOverhead is the most a data frame adds to its body: frame type,
	// a 10-byte uvarint seq and the message type.
	dataOverhead = 1 + binary.MaxVarintLen64 + 1
	bufSize      = 64 << 10
)

// Config configures a Server or a Link. Every node of a cluster should use the
// same Secret and MaxFrame.
type Config struct {
	// NodeName is this node's name; required, at most MaxNodeName bytes.
	NodeName string
	// Incarnation identifies this process start to receivers, which reset
	// their de-duplication state when it changes; 0 means a random value
	// picked at Listen or Dial. Give every Link of a process the same one.
	Incarnation uint64
	// Secret is the shared cluster secret both ends prove they know; "" runs
	// the handshake with an empty key, which authenticates nothing.
	Secret string
	// TLS, if not nil, wraps every connection in mutual TLS 1.3 before the
	// HMAC handshake (which still runs, inside it): a Server uses it as its
	// server configuration, a Link as its client configuration. Build it
	// with SecretTLS or FileTLS. nil: plaintext.
	TLS *tls.Config
	// MaxFrame is the largest frame accepted or sent, in bytes (length field
	// value); 0 means DefaultMaxFrame (16 MiB + 1 KiB). A message body may
	// be up to MaxFrame-12 bytes.
	MaxFrame int
	// QueueBytes bounds the body bytes an outbound Link keeps queued
	// (unwritten or unacked); 0 means DefaultQueueBytes (64 MiB).
	QueueBytes int
	// RedialMax caps the exponential redial delay, which starts at 50 ms;
	// 0 means DefaultRedialMax (2 s).
	RedialMax time.Duration
	// Heartbeat is how often an idle dialer pings; a connection silent for
	// three heartbeats is closed. 0 means DefaultHeartbeat (1 s).
	Heartbeat time.Duration
	// HandshakeTimeout bounds a Link's dial plus handshake, and a Server's
	// handshake of an inbound connection (including the wait for the
	// sender's previous connection to finish delivering); 0 means
	// DefaultHandshakeTimeout (5 s).
	HandshakeTimeout time.Duration
	// Logger receives the link's logs; nil discards them.
	Logger *slog.Logger
	// OnDiscard, if not nil, is told about queued messages the Link l
	// throws away (see Discard), each with its Seq, with no link lock
	// held, from Close's caller or the Link's goroutine; it must not call
	// Close on that Link. Messages Send refuses are not reported: Send's
	// caller knows.
	OnDiscard func(l *Link, why Discard, msgs []Message)

	// BeforeAck, if set, is called by a Server before it acknowledges
	// what it delivered: an acknowledgement tells the sender it may forget
	// those messages, so the Server acknowledges them once they are safe
	// (e.g. written to a store). BeforeAck returns a check for the
	// messages delivered so far, which the Server calls until it returns
	// true: each call should return within a heartbeat (the sender drops
	// a link silent for three). While it returns false (not safe yet) the
	// Server acknowledges only what was safe before, which keeps the link
	// alive, and asks the same check again, so a check can keep waiting for
	// what it first had to cover rather than for later messages too: the
	// sender keeps, and after a reconnect resends, the rest. It delays the
	// ack, not the deliveries.
	BeforeAck func() (safe func() bool)
}

// withDefaults returns c with its zero values replaced by the defaults.
func (c Config) withDefaults() Config {
	if c.Incarnation == 0 {
		c.Incarnation = random64()
	}
	if c.MaxFrame <= 0 {
		c.MaxFrame = DefaultMaxFrame
	}
	if c.QueueBytes <= 0 {
		c.QueueBytes = DefaultQueueBytes
	}
	if c.RedialMax <= 0 {
		c.RedialMax = DefaultRedialMax
	}
	if c.Heartbeat <= 0 {
		c.Heartbeat = DefaultHeartbeat
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// validate reports every problem of c at once, naming the field.
func (c Config) validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("link: NodeName is required"))
	}
	if len(c.NodeName) > MaxNodeName {
		errs = append(errs, fmt.Errorf("link: NodeName %q is longer than %d bytes", c.NodeName, MaxNodeName))
	}
	if c.MaxFrame > 0 && c.MaxFrame <= dataOverhead {
		errs = append(errs, fmt.Errorf("link: MaxFrame %d is too small", c.MaxFrame))
	}
	return errors.Join(errs...)
}

// random64 returns a random non-zero uint64.
func random64() uint64 {
	var b [8]byte
	for {
		rand.Read(b[:]) // never fails (crypto/rand since Go 1.24)
		if v := binary.LittleEndian.Uint64(b[:]); v != 0 {
			return v
		}
	}
}

// Message is one application message carried by a link.
type Message struct {
	// Type is the application's message type, MinMessageType..255.
	Type byte
	// Body is the encoded message. The link never modifies it, so the
	// sender must not modify it after Send either; the receiver's handler
	// owns the Body it is given and may keep it.
	Body []byte
	// Seq is the sequence number the message got on its Link (QueueSeq),
	// in what Queued and Config.OnDiscard return; ignored by Send and
	// Queue, 0 elsewhere.
	Seq uint64
}

// Handler receives inbound messages. Deliver is called for each message of
// one sender in order, from one goroutine per sender (a reconnecting sender's
// new connection waits until the old one's Deliver calls are finished);
// different senders are delivered concurrently. The message counts as
// delivered once Deliver returns. Deliver should not block for long: the
// sender hears no acks meanwhile and drops the connection after three
// heartbeats.
type Handler interface {
	Deliver(from string, m Message)
}

// HandlerFunc adapts a function to a Handler.
type HandlerFunc func(from string, m Message)

// Deliver calls f(from, m).
func (f HandlerFunc) Deliver(from string, m Message) { f(from, m) }

var (
	// ErrClosed reports use of a closed Link or Server.
	ErrClosed = errors.New("link: closed")
	// ErrQueueFull reports a message not queued because the Link's queue
	// would exceed Config.QueueBytes.
	ErrQueueFull = errors.New("link: queue full")
	// ErrOversize reports a message whose body exceeds MaxFrame-12 bytes.
	ErrOversize = errors.New("link: message too large")
	// ErrBadSecret reports a peer whose handshake proof did not verify
	// against the cluster secret.
	ErrBadSecret = errors.New("bad cluster secret")
	// ErrWrongPeer reports that a different node than the dialled one
	// answered.
	ErrWrongPeer = errors.New("wrong peer")
	// ErrVersion reports an unsupported protocol version.
	ErrVersion = errors.New("protocol version not supported")
	// ErrRejected reports that the peer refused the handshake; the error
	// carries the peer's reason.
	ErrRejected = errors.New("rejected by peer")
	// ErrFrameTooLarge reports a frame whose length exceeds the limit.
	ErrFrameTooLarge = errors.New("frame too large")
	// ErrMalformedFrame reports a frame that does not decode.
	ErrMalformedFrame = errors.New("malformed frame")
	// ErrUnexpectedFrame reports a well-formed frame of a type not allowed
	// at that point of the protocol.
	ErrUnexpectedFrame = errors.New("unexpected frame")
)

// detailedError is an error with its own text that still matches a sentinel
// with errors.Is, so logs read "dialled "b" but "c" answered" rather than
// that plus ": wrong peer".
type detailedError struct {
	msg    string
	target error
}

func (e *detailedError) Error() string { return e.msg }
func (e *detailedError) Unwrap() error { return e.target }

func detailed(target error, format string, args ...any) error {
	return &detailedError{msg: fmt.Sprintf(format, args...), target: target}
}

// isProtocolError reports whether err means the peer broke the protocol (as
// opposed to the network failing), which is worth a warning.
func isProtocolError(err error) bool {
	return errors.Is(err, ErrFrameTooLarge) || errors.Is(err, ErrMalformedFrame) ||
		errors.Is(err, ErrUnexpectedFrame) || errors.Is(err, ErrBadSecret) ||
		errors.Is(err, ErrWrongPeer) || errors.Is(err, ErrVersion) || errors.Is(err, ErrRejected)
}

// Interface guards.
var _ Handler = HandlerFunc(nil)
