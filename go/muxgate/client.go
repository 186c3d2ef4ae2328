package muxgate

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"iter"
	"math/big"
	"net/http"
	"sync"
	"time"

	"github.com/muxgate/muxgate/go/protocol"
)

// Client is a client of a muxgate gateway: one WebSocket, any number of concurrent requests,
// multiplexed by request id. It is safe for concurrent use by many goroutines. The connection
// opens on the first call, and reopens (with backoff while the gateway is unreachable) on the
// next call after it dropped, or at once by itself when resumable requests (ChatRequest.
// Resumable) were running on it: it resumes them, and their calls and streams go on
// (WithAutoResume). Close it when done.
type Client struct {
	s    settings
	sErr error // a bad option or environment value, reported by every call
	http *http.Client
	own  *http.Transport // closed by Close when the HTTP client is ours

	ctx    context.Context // cancelled by Close: stops dialing
	cancel context.CancelFunc
	wg     sync.WaitGroup // dialers and ChatAsync tasks

	mu       sync.Mutex
	conn     *conn
	dialing  *dialCall
	closed   bool
	starting map[string]*announcement

	// Automatic resume (resume.go).
	detached []*detachedReq // resumable requests whose connection dropped, not resumed yet
	resuming bool           // the resumer goroutine runs
	flaps    int            // connections in a row that dropped soon after they opened
	since    time.Time      // the first drop since the last stable connection
}

// announcement is a request whose chat is not on the wire yet, so that a CancelRequest for
// its id (even right after ChatAsync returns) waits for it and then cancels it in-band.
type announcement struct {
	done chan struct{}
}

type dialCall struct {
	done     chan struct{}
	deadline time.Time // the last attempt starts before it
	conn     *conn
	err      error
	last     error // the latest attempt's error, under Client.mu (read while dialing)
}

// NewClient returns a client; nothing is opened until the first call. An invalid option or
// environment value (a bad URL, both a client key and a token) is returned by every call.
func NewClient(opts ...Option) *Client {
	s, err := resolve(opts)
	c := &Client{s: s, sErr: err, starting: map[string]*announcement{}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	if s.httpClient != nil {
		c.http = s.httpClient
	} else {
		c.own = http.DefaultTransport.(*http.Transport).Clone()
		c.http = &http.Client{Transport: c.own, Timeout: s.connectTimeout}
	}
	return c
}

// URL is the gateway's WebSocket endpoint.
func (c *Client) URL() string { return c.s.wsURL }

// HTTPURL is the base of the gateway's HTTP API.
func (c *Client) HTTPURL() string { return c.s.httpURL }

// Close closes the connection (after sending any queued cancels). Requests still in flight end
// with a *ConnectionLostError wrapping ErrClosed, and the gateway cancels them (reason
// disconnect). Close waits for the client's goroutines to stop. It is idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	conn := c.conn
	c.conn = nil
	for id, a := range c.starting {
		close(a.done)
		delete(c.starting, id)
	}
	c.mu.Unlock()
	c.cancel()
	if conn != nil {
		conn.close()
	}
	c.wg.Wait()
	if c.own != nil {
		c.own.CloseIdleConnections()
	}
	return nil
}

// --- connection -------------------------------------------------------------------------

// connection returns the open connection, dialing if needed; concurrent callers share one dial.
func (c *Client) connection(ctx context.Context) (*conn, error) {
	conn, _, err := c.connectionUntil(ctx, time.Time{})
	return conn, err
}

