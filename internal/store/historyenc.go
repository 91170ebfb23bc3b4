package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/x/bsonx/bsoncore"
)

// AppendHistoryBSON appends m as the BSON document bson.Marshal(&m) makes
// (same fields, order, types and omissions; historyenc_test.go proves it),
// without reflection: the spool and the buckets encode every captured
// message, and the reflective marshaller was a large part of what capture
// costs the broker (BENCHMARKS.md, History).
func AppendHistoryBSON(dst []byte, m *HistoryMessage) []byte {
	return appendHistoryDoc(dst, m, &longNames)
}

// appendBucketMessage appends m in the buckets' short layout
// (writeShortLayout): AppendHistoryBSON's document with one-letter names
// and without the node (the bucket's). Every byte of a bucket is copied
// four times more on its way to the store (the driver's marshal, twice;
// its wire message; the socket) and crosses the loopback: with the long
// names and the node, a message of 64 bytes takes about 210, 169 in this
// layout. DecodeHistoryBSON reads both.
func appendBucketMessage(dst []byte, m *HistoryMessage) []byte {
	return appendHistoryDoc(dst, m, &shortNames)
}

// historyNames are a layout's element headers (type byte, name, NUL).
type historyNames struct {
	id, topic, payload, payloadNull, qos32, qos64, retain, publisher, node, ts, contentType, user string
}

var (
	longNames = historyNames{id: "\x02_id\x00", topic: "\x02topic\x00", payload: "\x05payload\x00", payloadNull: "\x0apayload\x00",
		qos32: "\x10qos\x00", qos64: "\x12qos\x00", retain: "\x08retain\x00\x01", publisher: "\x02publisher\x00",
		node: "\x02node\x00", ts: "\x09ts\x00", contentType: "\x02content_type\x00", user: "user"}
	// No node: a bucket's messages are its node's.
	shortNames = historyNames{id: "\x02_id\x00", topic: "\x02t\x00", payload: "\x05p\x00", payloadNull: "\x0ap\x00",
		qos32: "\x10q\x00", qos64: "\x12q\x00", retain: "\x08r\x00\x01", publisher: "\x02f\x00",
		ts: "\x09s\x00", contentType: "\x02c\x00", user: "u"}
)

func appendHistoryDoc(dst []byte, m *HistoryMessage, k *historyNames) []byte {
	// The element headers are constants, appended as they are:
	// bsoncore's Append*Element checks every key for a NUL, and with
	// eight keys a message that was most of the encoding's time.
	dst = slices.Grow(dst, historyBSONSize(m))
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	dst = appendStringEl(dst, k.id, m.ID)
	dst = appendStringEl(dst, k.topic, m.Topic)
	if m.Payload == nil {
		dst = append(dst, k.payloadNull...)
	} else {
		dst = append(dst, k.payload...)
		dst = binary.LittleEndian.AppendUint32(dst, uint32(len(m.Payload)))
		dst = append(dst, 0)
		dst = append(dst, m.Payload...)
	}
	if m.QoS >= math.MinInt32 && m.QoS <= math.MaxInt32 {
		dst = append(dst, k.qos32...)
		dst = binary.LittleEndian.AppendUint32(dst, uint32(int32(m.QoS)))
	} else {
		dst = append(dst, k.qos64...)
		dst = binary.LittleEndian.AppendUint64(dst, uint64(m.QoS))
	}
	if m.Retain {
		dst = append(dst, k.retain...)
	}
	dst = appendStringEl(dst, k.publisher, m.Publisher)
	if k.node != "" {
		dst = appendStringEl(dst, k.node, m.Node)
	}
	dst = append(dst, k.ts...)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(m.Time.UnixMilli()))
	if m.ContentType != "" {
		dst = appendStringEl(dst, k.contentType, m.ContentType)
	}
	if len(m.User) > 0 {
		var aidx int32
		aidx, dst = bsoncore.AppendArrayElementStart(dst, k.user)
		var key [20]byte
		for i := range m.User {
			var uidx int32
			uidx, dst = bsoncore.AppendDocumentElementStart(dst, string(appendIndex(key[:0], i)))
			dst = appendStringEl(dst, "\x02k\x00", m.User[i].Key)
			dst = appendStringEl(dst, "\x02v\x00", m.User[i].Value)
			dst, _ = bsoncore.AppendDocumentEnd(dst, uidx)
		}
		dst, _ = bsoncore.AppendArrayEnd(dst, aidx)
	}
	dst = append(dst, 0)
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(dst)-start))
	return dst
}

