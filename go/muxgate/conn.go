package muxgate

// One WebSocket to the gateway, multiplexed: the SDK's I/O edge.
//
// Theory of operation. A conn owns one WebSocket and two goroutines:
//
//   - the reader decodes every frame with protocol.Decode and routes each message by
//     request_id to its exchange, checking what SPEC.md §5.1 lets a client check alone: no chunk
//     or second response after the response, contiguous seq, no chunk for stream false, a
//     completed content equal to the streamed text (G1-G3), a usage report only when announced,
//     a cancel_result only for a cancel sent; and for steps (§3.12): only for a chat that asked,
//     none after the response, started indices 0, 1, 2, ... without gap, an ended one only for
//     a started step not ended yet, a halt only in a cancelled response or the usage after it;
//     and for resumable requests (§5.8): resumable once, only for a chat that asked, before
//     anything else about it; moved only for a request known to be resumable (its epoch
//     known), and nothing but cancel_results after moved or a resume_result not_found;
//     nothing about a resumed request before its resume_result, then seq from the resume's
//     after_seq + 1, a completed content that ends with the text received since, and steps
//     not checked against those before the resume. A violation closes the connection (1002)
//     and fails every request on it with a *ProtocolError (protocol_violation). The reader
//     never blocks on a consumer: chunks and steps go to the exchange's bounded buffer (see
//     below).
//   - the writer is the only goroutine that writes. Callers enqueue encoded messages under
//     conn.mu and wake it; whatever is pending when it runs goes out as one batched frame
//     (SPEC.md §2.4) within the welcome limits. A context's AfterFunc can therefore queue a
//     cancel at once from any goroutine.
//
// Bounds. The outbox holds at most one chat per stream slot (a chat waits for one of the
// welcome's max_streams slots before it is queued) and at most maxCancels cancels per request,
// plus the hello: it cannot grow without bound. Each streaming request buffers the chunks (and
// the steps, when its consumer takes them) its consumer has not read yet, in wire order: past maxPendingChunks pieces they are merged into one (chunk
// boundaries carry no meaning, SPEC.md §5.2), and past the stream buffer's bytes
// (WithStreamBuffer) the request is cancelled on the gateway and its stream ends with
// ErrSlowConsumer. So a consumer that stops reading costs at most its own buffer and its own
// request, never the other streams, and the connection holds at most max_streams buffers.
//
// A request holds its slot from its chat until it is finished (SPEC.md §5.6): response
// received, the late usage too if one was announced, every cancel sent for it answered.
//
// Automatic resume (SPEC.md §5.8, the Client's WithAutoResume). When a connection drops (not
// closed by the client, nor with 1001, 1002 or 4001, nor for a protocol violation), an
// unfinished resumable exchange whose epoch is known is not failed: fail marks it detached and
// hands it to the Client (onDrop, resume.go), which reconnects and calls continueLocked and
// reattach: a successor exchange on the new connection takes over everything the consumer has
// not read yet (its events, in order), the checks' state (the next seq, the streamed text's
// hash, the steps) and the cancels asked for while detached (or sent and not answered), and
// the resume goes out from the last seq received, followed by those cancels. The old exchange
// points at its successor (next, under the old connection's lock: its reader has stopped, so
// only consumers still touch it) and closes hop; every consumer holds a handle (resume.go)
// that follows the chain, so a Stream, a ChatStream loop or a Chat call just goes on. No chunk
// of the old connection can follow the resume point: nothing is dispatched from a failed
// connection.

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"hash/fnv"
	"io"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/muxgate/muxgate/go/protocol"
)

const (
	maxCancels       = 4    // unanswered cancels per request; more go over HTTP
	maxPendingChunks = 1024 // buffered pieces per stream before merging
	stepCost         = 64   // bytes a buffered step counts for, besides its kind and name
	writeTimeout     = 10 * time.Second
	closeGrace       = 2 * time.Second
)

type cancelOutcome struct {
	status CancelResult
	err    error
}

// exchange is one request on one connection as this client has seen it. Every field after the
// first block is guarded by conn.mu.
type exchange struct {
	id         string
	chatUserID string // the chat's user_id field ("" = the connection's default user)
	user       string // the effective user as far as the client can tell
	stream     bool

	nextSeq      int64
	streamed     hash.Hash64 // of the streamed text, to check a completed content (G3)
	streamedLen  int
	events       []Event // chunks, and steps when wantSteps, not read yet
	bufBytes     int
	keep         bool // someone reads the events
	wantSteps    bool // the consumer takes the steps (OnStep, Stream.Events)
	overflowed   bool
	notify       chan struct{} // cap 1: a chunk or the end
	response     *Response
	err          error
	done         chan struct{} // closed once response or err is set
	refused      bool
	cancelSent   bool
	cancels      []chan cancelOutcome // unanswered cancels, in order (nil: nobody waits)
	usagePending bool

	// Steps (SPEC.md §3.12), when the chat asked for them.
	steps    bool
	stepLog  []Step
	running  map[int64]bool // started, not ended
	nextStep int64
	halt     *Halt // the latest: the response's, then the usage message's

	// Resumable requests (SPEC.md §5.8).
	resumable      bool          // the chat asked (or a resume started the exchange)
	epoch          string        // from the resumable message or the resume; "" = none
	grace          time.Duration // granted by the resumable message; 0 = unknown
	resumed        bool          // started by a resume (Client.Resume)
	firstSeq       int64         // the first seq tracked here: 0, or the resume's after_seq + 1
	awaitingResume bool          // the resume is sent, its resume_result has not arrived
	resumeAnswered chan struct{} // closed by the resume_result (resume exchanges only)
	moved          bool          // moved received: the request goes on on another connection
	gone           bool          // resume_result not_found: nothing about it will come
	firstStep      int64         // resumed: index of the first step started since, -1 = none
	endedBefore    map[int64]bool

	// Automatic resume (see the top comment).
	detached   bool          // its connection dropped, or a successor not registered yet: cancels wait in cancels
	next       *exchange     // the successor that continues the request on nextConn
	nextConn   *conn         // (both set once, under this exchange's connection's lock)
	hop        chan struct{} // closed when next is set; nil for a request that is not resumable
	whole      bool          // streamed covers the text from seq 0 (a successor of a chat)
	knownSteps int64         // a successor: steps below this index were seen before its resume
}

