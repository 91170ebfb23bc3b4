// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: 2023 mochi-mqtt, mochi-co
// SPDX-FileContributor: mochi-co

package mqtt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/rs/xid"

	"github.com/mochi-mqtt/server/v2/mempool"
	"github.com/mochi-mqtt/server/v2/packets"
)

const (
	defaultKeepalive             uint16 = 10 // the default connection keepalive value in seconds.
	defaultClientProtocolVersion byte   = 4  // the default mqtt protocol version of connecting clients (if somehow unspecified).
	minimumKeepalive             uint16 = 5  // the minimum recommended keepalive - values under with display a warning.
)

var (
	ErrMinimumKeepalive = errors.New("client keepalive is below minimum recommended value and may exhibit connection instability")

	// ErrClientPanic is the stop cause of a client whose connection handling
	// panicked (rtm patch, https://github.com/mochi-mqtt/server/issues/501).
	ErrClientPanic = errors.New("recovered panic while serving client")
)

// ReadFn is the function signature for the function used for reading and processing new packets.
type ReadFn func(*Client, packets.Packet) error

// Clients contains a map of the clients known by the broker.
type Clients struct {
	internal map[string]*Client // clients known by the broker, keyed on client id.
	sync.RWMutex
}

// NewClients returns an instance of Clients.
func NewClients() *Clients {
	return &Clients{
		internal: make(map[string]*Client),
	}
}

// Add adds a new client to the clients map, keyed on client id.
func (cl *Clients) Add(val *Client) {
	cl.Lock()
	defer cl.Unlock()
	cl.internal[val.ID] = val
}

// GetAll returns all the clients.
func (cl *Clients) GetAll() map[string]*Client {
	cl.RLock()
	defer cl.RUnlock()
	m := map[string]*Client{}
	for k, v := range cl.internal {
		m[k] = v
	}
	return m
}

// Range calls fn for each client, in no particular order, until fn returns
// false. The read lock is held throughout: fn must be quick and must not call
// the Clients methods (a second read lock deadlocks once a writer waits; Add
// and Delete deadlock at once) nor hooks, which may.
//
// rtm patch: the event loop's housekeeping iterated over GetAll, a copy of
// the whole map, twice a second. See PATCHES.md, patch 13.
func (cl *Clients) Range(fn func(id string, c *Client) bool) {
	cl.RLock()
	defer cl.RUnlock()
	for id, c := range cl.internal {
		if !fn(id, c) {
			return
		}
	}
}

// Get returns the value of a client if it exists.
func (cl *Clients) Get(id string) (*Client, bool) {
	cl.RLock()
	defer cl.RUnlock()
	val, ok := cl.internal[id]
	return val, ok
}

// Len returns the length of the clients map.
func (cl *Clients) Len() int {
	cl.RLock()
	defer cl.RUnlock()
	val := len(cl.internal)
	return val
}

// Delete removes a client from the internal map.
func (cl *Clients) Delete(id string) {
	cl.Lock()
	defer cl.Unlock()
	delete(cl.internal, id)
}

// Remove deletes val if it is the client of its ID, and reports whether
// it was. rtm patch 115: Delete(id) deletes whichever client holds the ID,
// possibly a newer connection that replaced val (see endExpiredSession).
func (cl *Clients) Remove(val *Client) bool {
	cl.Lock()
	defer cl.Unlock()
	if cur, ok := cl.internal[val.ID]; !ok || cur != val {
		return false
	}
	delete(cl.internal, val.ID)
	return true
}

// GetByListener returns clients matching a listener id.
func (cl *Clients) GetByListener(id string) []*Client {
	cl.RLock()
	defer cl.RUnlock()
	// rtm patch: len, not cl.Len(): a second RLock in the same goroutine
	// deadlocks once a writer waits in between.
	// https://github.com/mochi-mqtt/server/issues/488
	clients := make([]*Client, 0, len(cl.internal))
	for _, client := range cl.internal {
		if client.Net.Listener == id && !client.Closed() {
			clients = append(clients, client)
		}
	}
	return clients
}

// Client contains information about a client known by the broker.
type Client struct {
	Properties   ClientProperties // client properties
	State        ClientState      // the operational state of the client.
	Net          ClientConnection // network connection state of the client
	ID           string           // the client id.
	ops          *ops             // ops provides a reference to server ops.
	sync.RWMutex                  // mutex
	// rtm patch 106: hooks' per-connection values, see ClientSlot.
	slots [clientSlots]unsafe.Pointer
}

// ClientConnection contains the connection transport and metadata for the client.
type ClientConnection struct {
	Conn     net.Conn                    // the net.Conn used to establish the connection
	bconn    *connReader                 // a buffered net.Conn for reading packets (rtm patch 73: was *bufio.Reader)
	outbuf   *bytes.Buffer               // a buffer for writing packets
	holding  atomic.Bool                 // rtm patch 70: the reader holds writes back, more of its input is buffered
	acks     atomic.Pointer[ackCoalesce] // rtm patch 102: made at the client's first QoS 1/2 PUBLISH, with AckCoalesce set
	closeBy  atomic.Int64                // rtm patch 102: unix ns, the closing connection's write deadline (setCloseWriteDeadline); 0 before
	Remote   string                      // the remote address of the client
	Listener string                      // listener id of the client
	Inline   bool                        // if true, the client is the built-in 'inline' embedded client
}

// ClientProperties contains the properties which define the client behaviour.
type ClientProperties struct {
	Props           packets.Properties
	Will            Will
	Username        []byte
	ProtocolVersion byte
	Clean           bool
}

// Will contains the last will and testament details for a client connection.
type Will struct {
	Payload           []byte                 // -
	User              []packets.UserProperty // -
	TopicName         string                 // -
	Flag              uint32                 // 0,1
	WillDelayInterval uint32                 // -
	Qos               byte                   // -
	Retain            bool                   // -
}