// appendStringEl appends a string element whose header (type byte, key,
// NUL) is hdr.
func appendStringEl(dst []byte, hdr, v string) []byte {
	dst = append(dst, hdr...)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(v)+1))
	dst = append(dst, v...)
	return append(dst, 0)
}

// historyBSONSize is about the length of m's document (AppendHistoryBSON),
// for sizing buffers.
func historyBSONSize(m *HistoryMessage) int {
	n := 96 + len(m.ID) + len(m.Topic) + len(m.Payload) + len(m.Publisher) + len(m.Node) + len(m.ContentType)
	for _, u := range m.User {
		n += 24 + len(u.Key) + len(u.Value)
	}
	return n
}

func appendIndex(dst []byte, i int) []byte {
	if i >= 10 {
		dst = appendIndex(dst, i/10)
	}
	return append(dst, byte('0'+i%10))
}

var errHistoryBSON = errors.New("store: history message: malformed BSON")

// DecodeHistoryBSON reads a document AppendHistoryBSON (or bson.Marshal of
// a HistoryMessage, or appendBucketMessage: no node then) wrote, without
// reflection. It reads what
// bson.Unmarshal reads for the documents rtm writes; unknown fields are
// skipped, and a field of an unexpected type is an error.
func DecodeHistoryBSON(b []byte) (HistoryMessage, error) {
	var m HistoryMessage
	doc := bsoncore.Document(b)
	if err := doc.Validate(); err != nil {
		return m, fmt.Errorf("%w: %w", errHistoryBSON, err)
	}
	rem := b[4 : len(b)-1]
	for len(rem) > 0 {
		e, r, ok := bsoncore.ReadElement(rem)
		if !ok {
			return m, errHistoryBSON
		}
		rem = r
		v := e.Value()
		key := foldKey(e.KeyBytes(), historyKeys)
		if v.Type == bsoncore.TypeNull && key != "_id" {
			continue // bson.Unmarshal leaves the zero value
		}
		var good bool
		switch key {
		case "_id":
			m.ID, good = v.StringValueOK()
		case "topic", "t":
			m.Topic, good = v.StringValueOK()
		case "payload", "p":
			var sub byte
			var data []byte
			sub, data, good = v.BinaryOK()
			good = good && (sub == 0 || sub == 2)
			if good {
				m.Payload = append(make([]byte, 0, len(data)), data...)
			}
		case "qos", "q":
			switch v.Type {
			case bsoncore.TypeInt32:
				m.QoS, good = int(v.Int32()), true
			case bsoncore.TypeInt64:
				m.QoS, good = int(v.Int64()), true
			}
		case "retain", "r":
			m.Retain, good = v.BooleanOK()
		case "publisher", "f":
			m.Publisher, good = v.StringValueOK()
		case "node":
			m.Node, good = v.StringValueOK()
		case "ts", "s":
			var ms int64
			if ms, good = v.DateTimeOK(); good {
				m.Time = bson.DateTime(ms).Time().UTC()
			}
		case "content_type", "c":
			m.ContentType, good = v.StringValueOK()
		case "user", "u":
			var arr bsoncore.Array
			if arr, good = v.ArrayOK(); good {
				m.User, good = decodeUser(arr)
			}
		default:
			good = true
		}
		if !good {
			return m, fmt.Errorf("%w: field %q of type %s", errHistoryBSON, key, v.Type)
		}
	}
	return m, nil
}

var (
	historyKeys = []string{"_id", "topic", "payload", "qos", "retain", "publisher", "node", "ts", "content_type", "user",
		"t", "p", "q", "r", "f", "s", "c", "u"} // appendBucketMessage's
	userKeys = []string{"k", "v"}
)

// foldKey is the field of names key stands for: the same name or, as
// bson.Unmarshal matches, one equal to it under case folding; "" if none.
func foldKey(key []byte, names []string) string {
	for _, n := range names {
		if string(key) == n {
			return n
		}
	}
	for _, n := range names {
		if bytes.EqualFold(key, []byte(n)) {
			return n
		}
	}
	return ""
}