// endedHere refuses a message about e that nothing may precede or follow: before the
// resume_result of a resume, after moved or a resume_result not_found (SPEC.md §5.8).
func (e *exchange) endedHere(what string) *ProtocolError {
	switch {
	case e.awaitingResume:
		return violation(what+" before the resume_result (§5.8)", e.id)
	case e.moved:
		return violation(what+" after moved (§5.8)", e.id)
	case e.gone:
		return violation(what+" after resume_result not_found (§5.8)", e.id)
	}
	return nil
}

// heardOf reports whether the gateway sent anything about e's request that shows it accepted
// the chat (so a later error cannot be the chat's refusal).
func (e *exchange) heardOf() bool {
	return e.response != nil || e.nextSeq != 0 || len(e.stepLog) != 0 || e.epoch != "" || e.moved
}

// contentMatches checks a completed content against the streamed text (G3), by length and
// FNV-64a hash. After a resume from after_seq, the text before it came on another connection:
// the content then only has to end with the text received here (SPEC.md §5.8), unless the
// exchange continues a chat of this client (whole: the hash covers every chunk since seq 0).
func (e *exchange) contentMatches(content string) bool {
	tail := content
	if e.firstSeq > 0 && !e.whole {
		if len(content) < e.streamedLen {
			return false
		}
		tail = content[len(content)-e.streamedLen:]
	} else if len(content) != e.streamedLen {
		return false
	}
	h := fnv.New64a()
	_, _ = h.Write([]byte(tail))
	return h.Sum64() == e.streamed.Sum64()
}

func (e *exchange) isDone() bool {
	select {
	case <-e.done:
		return true
	default:
		return false
	}
}

func (e *exchange) wake() {
	select {
	case e.notify <- struct{}{}:
	default:
	}
}

func (e *exchange) finishWith(resp *Response, err error) {
	if e.isDone() {
		return
	}
	e.response, e.err = resp, err
	close(e.done)
	e.wake()
}

type conn struct {
	s        *settings
	ws       *websocket.Conn
	codec    protocol.Codec
	ctx      context.Context
	cancel   context.CancelFunc
	welcomed chan struct{}
	slots    chan struct{} // one per unfinished request, capacity welcome.limits.max_streams
	done     chan struct{} // closed when the connection ended (err is set)
	wakeW    chan struct{} // cap 1: the writer has work
	stopped  sync.WaitGroup
	// onDrop, when set (automatic resume), takes the resumable exchanges of a connection that
	// dropped: they are detached instead of failed (see the top comment).
	onDrop func(c *conn, detached []*exchange, err error)

	mu        sync.Mutex
	welcome   *protocol.Welcome
	limits    protocol.Limits
	exchanges map[string]*exchange
	outbox    [][]byte
	drained   chan struct{} // closed by the writer once the outbox is empty (for close)
	err       error
	announced error     // an error the gateway sent before closing (unauthorized)
	opened    time.Time // when the welcome arrived
}