// connectionUntil is connection for a caller that wants a new dial to keep trying until
// deadline (if later than the connect timeout); d is the dial it waited for, if any.
func (c *Client) connectionUntil(ctx context.Context, deadline time.Time) (*conn, *dialCall, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, nil, ErrClosed
		}
		if c.conn != nil && c.conn.alive() {
			conn := c.conn
			c.mu.Unlock()
			return conn, nil, nil
		}
		d := c.dialing
		if d == nil {
			d = &dialCall{done: make(chan struct{}), deadline: time.Now().Add(c.s.connectTimeout)}
			if deadline.After(d.deadline) {
				d.deadline = deadline
			}
			c.dialing = d
			c.wg.Add(1)
			go c.dial(d)
		}
		c.mu.Unlock()
		select {
		case <-d.done:
			if d.err != nil {
				return nil, d, d.err
			}
		case <-ctx.Done():
			return nil, d, ctx.Err()
		}
	}
}

// dial opens a connection for everyone waiting, retrying transient failures (refused, 503 while
// a gateway drains, a gateway restarting) with exponential backoff and jitter, within the
// connect timeout (or the resumer's deadline). Unauthorized and protocol mismatches are not
// retried.
func (c *Client) dial(d *dialCall) {
	defer c.wg.Done()
	ctx, cancel := context.WithDeadline(c.ctx, d.deadline)
	defer cancel()
	var onDrop func(*conn, []*exchange, error)
	if c.s.autoResume {
		onDrop = c.onDrop
	}
	backoff := minBackoff
	for {
		conn, err := dial(ctx, &c.s, onDrop)
		if err == nil {
			d.conn = conn
			break
		}
		d.err = err
		c.mu.Lock()
		d.last = err
		c.mu.Unlock()
		if !retryable(err) {
			break
		}
		wait := jitter(backoff)
		backoff = min(backoff*2, maxBackoff)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
			continue
		case <-ctx.Done():
			t.Stop()
		}
		break
	}
	c.mu.Lock()
	c.dialing = nil
	if d.conn != nil {
		d.err = nil
		if c.closed {
			d.err = ErrClosed
		} else {
			c.conn = d.conn
		}
	}
	c.mu.Unlock()
	if d.err != nil && d.conn != nil {
		d.conn.close()
		d.conn = nil
	}
	close(d.done)
}

func retryable(err error) bool {
	var pe *ProtocolError
	if errors.As(err, &pe) || errors.Is(err, ErrInvalidRequest) {
		return false
	}
	var ce *ConnectError
	if errors.As(err, &ce) && ce.Status != 0 && ce.Status != 503 && ce.Status != 502 && ce.Status != 504 {
		return false
	}
	return true
}

// --- requests -----------------------------------------------------------------------------

func newRequestID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		n, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
		return "req_" + n.String()
	}
	return "req_" + hex.EncodeToString(b[:])
}

// build validates req into a chat message; nothing is sent when it fails.
func (c *Client) build(req *ChatRequest, stream bool) (*protocol.Chat, error) {
	if c.sErr != nil {
		return nil, c.sErr
	}
	if req == nil {
		return nil, invalidf("nil ChatRequest")
	}
	chat := &protocol.Chat{RequestID: req.RequestID, Stream: stream, UserID: req.UserID, Steps: req.Steps || req.OnStep != nil}
	if chat.RequestID == "" {
		chat.RequestID = newRequestID()
	}
	if !protocol.ValidRequestID(chat.RequestID) {
		return nil, invalidf("request id must be 1-128 characters of [A-Za-z0-9._:-]: %q", chat.RequestID)
	}
	if chat.UserID != "" && !protocol.ValidUserID(chat.UserID) {
		return nil, invalidf("user id must be 1-128 characters of [A-Za-z0-9._:@-]: %q", chat.UserID)
	}
	if req.Messages != nil && req.Message == "" {
		chat.Messages = make([]protocol.ChatMessage, len(req.Messages))
		for i, m := range req.Messages {
			chat.Messages[i] = protocol.ChatMessage{Role: protocol.Role(m.Role), Content: m.Content}
		}
	} else {
		if req.Messages != nil {
			return nil, invalidf("give Message or Messages, not both")
		}
		msg := req.Message
		chat.Message = &msg
	}
	if req.Timeout < 0 {
		return nil, invalidf("negative timeout")
	}
	if req.Timeout > 0 {
		ms := (req.Timeout + time.Millisecond - 1) / time.Millisecond
		if ms > protocol.MaxTimeoutMs {
			return nil, invalidf("timeout above %d ms", protocol.MaxTimeoutMs)
		}
		chat.TimeoutMs = int64(ms)
	}
	if req.Grace < 0 {
		return nil, invalidf("negative grace period")
	}
	if req.Grace > 0 {
		if !req.Resumable {
			return nil, invalidf("a grace period is only for a resumable chat")
		}
		ms := (req.Grace + time.Millisecond - 1) / time.Millisecond
		if ms > protocol.MaxGraceMs {
			return nil, invalidf("grace period above %d ms", protocol.MaxGraceMs)
		}
		chat.GraceMs = int64(ms)
	}
	chat.Resumable = req.Resumable
	if req.Metadata != nil {
		raw, err := json.Marshal(req.Metadata)
		if err != nil {
			return nil, invalidf("metadata: %v", err)
		}
		v, err := protocol.ParseJSON(raw)
		if err != nil || v.Kind != protocol.KindObject {
			return nil, invalidf("metadata is not a JSON object")
		}
		chat.Metadata = v.Object
	}
	if err := chat.Validate(); err != nil {
		return nil, invalidf("%v", err)
	}
	return chat, nil
}

