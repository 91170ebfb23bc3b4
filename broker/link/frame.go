package link

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// FrameType is the type byte of a link frame. Types below MinMessageType are
// the link's own; a data frame carries the application's type inside.
type FrameType byte

// Link frame types and their bodies (uvarint = encoding/binary varint,
// string = uvarint length + bytes, [32] = 32 raw bytes).
const (
	// FrameHello opens a handshake (dialer): uvarint version, then for
	// version 1 string node, uvarint incarnation, uvarint stream, uvarint
	// heartbeat milliseconds, [32] nonce.
	FrameHello FrameType = 1
	// FrameChallenge answers a hello (acceptor): string node, [32] nonce,
	// [32] proof.
	FrameChallenge FrameType = 2
	// FrameAuth proves the dialer's knowledge of the secret: [32] proof.
	FrameAuth FrameType = 3
	// FrameReady ends the handshake (acceptor): uvarint last seq the
	// sender may forget (delivered, and with Config.BeforeAck safe),
	// then (since rtm issue 11) uvarint acceptor incarnation; a ready
	// without it decodes with Incarnation 0 (unknown).
	FrameReady FrameType = 4
	// FrameData carries a message: uvarint seq, message type byte, body.
	FrameData FrameType = 5
	// FrameAck acknowledges every seq up to its own: uvarint seq.
	FrameAck FrameType = 6
	// FramePing keeps an idle link alive (dialer); empty body.
	FramePing FrameType = 7
	// FrameReject ends a failed handshake with a reason: string reason.
	FrameReject FrameType = 8
)

var frameNames = [...]string{
	FrameHello: "hello", FrameChallenge: "challenge", FrameAuth: "auth", FrameReady: "ready",
	FrameData: "data", FrameAck: "ack", FramePing: "ping", FrameReject: "reject",
}

func (t FrameType) String() string {
	if int(t) < len(frameNames) && frameNames[t] != "" {
		return frameNames[t]
	}
	return fmt.Sprintf("frame type %d", byte(t))
}

// Frame is one decoded link frame. Only the fields of its Type are set.
type Frame struct {
	Type FrameType
	// Seq is the sequence number of a data, ack or ready frame; 0 in a data
	// frame marks an unsequenced OnUp message.
	Seq uint64
	// Msg is the message of a data frame.
	Msg Message
	// Version is the protocol version of a hello. A hello of another
	// version decodes with only Version set, so the acceptor can say why
	// it refuses it.
	Version uint64
	// Node is the dialer's name in a hello and the acceptor's in a
	// challenge.
	Node string
	// Incarnation, Stream and Heartbeat describe the dialer in a hello;
	// Incarnation is also the acceptor's in a ready.
	Incarnation uint64
	Stream      uint64
	Heartbeat   time.Duration
	// Nonce is the sender's fresh nonce in a hello or challenge.
	Nonce [32]byte
	// MAC is the sender's proof in a challenge or auth.
	MAC [32]byte
	// Reason says why a reject frame ends the handshake.
	Reason string
}

// maxHeartbeatMS bounds the heartbeat a hello may announce (a day).
const maxHeartbeatMS = 24 * 60 * 60 * 1000