// dial opens the WebSocket, sends hello and waits for welcome (SPEC.md §3.5, §4.4). Credentials
// travel in the handshake headers; the hello carries the default user.
func dial(ctx context.Context, s *settings, onDrop func(*conn, []*exchange, error)) (*conn, error) {
	ws, resp, err := websocket.Dial(ctx, s.wsURL, &websocket.DialOptions{
		Subprotocols:    []string{s.codec.Subprotocol()},
		HTTPHeader:      s.credentials(),
		CompressionMode: websocket.CompressionDisabled, // chat tokens are tiny; the gateway offers none
	})
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
			if resp.Body != nil {
				_ = resp.Body.Close()
			}
		}
		if status == 401 {
			err = &ProtocolError{Code: protocol.CodeUnauthorized, Message: "handshake refused (HTTP 401)"}
		}
		return nil, &ConnectError{URL: s.wsURL, Status: status, Err: err}
	}
	ws.SetReadLimit(protocol.MaxFrameBytes)
	if codec, ok := protocol.CodecFromSubprotocol(ws.Subprotocol()); !ok || codec != s.codec {
		_ = ws.Close(protocol.CloseProtocolError, "wrong subprotocol")
		return nil, &ConnectError{URL: s.wsURL, Err: &ProtocolError{Code: protocol.CodeProtocolViolation, Message: "the gateway chose subprotocol " + ws.Subprotocol()}}
	}
	c := &conn{
		s:         s,
		ws:        ws,
		codec:     s.codec,
		welcomed:  make(chan struct{}),
		done:      make(chan struct{}),
		wakeW:     make(chan struct{}, 1),
		limits:    protocol.DefaultLimits(),
		exchanges: make(map[string]*exchange),
		onDrop:    onDrop,
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.stopped.Add(2)
	go c.readLoop()
	go c.writeLoop()
	c.mu.Lock()
	c.enqueueLocked(protocol.EncodeUnchecked(&protocol.Hello{UserID: s.user}, c.codec))
	c.mu.Unlock()
	select {
	case <-c.welcomed:
		return c, nil
	case <-c.done:
		c.wait()
		return nil, &ConnectError{URL: s.wsURL, Err: c.err}
	case <-ctx.Done():
		c.abort(&ConnectionLostError{Code: -1, Err: ctx.Err()})
		c.wait()
		return nil, &ConnectError{URL: s.wsURL, Err: ctx.Err()}
	}
}

func (c *conn) alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// defaultUser is the connection's default user: welcome.user_id, else the anonymous user.
func (c *conn) defaultUser() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.welcome != nil {
		return c.welcome.UserID
	}
	return ""
}

// --- sending ------------------------------------------------------------------------------

func (c *conn) enqueueLocked(data []byte) {
	c.outbox = append(c.outbox, data)
	select {
	case c.wakeW <- struct{}{}:
	default:
	}
}

// start queues chat once a stream slot is free and registers its exchange; wantSteps: the
// consumer takes the steps in order with the chunks.
func (c *conn) start(ctx context.Context, chat *protocol.Chat, wantSteps bool) (*exchange, error) {
	e := &exchange{
		id:         chat.RequestID,
		chatUserID: chat.UserID,
		stream:     chat.Stream,
		keep:       chat.Stream || wantSteps,
		wantSteps:  wantSteps && chat.Steps,
		steps:      chat.Steps,
		resumable:  chat.Resumable,
		notify:     make(chan struct{}, 1),
		done:       make(chan struct{}),
	}
	if chat.Steps {
		e.running = map[int64]bool{}
	}
	if chat.Stream {
		e.streamed = fnv.New64a()
	}
	if chat.Resumable {
		e.hop = make(chan struct{})
	}
	return e, c.register(ctx, e, protocol.EncodeUnchecked(chat, c.codec), "chat")
}

// resume queues a resume once a stream slot is free (a resumed request counts against this
// connection's max_streams, SPEC.md §5.8) and registers its exchange, which accepts nothing
// about the request before the resume_result. The original chat's stream and steps flags are
// not known here: the exchange accepts chunks, steps and halts, and takes the steps as events.
func (c *conn) resume(ctx context.Context, m *protocol.Resume) (*exchange, error) {
	e := &exchange{
		id:             m.RequestID,
		chatUserID:     m.UserID,
		stream:         true,
		keep:           true,
		wantSteps:      true,
		steps:          true,
		running:        map[int64]bool{},
		streamed:       fnv.New64a(),
		resumable:      true,
		epoch:          m.Epoch,
		resumed:        true,
		awaitingResume: true,
		resumeAnswered: make(chan struct{}),
		firstStep:      -1,
		endedBefore:    map[int64]bool{},
		notify:         make(chan struct{}, 1),
		done:           make(chan struct{}),
		hop:            make(chan struct{}),
	}
	if m.AfterSeq != nil {
		e.firstSeq = *m.AfterSeq + 1
		e.nextSeq = e.firstSeq
	}
	return e, c.register(ctx, e, protocol.EncodeUnchecked(m, c.codec), "resume")
}

// register queues data (e's chat or resume) once a stream slot is free, and registers e.
func (c *conn) register(ctx context.Context, e *exchange, data []byte, what string) error {
	c.mu.Lock()
	if int64(len(data)) > c.limits.MaxFrameBytes {
		c.mu.Unlock()
		return invalidf("%s of %d bytes exceeds the gateway's max_frame_bytes (%d)", what, len(data), c.limits.MaxFrameBytes)
	}
	_, dup := c.exchanges[e.id]
	c.mu.Unlock()
	if dup {
		return duplicate(e.id)
	}
	// Beyond max_streams, wait for a slot rather than be refused with too_many_streams.
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return c.err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		<-c.slots
		return c.err
	}
	if _, dup := c.exchanges[e.id]; dup {
		<-c.slots
		return duplicate(e.id)
	}
	e.user = e.chatUserID
	if e.user == "" && c.welcome != nil {
		e.user = c.welcome.UserID
	}
	c.exchanges[e.id] = e
	c.enqueueLocked(data)
	return nil
}

func duplicate(id string) error {
	// SPEC.md §5.6: unique per connection among unfinished requests. Refused here: the
	// gateway's error would be indistinguishable from one about the running request.
	return &ProtocolError{Code: protocol.CodeDuplicateRequestID, Message: "request_id is active on this connection", RequestID: id}
}