func decodeUser(arr bsoncore.Array) ([]UserProperty, bool) {
	var out []UserProperty
	rem := arr[4 : len(arr)-1]
	for len(rem) > 0 {
		e, r, ok := bsoncore.ReadElement(rem)
		if !ok {
			return nil, false
		}
		rem = r
		d, ok := e.Value().DocumentOK()
		if !ok {
			return nil, false
		}
		var u UserProperty
		drem := d[4 : len(d)-1]
		for len(drem) > 0 {
			f, r, ok := bsoncore.ReadElement(drem)
			if !ok {
				return nil, false
			}
			drem = r
			fv := f.Value()
			if fv.Type == bsoncore.TypeNull {
				continue
			}
			switch foldKey(f.KeyBytes(), userKeys) {
			case "k":
				u.Key, ok = fv.StringValueOK()
			case "v":
				u.Value, ok = fv.StringValueOK()
			}
			if !ok {
				return nil, false
			}
		}
		out = append(out, u)
	}
	if out == nil {
		out = []UserProperty{}
	}
	return out, true
}

// appendBucketBSON appends b as bson.Marshal(b) encodes it, without
// reflection, and without the reflective encoder's copies of the data
// (TestHistoryIndexBSONMatchesMarshal).
func appendBucketBSON(dst []byte, b *histBucket) []byte {
	idx, dst := bsoncore.AppendDocumentStart(dst)
	dst = bsoncore.AppendStringElement(dst, "_id", b.ID)
	dst = bsoncore.AppendStringElement(dst, "node", b.Node)
	dst = appendIntElement(dst, "m", b.Count)
	dst = appendTimeElement(dst, "t0", b.T0)
	dst = appendTimeElement(dst, "t1", b.T1)
	if b.Data == nil {
		dst = bsoncore.AppendNullElement(dst, "d")
	} else {
		dst = bsoncore.AppendBinaryElement(dst, "d", 0, b.Data)
	}
	dst, _ = bsoncore.AppendDocumentEnd(dst, idx)
	return dst
}

// appendSegmentBSON appends sg (packed: no IDs, Entries or Refs) as
// bson.Marshal(sg) encodes it.
func appendSegmentBSON(dst []byte, sg *histSegment) []byte {
	idx, dst := bsoncore.AppendDocumentStart(dst)
	dst = bsoncore.AppendStringElement(dst, "_id", sg.ID)
	dst = bsoncore.AppendStringElement(dst, "node", sg.Node)
	dst = bsoncore.AppendStringElement(dst, "topic", sg.Topic)
	dst = bsoncore.AppendInt64Element(dst, "n", sg.N)
	if len(sg.IDs) > 0 {
		var aidx int32
		aidx, dst = bsoncore.AppendArrayElementStart(dst, "ids")
		var key [20]byte
		for i, id := range sg.IDs {
			dst = bsoncore.AppendStringElement(dst, string(appendIndex(key[:0], i)), id)
		}
		dst, _ = bsoncore.AppendArrayEnd(dst, aidx)
	}
	if sg.Packed != "" {
		dst = bsoncore.AppendStringElement(dst, "p", sg.Packed)
	}
	dst = bsoncore.AppendStringElement(dst, "min", sg.Min)
	dst = bsoncore.AppendStringElement(dst, "max", sg.Max)
	dst = bsoncore.AppendStringElement(dst, "cmax", sg.CMax)
	dst = bsoncore.AppendInt64Element(dst, "clag", sg.CLag)
	if sg.Log != "" {
		dst = bsoncore.AppendStringElement(dst, "l", sg.Log)
	}
	if sg.Flushed != 0 {
		dst = bsoncore.AppendInt64Element(dst, "f", sg.Flushed)
	}
	if sg.PackedRefs != "" {
		dst = bsoncore.AppendStringElement(dst, "r", sg.PackedRefs)
	}
	if sg.Buckets != 0 {
		dst = appendIntElement(dst, "bc", sg.Buckets)
	}
	if sg.BucketStarts != "" {
		dst = bsoncore.AppendStringElement(dst, "bk", sg.BucketStarts)
	}
	dst, _ = bsoncore.AppendDocumentEnd(dst, idx)
	return dst
}

