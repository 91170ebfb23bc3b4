package loadgen

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The load generator speaks MQTT with its own small codec rather than a
// client library's: it needs both 3.1.1 and 5 on one code path, windows of
// QoS 1/2 publishes without a goroutine each, and a per-message cost low
// enough that the generator, not the broker, is rarely the limit. It must
// not share the broker's codec (mochi's packets) either, or a shared
// encoding bug would hide itself. Only the packets a benchmark client uses
// are here.

// Packet types (MQTT 3.1.1 and 5, section 2.1.2).
const (
	typConnect    = 1
	typConnack    = 2
	typPublish    = 3
	typPuback     = 4
	typPubrec     = 5
	typPubrel     = 6
	typPubcomp    = 7
	typSubscribe  = 8
	typSuback     = 9
	typPingreq    = 12
	typPingresp   = 13
	typDisconnect = 14
)

// Protocol levels.
const (
	V311 = 4
	V5   = 5
)

// maxPacket bounds what the reader accepts, so a broker sending garbage
// cannot make the generator allocate gigabytes.
const maxPacket = 16 << 20

func appendVarint(b []byte, n int) []byte {
	for {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			return b
		}
	}
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// header appends the fixed header of a packet whose remaining length is n.
func header(b []byte, first byte, n int) []byte {
	return appendVarint(append(b, first), n)
}

type connectOpts struct {
	version    byte
	clientID   string
	username   string
	password   string
	hasUser    bool
	hasPass    bool
	keepAlive  uint16
	receiveMax uint16 // MQTT 5 only; 0 omits the property
}

func appendConnect(b []byte, o connectOpts) []byte {
	var vh []byte
	vh = appendString(vh, "MQTT")
	vh = append(vh, o.version)
	flags := byte(0x02) // clean session / clean start
	if o.hasUser {
		flags |= 0x80
	}
	if o.hasPass {
		flags |= 0x40
	}
	vh = append(vh, flags)
	vh = binary.BigEndian.AppendUint16(vh, o.keepAlive)
	if o.version == V5 {
		// Session Expiry Interval absent: the session ends with the
		// connection, as a 3.1.1 clean session does.
		if o.receiveMax > 0 {
			vh = append(vh, 3, 0x21)
			vh = binary.BigEndian.AppendUint16(vh, o.receiveMax)
		} else {
			vh = append(vh, 0)
		}
	}
	vh = appendString(vh, o.clientID)
	if o.hasUser {
		vh = appendString(vh, o.username)
	}
	if o.hasPass {
		vh = appendString(vh, o.password)
	}
	return append(header(b, typConnect<<4, len(vh)), vh...)
}

func appendPublish(b []byte, version, qos byte, id uint16, topic string, payload []byte) []byte {
	n := 2 + len(topic) + len(payload)
	if qos > 0 {
		n += 2
	}
	if version == V5 {
		n++ // empty properties
	}
	b = header(b, typPublish<<4|qos<<1, n)
	b = appendString(b, topic)
	if qos > 0 {
		b = binary.BigEndian.AppendUint16(b, id)
	}
	if version == V5 {
		b = append(b, 0)
	}
	return append(b, payload...)
}

// appendAck appends a PUBACK, PUBREC, PUBREL or PUBCOMP with success: the
// two-byte form, valid in both versions (MQTT 5 section 3.4.2.1).
func appendAck(b []byte, typ byte, id uint16) []byte {
	first := typ << 4
	if typ == typPubrel {
		first |= 0x02
	}
	return binary.BigEndian.AppendUint16(append(b, first, 2), id)
}

func appendSubscribe(b []byte, version byte, id uint16, filter string, qos byte) []byte {
	n := 2 + 2 + len(filter) + 1
	if version == V5 {
		n++
	}
	b = header(b, typSubscribe<<4|0x02, n)
	b = binary.BigEndian.AppendUint16(b, id)
	if version == V5 {
		b = append(b, 0)
	}
	return append(appendString(b, filter), qos)
}

// packet is one packet read: its type, flags and body (valid until the
// next read).
type packet struct {
	typ, flags byte
	body       []byte
}

// readPacket reads one packet into buf (grown as needed) from r.
func readPacket(r *bufio.Reader, buf []byte) (packet, []byte, error) {
	first, err := r.ReadByte()
	if err != nil {
		return packet{}, buf, err
	}
	n, mul := 0, 1
	for i := 0; ; i++ {
		c, err := r.ReadByte()
		if err != nil {
			return packet{}, buf, err
		}
		n += int(c&0x7f) * mul
		if c&0x80 == 0 {
			break
		}
		if i == 3 {
			return packet{}, buf, errors.New("malformed remaining length")
		}
		mul *= 128
	}
	if n > maxPacket {
		return packet{}, buf, fmt.Errorf("packet of %d bytes, more than the %d this client reads", n, maxPacket)
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return packet{}, buf, err
	}
	return packet{typ: first >> 4, flags: first & 0x0f, body: buf}, buf, nil
}