// sendCancelLocked queues a cancel for e; waiter (may be nil) gets its cancel_result.
func (c *conn) sendCancelLocked(e *exchange, waiter chan cancelOutcome) {
	c.enqueueLocked(protocol.EncodeUnchecked(&protocol.Cancel{RequestID: e.id, UserID: e.chatUserID}, c.codec))
	e.cancelSent = true
	e.cancels = append(e.cancels, waiter)
}

// stopLocked: the caller gave up on e (context done, stream left): cancel it on the gateway
// unless it already has its answer or a cancel is on its way; while e is detached the cancel
// waits for its resume (reattach sends it right after). Its buffered events are dropped.
func (c *conn) stopLocked(e *exchange) {
	e.keep = false
	e.events, e.bufBytes = nil, 0
	switch {
	case e.isDone() || e.cancelSent:
	case e.detached:
		e.cancelSent = true
		e.cancels = append(e.cancels, nil)
	case c.err == nil:
		c.sendCancelLocked(e, nil)
	}
}

// cancelInBand sends a cancel for the request id of user if it runs on this connection; the
// channel gets its cancel_result. ok is false when the request is not here (or too many
// cancels for it are unanswered): the caller goes over HTTP.
func (c *conn) cancelInBand(id, user string) (<-chan cancelOutcome, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.exchanges[id]
	if e == nil {
		return nil, false
	}
	return c.cancelLocked(e, user)
}

// cancelLocked sends a cancel for e (of user) if it runs on this connection, or queues it for
// after its resume if e is detached; the channel gets its cancel_result (or the error that
// ended e first).
func (c *conn) cancelLocked(e *exchange, user string) (<-chan cancelOutcome, bool) {
	if e.refused || e.user != user || len(e.cancels) >= maxCancels {
		return nil, false
	}
	waiter := make(chan cancelOutcome, 1)
	switch {
	case e.detached && !e.isDone():
		e.cancelSent = true
		e.cancels = append(e.cancels, waiter)
	case c.err == nil && c.exchanges[e.id] == e:
		c.sendCancelLocked(e, waiter)
	default:
		return nil, false
	}
	return waiter, true
}

// --- automatic resume -----------------------------------------------------------------------

// detachable reports whether a connection that ended with err may have left resumable
// requests detached on the gateway for a resume (SPEC.md §5.8): a drop, not the client's own
// close, nor a protocol violation, nor 4001 (the credentials would fail again), nor 1001 (a
// gateway shutdown cancels detached requests: an epoch does not outlive its process).
func detachable(err error) bool {
	var lost *ConnectionLostError
	if !errors.As(err, &lost) || errors.Is(lost.Err, ErrClosed) {
		return false
	}
	var pe *ProtocolError
	if errors.As(lost.Err, &pe) {
		return false // an error the gateway announced before closing
	}
	switch lost.Code {
	case protocol.CloseGoingAway, protocol.CloseProtocolError, protocol.CloseUnauthorized:
		return false
	}
	return true
}

// canResume: e is detached rather than failed when its connection drops.
func (e *exchange) canResume() bool {
	return e.resumable && e.epoch != "" && !e.isDone() && !e.refused && !e.moved && !e.gone
}

// continueLocked makes the successor of the detached exchange e (c's lock held) on nc: it takes
// what the consumer has not read, the checks' state and the cancels asked for meanwhile, and
// stays detached until nc.reattach registers it. e then points at it, and its consumer,
// woken, follows.
func (c *conn) continueLocked(e *exchange, nc *conn) *exchange {
	n := &exchange{
		id:             e.id,
		chatUserID:     e.chatUserID,
		user:           e.user,
		stream:         e.stream,
		nextSeq:        e.nextSeq,
		streamed:       e.streamed,
		streamedLen:    e.streamedLen,
		events:         e.events,
		bufBytes:       e.bufBytes,
		keep:           e.keep,
		wantSteps:      e.wantSteps,
		overflowed:     e.overflowed,
		notify:         make(chan struct{}, 1),
		done:           make(chan struct{}),
		cancelSent:     e.cancelSent,
		cancels:        e.cancels,
		steps:          e.steps,
		stepLog:        e.stepLog,
		running:        e.running,
		nextStep:       e.nextStep,
		resumable:      true,
		epoch:          e.epoch,
		grace:          e.grace,
		resumed:        true,
		firstSeq:       e.nextSeq,
		awaitingResume: true,
		resumeAnswered: make(chan struct{}),
		firstStep:      -1,
		endedBefore:    e.endedBefore,
		detached:       true,
		hop:            make(chan struct{}),
		whole:          e.whole || e.firstSeq == 0,
		knownSteps:     e.nextStep,
	}
	if n.endedBefore == nil {
		n.endedBefore = map[int64]bool{}
	}
	if n.running == nil {
		n.running = map[int64]bool{}
	}
	e.events, e.bufBytes, e.cancels = nil, 0, nil
	e.next, e.nextConn = n, nc
	close(e.hop)
	e.wake()
	return n
}

