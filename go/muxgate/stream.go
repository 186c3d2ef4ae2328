package muxgate

import (
	"context"
	"iter"
	"slices"
	"sync/atomic"

	"github.com/muxgate/muxgate/go/protocol"
)

// Stream is one streamed chat opened by Client.OpenStream: a handle on the request while it
// runs. Events yields its chunks and, for a chat with Steps, its steps, in the order the
// gateway sent them; Steps, CurrentStep, Halt and Response say at any time (from any
// goroutine) what the connection has received so far, which may be ahead of the event the
// Events loop is at. A resumable stream follows its request across the connections the client
// resumes it on (WithAutoResume): all of this goes on as if the connection had not dropped.
type Stream struct {
	c      *Client
	h      *handle
	ctx    context.Context
	onStep func(Step)
	stop   func() bool // the context's AfterFunc
	ranged atomic.Bool
}

// OpenStream sends a streamed chat (stream true) and returns its handle once the chat is on
// its way (after connecting, and waiting for a stream slot if all max_streams are in use).
// Cancelling ctx cancels the request on the gateway, as does Close before the request ended
// or leaving the Events loop early. req.Steps asks for the pipeline's steps; req.OnStep, if
// set, is called for each step too, by the Events loop just before it yields the step.
//
// Range Events or Close the stream: what nobody reads is buffered up to WithStreamBuffer, then
// the request is cancelled as a slow consumer (ErrSlowConsumer), as with ChatStream.
func (c *Client) OpenStream(ctx context.Context, req *ChatRequest) (*Stream, error) {
	chat, err := c.build(req, true)
	if err != nil {
		return nil, err
	}
	a, err := c.announce(chat.RequestID)
	if err != nil {
		return nil, err
	}
	cn, e, err := c.start(ctx, chat, a, true)
	if err != nil {
		return nil, err
	}
	s := &Stream{c: c, h: newHandle(cn, e), ctx: ctx, onStep: req.OnStep}
	s.stop = context.AfterFunc(ctx, s.h.stop)
	return s, nil
}

// RequestID is the request's id (generated when the ChatRequest had none).
func (s *Stream) RequestID() string { return s.h.id }

// Events yields the request's events as they arrive: a chunk of text, or (for a chat with
// Steps) a step that started or ended, in wire order — a step started follows every chunk
// emitted before it and precedes every chunk emitted after (SPEC.md §3.12). The loop ends after
// the last event when the request completes; otherwise the last iteration yields the error,
// exactly as ChatStream's (a cancelled request: a *CancelledError with its Response). A Stream
// is ranged once: a second range yields only an error. Leaving the loop early cancels the
// request on the gateway.
func (s *Stream) Events() iter.Seq2[Event, error] {
	return func(yield func(Event, error) bool) {
		if s.ranged.Swap(true) {
			yield(Event{}, invalidf("a Stream's events are ranged once"))
			return
		}
		defer s.stop()
		finished := false
		defer func() {
			if !finished {
				s.h.stop() // the loop was left early (break, return, panic)
			}
		}()
		for {
			ev, more, err := s.c.next(s.ctx, s.h)
			if !more {
				finished = true
				if err != nil {
					yield(Event{}, err)
				}
				return
			}
			if ev.Step != nil && s.onStep != nil {
				s.onStep(*ev.Step)
			}
			if !yield(ev, nil) {
				return
			}
		}
	}
}