// appendPackedSegmentBSON appends sg as appendSegmentBSON(dst,
// sg.packed()) does, packing its ids, refs and entries straight into dst:
// the packed strings, and the list packed() flattens the entries into,
// were most of what the writer allocated itself for each batch.
func appendPackedSegmentBSON(dst []byte, sg *histSegment) []byte {
	idx, dst := bsoncore.AppendDocumentStart(dst)
	dst = bsoncore.AppendStringElement(dst, "_id", sg.ID)
	dst = bsoncore.AppendStringElement(dst, "node", sg.Node)
	dst = bsoncore.AppendStringElement(dst, "topic", sg.Topic)
	dst = bsoncore.AppendInt64Element(dst, "n", sg.N)
	if len(sg.IDs) > 0 {
		at, d := packedStart(dst, "p")
		dst = packedEnd(appendPacked(d, sg.IDs...), at)
	} else if sg.Packed != "" {
		dst = bsoncore.AppendStringElement(dst, "p", sg.Packed)
	}
	dst = bsoncore.AppendStringElement(dst, "min", sg.Min)
	dst = bsoncore.AppendStringElement(dst, "max", sg.Max)
	dst = bsoncore.AppendStringElement(dst, "cmax", sg.CMax)
	dst = bsoncore.AppendInt64Element(dst, "clag", sg.CLag)
	if len(sg.Entries) > 0 {
		at, d := packedStart(dst, "l")
		var n [20]byte
		for _, e := range sg.Entries {
			d = appendPacked(d, e.Topic, string(strconv.AppendInt(n[:0], int64(len(e.IDs)), 10)))
			d = appendPacked(d, e.IDs...)
		}
		dst = packedEnd(d, at)
	} else if sg.Log != "" {
		dst = bsoncore.AppendStringElement(dst, "l", sg.Log)
	}
	if sg.Flushed != 0 {
		dst = bsoncore.AppendInt64Element(dst, "f", sg.Flushed)
	}
	if slices.ContainsFunc(sg.Refs, func(r string) bool { return r != "" }) {
		at, d := packedStart(dst, "r")
		dst = packedEnd(appendPacked(d, sg.Refs...), at)
	} else if sg.PackedRefs != "" {
		dst = bsoncore.AppendStringElement(dst, "r", sg.PackedRefs)
	}
	if sg.Buckets != 0 {
		dst = appendIntElement(dst, "bc", sg.Buckets)
	}
	if sg.BucketStarts != "" {
		dst = bsoncore.AppendStringElement(dst, "bk", sg.BucketStarts)
	}
	dst, _ = bsoncore.AppendDocumentEnd(dst, idx)
	return dst
}

// packedStart appends a string element's header and a placeholder for its
// length, and returns where the length goes; packedEnd ends the string.
func packedStart(dst []byte, key string) (int, []byte) {
	dst = bsoncore.AppendHeader(dst, bsoncore.TypeString, key)
	return len(dst), append(dst, 0, 0, 0, 0)
}

func packedEnd(dst []byte, at int) []byte {
	dst = append(dst, 0)
	binary.LittleEndian.PutUint32(dst[at:], uint32(len(dst)-at-4))
	return dst
}

// appendPacked appends v as packStrings packs it.
func appendPacked(dst []byte, v ...string) []byte {
	for _, x := range v {
		dst = strconv.AppendInt(dst, int64(len(x)), 10)
		dst = append(dst, ':')
		dst = append(dst, x...)
	}
	return dst
}

// appendIntElement encodes a Go int as bson.Marshal does: int32 when it
// fits.
func appendIntElement(dst []byte, key string, v int) []byte {
	if v >= math.MinInt32 && v <= math.MaxInt32 {
		return bsoncore.AppendInt32Element(dst, key, int32(v))
	}
	return bsoncore.AppendInt64Element(dst, key, int64(v))
}

// appendTimeElement encodes a time.Time as bson.Marshal does.
func appendTimeElement(dst []byte, key string, t time.Time) []byte {
	return bsoncore.AppendDateTimeElement(dst, key, t.Unix()*1e3+int64(t.Nanosecond()/1e6))
}