// announce registers a request about to be sent.
func (c *Client) announce(id string) (*announcement, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if _, dup := c.starting[id]; dup {
		return nil, &ProtocolError{Code: protocol.CodeDuplicateRequestID, Message: "request_id is being started", RequestID: id}
	}
	a := &announcement{done: make(chan struct{})}
	c.starting[id] = a
	return a, nil
}

func (c *Client) unannounce(id string, a *announcement) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.starting[id] == a {
		delete(c.starting, id)
		close(a.done)
	}
}

// start connects if needed and puts chat on the wire; wantSteps: the consumer takes the steps.
func (c *Client) start(ctx context.Context, chat *protocol.Chat, a *announcement, wantSteps bool) (*conn, *exchange, error) {
	return c.open(ctx, chat.RequestID, a, func(conn *conn) (*exchange, error) {
		return conn.start(ctx, chat, wantSteps)
	})
}

// open connects if needed and puts a request's first message on the wire (send).
func (c *Client) open(ctx context.Context, id string, a *announcement, send func(*conn) (*exchange, error)) (*conn, *exchange, error) {
	defer c.unannounce(id, a)
	conn, err := c.connection(ctx)
	if err == nil {
		var e *exchange
		if e, err = send(conn); err == nil {
			return conn, e, nil
		}
	}
	if ctxErr := ctx.Err(); ctxErr != nil && errors.Is(err, ctxErr) {
		// The context ended before the message was sent (waiting for the connection or a slot).
		err = &CancelledError{RequestID: id, Cause: ctxErr}
	}
	return nil, nil, err
}

// await waits for the request's terminal response (on whichever connection it runs). When ctx
// ends first, the cancel frame is already on its way (AfterFunc; or queued for after the
// resume of a request whose connection dropped); await then waits at most the cancel wait
// for the cancelled response and returns a *CancelledError wrapping ctx.Err().
func (c *Client) await(ctx context.Context, h *handle) (*Response, error) {
	if h.waitDone(ctx.Done()) {
		return outcome(h.exchange())
	}
	answered := false
	_, e := h.do(func(cn *conn, e *exchange) {
		answered = e.isDone() && !e.cancelSent
		cn.stopLocked(e)
	})
	if answered { // the response came before the context ended: it is the answer
		return outcome(e)
	}
	wctx, cancel := context.WithTimeout(context.Background(), c.s.cancelWait)
	h.waitDone(wctx.Done())
	cancel()
	return nil, &CancelledError{RequestID: h.id, Response: h.response(), Cause: ctx.Err()}
}