// ClientState tracks the state of the client.
type ClientState struct {
	TopicAliases    TopicAliases             // a map of topic aliases
	stopCause       atomic.Value             // reason for stopping
	Inflight        *Inflight                // a map of in-flight qos messages
	Subscriptions   *Subscriptions           // a map of the subscription filters a client maintains
	disconnected    int64                    // the time the client disconnected in unix time, for calculating expiry
	outbound        outboundQueue            // queue for pending outbound packets (rtm patch: was a chan, see outbound.go)
	flow            flowGate                 // rtm patch 20: publishers waiting for this client to drain
	rtm             rtmClientState           // rtm patches 42-44: read deadlines
	acks            heldAcks                 // rtm patch 54: acknowledgements held by OnPublishHold
	endOnce         sync.Once                // only end once
	isTakenOver     atomic.Bool              // used to identify orphaned clients
	takeover        sync.RWMutex             // rtm patch 92: a take-over (write) against deliveries (read)
	inbound         atomic.Pointer[Inflight] // rtm patch 94: the client's own QoS 1/2 flows, see inboundQos
	packetID        uint32                   // the current highest packetID
	packetIDMu      sync.Mutex               // rtm patch: guards packetID allocation (was the client's lock, held by writes)
	open            context.Context          // indicate that the client is open for packet exchange
	cancelOpen      context.CancelFunc       // cancel function for open context
	outboundQty     int32                    // number of messages currently in the outbound queue
	Keepalive       uint16                   // the number of seconds the connection can wait
	ServerKeepalive bool                     // keepalive was set by the server
}

// newClient returns a new instance of Client. This is almost exclusively used by Server
// for creating new clients, but it lives here because it's not dependent.
func newClient(c net.Conn, o *ops) *Client {
	ctx, cancel := context.WithCancel(context.Background())
	cl := &Client{
		State: ClientState{
			Inflight:      NewInflights(),
			Subscriptions: NewSubscriptions(),
			TopicAliases:  NewTopicAliases(o.options.Capabilities.TopicAliasMaximum),
			open:          ctx,
			cancelOpen:    cancel,
			Keepalive:     defaultKeepalive,
			outbound:      newOutboundQueue(o.options.Capabilities.MaximumClientWritesPending), // rtm patch
		},
		Properties: ClientProperties{
			ProtocolVersion: defaultClientProtocolVersion, // default protocol version
		},
		ops: o,
	}

	if c != nil {
		cl.Net = ClientConnection{
			Conn:   c,
			bconn:  newConnReader(c, o.options.ClientNetReadBufferSize), // rtm patch 73
			Remote: c.RemoteAddr().String(),
		}
	}

	cl.State.outbound.coalesce = o.options.WriteCoalesce // rtm patch 98

	if o.mem != nil { // rtm patch 41: the client's held bytes count in the server's total
		cl.State.Inflight.budget = &o.mem.Queued
		cl.State.outbound.budget = &o.mem.Queued
	}

	return cl
}

