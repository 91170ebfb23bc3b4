package writebehind

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// A Spool is an Overflow on disk: an append-only log of records in segment
// files of one directory, for items that must survive the process (message
// history while the store is down).
//
// Record format, little-endian: a 4-byte payload length, the CRC-32C
// (Castagnoli) of the payload, the payload. A segment file starts with
// spoolMagic. A record whose header or payload is cut short, whose length
// is impossible or whose checksum does not match is where the segment
// ends: OpenSpool truncates it there (a torn write after a crash), so
// garbage is never replayed.
//
// Durability: Put writes each batch with one write(2) and no fsync, so a
// process crash (kill -9) loses nothing; Sync (the caller runs it
// periodically, and Close and segment rotation run it) bounds what an
// operating-system crash or power loss can lose to what was put since.
//
// Acknowledged records are forgotten by an offset kept in the file "ack"
// (segment and byte offset, with a checksum; not synced: a lost or torn
// ack file replays records again, which the idempotent store writes
// absorb), and by deleting each segment once all of it is acknowledged.
type Spool[T any] struct {
	o   SpoolOptions[T]
	log *slog.Logger

	mu      sync.Mutex
	segs    []spoolSeg // oldest first; the last one is appended to
	w       *os.File   // the last segment, open for appending; nil until the first Put
	ackFile *os.File
	ackOff  int64 // offset in segs[0] of the first unacknowledged record
	taken   []int // byte sizes of the records returned by the last Take
	n       int   // records held
	bytes   int64 // bytes of the records held, headers included
	cut     int64 // bytes cut at open (torn or corrupt tails)
	skipped int64 // records with a valid checksum that Decode refused
	closed  bool
}

// SpoolOptions configure a Spool. Dir, MaxBytes, Encode and Decode are
// required.
type SpoolOptions[T any] struct {
	// Dir holds the segment files; created if missing. One Spool per
	// directory: OpenSpool does not lock it.
	Dir string
	// MaxBytes bounds the bytes held (records not yet acknowledged,
	// headers included); Put refuses a batch past it with ErrFull.
	MaxBytes int64
	// SegmentBytes is the size past which a new segment file is started;
	// 0 means MaxBytes/8, at least 64 KiB.
	SegmentBytes int64
	// Encode appends an item's bytes to dst; Decode reads them back. A
	// record Decode refuses is skipped, logged and counted (Skipped).
	Encode func(dst []byte, item T) []byte
	Decode func(b []byte) (T, error)
	Logger *slog.Logger
}

type spoolSeg struct {
	seq  uint64
	size int64
}