func outcome(e *exchange) (*Response, error) {
	if e.err != nil {
		return nil, e.err
	}
	if e.response.Status == StatusFailed {
		return e.response, &RequestFailedError{Response: e.response}
	}
	return e.response, nil
}

func (c *Client) run(ctx context.Context, chat *protocol.Chat, a *announcement, onStep func(Step)) (*Response, error) {
	cn, e, err := c.start(ctx, chat, a, onStep != nil)
	if err != nil {
		return nil, err
	}
	h := newHandle(cn, e)
	stop := context.AfterFunc(ctx, h.stop)
	defer stop()
	if onStep != nil { // hand the steps to onStep on this goroutine while waiting
		for {
			var events []Event
			var done, overflowed bool
			var notify chan struct{}
			h.do(func(_ *conn, e *exchange) {
				events = e.events
				e.events, e.bufBytes = nil, 0
				done, overflowed, notify = e.isDone(), e.overflowed, e.notify
			})
			for _, ev := range events {
				onStep(*ev.Step)
			}
			if overflowed {
				return nil, c.slowConsumer(h)
			}
			if done || ctx.Err() != nil {
				break
			}
			select {
			case <-notify:
			case <-ctx.Done():
			}
		}
	}
	return c.await(ctx, h)
}

// slowConsumer ends a request whose consumer fell behind (its buffer overflowed, the cancel is
// sent): it waits at most the cancel wait for the cancelled response.
func (c *Client) slowConsumer(h *handle) error {
	wctx, cancel := context.WithTimeout(context.Background(), c.s.cancelWait)
	h.waitDone(wctx.Done())
	cancel()
	return &CancelledError{RequestID: h.id, Response: h.response(), Cause: ErrSlowConsumer}
}

// Chat sends one chat (stream false) and returns its Response: completed, or cancelled when
// the gateway cancelled it (CancelRequest from anywhere, DELETE, req.Timeout), with a nil
// error. A failed request returns its Response and a *RequestFailedError.
//
// When ctx is cancelled or reaches its deadline first, the cancel frame is sent at once and
// Chat returns a *CancelledError wrapping ctx.Err() (errors.Is(err, context.DeadlineExceeded)),
// after the gateway's cancelled response or the cancel wait (WithCancelWait).
func (c *Client) Chat(ctx context.Context, req *ChatRequest) (*Response, error) {
	chat, err := c.build(req, false)
	if err != nil {
		return nil, err
	}
	a, err := c.announce(chat.RequestID)
	if err != nil {
		return nil, err
	}
	return c.run(ctx, chat, a, req.OnStep)
}

// Task is a chat running in the background (ChatAsync).
type Task struct {
	id   string
	done chan struct{}
	resp *Response
	err  error
}

// RequestID is the request's id (generated when the ChatRequest had none).
func (t *Task) RequestID() string { return t.id }

// Done is closed when the result is ready.
func (t *Task) Done() <-chan struct{} { return t.done }

// Wait blocks until the request ends and returns what Chat would have returned.
func (t *Task) Wait() (*Response, error) {
	<-t.done
	return t.resp, t.err
}

// ChatAsync starts Chat in the background and returns at once. The request counts as started
// immediately: CancelRequest with its id, even right away, waits for the chat to be sent and
// cancels it in-band. Cancelling ctx cancels the request on the gateway.
func (c *Client) ChatAsync(ctx context.Context, req *ChatRequest) *Task {
	t := &Task{done: make(chan struct{})}
	if req != nil {
		t.id = req.RequestID
	}
	chat, err := c.build(req, false)
	var a *announcement
	if err == nil {
		t.id = chat.RequestID
		a, err = c.announce(chat.RequestID)
	}
	if err != nil {
		t.err = err
		close(t.done)
		return t
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		t.resp, t.err = c.run(ctx, chat, a, req.OnStep)
		close(t.done)
	}()
	return t
}