// recoverPanic logs a recovered panic with the client id and the stack, and
// returns the error the connection is stopped with.
// rtm patch: https://github.com/mochi-mqtt/server/issues/501
func (cl *Client) recoverPanic(r any) error {
	cl.ops.log.Error("recovered panic while serving client; closing its connection",
		"client", cl.ID, "remote", cl.Net.Remote, "listener", cl.Net.Listener,
		"panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	return fmt.Errorf("%w: %v", ErrClientPanic, r)
}

// WriteLoop writes the pending outbound packets to the client connection, in
// order, and returns when none is left.
//
// rtm patch: the server no longer runs it as a goroutine per connection that
// waits for packets (a 4 KiB stack per idle connection): publishToClient
// starts a writer (writeQueued) when it queues a packet and none is running,
// and the writer exits once the queue is empty (see outboundQueue). Called
// directly, WriteLoop drains the queue unless a writer is running already.
func (cl *Client) WriteLoop() {
	if cl.State.outbound.claim() {
		cl.writeQueued()
	}
}

// releaseWriter lets the packets queued while the caller held the writer
// (outbound.claim) go out, after what the caller wrote directly.
// rtm patch 95.
func (cl *Client) releaseWriter() {
	if cl.State.outbound.release() {
		cl.startWriter() // rtm patch 96
	}
}

// writeQueued writes queued packets until the queue is empty; the caller is
// the queue's writer (push returned start, or claim true). After the client
// closes it keeps going, each write failing at once, so the queue is emptied.
func (cl *Client) writeQueued() {
	// rtm patch: a panic while encoding or writing a packet to this client
	// closes this client only. https://github.com/mochi-mqtt/server/issues/501
	defer func() {
		if r := recover(); r != nil {
			cl.Stop(cl.recoverPanic(r))
		}
	}()
	cl.drainOutbound()
}

// drainOutbound is writeQueued's loop, without its recovery (rtm patch 98:
// flushCoalesced runs it from stop, where Stop cannot be called again).
func (cl *Client) drainOutbound() {
	for {
		pk, ok := cl.State.outbound.pop()
		if !ok {
			return
		}
		held := cl.State.outbound.queuedBytes(pk)  // rtm patch 83: before writePacket changes pk
		if err := cl.writePacket(pk); err != nil { // rtm patch 83: the queue's copy, not another
			// TODO : Figure out what to do with error
			cl.ops.log.Debug("failed publishing packet", "error", err, "client", cl.ID, "packet", pk)
		}
		cl.State.outbound.releaseBytes(held) // rtm patch 40: written (or failed), no longer held
		releaseQueuedPacket(pk)              // rtm patch 72: the queue held the only reference
		atomic.AddInt32(&cl.State.outboundQty, -1)
		cl.flowDrained() // rtm patch 20: a place in the queue is free
	}
}

// ParseConnect parses the connect parameters and properties for a client.
func (cl *Client) ParseConnect(lid string, pk packets.Packet) {
	cl.Net.Listener = lid

	cl.Properties.ProtocolVersion = pk.ProtocolVersion
	// rtm patch 108: a copy. The decoded username is a slice of the
	// CONNECT's body, which it kept alive for the whole connection: with a
	// token as the password, about 300 bytes per connection for a username
	// of 20.
	cl.Properties.Username = bytes.Clone(pk.Connect.Username)
	cl.Properties.Clean = pk.Connect.Clean
	cl.Properties.Props = pk.Properties.Copy(false)

	if cl.Properties.Props.ReceiveMaximum > cl.ops.options.Capabilities.MaximumInflight { // 3.3.4 Non-normative
		cl.Properties.Props.ReceiveMaximum = cl.ops.options.Capabilities.MaximumInflight
	}

	if pk.Connect.Keepalive <= minimumKeepalive {
		cl.ops.log.Warn(
			ErrMinimumKeepalive.Error(),
			"client", cl.ID,
			"keepalive", pk.Connect.Keepalive,
			"recommended", minimumKeepalive,
		)
	}

	cl.State.Keepalive = pk.Connect.Keepalive                                              // [MQTT-3.2.2-22]
	cl.State.Inflight.ResetReceiveQuota(int32(cl.ops.options.Capabilities.ReceiveMaximum)) // server receive max per client
	cl.State.Inflight.ResetSendQuota(int32(cl.Properties.Props.ReceiveMaximum))            // client receive max
	// rtm patch 107: newClient made the outbound aliases already, with the
	// server's maximum: set the client's instead of allocating them again.
	if out := cl.State.TopicAliases.Outbound; out != nil {
		out.Lock()
		out.internal, out.cursor, out.maximum = nil, 0, cl.Properties.Props.TopicAliasMaximum
		out.Unlock()
	} else {
		cl.State.TopicAliases.Outbound = NewOutboundTopicAliases(cl.Properties.Props.TopicAliasMaximum)
	}

	cl.ID = pk.Connect.ClientIdentifier
	if cl.ID == "" {
		cl.ID = xid.New().String() // [MQTT-3.1.3-6] [MQTT-3.1.3-7]
		cl.Properties.Props.AssignedClientID = cl.ID
	}

	if pk.Connect.WillFlag {
		cl.Properties.Will = Will{
			Qos:               pk.Connect.WillQos,
			Retain:            pk.Connect.WillRetain,
			Payload:           pk.Connect.WillPayload,
			TopicName:         pk.Connect.WillTopic,
			WillDelayInterval: pk.Connect.WillProperties.WillDelayInterval,
			User:              pk.Connect.WillProperties.User,
		}
		if pk.Properties.SessionExpiryIntervalFlag &&
			pk.Properties.SessionExpiryInterval < pk.Connect.WillProperties.WillDelayInterval {
			cl.Properties.Will.WillDelayInterval = pk.Properties.SessionExpiryInterval
		}
		if pk.Connect.WillFlag {
			cl.Properties.Will.Flag = 1 // atomic for checking
		}
	}
}

// refreshDeadline refreshes the read/write deadline for the net.Conn connection.
// rtm patch 86: it returns the deadline set (zero: none).
func (cl *Client) refreshDeadline(keepalive uint16) time.Time {
	return cl.refreshDeadlineFrom(time.Now(), keepalive)
}

// refreshDeadlineFrom is refreshDeadline counting from now (rtm patch 109:
// after a burst, from its last wait).
func (cl *Client) refreshDeadlineFrom(now time.Time, keepalive uint16) time.Time {
	var expiry time.Time // nil time can be used to disable deadline if keepalive = 0
	if keepalive > 0 {
		expiry = now.Add(time.Duration(keepalive+(keepalive/2)) * time.Second) // [MQTT-3.1.2-22]
	}

	if cl.Net.Conn != nil {
		_ = cl.Net.Conn.SetDeadline(expiry) // [MQTT-3.1.2-22]
		// rtm patch 102: the read loop must not put off the write
		// deadline of a connection being closed (stop): the store there
		// precedes its SetWriteDeadline, so either this load sees it or
		// stop's deadline is set after this SetDeadline.
		if by := cl.Net.closeBy.Load(); by != 0 {
			_ = cl.Net.Conn.SetWriteDeadline(time.Unix(0, by))
		}
	}
	return expiry
}

// NextPacketID returns the next available (unused) packet id for the client.
// If no unused packet ids are available, an error is returned and the client
// should be disconnected.
//
// rtm patch: it takes its own mutex. v2.7.9 took the client's lock, which
// WritePacket holds across the network write: with a subscriber that stopped
// reading, every publisher to it blocked here behind the writer stuck in
// write(2), and with them their own clients.
// https://github.com/mochi-mqtt/server/issues/196 (the lock in WritePacket),
// https://github.com/mochi-mqtt/server/pull/160 (the lock here)
func (cl *Client) NextPacketID() (i uint32, err error) {
	cl.State.packetIDMu.Lock()
	defer cl.State.packetIDMu.Unlock()

	i = atomic.LoadUint32(&cl.State.packetID)
	started := i
	overflowed := false
	for {
		if overflowed && i == started {
			return 0, packets.ErrQuotaExceeded
		}

		if i >= cl.ops.options.Capabilities.maximumPacketID {
			overflowed = true
			i = 0
			continue
		}

		i++

		if _, ok := cl.State.Inflight.Get(uint16(i)); !ok {
			atomic.StoreUint32(&cl.State.packetID, i)
			return i, nil
		}
	}
}

// ResendInflightMessages attempts to resend any pending inflight messages to connected clients.
func (cl *Client) ResendInflightMessages(force bool) error {
	if cl.State.Inflight.Len() == 0 && cl.inboundLen() == 0 { // rtm patch 94
		return nil
	}
	return cl.resendInflight(cl.State.Inflight.GetAll(false))
}

// resendInflight resends the session's messages in list (a snapshot of
// State.Inflight), then the inbound QoS flows (patch 94).
// rtm patch 95: split out of ResendInflightMessages, so connectClient takes
// the snapshot while deliveries wait and writes it after they resume.
func (cl *Client) resendInflight(list []packets.Packet) error {
	if err := cl.resendFrom(cl.State.Inflight, list); err != nil {
		return err
	}
	return cl.resendFrom(cl.State.inbound.Load(), cl.inboundResend()) // rtm patch 94; 123: only what is owed
}

// resendFrom resends list, taken from m. rtm patch 95: the loop of
// ResendInflightMessages.
func (cl *Client) resendFrom(m *Inflight, list []packets.Packet) error {
	for _, tk := range list {
		if tk.FixedHeader.Type == packets.Publish {
			tk.FixedHeader.Dup = true // [MQTT-3.3.1-1] [MQTT-3.3.1-3]
		}

		cl.ops.hooks.OnQosPublish(cl, tk, tk.Created, 0)
		err := cl.WritePacket(tk)
		if errors.Is(err, packets.ErrPacketTooLarge) {
			continue // rtm patch 31: dropped and reported by discardTooLarge; send the rest
		}
		if err != nil {
			return err
		}

		if tk.FixedHeader.Type == packets.Puback || tk.FixedHeader.Type == packets.Pubcomp {
			if ok := m.Delete(tk.PacketID); ok {
				cl.ops.hooks.OnQosComplete(cl, tk)
				atomic.AddInt64(&cl.ops.info.Inflight, -1)
			}
		}
	}

	return nil
}

// ClearInflights deletes all inflight messages for the client, e.g. for a disconnected user with a clean session.
func (cl *Client) ClearInflights() {
	for _, tk := range cl.State.Inflight.GetAll(false) {
		if ok := cl.State.Inflight.Delete(tk.PacketID); ok {
			cl.ops.hooks.OnQosDropped(cl, tk)
			atomic.AddInt64(&cl.ops.info.Inflight, -1)
		}
	}
	cl.clearInbound() // rtm patch 94
	cl.flowDrained()  // rtm patch 20
}

// ClearExpiredInflights deletes any inflight messages which have expired.
func (cl *Client) ClearExpiredInflights(now, maximumExpiry int64) []uint16 {
	deleted := []uint16{}
	for _, tk := range cl.State.Inflight.GetAll(false) {
		if inflightExpired(&tk, now, maximumExpiry) { // rtm patch: shared with Inflight.hasExpired
			if ok := cl.State.Inflight.Delete(tk.PacketID); ok {
				cl.ops.hooks.OnQosDropped(cl, tk)
				if tk.FixedHeader.Type == packets.Publish {
					cl.ops.hooks.OnPublishExpired(cl, tk) // rtm patch 27
				}
				atomic.AddInt64(&cl.ops.info.Inflight, -1)
				deleted = append(deleted, tk.PacketID)
			}
		}
	}
	if len(deleted) > 0 {
		cl.flowDrained() // rtm patch 20
	}

	return deleted
}

// inflightExpired reports whether an inflight message has expired.
// rtm patch: the test of ClearExpiredInflights, shared with
// Inflight.hasExpired (patch 13).
func inflightExpired(tk *packets.Packet, now, maximumExpiry int64) bool {
	expired := tk.ProtocolVersion == 5 && tk.Expiry > 0 && tk.Expiry < now // [MQTT-3.3.2-5]

	// If the maximum message expiry interval is set (greater than 0), and the message
	// retention period exceeds the maximum expiry, the message will be forcibly removed.
	enforced := maximumExpiry > 0 && now-tk.Created > maximumExpiry

	return expired || enforced
}

// Read reads incoming packets from the connected client and transforms them into
// packets to be handled by the packetHandler.
func (cl *Client) Read(packetHandler ReadFn) (err error) {
	return cl.read(packetHandler, 0)
}

// read is Read; with parkedAt != 0 (unix ns) it continues a wait that
// began then and was parked (rtm patch 86): the deadline set then stands.
// It returns errParked when the connection should be parked.
func (cl *Client) read(packetHandler ReadFn, parkedAt int64) (err error) {
	// rtm patch: a panic while decoding or processing a packet from this client
	// is returned as an error, so the server closes this connection only (with
	// the usual LWT/disconnect handling) instead of crashing the process.
	// https://github.com/mochi-mqtt/server/issues/501
	defer func() {
		if r := recover(); r != nil {
			err = cl.recoverPanic(r)
		}
	}()
	defer cl.holdWrites(false) // rtm patch 70: whatever ends the loop, held writes go out

	var burstWait time.Time // rtm patch 109: when a burst's last wait began
	for {
		// rtm patch 86: a parked client woken because it was stopped goes
		// on to the read, which fails as the waiting read of a client that
		// was not parked does (its error sends the will): not "closed, no
		// error", which a client's own DISCONNECT ends with.
		if parkedAt == 0 && cl.Closed() {
			return nil
		}

		// rtm patch 74: the keepalive deadline is set before a read that
		// may wait for the network. While the read loop holds writes (patch
		// 70) the whole next packet is buffered, received already: v2.7.9
		// reset both deadlines (a time.Now and two runtime timers) for
		// every packet of a burst.
		var waitFrom time.Time // rtm patch 75: when this read may start to wait
		if parkedAt != 0 {
			waitFrom, parkedAt = time.Unix(0, parkedAt), 0 // rtm patch 86
		} else if !cl.Net.holding.Load() {
			waitFrom = time.Now()
			if !burstWait.IsZero() {
				waitFrom = burstWait // rtm patch 109: the wait began in the burst
			}
			expiry := cl.refreshDeadlineFrom(waitFrom, cl.State.Keepalive)
			if park, err := cl.waitOrPark(waitFrom, expiry); park || err != nil { // rtm patch 86
				if park {
					return errParked
				}
				return err
			}
		}
		// rtm patch 96: on the stack; the helper gets a copy (new() escaped
		// through handleOnHelper's closure: an allocation per packet).
		var fh packets.FixedHeader
		err = cl.ReadFixedHeader(&fh) // an idle connection waits here
		if err != nil {
			return err
		}

		if !waitFrom.IsZero() && time.Since(waitFrom) >= idleHandOff {
			err = cl.handleOnHelper(fh, packetHandler) // rtm patch 75
		} else {
			err = cl.readAndHandle(&fh, packetHandler)
		}
		if err != nil {
			return err
		}

		// rtm patch 109: the packets that follow are read and handled in
		// one RawConn.Read, with no read that finds the socket empty.
		burstWait = time.Time{}
		if b := cl.Net.bconn; b != nil && b.rc != nil && !cl.Net.holding.Load() && !cl.Closed() {
			if burstWait, err = cl.readBurst(packetHandler); err != nil {
				return err
			}
		}
	}
}

// idleHandOff is how long a connection's read loop must have waited for a
// packet for handleOnHelper to handle it (rtm patch 75).
const idleHandOff = time.Second

// handleOnHelper runs readAndHandle on a goroutine of its own and waits for
// it; a panic there is returned as an error, as Read's recover does.
//
// rtm patch 75: handling any packet passes ~800-byte packets.Packet values
// through deep frames (ReadPacket, the hooks, processPacket, WritePacket)
// and grows the goroutine's stack to 16 KiB, even for a PINGREQ. On the
// connection's own goroutine that stack stayed until two GCs had halved it,
// and RSS kept it: an idle device pinging every keepalive idled on 16 KiB of
// stack instead of 4 KiB. A packet that ends a wait of idleHandOff or more
// (a PINGREQ, an occasional message) is therefore handled on a short-lived
// helper, whose stack returns to the runtime's cache when it exits (see
// patch 69 for the CONNECT); packets that follow each other closely are
// handled on the read goroutine, as before, so a busy connection pays
// nothing and an idle one one goroutine start per packet.
func (cl *Client) handleOnHelper(fh packets.FixedHeader, packetHandler ReadFn) error {
	done := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- cl.recoverPanic(r)
			}
		}()
		done <- cl.readAndHandle(&fh, packetHandler)
	}()
	return <-done
}

