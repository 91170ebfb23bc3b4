package link

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"time"
)

// The two proof labels differ so that neither side's proof can be replayed
// as the other's.
const (
	labelAcceptor = "rtm-link/acceptor"
	labelDialer   = "rtm-link/dialer"
)

// proof is HMAC-SHA256(secret, label || n1 || n2 || name1 || name2), names
// length-prefixed so that ("ab","c") and ("a","bc") differ.
func proof(secret, label string, n1, n2 *[32]byte, name1, name2 string) [32]byte {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(label))
	m.Write(n1[:])
	m.Write(n2[:])
	writeString(m, name1)
	writeString(m, name2)
	var out [32]byte
	m.Sum(out[:0])
	return out
}

func writeString(h hash.Hash, s string) {
	var n [binary.MaxVarintLen64]byte
	h.Write(n[:binary.PutUvarint(n[:], uint64(len(s)))])
	h.Write([]byte(s))
}

func nonce() (n [32]byte) {
	rand.Read(n[:]) // never fails (crypto/rand since Go 1.24)
	return n
}

// reject tells the peer why the handshake failed, best effort: the
// connection is closed right after, whatever happens.
func reject(conn net.Conn, w *frameWriter, reason string) {
	if len(reason) > maxReason {
		reason = reason[:maxReason]
	}
	_ = conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	if w.frame(Frame{Type: FrameReject, Reason: reason}) == nil {
		_ = w.flush()
	}
}

// expect reads the next frame and checks its type, turning a reject into
// an ErrRejected error carrying the peer's reason.
func expect(r *frameReader, t FrameType) (Frame, error) {
	f, err := r.next()
	if err != nil {
		return Frame{}, err
	}
	if f.Type == FrameReject && t != FrameReject {
		return Frame{}, fmt.Errorf("%w: %s", ErrRejected, f.Reason)
	}
	if f.Type != t {
		return Frame{}, fmt.Errorf("%w: want %v, got %v", ErrUnexpectedFrame, t, f.Type)
	}
	return f, nil
}

// dialHandshake runs the dialer's side of the handshake on conn and returns
// the acceptor's ready frame: the last seq it delivered from this Link's
// stream, and its incarnation. The caller has set the handshake deadline.
func (l *Link) dialHandshake(conn net.Conn, r *frameReader, w *frameWriter) (Frame, error) {
	nonceD := nonce()
	hello := Frame{
		Type:        FrameHello,
		Version:     ProtocolVersion,
		Node:        l.cfg.NodeName,
		Incarnation: l.cfg.Incarnation,
		Stream:      l.stream,
		Heartbeat:   l.cfg.Heartbeat,
		Nonce:       nonceD,
	}
	if err := w.frame(hello); err != nil {
		return Frame{}, err
	}
	if err := w.flush(); err != nil {
		return Frame{}, err
	}
	ch, err := expect(r, FrameChallenge)
	if err != nil {
		return Frame{}, err
	}
	if ch.Node != l.peer {
		err := detailed(ErrWrongPeer, "dialled %q but %q answered", l.peer, ch.Node)
		reject(conn, w, err.Error())
		return Frame{}, err
	}
	want := proof(l.cfg.Secret, labelAcceptor, &nonceD, &ch.Nonce, ch.Node, l.cfg.NodeName)
	if !hmac.Equal(want[:], ch.MAC[:]) {
		reject(conn, w, ErrBadSecret.Error())
		return Frame{}, fmt.Errorf("%w: the acceptor's proof does not verify", ErrBadSecret)
	}
	auth := Frame{Type: FrameAuth, MAC: proof(l.cfg.Secret, labelDialer, &ch.Nonce, &nonceD, l.cfg.NodeName, ch.Node)}
	if err := w.frame(auth); err != nil {
		return Frame{}, err
	}
	if err := w.flush(); err != nil {
		return Frame{}, err
	}
	return expect(r, FrameReady)
}

// errNoHello means a client connected and left without a byte, as TCP
// health checks do; that is not worth a warning.
var errNoHello = errors.New("closed before hello")

// acceptHandshake runs the acceptor's side of the handshake on c up to the
// dialer's proof and returns the dialer's hello. The caller has set the
// handshake deadline, and sends Ready once it has claimed the peer.
func (s *Server) acceptHandshake(c *inConn, r *frameReader, w *frameWriter) (Frame, error) {
	hello, err := expect(r, FrameHello)
	if errors.Is(err, io.EOF) {
		return Frame{}, errNoHello
	}
	if err != nil {
		return Frame{}, err
	}
	if hello.Version != ProtocolVersion {
		err := detailed(ErrVersion, "protocol version %d not supported (this node speaks %d)", hello.Version, ProtocolVersion)
		reject(c.conn, w, err.Error())
		return Frame{}, err
	}
	if hello.Node == "" {
		err := fmt.Errorf("%w: hello without a node name", ErrMalformedFrame)
		reject(c.conn, w, err.Error())
		return Frame{}, err
	}
	nonceA := nonce()
	ch := Frame{
		Type:  FrameChallenge,
		Node:  s.cfg.NodeName,
		Nonce: nonceA,
		MAC:   proof(s.cfg.Secret, labelAcceptor, &hello.Nonce, &nonceA, s.cfg.NodeName, hello.Node),
	}
	if err := w.frame(ch); err != nil {
		return Frame{}, err
	}
	if err := w.flush(); err != nil {
		return Frame{}, err
	}
	auth, err := expect(r, FrameAuth)
	if err != nil {
		return Frame{}, fmt.Errorf("node %q: %w", hello.Node, err)
	}
	want := proof(s.cfg.Secret, labelDialer, &nonceA, &hello.Nonce, hello.Node, s.cfg.NodeName)
	if !hmac.Equal(want[:], auth.MAC[:]) {
		reject(c.conn, w, ErrBadSecret.Error())
		return Frame{}, fmt.Errorf("node %q: %w: the dialer's proof does not verify", hello.Node, ErrBadSecret)
	}
	return hello, nil
}