const (
	spoolMagic      = "RTMSPOOL1\n"
	segHeader       = int64(len(spoolMagic))
	spoolHeader     = 8 // a record's: length and checksum
	spoolSegExt     = ".seg"
	spoolAckName    = "ack"
	maxSpoolRecord  = 1 << 30
	minSegmentBytes = 64 << 10
	// firstSeq numbers the first segment: high, so PutFront has room
	// below it.
	firstSeq = uint64(1) << 40
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// errCorrupt reports a record that is not whole or not intact.
var errCorrupt = errors.New("spool: torn or corrupt record")

// OpenSpool opens (or creates) the spool in o.Dir. Records left by an
// earlier process and not acknowledged are held again, in order; a torn or
// corrupt record ends its segment, which is truncated there and logged.
func OpenSpool[T any](o SpoolOptions[T]) (*Spool[T], error) {
	if o.Dir == "" || o.MaxBytes <= 0 || o.Encode == nil || o.Decode == nil {
		return nil, errors.New("writebehind: SpoolOptions need Dir, MaxBytes > 0, Encode and Decode")
	}
	if o.SegmentBytes <= 0 {
		o.SegmentBytes = max(o.MaxBytes/8, minSegmentBytes)
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	s := &Spool[T]{o: o, log: log.With("spool", o.Dir)}
	if err := s.recover(); err != nil {
		s.closeFiles()
		return nil, err
	}
	return s, nil
}

// recover lists the segments, applies the ack file, cuts torn tails and
// counts what is held.
func (s *Spool[T]) recover() error {
	ents, err := os.ReadDir(s.o.Dir)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	var seqs []uint64
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, spoolSegExt) {
			continue
		}
		seq, err := strconv.ParseUint(strings.TrimSuffix(name, spoolSegExt), 10, 64)
		if err != nil {
			continue
		}
		seqs = append(seqs, seq)
	}
	slices.Sort(seqs)
	ackSeq, ackOff := s.readAck()
	for _, seq := range seqs {
		if seq < ackSeq {
			_ = os.Remove(s.segPath(seq)) // acknowledged before a crash
			continue
		}
		size, bounds, err := s.scan(seq)
		if err != nil {
			return err
		}
		off := segHeader
		if seq == ackSeq && slices.Contains(bounds, ackOff) {
			off = ackOff
		}
		for i, b := range bounds {
			if b >= off && i+1 < len(bounds) {
				s.n++
			}
		}
		if len(s.segs) == 0 {
			s.ackOff = off
			s.bytes += size - off
		} else {
			s.bytes += size - segHeader
		}
		s.segs = append(s.segs, spoolSeg{seq: seq, size: size})
	}
	if len(s.segs) == 0 {
		s.ackOff = segHeader
	} else if s.n == 0 {
		// Everything was acknowledged: start afresh.
		for _, g := range s.segs {
			_ = os.Remove(s.segPath(g.seq))
		}
		next := s.segs[len(s.segs)-1].seq + 1
		s.segs, s.ackOff, s.bytes = nil, segHeader, 0
		_ = s.writeAck(next, segHeader)
	}
	if s.cut > 0 {
		s.log.Warn("spool: torn or corrupt tail cut (a crash during a write)", "bytes", s.cut)
	}
	return nil
}

// scan reads a segment, truncating it at its first bad record, and returns
// its size and the offsets of its record boundaries (the header's end
// first, the size last).
func (s *Spool[T]) scan(seq uint64) (int64, []int64, error) {
	path := s.segPath(seq)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return 0, nil, fmt.Errorf("spool: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, nil, fmt.Errorf("spool: %w", err)
	}
	magic := make([]byte, len(spoolMagic))
	if _, err := io.ReadFull(f, magic); err != nil || string(magic) != spoolMagic {
		// Not even a whole header: nothing in it was ever acknowledged
		// to anyone. Start it again empty.
		s.cut += st.Size()
		if err := rewriteHeader(f); err != nil {
			return 0, nil, fmt.Errorf("spool: %s: %w", path, err)
		}
		return segHeader, []int64{segHeader}, nil
	}
	r := bufio.NewReaderSize(f, 64<<10)
	off := segHeader
	bounds := []int64{off}
	var buf []byte
	for {
		var n int
		buf, n, err = ReadRecord(r, buf)
		if err == io.EOF {
			break
		}
		if err != nil {
			s.cut += st.Size() - off
			if terr := f.Truncate(off); terr != nil {
				return 0, nil, fmt.Errorf("spool: cut %s at %d: %w", path, off, terr)
			}
			break
		}
		off += int64(n)
		bounds = append(bounds, off)
	}
	return off, bounds, nil
}

func rewriteHeader(f *os.File) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err := f.WriteAt([]byte(spoolMagic), 0)
	return err
}

// ReadRecord reads one record from r into buf (reused when large enough)
// and returns the payload and the record's size in bytes. It returns
// io.EOF at a clean end, and an error wrapping errCorrupt for a record cut
// short, of an impossible length or with a wrong checksum.
func ReadRecord(r io.Reader, buf []byte) ([]byte, int, error) {
	var h [spoolHeader]byte
	if n, err := io.ReadFull(r, h[:]); err != nil {
		if err == io.EOF && n == 0 {
			return buf, 0, io.EOF
		}
		return buf, 0, fmt.Errorf("%w: header cut short", errCorrupt)
	}
	size := binary.LittleEndian.Uint32(h[0:4])
	sum := binary.LittleEndian.Uint32(h[4:8])
	if size > maxSpoolRecord {
		return buf, 0, fmt.Errorf("%w: length %d", errCorrupt, size)
	}
	if cap(buf) < int(size) {
		buf = make([]byte, size)
	}
	buf = buf[:size]
	if _, err := io.ReadFull(r, buf); err != nil {
		return buf, 0, fmt.Errorf("%w: payload cut short", errCorrupt)
	}
	if crc32.Checksum(buf, crcTable) != sum {
		return buf, 0, fmt.Errorf("%w: checksum mismatch", errCorrupt)
	}
	return buf, spoolHeader + int(size), nil
}