// readAndHandle reads the rest of the packet whose fixed header is fh and
// processes it.
// rtm patch: split out of Read, so the packets.Packet values (800 bytes
// each) are on the stack only while a packet is handled, not while the
// connection idles in ReadFixedHeader (see attachClient).
//
//go:noinline
func (cl *Client) readAndHandle(fh *packets.FixedHeader, packetHandler ReadFn) error {
	pk, err := cl.ReadPacket(fh)
	if err != nil {
		return err
	}

	// rtm patch 70: while the next packet is already read in full, what handling
	// this one writes (a PUBACK) is held and goes out with the next
	// packet's, in one write; the last packet of a burst releases them all,
	// with its own.
	hold := cl.nextPacketBuffered()
	delay := cl.ackDelaying(pk.FixedHeader.Type, pk.FixedHeader.Qos) // rtm patch 102: hold its ack past the burst, perhaps
	if hold || delay {
		cl.holdWrites(true)
	}

	if cl.Closed() {
		// rtm patch: stopped meanwhile; its connection may be draining (see
		// stopAfterDrain), so it can still deliver packets: ignore them.
		return nil
	}

	err = packetHandler(cl, pk) // Process inbound packet.
	if !hold {
		if delay {
			cl.releaseAcks() // rtm patch 102
		} else {
			cl.holdWrites(false) // rtm patch 70
		}
	}
	return err
}