var errShort = errors.New("packet too short")

func readVarint(b []byte) (n, used int, err error) {
	mul := 1
	for i := 0; i < 4 && i < len(b); i++ {
		n += int(b[i]&0x7f) * mul
		if b[i]&0x80 == 0 {
			return n, i + 1, nil
		}
		mul *= 128
	}
	return 0, 0, errors.New("malformed variable byte integer")
}

// receiveMaximum returns the Receive Maximum property among MQTT 5
// properties p (without their length prefix), or 0.
func receiveMaximum(p []byte) (uint16, error) {
	for len(p) > 0 {
		id := p[0]
		p = p[1:]
		var skip int
		switch id {
		case 0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A:
			skip = 1
		case 0x13, 0x22, 0x23:
			skip = 2
		case 0x21:
			if len(p) < 2 {
				return 0, errShort
			}
			return binary.BigEndian.Uint16(p), nil
		case 0x02, 0x11, 0x18, 0x27:
			skip = 4
		case 0x0B:
			_, used, err := readVarint(p)
			if err != nil {
				return 0, err
			}
			skip = used
		case 0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F, 0x09, 0x16:
			if len(p) < 2 {
				return 0, errShort
			}
			skip = 2 + int(binary.BigEndian.Uint16(p))
		case 0x26:
			if len(p) < 2 {
				return 0, errShort
			}
			k := 2 + int(binary.BigEndian.Uint16(p))
			if len(p) < k+2 {
				return 0, errShort
			}
			skip = k + 2 + int(binary.BigEndian.Uint16(p[k:]))
		default:
			return 0, fmt.Errorf("unknown property %#x", id)
		}
		if len(p) < skip {
			return 0, errShort
		}
		p = p[skip:]
	}
	return 0, nil
}

// connack is what a client needs of a CONNACK: the reason (3.1.1 return
// code or MQTT 5 reason code) and the server's Receive Maximum (0: none
// given, so 65535 in MQTT 5 and unbounded in 3.1.1).
type connack struct {
	reason     byte
	receiveMax uint16
}

func parseConnack(version byte, b []byte) (connack, error) {
	if len(b) < 2 {
		return connack{}, errShort
	}
	c := connack{reason: b[1]}
	if version == V5 && len(b) > 2 {
		n, used, err := readVarint(b[2:])
		if err != nil {
			return c, err
		}
		if len(b) < 2+used+n {
			return c, errShort
		}
		if c.receiveMax, err = receiveMaximum(b[2+used : 2+used+n]); err != nil {
			return c, err
		}
	}
	return c, nil
}

// parsePublish splits a PUBLISH body into topic, packet ID and payload.
func parsePublish(version, flags byte, b []byte) (topic []byte, id uint16, payload []byte, err error) {
	if len(b) < 2 {
		return nil, 0, nil, errShort
	}
	tl := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+tl {
		return nil, 0, nil, errShort
	}
	topic, b = b[2:2+tl], b[2+tl:]
	if (flags>>1)&3 > 0 {
		if len(b) < 2 {
			return nil, 0, nil, errShort
		}
		id, b = binary.BigEndian.Uint16(b), b[2:]
	}
	if version == V5 {
		n, used, err := readVarint(b)
		if err != nil {
			return nil, 0, nil, err
		}
		if len(b) < used+n {
			return nil, 0, nil, errShort
		}
		b = b[used+n:]
	}
	return topic, id, b, nil
}

// parseAck returns the packet ID and reason code (0 when absent) of a
// PUBACK, PUBREC, PUBREL or PUBCOMP.
func parseAck(b []byte) (uint16, byte, error) {
	if len(b) < 2 {
		return 0, 0, errShort
	}
	var rc byte
	if len(b) > 2 {
		rc = b[2]
	}
	return binary.BigEndian.Uint16(b), rc, nil
}

// parseSuback returns the packet ID and the reason codes of a SUBACK.
func parseSuback(version byte, b []byte) (uint16, []byte, error) {
	if len(b) < 3 {
		return 0, nil, errShort
	}
	id := binary.BigEndian.Uint16(b)
	b = b[2:]
	if version == V5 {
		n, used, err := readVarint(b)
		if err != nil {
			return 0, nil, err
		}
		if len(b) < used+n {
			return 0, nil, errShort
		}
		b = b[used+n:]
	}
	return id, b, nil
}