// errDropped: the connection ended before a detached exchange could be registered on it.
var errDropped = errors.New("muxgate: the connection ended before the resume was sent")

// reattach registers n, a detached successor on this connection, once a stream slot is free
// (a resumed request counts against the resuming connection's max_streams, SPEC.md §5.8),
// and queues its resume from the last seq received, then one cancel per cancel asked for
// while it was detached. errDropped: the connection ended first, and n is still detached. A
// duplicate id on this connection ends n with that error.
func (c *conn) reattach(ctx context.Context, n *exchange) error {
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return errDropped
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.err != nil:
		<-c.slots
		return errDropped
	case n.isDone() || !n.detached:
		<-c.slots
		return nil
	case c.exchanges[n.id] != nil:
		<-c.slots
		err := duplicate(n.id)
		n.finishWith(nil, err)
		n.failCancels(err)
		return err
	}
	n.detached = false
	c.exchanges[n.id] = n
	m := &protocol.Resume{RequestID: n.id, Epoch: n.epoch, UserID: n.chatUserID}
	if n.nextSeq > 0 {
		after := n.nextSeq - 1
		m.AfterSeq = &after
	}
	c.enqueueLocked(protocol.EncodeUnchecked(m, c.codec))
	for range n.cancels {
		c.enqueueLocked(protocol.EncodeUnchecked(&protocol.Cancel{RequestID: n.id, UserID: n.chatUserID}, c.codec))
	}
	return nil
}

// failCancels answers e's unanswered cancels with err; it reports whether one of them had
// nobody waiting (a Stop or an ended context: a cancel that must not be lost).
func (e *exchange) failCancels(err error) (unattended bool) {
	for _, w := range e.cancels {
		if w == nil {
			unattended = true
		} else {
			w <- cancelOutcome{err: err}
		}
	}
	e.cancels = nil
	return unattended
}

// current runs f (if not nil) on the request's current exchange, under its connection's lock:
// from (c, e) it follows the successors of a request continued on other connections.
func current(c *conn, e *exchange, f func(*conn, *exchange)) (*conn, *exchange) {
	for {
		c.mu.Lock()
		if e.next == nil {
			break
		}
		nc, ne := e.nextConn, e.next
		c.mu.Unlock()
		c, e = nc, ne
	}
	defer c.mu.Unlock()
	if f != nil {
		f(c, e)
	}
	return c, e
}

// --- the writer ---------------------------------------------------------------------------

func (c *conn) writeLoop() {
	defer c.stopped.Done()
	kind := websocket.MessageBinary
	if c.codec.IsText() {
		kind = websocket.MessageText
	}
	for {
		select {
		case <-c.wakeW:
		case <-c.ctx.Done():
			return
		}
		for {
			c.mu.Lock()
			frame := c.takeBatchLocked()
			if frame == nil {
				if c.drained != nil {
					close(c.drained)
					c.drained = nil
				}
				c.mu.Unlock()
				break
			}
			c.mu.Unlock()
			ctx, cancel := context.WithTimeout(c.ctx, writeTimeout)
			err := c.ws.Write(ctx, kind, frame)
			cancel()
			if err != nil {
				c.abort(c.lost(err))
				return
			}
		}
	}
}

// takeBatchLocked pops what is pending into one frame, within the welcome limits (SPEC.md §2.4).
func (c *conn) takeBatchLocked() []byte {
	if len(c.outbox) == 0 {
		return nil
	}
	size, n := len(c.outbox[0]), 1
	for n < len(c.outbox) && int64(n) < c.limits.MaxBatchMessages &&
		int64(size+1+len(c.outbox[n])) <= c.limits.MaxFrameBytes {
		size += 1 + len(c.outbox[n])
		n++
	}
	frame := protocol.JoinBatch(c.outbox[:n], c.codec)
	clear(c.outbox[:n])
	c.outbox = c.outbox[n:]
	if len(c.outbox) == 0 {
		c.outbox = nil // let the backing array go
	}
	return frame
}

// --- the reader ---------------------------------------------------------------------------

// violation is the gateway breaking the protocol.
func violation(format string, id string) *ProtocolError {
	return &ProtocolError{Code: protocol.CodeProtocolViolation, Message: format, RequestID: id}
}

func (c *conn) readLoop() {
	defer c.stopped.Done()
	for {
		kind, data, err := c.ws.Read(c.ctx)
		if err != nil {
			c.abort(c.lost(err))
			return
		}
		if (kind == websocket.MessageText) != c.codec.IsText() {
			c.breakOff(violation("a frame of the wrong kind for the codec", ""))
			return
		}
		for _, r := range protocol.Decode(data, c.codec, protocol.SenderGateway) {
			if r.Err != nil {
				if r.Err.Code == protocol.CodeUnknownType {
					continue // SPEC.md §3.1, §10: newer gateways may send more types
				}
				c.breakOff(violation("undecodable gateway message: "+r.Err.Error(), r.Err.RequestID))
				return
			}
			c.mu.Lock()
			perr := c.dispatchLocked(r.Message)
			c.mu.Unlock()
			if perr != nil {
				c.breakOff(perr)
				return
			}
		}
	}
}