// Stop instructs the client to shut down all processing goroutines and disconnect.
func (cl *Client) Stop(err error) {
	cl.stop(err, false)
}

// Bounds of the drain after a DISCONNECT refusing what the client sent (see
// stopAfterDrain).
const (
	disconnectDrainTimeout = 2 * time.Second
	disconnectDrainBytes   = 1 << 20
)

// stopAfterDrain is Stop for a connection just sent a DISCONNECT because of
// the client's own packets (receive maximum exceeded, protocol error, ...):
// it half-closes the connection (FIN after the DISCONNECT) and reads and
// discards what the client still sends, for at most
// disconnectDrainTimeout or disconnectDrainBytes, before closing it.
//
// rtm patch: v2.7.9 closed at once. A client still sending (the PUBRELs for
// the PUBRECs it got before the DISCONNECT 0x93, in Paho client_test5
// test_flow_control2) then had unread bytes in the server's socket, so the
// server's kernel answered with a TCP reset, and the client's next write
// failed (ECONNRESET, EPIPE) before it read the DISCONNECT and its reason
// code. The caller is usually the client's read goroutine, which then stops
// reading; from elsewhere, that goroutine ignores what it still reads
// (readAndHandle) and its read ends at the drain deadline. Connections
// without a half-close (WebSocket, net.Pipe) are closed at once, as before.
// No upstream issue found.
func (cl *Client) stopAfterDrain(err error) {
	cl.stop(err, true)
}

