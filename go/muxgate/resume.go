package muxgate

// Automatic resume (SPEC.md §5.8): when the connection drops, the client reconnects and
// resumes every unfinished resumable request, and their callers go on as if nothing happened.
//
// The connection side is in conn.go (detach, continueLocked, reattach). Here: the handle each
// caller holds (it follows a request from exchange to successor), and the resumer, one
// goroutine while some request waits to be resumed. It reconnects through the client's shared
// dial (so the client's other calls use the same new connection), then, for each detached
// request, makes its successor on the new connection and sends its resume (and the cancels
// asked for meanwhile). A drop during that round detaches them again, and the next round
// starts; none starts after the deadline, and then the requests still waiting end with a
// *ResumeFailedError (a cancel nobody waits for goes over HTTP DELETE then).
//
// Backoff. The first reconnection after a drop goes at once, unless the connection was
// unstable (it dropped within stableAfter of its welcome, or closed with 1013, 4008 or 4029:
// the gateway asks for a pause, SPEC.md §2.6): then it waits one step per such drop in a row.
// A dial retries transient failures itself, 50 ms doubling to 2 s, each pause with equal
// jitter (a random duration in [d/2, d]), and the resumer starts another dial (after the next
// step of the same backoff) until WithResumeTimeout (30 s) after the first drop since the
// last stable connection: so a link that keeps failing, or flapping, is given up on in bounded
// time.

import (
	"context"
	"errors"
	mrand "math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/muxgate/muxgate/go/protocol"
)

const (
	minBackoff  = 50 * time.Millisecond
	maxBackoff  = 2 * time.Second
	stableAfter = time.Second // a connection that lived this long earns an immediate reconnect
)

// jitter returns a random duration in [d/2, d] ("equal jitter": reconnecting clients spread
// out, and none waits much less than the step).
func jitter(d time.Duration) time.Duration { return d/2 + mrand.N(d/2+1) }

// backoffStep is the pause before a reconnection after step unstable attempts (0: none).
func backoffStep(step int) time.Duration {
	if step <= 0 {
		return 0
	}
	d := minBackoff
	for i := 1; i < step && d < maxBackoff; i++ {
		d *= 2
	}
	return jitter(min(d, maxBackoff))
}

// handle is a request as its caller holds it: the exchange it runs as, followed to its
// successors when the request is resumed on a new connection.
type handle struct {
	id string
	at atomic.Pointer[link]
}

type link struct {
	conn *conn
	e    *exchange
}

func newHandle(cn *conn, e *exchange) *handle {
	h := &handle{id: e.id}
	h.at.Store(&link{cn, e})
	return h
}

// do runs f (if not nil) on the request's current exchange under its connection's lock, and
// returns them.
func (h *handle) do(f func(*conn, *exchange)) (*conn, *exchange) {
	l := h.at.Load()
	cn, e := current(l.conn, l.e, f)
	if e != l.e {
		h.at.CompareAndSwap(l, &link{cn, e}) // a later one stored by another goroutine stays
	}
	return cn, e
}

// exchange is the current exchange (its immutable fields, or a done one's outcome).
func (h *handle) exchange() *exchange {
	_, e := h.do(nil)
	return e
}

// stop: the caller gave up on the request (see conn.stopLocked).
func (h *handle) stop() { h.do(func(cn *conn, e *exchange) { cn.stopLocked(e) }) }

// response is the terminal response if it arrived.
func (h *handle) response() *Response {
	var r *Response
	h.do(func(_ *conn, e *exchange) { r = e.response })
	return r
}

// waitDone waits until the request has ended (across resumes) or stop is closed; it reports
// whether the request ended.
func (h *handle) waitDone(stop <-chan struct{}) bool {
	for {
		var done, hop chan struct{}
		h.do(func(_ *conn, e *exchange) { done, hop = e.done, e.hop })
		select {
		case <-done:
			return true
		case <-hop: // continued on a new connection: wait there
		case <-stop:
			return false
		}
	}
}

// detachedReq is a resumable request whose connection dropped: the latest exchange of its
// chain (detached: on a dead connection, or a successor not registered yet) and the drop.
type detachedReq struct {
	conn *conn
	e    *exchange
	lost error // the *ConnectionLostError that detached it
}

// onDrop is conn.onDrop: the resumable requests of dropped are detached on the gateway; start
// resuming them (from the connection's reader, as it ends).
func (c *Client) onDrop(dropped *conn, exchanges []*exchange, err error) {
	now := time.Now()
	dropped.mu.Lock()
	lived := now.Sub(dropped.opened)
	dropped.mu.Unlock()
	var lost *ConnectionLostError
	slowDown := errors.As(err, &lost) && (lost.Code == protocol.CloseTryAgainLater ||
		lost.Code == protocol.CloseSlowConsumer || lost.Code == protocol.CloseRateLimited)
	c.mu.Lock()
	for _, e := range exchanges {
		c.detached = append(c.detached, &detachedReq{conn: dropped, e: e, lost: err})
	}
	if lived < stableAfter || slowDown {
		c.flaps++
		if c.since.IsZero() {
			c.since = now
		}
	} else {
		c.flaps, c.since = 0, now
	}
	start := !c.resuming && !c.closed
	if start {
		c.resuming = true
		c.wg.Add(1)
	}
	closed := c.closed
	c.mu.Unlock()
	switch {
	case start:
		go c.resumeLoop()
	case closed:
		c.giveUp(ErrClosed)
	}
}

