package muxgate

import (
	"context"
	"iter"
	"slices"
	"sync/atomic"
)

// Stream is one streamed chat opened by Client.OpenStream: a handle on the request while it
// runs. Events yields its chunks and, for a chat with Steps, its steps, in the order the
// gateway sent them; Steps, CurrentStep, Halt and Response say at any time (from any
// goroutine) what the connection has received so far, which may be ahead of the event the
// Events loop is at.
type Stream struct {
	c      *Client
	conn   *conn
	e      *exchange
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
	conn, e, err := c.start(ctx, chat, a, true)
	if err != nil {
		return nil, err
	}
	s := &Stream{c: c, conn: conn, e: e, ctx: ctx, onStep: req.OnStep}
	s.stop = context.AfterFunc(ctx, func() { conn.stop(e) })
	return s, nil
}

// RequestID is the request's id (generated when the ChatRequest had none).
func (s *Stream) RequestID() string { return s.e.id }

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
				s.conn.stop(s.e) // the loop was left early (break, return, panic)
			}
		}()
		for {
			ev, more, err := s.c.next(s.ctx, s.conn, s.e)
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

// Close cancels the request on the gateway unless it has ended (or a cancel is on its way),
// and drops what the stream buffered. It does not wait for the cancelled response (Response,
// or Events, do). It is idempotent; after the Events loop ended it does nothing.
func (s *Stream) Close() error {
	s.stop()
	s.conn.stop(s.e)
	return nil
}

// Steps returns the steps received so far, in order (a copy).
func (s *Stream) Steps() []Step {
	s.conn.mu.Lock()
	defer s.conn.mu.Unlock()
	return slices.Clone(s.e.stepLog)
}

// CurrentStep returns the step that started last among those still running (started, not
// ended), if any. With overlapping steps (two tool calls at once) it is the later one.
func (s *Stream) CurrentStep() (Step, bool) {
	s.conn.mu.Lock()
	defer s.conn.mu.Unlock()
	return s.e.currentLocked()
}

// Halt returns the latest halt of a cancelled request of a chat with Steps: the response's
// (usually pending), then, once the usage message arrived, the final one (halted). nil before
// the response, and when the gateway sends none.
func (s *Stream) Halt() *Halt {
	s.conn.mu.Lock()
	defer s.conn.mu.Unlock()
	return s.e.halt.clone()
}

// Response returns the terminal response once it arrived, else nil. Its final usage and halt
// follow with Client.FinalUsage and Client.FinalHalt.
func (s *Stream) Response() *Response {
	s.conn.mu.Lock()
	defer s.conn.mu.Unlock()
	return s.e.response
}