func (cl *Client) stop(err error, drain bool) {
	cl.State.endOnce.Do(func() {
		cl.setCloseWriteDeadline() // rtm patch 102: a write blocked on a full socket must not hold cl.Lock (FlushHeld) forever
		cl.FlushHeld()             // rtm patch 70: what the read loop held back (a DISCONNECT, acks) goes out first
		cl.flushCoalesced()        // rtm patch 98: and what a coalescing writer waits to write

		if conn := cl.Net.Conn; conn != nil {
			hc, ok := conn.(interface{ CloseWrite() error })
			if drain && ok && hc.CloseWrite() == nil {
				_ = conn.SetReadDeadline(time.Now().Add(disconnectDrainTimeout))
				go func() {
					_, _ = io.CopyN(io.Discard, conn, disconnectDrainBytes)
					_ = conn.Close()
				}()
			} else if b := cl.Net.bconn; b != nil && b.inBurst.Load() {
				// rtm patch 109: the read loop holds the descriptor in a
				// burst (perhaps this very call, from a packet's handler)
				// and Close waits until it lets go: close once it does.
				go conn.Close()
			} else {
				_ = conn.Close() // omit close error
			}
		}

		if err != nil {
			cl.State.stopCause.Store(err)
		}

		if cl.State.cancelOpen != nil {
			cl.State.cancelOpen()
		}

		if cl.ops != nil && cl.ops.park != nil {
			cl.ops.park.wake(cl) // rtm patch 86: the closed socket left the poller without an event
		}

		atomic.StoreInt64(&cl.State.disconnected, time.Now().Unix())
	})
}

// StopCause returns the reason the client connection was stopped, if any.
func (cl *Client) StopCause() error {
	if cl.State.stopCause.Load() == nil {
		return nil
	}
	return cl.State.stopCause.Load().(error)
}

// StopTime returns the the time the client disconnected in unix time, else zero.
func (cl *Client) StopTime() int64 {
	return atomic.LoadInt64(&cl.State.disconnected)
}

// Closed returns true if client connection is closed.
func (cl *Client) Closed() bool {
	return cl.State.open == nil || cl.State.open.Err() != nil
}

func (cl *Client) IsTakenOver() bool {
	return cl.State.isTakenOver.Load()
}

// ReadFixedHeader reads in the values of the next packet's fixed header.
func (cl *Client) ReadFixedHeader(fh *packets.FixedHeader) error {
	if cl.Net.bconn == nil {
		return ErrConnectionClosed
	}

	b, err := cl.Net.bconn.ReadByte()
	if err != nil {
		return err
	}

	err = fh.Decode(b)
	if err != nil {
		return err
	}

	var bu int
	fh.Remaining, bu, err = packets.DecodeLength(cl.Net.bconn)
	if err != nil {
		return err
	}

	if cl.ops.options.Capabilities.MaximumPacketSize > 0 && uint32(fh.Remaining+1) > cl.ops.options.Capabilities.MaximumPacketSize {
		return packets.ErrPacketTooLarge // [MQTT-3.2.2-15]
	}

	atomic.AddInt64(&cl.ops.info.BytesReceived, int64(bu+1))
	return nil
}

// ReadPacket reads the remaining buffer into an MQTT packet.
func (cl *Client) ReadPacket(fh *packets.FixedHeader) (pk packets.Packet, err error) {
	atomic.AddInt64(&cl.ops.info.PacketsReceived, 1)

	pk.ProtocolVersion = cl.Properties.ProtocolVersion // inherit client protocol version for decoding
	pk.FixedHeader = *fh
	// rtm patch 42: read as the bytes arrive, counted against
	// MemoryLimits.MaxReadingBytes, within MemoryLimits.ReadTimeout (see
	// readBody); v2.7.9 allocated the declared length before reading, then
	// copied it ("a fresh copy", but p is allocated for this packet alone).
	px, err := cl.readBody(pk.FixedHeader.Remaining)
	if err != nil {
		return pk, err
	}

	atomic.AddInt64(&cl.ops.info.BytesReceived, int64(len(px)))

	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectDecode(px)
	case packets.Disconnect:
		err = pk.DisconnectDecode(px)
	case packets.Connack:
		err = pk.ConnackDecode(px)
	case packets.Publish:
		err = pk.PublishDecode(px)
		if err == nil {
			atomic.AddInt64(&cl.ops.info.MessagesReceived, 1)
		}
	case packets.Puback:
		err = pk.PubackDecode(px)
	case packets.Pubrec:
		err = pk.PubrecDecode(px)
	case packets.Pubrel:
		err = pk.PubrelDecode(px)
	case packets.Pubcomp:
		err = pk.PubcompDecode(px)
	case packets.Subscribe:
		err = pk.SubscribeDecode(px)
	case packets.Suback:
		err = pk.SubackDecode(px)
	case packets.Unsubscribe:
		err = pk.UnsubscribeDecode(px)
	case packets.Unsuback:
		err = pk.UnsubackDecode(px)
	case packets.Pingreq:
	case packets.Pingresp:
	case packets.Auth:
		err = pk.AuthDecode(px)
	default:
		err = fmt.Errorf("invalid packet type; %v", pk.FixedHeader.Type)
	}

	if err != nil {
		return pk, err
	}

	// rtm patch 105: only when a hook provides OnPacketRead (rtm has
	// none), through a function of its own, so its packet copies in and
	// out are not in this frame.
	if cl.ops.hooks.provided(OnPacketRead) {
		err = cl.ops.hooks.onPacketReadIn(cl, &pk)
	}
	return
}

// WritePacket encodes and writes a packet to the client.
func (cl *Client) WritePacket(pk packets.Packet) error {
	return cl.writePacket(&pk)
}

// writePacket is WritePacket for a packet the caller owns: it sets the
// fields written for this client (protocol version, Mods, expiry) in *pk.
//
// rtm patch 83: v2.7.9's WritePacket took the ~800-byte packet by value and
// passed it by value through OnPacketEncode and OnPacketSent, even with no
// hook providing them: about 6 KiB of frames, which a writer goroutine
// (started for each burst of queued packets) grew its stack to, copying
// it twice, for every burst. The writer now writes its queued copy in
// place, and the hooks are called (with copies, as before) only when a
// hook provides them.
func (cl *Client) writePacket(pk *packets.Packet) error {
	return cl.writePacketMode(pk, false)
}