// resumeLoop reconnects and resumes the detached requests until none is left.
func (c *Client) resumeLoop() {
	defer c.wg.Done()
	for {
		c.mu.Lock()
		if len(c.detached) == 0 {
			c.resuming = false
			c.mu.Unlock()
			return
		}
		deadline, step := c.since.Add(c.s.resumeTimeout), c.flaps
		c.mu.Unlock()
		cn, err := c.reconnect(deadline, step)
		if err != nil {
			c.giveUp(err)
			continue
		}
		if err := c.resumeOn(cn, deadline); err != nil {
			c.giveUp(err)
		}
	}
}

// reconnect returns the client's connection, redialing with backoff until deadline; at least
// one attempt.
func (c *Client) reconnect(deadline time.Time, step int) (*conn, error) {
	var last error
	for attempt := 0; ; attempt++ {
		if pause := backoffStep(step); pause > 0 {
			if attempt > 0 && time.Now().Add(pause).After(deadline) {
				return nil, last
			}
			t := time.NewTimer(pause)
			select {
			case <-t.C:
			case <-c.ctx.Done():
				t.Stop()
				return nil, ErrClosed
			}
		}
		step++
		ctx, cancel := context.WithDeadline(c.ctx, deadline)
		cn, d, err := c.connectionUntil(ctx, deadline)
		cancel()
		if err == nil {
			return cn, nil
		}
		last = err
		if errors.Is(err, context.DeadlineExceeded) && d != nil {
			c.mu.Lock()
			if d.last != nil {
				last = d.last // what the dial still running met
			}
			c.mu.Unlock()
		}
		if c.ctx.Err() != nil {
			return nil, ErrClosed
		}
		if !retryable(last) || !time.Now().Before(deadline) {
			return nil, last
		}
	}
}

// resumeOn continues each detached request on conn: its successor takes its place in the
// list until its resume is queued. A drop meanwhile leaves the rest for the next round; an
// error (the deadline while waiting for a stream slot, the client closed) gives up on them.
func (c *Client) resumeOn(nc *conn, deadline time.Time) error {
	ctx, cancel := context.WithDeadline(c.ctx, deadline)
	defer cancel()
	c.mu.Lock()
	list := append([]*detachedReq(nil), c.detached...)
	c.mu.Unlock()
	for _, d := range list {
		var n *exchange
		current(d.conn, d.e, func(oc *conn, e *exchange) {
			if e.detached && !e.isDone() {
				n = oc.continueLocked(e, nc)
			}
		})
		if n == nil { // ended meanwhile (or reattached by an earlier round)
			c.forget(d)
			continue
		}
		c.mu.Lock()
		d.conn, d.e = nc, n
		c.mu.Unlock()
		switch err := nc.reattach(ctx, n); {
		case err == nil:
			c.forget(d)
		case errors.Is(err, errDropped):
			// The next round resumes the rest, one backoff step later: a connection that
			// drops before the resumes are out is not stable (and may have had none to
			// detach, so onDrop did not count it).
			c.mu.Lock()
			c.flaps++
			if c.since.IsZero() {
				c.since = time.Now()
			}
			c.mu.Unlock()
			return nil
		case ctx.Err() != nil:
			if c.ctx.Err() != nil {
				return ErrClosed
			}
			return errors.New("no stream slot free on the new connection before the deadline")
		default:
			c.forget(d) // refused here (a duplicate id): n ended with the error
		}
	}
	return nil
}

func (c *Client) forget(d *detachedReq) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.detached {
		if x == d {
			c.detached = append(c.detached[:i], c.detached[i+1:]...)
			return
		}
	}
}

// giveUp ends every detached request: with a *ResumeFailedError wrapping cause, or, after
// Close, the *ConnectionLostError of a closed client. A cancel asked for meanwhile that nobody
// waits for (a Stop, an ended context) goes over HTTP DELETE, so that it is not lost; those
// of CancelRequest calls get the error, and the calls go over HTTP themselves.
func (c *Client) giveUp(cause error) {
	c.mu.Lock()
	list := make([]detachedReq, len(c.detached))
	for i, d := range c.detached {
		list[i] = *d
	}
	c.detached = nil
	closed := c.closed
	c.flaps, c.since = 0, time.Time{} // the next drop starts afresh
	c.mu.Unlock()
	for _, d := range list {
		var err error = &ResumeFailedError{RequestID: d.e.id, Lost: d.lost, Err: cause}
		if closed || errors.Is(cause, ErrClosed) {
			err = &ConnectionLostError{Code: protocol.CloseNormal, Err: ErrClosed}
		}
		cancel := false
		current(d.conn, d.e, func(_ *conn, e *exchange) {
			if e.detached && !e.isDone() {
				cancel = e.failCancels(err)
				e.finishWith(nil, err)
			}
		})
		if cancel && !closed {
			id, user := d.e.id, d.e.chatUserID
			// Only the resumer gets here (closed is false): its own count is held, so Close's
			// Wait cannot have returned.
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				ctx, cancel := context.WithTimeout(c.ctx, c.s.connectTimeout)
				defer cancel()
				_, _ = c.cancelHTTP(ctx, id, user)
			}()
		}
	}
}