// ChatStream sends a streamed chat when the range loop starts and yields its chunks as they
// arrive. The loop ends after the last chunk when the request completes. Otherwise the last
// iteration yields an error: a *CancelledError (the context ended: wrapping ctx.Err(); the
// gateway cancelled it: with its Response; the consumer fell behind: wrapping
// ErrSlowConsumer), a *RequestFailedError, a *ConnectionLostError.
//
// Leaving the loop early (break, return, panic) cancels the request on the gateway; so does
// cancelling ctx, at once, even while the loop body runs. Each range over the returned
// sequence starts a new request (with a new id when req.RequestID is empty).
//
// With req.OnStep the request's steps go to it, in order with the chunks; Client.OpenStream
// returns a handle that also yields them and keeps the steps and the halt.
func (c *Client) ChatStream(ctx context.Context, req *ChatRequest) iter.Seq2[Chunk, error] {
	return func(yield func(Chunk, error) bool) {
		chat, err := c.build(req, true)
		if err != nil {
			yield(Chunk{}, err)
			return
		}
		a, err := c.announce(chat.RequestID)
		if err != nil {
			yield(Chunk{}, err)
			return
		}
		onStep := req.OnStep
		cn, e, err := c.start(ctx, chat, a, onStep != nil)
		if err != nil {
			yield(Chunk{}, err)
			return
		}
		h := newHandle(cn, e)
		stop := context.AfterFunc(ctx, h.stop)
		defer stop()
		finished := false
		defer func() {
			if !finished {
				h.stop() // the loop was left early (break, return, panic)
			}
		}()
		for {
			ev, more, err := c.next(ctx, h)
			if more {
				if ev.Step != nil {
					onStep(*ev.Step)
					continue
				}
				if !yield(ev.Chunk, nil) {
					return
				}
				continue
			}
			finished = true
			if err != nil {
				yield(Chunk{}, err)
			}
			return
		}
	}
}

// next returns the next event (more), or the stream's end: nil after a completed request,
// else its error. It follows the request across the connections it is resumed on.
func (c *Client) next(ctx context.Context, h *handle) (Event, bool, error) {
	for {
		if ctx.Err() != nil {
			_, err := c.await(ctx, h)
			if err == nil { // answered before the context ended, but the consumer stops here
				err = &CancelledError{RequestID: h.id, Response: h.response(), Cause: ctx.Err()}
			}
			return Event{}, false, err
		}
		var ev Event
		var got, overflowed, done bool
		var notify chan struct{}
		_, e := h.do(func(_ *conn, e *exchange) {
			if len(e.events) > 0 {
				ev, got = e.events[0], true
				e.events[0] = Event{}
				e.events = e.events[1:]
				if ev.Step != nil {
					e.bufBytes -= stepCost + len(ev.Step.Kind) + len(ev.Step.Name)
				} else {
					e.bufBytes -= len(ev.Chunk.Text)
				}
				return
			}
			overflowed, done, notify = e.overflowed, e.isDone(), e.notify
		})
		switch {
		case got:
			return ev, true, nil
		case overflowed:
			return Event{}, false, c.slowConsumer(h)
		case done:
			resp, err := outcome(e)
			if err == nil && resp.Status == StatusCancelled {
				err = &CancelledError{RequestID: e.id, Response: resp}
			}
			return Event{}, false, err
		}
		select {
		case <-notify: // an event, the end, or the request continued on a new connection
		case <-ctx.Done():
		}
	}
}

// --- cancel and inspect -------------------------------------------------------------------