// lost maps a read or write failure to the error of the requests in flight (SPEC.md §2.6).
func (c *conn) lost(err error) error {
	c.mu.Lock()
	announced := c.announced
	c.mu.Unlock()
	code := int(websocket.CloseStatus(err))
	var ce websocket.CloseError
	reason := ""
	if errors.As(err, &ce) {
		reason = ce.Reason
	}
	cause := err
	switch {
	case announced != nil:
		cause = announced
	case code == protocol.CloseUnauthorized:
		cause = &ProtocolError{Code: protocol.CodeUnauthorized, Message: "the gateway refused the credentials"}
	case code >= 0:
		cause = nil
	case errors.Is(err, io.EOF), errors.Is(err, context.Canceled):
		cause = err
	}
	return &ConnectionLostError{Code: code, Reason: reason, Err: cause}
}

// breakOff closes the connection after a protocol violation (1002) or a gateway error that
// leaves some request unanswerable (1000).
func (c *conn) breakOff(err *ProtocolError) {
	c.fail(err)
	if err.Code == protocol.CodeProtocolViolation {
		_ = c.ws.Close(protocol.CloseProtocolError, "protocol violation")
	} else {
		_ = c.ws.Close(websocket.StatusNormalClosure, "unexpected gateway error")
	}
	c.cancel()
}

// abort ends the connection with err and drops the socket without a close handshake.
func (c *conn) abort(err error) {
	c.fail(err)
	c.cancel()
	_ = c.ws.CloseNow()
}

// fail ends the connection: every unfinished exchange gets err (the gateway cancels them, G7).
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	exchanges := c.exchanges
	c.exchanges = map[string]*exchange{}
	c.outbox = nil
	if c.drained != nil {
		close(c.drained)
		c.drained = nil
	}
	resume := c.onDrop != nil && detachable(err)
	var detached []*exchange
	for _, e := range exchanges {
		if resume && e.canResume() {
			// The gateway keeps it for a resume (SPEC.md §5.8): the client reconnects. Its
			// unanswered cancels go out again after the resume (they may not have arrived).
			e.detached = true
			detached = append(detached, e)
			continue
		}
		e.finishWith(nil, err)
		if r := e.response; r != nil && r.late != nil && e.usagePending {
			r.late.err = err
			close(r.late.done)
		}
		e.failCancels(err)
	}
	close(c.done)
	c.mu.Unlock()
	if len(detached) > 0 {
		c.onDrop(c, detached, err)
	}
}

// close flushes what is queued (cancels), then closes with 1000 and waits for the goroutines.
func (c *conn) close() {
	c.mu.Lock()
	var drained chan struct{}
	if c.err == nil && len(c.outbox) > 0 {
		c.drained = make(chan struct{})
		drained = c.drained
	}
	c.mu.Unlock()
	if drained != nil {
		t := time.NewTimer(closeGrace)
		select {
		case <-drained:
		case <-t.C:
		}
		t.Stop()
	}
	c.fail(&ConnectionLostError{Code: protocol.CloseNormal, Err: ErrClosed})
	_ = c.ws.Close(websocket.StatusNormalClosure, "")
	c.cancel()
	c.wait()
}

// wait returns once the reader and the writer have stopped.
func (c *conn) wait() { c.stopped.Wait() }

// maybeFinishLocked frees e's slot once nothing more will arrive about it (SPEC.md §5.6): a
// moved request counts against the connection that resumed it (§5.8).
func (c *conn) maybeFinishLocked(e *exchange) {
	if (e.response != nil || e.refused || e.moved || e.gone) && !e.usagePending && len(e.cancels) == 0 && c.exchanges[e.id] == e {
		delete(c.exchanges, e.id)
		<-c.slots
	}
}

func (c *conn) exchangeLocked(id, what string) (*exchange, *ProtocolError) {
	e := c.exchanges[id]
	if e == nil || e.refused {
		return nil, violation(what+" for unknown request", id)
	}
	return e, nil
}