// AppendFrame appends the encoding of f to dst. It does not validate f:
// strings longer than DecodeFrame accepts encode but do not decode.
func AppendFrame(dst []byte, f Frame) []byte {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0, byte(f.Type))
	switch f.Type {
	case FrameHello:
		dst = binary.AppendUvarint(dst, f.Version)
		dst = appendString(dst, f.Node)
		dst = binary.AppendUvarint(dst, f.Incarnation)
		dst = binary.AppendUvarint(dst, f.Stream)
		dst = binary.AppendUvarint(dst, uint64(f.Heartbeat/time.Millisecond))
		dst = append(dst, f.Nonce[:]...)
	case FrameChallenge:
		dst = appendString(dst, f.Node)
		dst = append(dst, f.Nonce[:]...)
		dst = append(dst, f.MAC[:]...)
	case FrameAuth:
		dst = append(dst, f.MAC[:]...)
	case FrameReady:
		dst = binary.AppendUvarint(dst, f.Seq)
		dst = binary.AppendUvarint(dst, f.Incarnation)
	case FrameAck:
		dst = binary.AppendUvarint(dst, f.Seq)
	case FrameData:
		dst = binary.AppendUvarint(dst, f.Seq)
		dst = append(dst, f.Msg.Type)
		dst = append(dst, f.Msg.Body...)
	case FrameReject:
		dst = appendString(dst, f.Reason)
	}
	binary.BigEndian.PutUint32(dst[start:], uint32(len(dst)-start-4))
	return dst
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// DecodeFrame decodes the frame at the start of b, accepting a length field
// of at most max. It returns the frame and the number of bytes it took; n is
// 0 with a nil error when b does not yet hold a whole frame. A length above
// max is reported as soon as the 4-byte header is there. The returned frame's
// Msg.Body aliases b. DecodeFrame never panics and allocates only for the
// strings it returns, which are shorter than the frame.
func DecodeFrame(b []byte, max int) (f Frame, n int, err error) {
	if len(b) < 4 {
		return Frame{}, 0, nil
	}
	size := binary.BigEndian.Uint32(b)
	switch {
	case size == 0:
		return Frame{}, 0, fmt.Errorf("%w: zero length", ErrMalformedFrame)
	case max < 1 || uint64(size) > uint64(max):
		return Frame{}, 0, fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, size, max)
	case uint64(len(b)-4) < uint64(size):
		return Frame{}, 0, nil
	}
	n = 4 + int(size)
	f, err = decodeBody(FrameType(b[4]), b[5:n])
	if err != nil {
		return Frame{}, 0, err
	}
	return f, n, nil
}

// decodeBody decodes the body of a frame of type t.
func decodeBody(t FrameType, body []byte) (Frame, error) {
	f := Frame{Type: t}
	d := decoder{b: body}
	switch t {
	case FrameHello:
		f.Version = d.uvarint("version")
		if d.err == nil && f.Version != ProtocolVersion {
			return f, nil
		}
		f.Node = d.string("node", MaxNodeName)
		f.Incarnation = d.uvarint("incarnation")
		f.Stream = d.uvarint("stream")
		if ms := d.uvarint("heartbeat"); ms > maxHeartbeatMS {
			d.fail("heartbeat %d ms out of range", ms)
		} else {
			f.Heartbeat = time.Duration(ms) * time.Millisecond
		}
		d.array(&f.Nonce, "nonce")
	case FrameChallenge:
		f.Node = d.string("node", MaxNodeName)
		d.array(&f.Nonce, "nonce")
		d.array(&f.MAC, "mac")
	case FrameAuth:
		d.array(&f.MAC, "mac")
	case FrameReady:
		f.Seq = d.uvarint("seq")
		if d.err == nil && len(d.b) > 0 {
			f.Incarnation = d.uvarint("incarnation")
		}
	case FrameAck:
		f.Seq = d.uvarint("seq")
	case FrameData:
		f.Seq = d.uvarint("seq")
		f.Msg.Type = d.byte("message type")
		if d.err == nil && f.Msg.Type < MinMessageType {
			d.fail("reserved message type %d", f.Msg.Type)
		}
		f.Msg.Body = d.rest()
	case FramePing:
	case FrameReject:
		f.Reason = d.string("reason", maxReason)
	default:
		return Frame{}, fmt.Errorf("%w: unknown frame type %d", ErrMalformedFrame, byte(t))
	}
	if d.err == nil && len(d.b) > 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	if d.err != nil {
		return Frame{}, fmt.Errorf("%w: %v: %v", ErrMalformedFrame, t, d.err)
	}
	return f, nil
}

// decoder reads a frame body, remembering the first error so callers can
// decode every field and check once.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf(format, args...)
	}
}