// Resume continues a resumable request on this client's connection (SPEC.md §5.8): one whose
// connection dropped while the automatic resume was off (WithAutoResume(false): its stream
// ended with a *ConnectionLostError; the gateway kept it for its grace period), by the
// handle's Stream.ResumeRequest, or by id and epoch from another process of the same user. It sends resume and waits for the gateway's answer: the
// stream of the chunks from req.FromSeq on (those kept while detached, then the live ones),
// the live steps (steps are not replayed) and the response. If the request still runs on
// another connection, it moves here and that connection's stream ends with ErrMoved.
//
// A resume that finds nothing (an unknown id, another user's, another epoch, a grace period
// over) returns an error wrapping ErrResumeNotFound; one the gateway refuses, a
// *ProtocolError (duplicate_request_id when the request still runs on this connection).
// Cancelling ctx cancels the request on the gateway, as with OpenStream. The chat's stream and
// steps flags are not known on this side: steps, if any, are yielded as events, and a
// completed response's content only has to end with the text received since the resume. If
// this connection drops in turn, the returned stream is resumed like a resumable chat's.
func (c *Client) Resume(ctx context.Context, req *ResumeRequest) (*Stream, error) {
	if c.sErr != nil {
		return nil, c.sErr
	}
	if req == nil {
		return nil, invalidf("nil ResumeRequest")
	}
	if !protocol.ValidRequestID(req.RequestID) {
		return nil, invalidf("request id must be 1-128 characters of [A-Za-z0-9._:-]: %q", req.RequestID)
	}
	if !protocol.ValidEpoch(req.Epoch) {
		return nil, invalidf("epoch must be 1-64 characters of [A-Za-z0-9._:-]: %q", req.Epoch)
	}
	if req.UserID != "" && !protocol.ValidUserID(req.UserID) {
		return nil, invalidf("user id must be 1-128 characters of [A-Za-z0-9._:@-]: %q", req.UserID)
	}
	if req.FromSeq < 0 || req.FromSeq > protocol.MaxSafeInteger+1 {
		return nil, invalidf("FromSeq out of range: %d", req.FromSeq)
	}
	m := &protocol.Resume{RequestID: req.RequestID, Epoch: req.Epoch, UserID: req.UserID}
	if req.FromSeq > 0 {
		after := req.FromSeq - 1
		m.AfterSeq = &after
	}
	a, err := c.announce(req.RequestID)
	if err != nil {
		return nil, err
	}
	cn, e, err := c.open(ctx, req.RequestID, a, func(cn *conn) (*exchange, error) {
		return cn.resume(ctx, m)
	})
	if err != nil {
		return nil, err
	}
	s := &Stream{c: c, h: newHandle(cn, e), ctx: ctx}
	s.stop = context.AfterFunc(ctx, s.h.stop)
wait:
	for {
		var answered, done, hop chan struct{}
		s.h.do(func(_ *conn, e *exchange) { answered, done, hop = e.resumeAnswered, e.done, e.hop })
		select {
		case <-answered:
			break wait
		case <-done:
			break wait
		case <-hop: // the connection dropped and the resume went out again on a new one
		case <-ctx.Done():
			break wait
		}
	}
	var awaiting, resumed bool
	s.h.do(func(_ *conn, e *exchange) {
		awaiting, resumed = e.awaitingResume, !e.awaitingResume && !e.refused && !e.gone
		err = e.err
	})
	switch {
	case resumed:
		return s, nil
	case awaiting && err == nil: // the context ended first: cancel the request (once)
		s.stop()
		s.h.stop()
		return nil, &CancelledError{RequestID: s.h.id, Cause: ctx.Err()}
	}
	s.stop()
	return nil, err
}

// Resumption returns what the gateway granted this resumable request (ChatRequest.Resumable):
// its epoch and grace period. ok is false until the gateway's resumable message arrived (it
// comes before anything else about the request), and for good when the chat did not ask or
// the gateway ignored the request (an older gateway). On a stream opened by Client.Resume it
// has the resume's epoch and no grace period.
func (s *Stream) Resumption() (r Resumption, ok bool) {
	s.h.do(func(_ *conn, e *exchange) {
		if e.epoch != "" {
			r, ok = Resumption{RequestID: e.id, Epoch: e.epoch, Grace: e.grace}, true
		}
	})
	return r, ok
}

// ResumeRequest returns what Client.Resume needs to continue this request on a new connection
// after this one dropped (with WithAutoResume(false), or from another process): its id, user
// and epoch, and FromSeq after the last chunk received (the Events loop yields every chunk
// received before it ends, so a consumer that ranged to the end has exactly those). ok is
// false when the request is not resumable (Resumption has nothing). Take it once the
// connection is gone: while the request still streams here, chunks that arrive after the call
// come here (until moved) and again on the resuming connection.
func (s *Stream) ResumeRequest() (req *ResumeRequest, ok bool) {
	s.h.do(func(_ *conn, e *exchange) {
		if e.epoch != "" {
			req, ok = &ResumeRequest{RequestID: e.id, Epoch: e.epoch, UserID: e.chatUserID, FromSeq: e.nextSeq}, true
		}
	})
	return req, ok
}

// Close cancels the request on the gateway unless it has ended (or a cancel is on its way),
// and drops what the stream buffered. It does not wait for the cancelled response (Response,
// or Events, do). It is idempotent; after the Events loop ended it does nothing.
func (s *Stream) Close() error {
	s.stop()
	s.h.stop()
	return nil
}

// Steps returns the steps received so far, in order (a copy).
func (s *Stream) Steps() (steps []Step) {
	s.h.do(func(_ *conn, e *exchange) { steps = slices.Clone(e.stepLog) })
	return steps
}

// CurrentStep returns the step that started last among those still running (started, not
// ended), if any. With overlapping steps (two tool calls at once) it is the later one.
func (s *Stream) CurrentStep() (step Step, ok bool) {
	s.h.do(func(_ *conn, e *exchange) { step, ok = e.currentLocked() })
	return step, ok
}

// Halt returns the latest halt of a cancelled request of a chat with Steps: the response's
// (usually pending), then, once the usage message arrived, the final one (halted). nil before
// the response, and when the gateway sends none.
func (s *Stream) Halt() (h *Halt) {
	s.h.do(func(_ *conn, e *exchange) { h = e.halt.clone() })
	return h
}

// Response returns the terminal response once it arrived, else nil. Its final usage and halt
// follow with Client.FinalUsage and Client.FinalHalt.
func (s *Stream) Response() *Response { return s.h.response() }