// dispatchLocked routes one gateway message; a non-nil result is a protocol violation.
func (c *conn) dispatchLocked(m protocol.Message) *ProtocolError {
	if c.err != nil {
		return nil
	}
	if c.welcome == nil {
		switch m.(type) {
		case *protocol.Welcome, *protocol.Error:
		default:
			return violation(m.Type()+" before welcome", "")
		}
	}
	switch m := m.(type) {
	case *protocol.Welcome:
		if c.welcome != nil {
			return violation("a second welcome", "")
		}
		c.welcome, c.limits, c.opened = m, m.Limits, time.Now()
		c.slots = make(chan struct{}, m.Limits.MaxStreams)
		close(c.welcomed)
	case *protocol.Chunk:
		e, perr := c.exchangeLocked(m.RequestID, "chunk")
		if perr != nil {
			return perr
		}
		if perr := e.endedHere("chunk"); perr != nil {
			return perr
		}
		switch {
		case e.response != nil:
			return violation("chunk after the response (G1)", e.id)
		case !e.stream:
			return violation("chunk for a chat with stream false (G3)", e.id)
		case m.Seq != e.nextSeq:
			return violation("chunk seq out of order (G3)", e.id)
		}
		e.nextSeq++
		_, _ = e.streamed.Write([]byte(m.Text))
		e.streamedLen += len(m.Text)
		if e.keep {
			c.bufferLocked(e, Event{Chunk: Chunk{RequestID: m.RequestID, Seq: m.Seq, Text: m.Text}}, len(m.Text))
		}
	case *protocol.Step:
		e, perr := c.exchangeLocked(m.RequestID, "step")
		if perr != nil {
			return perr
		}
		if perr := e.endedHere("step"); perr != nil {
			return perr
		}
		if perr := e.onStepLocked(m); perr != nil {
			return perr
		}
		if e.keep && e.wantSteps {
			step := stepOf(m)
			c.bufferLocked(e, Event{Step: &step}, stepCost+len(m.Kind)+len(m.Name))
		}
	case *protocol.Response:
		e, perr := c.exchangeLocked(m.RequestID, "response")
		if perr != nil {
			return perr
		}
		if perr := e.endedHere("response"); perr != nil {
			return perr
		}
		if e.response != nil {
			return violation("a second response (G1)", e.id)
		}
		if m.Status == protocol.StatusCompleted && e.stream && !e.contentMatches(m.Content) {
			return violation("completed content differs from the streamed chunks (G3)", e.id)
		}
		if m.Halt != nil && !e.steps {
			return violation("halt for a chat without steps (§3.12)", e.id)
		}
		resp := responseOf(m, e.chatUserID)
		e.halt = resp.Halt.clone()
		e.usagePending = resp.late != nil
		e.finishWith(resp, nil)
		c.maybeFinishLocked(e)
	case *protocol.UsageReport:
		e, perr := c.exchangeLocked(m.RequestID, "usage")
		if perr != nil {
			return perr
		}
		if perr := e.endedHere("usage"); perr != nil {
			return perr
		}
		if !e.usagePending {
			return violation("usage report nobody announced (§5.4)", e.id)
		}
		if m.Halt != nil && !e.steps {
			return violation("halt for a chat without steps (§3.12)", e.id)
		}
		e.usagePending = false
		e.response.late.usage = usageOf(m.Usage)
		if m.Halt != nil {
			e.response.late.halt = haltOf(m.Halt)
			e.halt = haltOf(m.Halt)
		}
		close(e.response.late.done)
		c.maybeFinishLocked(e)
	case *protocol.CancelResult:
		e := c.exchanges[m.RequestID]
		if e == nil || len(e.cancels) == 0 {
			return violation("cancel_result for no cancel", m.RequestID)
		}
		if e.awaitingResume {
			return violation("cancel_result before the resume_result (§5.8)", e.id)
		}
		if !e.refused && !e.moved && !e.gone {
			// §5.1: the result follows the response on the connection that runs the request.
			// After moved (or a resume not found) the response went elsewhere (or nowhere), so
			// any status may be the true one (§5.8).
			switch m.Status {
			case protocol.CancelCancelled, protocol.CancelAlreadyCancelled:
				if e.response == nil || e.response.Status != StatusCancelled {
					return violation("cancel_result "+string(m.Status)+" before a cancelled response", e.id)
				}
			case protocol.CancelAlreadyCompleted:
				if e.response == nil || e.response.Status == StatusCancelled {
					return violation("cancel_result already_completed before a completed response", e.id)
				}
			}
		}
		w := e.cancels[0]
		e.cancels = e.cancels[1:]
		if w != nil {
			w <- cancelOutcome{status: CancelResult(m.Status)}
		}
		c.maybeFinishLocked(e)
	case *protocol.Resumable:
		e, perr := c.exchangeLocked(m.RequestID, "resumable")
		if perr != nil {
			return perr
		}
		if perr := e.endedHere("resumable"); perr != nil {
			return perr
		}
		switch {
		case !e.resumable:
			return violation("resumable for a chat that did not ask (§5.8)", e.id)
		case e.epoch != "":
			return violation("a second resumable (§5.8)", e.id)
		case e.heardOf():
			return violation("resumable after other messages about the request (§5.8)", e.id)
		}
		e.epoch, e.grace = m.Epoch, time.Duration(m.GraceMs)*time.Millisecond
	case *protocol.ResumeResult:
		e, perr := c.exchangeLocked(m.RequestID, "resume_result")
		if perr != nil {
			return perr
		}
		if !e.awaitingResume {
			return violation("resume_result for no resume (§5.8)", e.id)
		}
		e.awaitingResume = false
		close(e.resumeAnswered)
		if m.Status == protocol.ResumeNotFound {
			e.gone, e.keep = true, false
			e.finishWith(nil, fmt.Errorf("%w: request %s, epoch %s", ErrResumeNotFound, e.id, e.epoch))
			c.maybeFinishLocked(e)
		}
	case *protocol.Moved:
		e, perr := c.exchangeLocked(m.RequestID, "moved")
		if perr != nil {
			return perr
		}
		if perr := e.endedHere("moved"); perr != nil {
			return perr
		}
		switch {
		case e.epoch == "": // its resumable message arrived, or this connection resumed it
			return violation("moved for a request not known to be resumable (§5.8)", e.id)
		case e.response != nil:
			return violation("moved after the response (G1)", e.id)
		}
		// The request goes on on another connection. What was buffered before stays readable;
		// then the consumer's stream ends with ErrMoved. No cancel is sent for it any more.
		e.moved = true
		e.finishWith(nil, fmt.Errorf("%w: request %s", ErrMoved, e.id))
		c.maybeFinishLocked(e)
	case *protocol.Error:
		return c.onErrorLocked(m)
	case *protocol.Pong:
		// we send no pings; WebSocket control frames keep the connection alive
	}
	return nil
}