func (d *decoder) uvarint(field string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad %s", field)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte(field string) byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) < 1 {
		d.fail("missing %s", field)
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) string(field string, max int) string {
	n := d.uvarint(field + " length")
	if d.err != nil {
		return ""
	}
	if n > uint64(max) || n > uint64(len(d.b)) {
		d.fail("%s length %d out of range", field, n)
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

func (d *decoder) array(dst *[32]byte, field string) {
	if d.err != nil {
		return
	}
	if len(d.b) < len(dst) {
		d.fail("short %s", field)
		return
	}
	copy(dst[:], d.b)
	d.b = d.b[len(dst):]
}

func (d *decoder) rest() []byte {
	if d.err != nil {
		return nil
	}
	v := d.b
	d.b = d.b[len(d.b):]
	return v
}

// frameReader reads frames from a buffered stream with DecodeFrame. Frames
// that fit the buffer are decoded in place; larger ones (up to max) are read
// into their own allocation.
type frameReader struct {
	br  *bufio.Reader
	max int
}

func newFrameReader(r io.Reader, size, max int) *frameReader {
	return &frameReader{br: bufio.NewReaderSize(r, size), max: max}
}

// next returns the next frame. A Msg.Body it returns is owned by the caller.
// A stream that ends inside a frame reports io.ErrUnexpectedEOF.
func (r *frameReader) next() (Frame, error) {
	hdr, err := r.br.Peek(4)
	if err != nil {
		if err == io.EOF && len(hdr) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	if _, _, err := DecodeFrame(hdr, r.max); err != nil {
		return Frame{}, err
	}
	total := 4 + int(binary.BigEndian.Uint32(hdr)) // fits: checked against max
	if total > r.br.Size() {
		b := make([]byte, total)
		if _, err := io.ReadFull(r.br, b); err != nil {
			return Frame{}, eofInFrame(err)
		}
		f, _, err := DecodeFrame(b, r.max)
		return f, err
	}
	b, err := r.br.Peek(total)
	if err != nil {
		return Frame{}, eofInFrame(err)
	}
	f, _, err := DecodeFrame(b, r.max)
	if err == nil && f.Msg.Body != nil {
		f.Msg.Body = bytes.Clone(f.Msg.Body) // b is the reader's buffer
	}
	_, _ = r.br.Discard(total)
	return f, err
}

func eofInFrame(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// buffered reports whether a whole frame is already buffered, so reading it
// will not block.
func (r *frameReader) buffered() bool {
	n := r.br.Buffered()
	if n < 4 {
		return false
	}
	hdr, _ := r.br.Peek(4) // buffered: no read
	return uint64(n) >= 4+uint64(binary.BigEndian.Uint32(hdr))
}

// frameWriter writes frames to a buffered stream; the caller flushes.
type frameWriter struct {
	bw      *bufio.Writer
	scratch []byte
}

func newFrameWriter(w io.Writer) *frameWriter {
	return &frameWriter{bw: bufio.NewWriterSize(w, bufSize)}
}

func (w *frameWriter) frame(f Frame) error {
	w.scratch = AppendFrame(w.scratch[:0], f)
	_, err := w.bw.Write(w.scratch)
	return err
}

// data writes a data frame without copying the body into a scratch buffer.
func (w *frameWriter) data(seq uint64, m Message) error {
	var hdr [4 + dataOverhead]byte
	hdr[4] = byte(FrameData)
	n := 5 + binary.PutUvarint(hdr[5:], seq)
	hdr[n] = m.Type
	n++
	binary.BigEndian.PutUint32(hdr[:4], uint32(n-4+len(m.Body)))
	if _, err := w.bw.Write(hdr[:n]); err != nil {
		return err
	}
	_, err := w.bw.Write(m.Body)
	return err
}

func (w *frameWriter) flush() error { return w.bw.Flush() }

// deadlineReader extends the connection's read deadline as reads make
// progress, so a connection is closed after idle of silence but never while
// a large frame is still arriving. The extension is throttled: resetting a
// deadline per read would cost a timer update per frame under load.
type deadlineReader struct {
	conn net.Conn
	idle time.Duration // 0 leaves the deadline alone (the handshake sets its own)
	set  time.Time
}

func (d *deadlineReader) Read(p []byte) (int, error) {
	if d.idle > 0 {
		if now := time.Now(); now.Sub(d.set) > d.idle/12 {
			if err := d.conn.SetReadDeadline(now.Add(d.idle)); err != nil {
				return 0, err
			}
			d.set = now
		}
	}
	return d.conn.Read(p)
}