// AppendRecord appends payload as one record to dst.
func AppendRecord(dst, payload []byte) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(payload)))
	dst = binary.LittleEndian.AppendUint32(dst, crc32.Checksum(payload, crcTable))
	return append(dst, payload...)
}

func (s *Spool[T]) segPath(seq uint64) string {
	return filepath.Join(s.o.Dir, fmt.Sprintf("%020d%s", seq, spoolSegExt))
}

// readAck returns the acknowledged position, or zeros when there is none
// (or it is torn).
func (s *Spool[T]) readAck() (uint64, int64) {
	b, err := os.ReadFile(filepath.Join(s.o.Dir, spoolAckName))
	if err != nil || len(b) != 20 || crc32.Checksum(b[:16], crcTable) != binary.LittleEndian.Uint32(b[16:]) {
		return 0, 0
	}
	return binary.LittleEndian.Uint64(b[0:8]), int64(binary.LittleEndian.Uint64(b[8:16]))
}

func (s *Spool[T]) writeAck(seq uint64, off int64) error {
	if s.ackFile == nil {
		f, err := os.OpenFile(filepath.Join(s.o.Dir, spoolAckName), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		s.ackFile = f
	}
	var b [20]byte
	binary.LittleEndian.PutUint64(b[0:8], seq)
	binary.LittleEndian.PutUint64(b[8:16], uint64(off))
	binary.LittleEndian.PutUint32(b[16:], crc32.Checksum(b[:16], crcTable))
	_, err := s.ackFile.WriteAt(b[:], 0)
	return err
}

// Put appends items, all or none: ErrFull when they would take the spool
// past MaxBytes.
func (s *Spool[T]) Put(items []T) error {
	var buf []byte
	var payload []byte
	for _, it := range items {
		payload = s.o.Encode(payload[:0], it)
		if len(payload) > maxSpoolRecord {
			return fmt.Errorf("spool: a record of %d bytes: %w", len(payload), ErrFull)
		}
		buf = AppendRecord(buf, payload)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.bytes+int64(len(buf)) > s.o.MaxBytes {
		return ErrFull
	}
	if err := s.ensureWritable(); err != nil {
		return err
	}
	last := &s.segs[len(s.segs)-1]
	if _, err := s.w.Write(buf); err != nil {
		// Leave no partial record behind for the next one to follow.
		_ = s.w.Truncate(last.size)
		_, _ = s.w.Seek(last.size, io.SeekStart)
		return fmt.Errorf("spool: %w", err)
	}
	last.size += int64(len(buf))
	s.bytes += int64(len(buf))
	s.n += len(items)
	return nil
}

// PutFront puts items ahead of those held, all or none, in a segment of
// their own (the writer's items in memory after a failed write: older
// than what overflowed after them).
func (s *Spool[T]) PutFront(items []T) error {
	s.mu.Lock()
	if len(s.segs) == 0 {
		s.mu.Unlock()
		return s.Put(items)
	}
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	buf := []byte(spoolMagic)
	var payload []byte
	for _, it := range items {
		payload = s.o.Encode(payload[:0], it)
		buf = AppendRecord(buf, payload)
	}
	rec := int64(len(buf)) - segHeader
	if s.bytes+rec > s.o.MaxBytes {
		return ErrFull
	}
	seq := s.segs[0].seq - 1
	if seq == 0 {
		return ErrFull
	}
	// The ack first: a crash between the two then replays acknowledged
	// records again (harmless), where the other order would delete the new
	// segment as acknowledged.
	if err := s.writeAck(seq, segHeader); err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	if err := os.WriteFile(s.segPath(seq), buf, 0o600); err != nil {
		_ = s.writeAck(s.segs[0].seq, s.ackOff)
		_ = os.Remove(s.segPath(seq))
		return fmt.Errorf("spool: %w", err)
	}
	// The old first segment is now read from its start again: records of
	// it acknowledged before are written twice (idempotent) rather than
	// tracked by a second offset.
	s.bytes += rec + (s.ackOff - segHeader)
	s.n += len(items) + s.countBefore(s.segs[0], s.ackOff)
	s.segs = append([]spoolSeg{{seq: seq, size: int64(len(buf))}}, s.segs...)
	s.ackOff = segHeader
	return nil
}

// countBefore counts the records of g before offset off. s.mu is held.
func (s *Spool[T]) countBefore(g spoolSeg, off int64) int {
	if off <= segHeader {
		return 0
	}
	f, err := os.Open(s.segPath(g.seq))
	if err != nil {
		return 0
	}
	defer f.Close()
	r := bufio.NewReader(io.NewSectionReader(f, segHeader, off-segHeader))
	n := 0
	var buf []byte
	for {
		var err error
		if buf, _, err = ReadRecord(r, buf); err != nil {
			return n
		}
		n++
	}
}

// ensureWritable opens the last segment for appending, starting a new one
// when there is none or it is full. s.mu is held.
func (s *Spool[T]) ensureWritable() error {
	if s.w != nil && s.segs[len(s.segs)-1].size < s.o.SegmentBytes {
		return nil
	}
	if s.w != nil {
		// Rotation: the full segment is synced once, here.
		_ = s.w.Sync()
		_ = s.w.Close()
		s.w = nil
	}
	if len(s.segs) > 0 && s.segs[len(s.segs)-1].size < s.o.SegmentBytes {
		last := s.segs[len(s.segs)-1]
		f, err := os.OpenFile(s.segPath(last.seq), os.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("spool: %w", err)
		}
		if _, err := f.Seek(last.size, io.SeekStart); err != nil {
			f.Close()
			return fmt.Errorf("spool: %w", err)
		}
		s.w = f
		return nil
	}
	seq := firstSeq
	if len(s.segs) > 0 {
		seq = s.segs[len(s.segs)-1].seq + 1
	} else if a, _ := s.readAck(); a > 0 {
		seq = a
	}
	f, err := os.OpenFile(s.segPath(seq), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	if _, err := f.Write([]byte(spoolMagic)); err != nil {
		f.Close()
		return fmt.Errorf("spool: %w", err)
	}
	s.w = f
	if len(s.segs) == 0 {
		s.ackOff = segHeader
	}
	s.segs = append(s.segs, spoolSeg{seq: seq, size: segHeader})
	return nil
}

// Take returns up to max of the oldest records, decoded, without removing
// them.
func (s *Spool[T]) Take(max int) ([]T, error) { return s.TakeBytes(max, 0) }

// TakeBytes is Take that also keeps the records returned within maxBytes
// encoded (0: no bound), one at least: a replay after a
// long outage then holds about a memory queue's worth of items at a time,
// not max items of any size (ByteTaker).
func (s *Spool[T]) TakeBytes(max int, maxBytes int64) ([]T, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		out, err := s.takeLocked(max, maxBytes)
		if err != nil || len(out) > 0 || len(s.taken) == 0 {
			return out, err
		}
		// Only undecodable records: drop them now, or Take would return
		// nothing forever while Len says there is something.
		if err := s.ackLocked(len(s.taken)); err != nil {
			return nil, err
		}
	}
}

func (s *Spool[T]) takeLocked(max int, maxBytes int64) ([]T, error) {
	s.taken = s.taken[:0]
	var out []T
	var buf []byte
	var bytes int64
	over := false // the next record would pass maxBytes
	full := func() bool { return over || len(out) >= max }
	for i := 0; i < len(s.segs) && !full(); i++ {
		g := s.segs[i]
		off := segHeader
		if i == 0 {
			off = s.ackOff
		}
		if off >= g.size {
			continue
		}
		f, err := os.Open(s.segPath(g.seq))
		if err != nil {
			return nil, fmt.Errorf("spool: %w", err)
		}
		r := bufio.NewReaderSize(io.NewSectionReader(f, off, g.size-off), 64<<10)
		for !full() {
			var n int
			buf, n, err = ReadRecord(r, buf)
			if err == io.EOF {
				break
			}
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("spool: segment %d: %w", g.seq, err)
			}
			if maxBytes > 0 && len(s.taken) > 0 && bytes+int64(n) > maxBytes {
				over = true // the next Take reads it again
				break
			}
			s.taken = append(s.taken, n)
			bytes += int64(n)
			it, derr := s.o.Decode(buf)
			if derr != nil {
				// Intact but unreadable (written by another version):
				// acknowledged with its batch, never retried.
				s.skipped++
				s.log.Error("spool: record skipped: cannot decode", "err", derr)
				continue
			}
			out = append(out, it)
		}
		f.Close()
	}
	return out, nil
}

// Ack removes the n oldest items: those of the last Take (with the
// records it skipped among them).
func (s *Spool[T]) Ack(n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Skipped records were not returned but are among those taken.
	return s.ackLocked(max(n, len(s.taken)))
}

// ackLocked forgets the records oldest first, by the sizes Take noted.
// s.mu is held.
func (s *Spool[T]) ackLocked(records int) error {
	if records > len(s.taken) {
		return fmt.Errorf("spool: ack of %d records, %d taken", records, len(s.taken))
	}
	for _, size := range s.taken[:records] {
		for len(s.segs) > 1 && s.ackOff >= s.segs[0].size {
			s.dropFirst()
		}
		s.ackOff += int64(size)
		s.bytes -= int64(size)
		s.n--
	}
	s.taken = s.taken[:0]
	for len(s.segs) > 1 && s.ackOff >= s.segs[0].size {
		s.dropFirst()
	}
	if s.n == 0 && len(s.segs) == 1 && s.ackOff >= s.segs[0].size {
		// Empty: remove the last segment too, so an idle spool holds no
		// file; the next Put starts the next one.
		seq := s.segs[0].seq
		if s.w != nil {
			_ = s.w.Close()
			s.w = nil
		}
		_ = os.Remove(s.segPath(seq))
		s.segs = s.segs[:0]
		s.ackOff = segHeader
		return s.writeAck(seq+1, s.ackOff)
	}
	if len(s.segs) == 0 {
		return nil
	}
	return s.writeAck(s.segs[0].seq, s.ackOff)
}

// dropFirst deletes the first segment, fully acknowledged. s.mu is held.
func (s *Spool[T]) dropFirst() {
	_ = os.Remove(s.segPath(s.segs[0].seq))
	s.segs = s.segs[1:]
	s.ackOff = segHeader
}

// Len is the number of records held.
func (s *Spool[T]) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// Bytes is the size of the records held, headers included.
func (s *Spool[T]) Bytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bytes
}

// Cut is the bytes cut at open: torn or corrupt tails.
func (s *Spool[T]) Cut() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cut
}

// Skipped counts intact records Decode refused.
func (s *Spool[T]) Skipped() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.skipped
}

// Sync flushes the segment being appended to to stable storage.
func (s *Spool[T]) Sync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.w == nil {
		return nil
	}
	return s.w.Sync()
}

// Close syncs and closes the files. What is held stays for the next
// OpenSpool.
func (s *Spool[T]) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	var err error
	if s.w != nil {
		err = s.w.Sync()
	}
	s.closeFiles()
	return err
}

func (s *Spool[T]) closeFiles() {
	if s.w != nil {
		_ = s.w.Close()
		s.w = nil
	}
	if s.ackFile != nil {
		_ = s.ackFile.Close()
		s.ackFile = nil
	}
}

var (
	_ Overflow[int]      = (*Spool[int])(nil)
	_ FrontOverflow[int] = (*Spool[int])(nil)
)