// errWriteDeferred is writePacketMode's answer when, trying once, it found
// the socket full: the packet is encoded and counted as sent, and its
// unwritten rest is in outbuf, ahead of anything written after it; the
// caller (the client's writer) must start a writer goroutine that writes
// it (resumeWriter). rtm patch 101.
var errWriteDeferred = errors.New("write deferred: the socket is full")

// writePacketMode is writePacket; with once (rtm patch 101, needs
// rawWritable, and the caller must hold the queue's writer claim) it never
// waits, neither for the network nor for another write: a write(2) that
// finds the socket full leaves the rest in outbuf, and a cl.Lock held by
// another write leaves the whole packet in outbound.resume; both return
// errWriteDeferred.
func (cl *Client) writePacketMode(pk *packets.Packet, once bool) error {
	if cl.Closed() {
		return ErrConnectionClosed
	}

	if cl.Net.Conn == nil {
		return nil
	}

	if pk.Expiry > 0 {
		expiry := pk.Expiry - time.Now().Unix()
		if expiry < 1 {
			expiry = 1
		}
		pk.Properties.MessageExpiryInterval = uint32(expiry) // [MQTT-3.3.2-6]
	}

	pk.ProtocolVersion = cl.Properties.ProtocolVersion
	if pk.Mods.MaxSize == 0 { // NB we use this statement to embed client packet sizes in tests
		pk.Mods.MaxSize = cl.Properties.Props.MaximumPacketSize
	}

	if cl.Properties.Props.RequestProblemInfoFlag && cl.Properties.Props.RequestProblemInfo == 0x0 {
		pk.Mods.DisallowProblemInfo = true // [MQTT-3.1.2-29] strict, no problem info on any packet if set
	}

	if pk.FixedHeader.Type != packets.Connack || cl.Properties.Props.RequestResponseInfo == 0x1 || cl.ops.options.Capabilities.Compatibilities.AlwaysReturnResponseInfo {
		pk.Mods.AllowResponseInfo = true // [MQTT-3.1.2-28] we need to know which properties we can encode
	}

	if cl.ops.hooks.provided(OnPacketEncode) { // rtm patch 83
		cl.ops.hooks.onPacketEncodeIn(cl, pk)
	}

	var err error
	buf := writeBufPool.Get() // rtm patch 70: was new(bytes.Buffer) per packet
	defer writeBufPool.Put(buf)
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(buf)
	case packets.Connack:
		err = pk.ConnackEncode(buf)
	case packets.Publish:
		err = pk.PublishEncode(buf)
	case packets.Puback:
		err = pk.PubackEncode(buf)
	case packets.Pubrec:
		err = pk.PubrecEncode(buf)
	case packets.Pubrel:
		err = pk.PubrelEncode(buf)
	case packets.Pubcomp:
		err = pk.PubcompEncode(buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(buf)
	case packets.Suback:
		err = pk.SubackEncode(buf)
	case packets.Unsubscribe:
		err = pk.UnsubscribeEncode(buf)
	case packets.Unsuback:
		err = pk.UnsubackEncode(buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(buf)
	case packets.Pingresp:
		err = pk.PingrespEncode(buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(buf)
	case packets.Auth:
		err = pk.AuthEncode(buf)
	default:
		err = fmt.Errorf("%w: %v", packets.ErrNoValidPacketAvailable, pk.FixedHeader.Type)
	}
	if err != nil {
		return err
	}

	if pk.Mods.MaxSize > 0 && uint32(buf.Len()) > pk.Mods.MaxSize {
		cl.discardTooLarge(pk)           // rtm patch: see discardTooLarge
		return packets.ErrPacketTooLarge // [MQTT-3.1.2-24] [MQTT-3.1.2-25]
	}

	deferred, busy := false, false // rtm patch 101
	size := int64(buf.Len())       // the write consumes buf
	_, err = func() (int64, error) {
		if once {
			// rtm patch 101: another write holds the lock, perhaps
			// waiting for a full socket (a PINGRESP, a PUBACK, held
			// acknowledgements): the caller (a publisher) must not wait
			// for it. The packet is handed to resumeWriter (busy).
			if !cl.TryLock() {
				busy = true
				return 0, nil
			}
		} else {
			cl.Lock()
		}
		defer cl.Unlock()
		// rtm patch 101: with once, a write that finds the socket full
		// leaves its rest at the head of outbuf, for resumeWriter.
		write := func(b *bytes.Buffer) (int64, error) {
			n, err := cl.writeConnMode(b, once) // rtm patch 97
			if err == nil && b.Len() > 0 {
				deferred = true
				if b != cl.Net.outbuf { // outbuf is nil: b is the packet's buffer
					cl.Net.outbuf = writeBufPool.Get()
					cl.Net.outbuf.Write(b.Bytes())
				}
			}
			return n, err
		}
		flush := func() error {
			_, err := write(cl.Net.outbuf)
			if err == nil && !deferred {
				writeBufPool.Put(cl.Net.outbuf) // rtm patch 70
				cl.Net.outbuf = nil
				cl.acksWritten() // rtm patch 102
			}
			return err
		}
		// rtm patch: was len(chan); rtm patch 70: and the reader's held writes
		if cl.State.outbound.len() == 0 && !cl.Net.holding.Load() {
			if cl.Net.outbuf == nil {
				return write(buf)
			}

			// first write to buffer, then flush buffer
			n, _ := cl.Net.outbuf.Write(buf.Bytes()) // will always be successful
			err = flush()
			return int64(n), err
		}

		// there are more writes in the queue
		if cl.Net.outbuf == nil {
			if buf.Len() >= cl.ops.options.ClientNetWriteBufferSize {
				return write(buf)
			}
			cl.Net.outbuf = writeBufPool.Get() // rtm patch 70: was new(bytes.Buffer) per burst
		}

		n, _ := cl.Net.outbuf.Write(buf.Bytes()) // will always be successful
		if cl.Net.outbuf.Len() < cl.ops.options.ClientNetWriteBufferSize {
			return int64(n), nil
		}

		err = flush()
		return int64(n), err
	}()
	if err != nil {
		return err
	}
	if busy {
		b := writeBufPool.Get()
		b.Write(buf.Bytes())
		cl.State.outbound.resume = b // the caller holds the queue's writer claim
		deferred = true
	}

	// rtm patch 101: the whole packet, also when part of it is left to
	// resumeWriter (which does not count it again).
	atomic.AddInt64(&cl.ops.info.BytesSent, size)
	atomic.AddInt64(&cl.ops.info.PacketsSent, 1)
	if pk.FixedHeader.Type == packets.Publish {
		atomic.AddInt64(&cl.ops.info.MessagesSent, 1)
	}

	if cl.ops.hooks.provided(OnPacketSent) { // rtm patch 83
		cl.ops.hooks.onPacketSentOf(cl, pk, buf.Bytes())
	}

	if deferred {
		return errWriteDeferred // rtm patch 101
	}
	return err
}

// discardTooLarge handles a packet WritePacket will not send because it
// exceeds the client's Maximum Packet Size: the server must "discard it
// without sending it and then behave as if it had completed sending that
// Application Message" [MQTT-3.1.2-25].
//
// rtm patch: v2.7.9 returned the error and nothing else. A QoS 1/2 PUBLISH
// stayed in the session forever, holding a unit of the client's send quota
// (and was resent, and refused again, on every reconnect); and bytes other
// goroutines had buffered in outbuf behind the queued packet (a PUBACK to
// the same client, written while its queue was not empty) were never
// flushed, so that client's publish was never acknowledged (Paho
// client_test5 test_maximum_packet_size). The message is reported to
// OnPublishDropped, with pk.Mods.MaxSize set (the only drop reported with
// it set), so the drop is counted. No upstream issue found.
// rtm patch 83: pk by pointer, so writePacket's frame holds no copy.
func (cl *Client) discardTooLarge(pk *packets.Packet) {
	if pk.FixedHeader.Type == packets.Publish {
		if pk.FixedHeader.Qos > 0 && cl.State.Inflight.Delete(pk.PacketID) {
			atomic.AddInt64(&cl.ops.info.Inflight, -1)
			cl.State.Inflight.IncreaseSendQuota()
			cl.flowDrained() // rtm patch 20: a place in the session is free
		}
		cl.ops.hooks.OnPublishDropped(cl, *pk)
	}
	cl.Lock()
	defer cl.Unlock()
	if cl.State.outbound.len() == 0 { // otherwise the next queued packet flushes it
		_ = cl.flushOutbuf()
	}
}

func (cl *Client) flushOutbuf() (err error) {
	if cl.Net.outbuf == nil {
		return
	}

	_, err = cl.writeConn(cl.Net.outbuf) // rtm patch 97
	if err == nil {
		writeBufPool.Put(cl.Net.outbuf) // rtm patch 70
		cl.Net.outbuf = nil
		cl.acksWritten() // rtm patch 102
	}
	return
}

// writeBufPool holds the buffers packets are encoded into and the buffers
// that collect a burst of packets for one write. Buffers larger than 64 KiB
// (a large message) are left to the GC.
// rtm patch 70: v2.7.9 allocated both per packet (or per burst), and grew
// them from empty.
var writeBufPool = mempool.NewBuffer(64 * 1024)

// holdWrites sets whether the client's read loop holds back the writes to
// the client (WritePacket then collects them in outbuf); releasing writes
// out what was held, unless queued packets follow (their writer flushes).
//
// rtm patch 70: v2.7.9 wrote every acknowledgement with a write(2) of its
// own, from the read goroutine: a publisher that sends a burst of QoS 1
// messages got one write per PUBACK. The read loop now holds the writes
// while the next packet is already buffered, so a burst is answered with
// one write. Writes are held only while the whole next packet is buffered,
// so the loop never waits for the network with writes held; code that
// blocks the read goroutine otherwise (a flow-control wait, a hook waiting
// for a store) should call FlushHeld first, or the acknowledgements of the
// burst's earlier packets wait with it.
func (cl *Client) holdWrites(hold bool) {
	if hold {
		cl.Net.holding.Store(true)
		return
	}
	if cl.Net.holding.Swap(false) {
		cl.Lock()
		defer cl.Unlock()
		if cl.State.outbound.len() == 0 {
			_ = cl.flushOutbuf() // an error is the connection's: the next write or read returns it
		}
	}
}

// nextPacketBuffered reports whether the read buffer holds the whole next
// packet, so reading and handling it will not wait for the network.
// rtm patch 70.
func (cl *Client) nextPacketBuffered() bool {
	r := cl.Net.bconn
	if r == nil {
		return false
	}
	n := r.Buffered()
	if n < 2 {
		return false
	}
	b, _ := r.Peek(min(n, 5)) // never blocks: at most Buffered bytes
	rem, shift := 0, 0
	for i := 1; i < len(b); i++ { // b[0] is the type; then the remaining length
		rem |= int(b[i]&0x7f) << shift
		if b[i]&0x80 == 0 {
			return n >= i+1+rem
		}
		shift += 7
	}
	return false
}

// FlushHeld writes out the writes the client's read loop holds back (see
// holdWrites); call it from the read goroutine before blocking it.
// rtm patch 70.
func (cl *Client) FlushHeld() {
	if cl.Net.holding.Load() {
		cl.holdWrites(false)
	}
	if a := cl.Net.acks.Load(); a != nil && a.since.Load() != 0 {
		cl.flushAcks(false) // rtm patch 102: and the acknowledgements it delays
	}
}