// onStepLocked checks a step against the request's state (SPEC.md §5.1, §3.12) and records it.
// After a resume the steps before it are unknown (they are not replayed): the first step
// started since may have any index (past those a successor saw), and a step started before it
// may end (once).
func (e *exchange) onStepLocked(m *protocol.Step) *ProtocolError {
	firstSinceResume := e.resumed && e.firstStep < 0 && m.State == protocol.StepStarted
	switch {
	case !e.steps:
		return violation("step for a chat without steps (§3.12)", e.id)
	case e.response != nil:
		return violation("step after the response (§3.12)", e.id)
	case firstSinceResume && e.endedBeforeFrom(m.Index):
		return violation("step started after its end was received (§3.12)", e.id)
	case firstSinceResume && m.Index < e.knownSteps: // a successor saw these start already
		return violation("step started out of order (§3.12)", e.id)
	case m.State == protocol.StepStarted && !firstSinceResume && m.Index != e.nextStep:
		return violation("step started out of order (§3.12)", e.id)
	case m.State == protocol.StepEnded && !e.running[m.Index] && !e.startedBeforeResume(m.Index):
		return violation("step ended that is not running (§3.12)", e.id)
	}
	switch {
	case m.State == protocol.StepStarted:
		if firstSinceResume {
			e.firstStep, e.nextStep = m.Index, m.Index
		}
		e.nextStep++
		e.running[m.Index] = true
	case e.running[m.Index]:
		delete(e.running, m.Index)
	default: // started before the resume
		e.endedBefore[m.Index] = true
	}
	e.stepLog = append(e.stepLog, stepOf(m))
	return nil
}

// startedBeforeResume: after a resume, step index may have started before it (below the
// first step started since, if any) and has not ended since.
func (e *exchange) startedBeforeResume(index int64) bool {
	return e.resumed && (e.firstStep < 0 || index < e.firstStep) && !e.endedBefore[index]
}

// endedBeforeFrom: a step at or above index ended since the resume, before any step started.
func (e *exchange) endedBeforeFrom(index int64) bool {
	for i := range e.endedBefore {
		if i >= index {
			return true
		}
	}
	return false
}

// currentLocked is the running step that started last.
func (e *exchange) currentLocked() (Step, bool) {
	for i := len(e.stepLog) - 1; i >= 0; i-- {
		if s := e.stepLog[i]; s.State == StepStarted && e.running[s.Index] {
			return s, true
		}
	}
	return Step{}, false
}

// bufferLocked hands a chunk or a step (counting size bytes) to the consumer's bounded buffer
// (see Bounds above). Past maxPendingChunks events a chunk is merged into a chunk before it.
func (c *conn) bufferLocked(e *exchange, ev Event, size int) {
	n := len(e.events)
	if ev.Step == nil && n >= maxPendingChunks && e.events[n-1].Step == nil {
		e.events[n-1].Chunk.Text += ev.Chunk.Text
	} else {
		e.events = append(e.events, ev)
	}
	e.bufBytes += size
	if e.bufBytes > c.s.streamBuffer {
		e.overflowed, e.keep = true, false
		e.events, e.bufBytes = nil, 0
		if !e.cancelSent {
			c.sendCancelLocked(e, nil)
		}
	}
	e.wake()
}

func (c *conn) onErrorLocked(m *protocol.Error) *ProtocolError {
	perr := &ProtocolError{Code: m.Code, Message: m.Message, RequestID: m.RequestID}
	var e *exchange
	if m.RequestID != "" {
		e = c.exchanges[m.RequestID]
	}
	if e == nil {
		// About the connection (unauthorized before the close 4001), or about a message of ours
		// the gateway could not attribute: some request may never be answered, so end the
		// connection rather than hang (the gateway closes it itself after unauthorized).
		c.announced = perr
		if m.Code == protocol.CodeUnauthorized {
			return nil
		}
		return perr
	}
	switch {
	case e.awaitingResume:
		// The resume itself was refused (SPEC.md §3.4): invalid_field, forbidden,
		// duplicate_request_id, too_many_streams. No resume_result follows.
		e.awaitingResume, e.refused, e.keep = false, true, false
		close(e.resumeAnswered)
		e.finishWith(nil, perr)
	case !e.resumed && !e.refused && !e.heardOf():
		// The chat itself was refused (SPEC.md §3.3): no request exists, no response follows.
		e.refused = true
		e.keep = false
		e.finishWith(nil, perr)
	case len(e.cancels) > 0:
		if w := e.cancels[0]; w != nil {
			w <- cancelOutcome{err: perr}
		}
		e.cancels = e.cancels[1:]
	default:
		return violation("error "+m.Code+" about a request that sent nothing to refuse", e.id)
	}
	c.maybeFinishLocked(e)
	return nil
}