// CancelRequest cancels a request by id and returns the protocol's status word: cancelled,
// already_cancelled, already_completed or not_found (none of them is an error). userID ""
// means the client's default user.
//
// When the request runs on this client's connection the cancel goes in-band (a cancel frame,
// reason client); otherwise over HTTP DELETE /v1/requests/{id} (reason api), so any process
// holding the credentials can cancel by id. For a resumable request of this client whose
// connection dropped, it waits (within ctx) for the resume and cancels right after it, in-band;
// over HTTP if the client gives up resuming it.
func (c *Client) CancelRequest(ctx context.Context, requestID, userID string) (CancelResult, error) {
	if c.sErr != nil {
		return "", c.sErr
	}
	if !protocol.ValidRequestID(requestID) {
		return "", invalidf("request id must be 1-128 characters of [A-Za-z0-9._:-]: %q", requestID)
	}
	if userID != "" && !protocol.ValidUserID(userID) {
		return "", invalidf("user id must be 1-128 characters of [A-Za-z0-9._:@-]: %q", userID)
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return "", ErrClosed
	}
	a := c.starting[requestID]
	c.mu.Unlock()
	if a != nil { // its chat goes out first, then the cancel
		select {
		case <-a.done:
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	if waiter, ok := c.cancelInBand(requestID, userID); ok {
		select {
		case out := <-waiter:
			if out.err == nil {
				return out.status, nil
			}
			if !errors.Is(out.err, ErrConnectionLost) {
				return "", out.err
			}
			// the connection dropped meanwhile (G7), or resuming failed: ask over HTTP below
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	return c.cancelHTTP(ctx, requestID, userID)
}

// cancelInBand sends a cancel for the request if it runs on this client's connection, or
// queues it for right after its resume if its connection dropped and the client is resuming
// it; the channel gets the cancel_result.
func (c *Client) cancelInBand(requestID, userID string) (<-chan cancelOutcome, bool) {
	user := func(conn *conn) string {
		switch {
		case userID != "":
			return userID
		case c.s.user != "":
			return c.s.user
		}
		return conn.defaultUser()
	}
	c.mu.Lock()
	var detached []detachedReq
	for _, d := range c.detached {
		if d.e.id == requestID {
			detached = append(detached, *d)
		}
	}
	cur := c.conn
	c.mu.Unlock()
	for _, d := range detached {
		u := user(d.conn)
		var waiter <-chan cancelOutcome
		ok := false
		current(d.conn, d.e, func(cn *conn, e *exchange) { waiter, ok = cn.cancelLocked(e, u) })
		if ok {
			return waiter, true
		}
	}
	if cur != nil && cur.alive() {
		return cur.cancelInBand(requestID, user(cur))
	}
	return nil, false
}

// FinalHalt returns where the pipeline of a cancelled request of a chat with Steps halted:
// the halted Halt of the usage message that follows a response whose usage is not final (it
// waits for it, like FinalUsage), else resp.Halt. nil when the gateway sent none (a chat
// without Steps, an older gateway, a request that was not cancelled). If the connection
// dropped before the usage message, the error says so (the HTTP API has no halt).
func (c *Client) FinalHalt(ctx context.Context, resp *Response) (*Halt, error) {
	if resp.Usage.Final || resp.late == nil {
		return resp.Halt, nil
	}
	select {
	case <-resp.late.done:
		return resp.late.halt.clone(), resp.late.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// FinalUsage returns the final token figures of resp (SPEC.md §5.4). A cancelled response may
// carry figures that still grow until the pipeline halts; the final ones follow in a usage
// message, which this waits for. If the connection dropped first, they are read over HTTP.
func (c *Client) FinalUsage(ctx context.Context, resp *Response) (Usage, error) {
	if resp.Usage.Final || resp.late == nil {
		return resp.Usage, nil
	}
	select {
	case <-resp.late.done:
		if resp.late.err == nil {
			return resp.late.usage, nil
		}
	case <-ctx.Done():
		return Usage{}, ctx.Err()
	}
	delay := 50 * time.Millisecond
	for {
		info, err := c.GetRequest(ctx, resp.RequestID, resp.userID)
		if err != nil {
			return Usage{}, err
		}
		if info.Usage != nil && info.Usage.Final {
			return *info.Usage, nil
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return Usage{}, ctx.Err()
		}
		delay = min(delay*2, 500*time.Millisecond)
	}
}
