package muxgate

import (
	"errors"
	"fmt"

	"github.com/muxgate/muxgate/go/protocol"
)

// The SDK's errors, for errors.Is and errors.As:
//
//	ErrInvalidRequest            our own bad input (a bad request id, a too long message);
//	                             nothing was sent
//	*ConnectError                the WebSocket or HTTP connection could not be opened
//	                             (Is ErrConnect; .Status is the HTTP status of a refused handshake)
//	*ConnectionLostError         the WebSocket closed while the request was in flight (Is
//	                             ErrConnectionLost; .Code is the close code; the gateway has
//	                             cancelled the request, SPEC.md G7); the next call reconnects.
//	                             A resumable request is resumed instead (§5.8, WithAutoResume)
//	*ResumeFailedError           a resumable request's connection dropped and the client could
//	                             not reconnect to resume it in time (Is ErrResumeFailed and
//	                             ErrConnectionLost; As gives the *ConnectionLostError of the drop)
//	*ProtocolError               a wire error code: the gateway refused a message with an
//	                             `error` (Code duplicate_request_id, too_many_streams,
//	                             rate_limited, unavailable, forbidden, unauthorized, ...) or the
//	                             SDK caught the gateway breaking the protocol (protocol_violation).
//	                             errors.Is matches by code: ErrUnauthorized, ErrTooManyStreams, ...
//	*CancelledError              the request ended cancelled before the caller had its answer:
//	                             the caller's context (Unwrap gives context.Canceled or
//	                             context.DeadlineExceeded) or, for a stream, the gateway (another
//	                             client's cancel, timeout_ms). Is ErrCancelled; .Response
//	*RequestFailedError          the request ended with status failed (.Response.Error)
//	ErrSlowConsumer              a stream's consumer fell behind its bounded buffer; the
//	                             request was cancelled (wrapped in a *CancelledError)
//	ErrMoved                     a resumable request was resumed on another connection (the
//	                             gateway sent moved, SPEC.md §5.8): it goes on there, not
//	                             cancelled; nothing more about it comes here
//	ErrResumeNotFound            a resume found nothing to resume (resume_result not_found:
//	                             unknown id, another user's, another epoch, or its grace period
//	                             is over), by Client.Resume or by the automatic resume
//	ErrClosed                    the Client was closed
//
// Chat returns a Response with Status cancelled and no error when the gateway cancelled the
// request on someone else's behalf (CancelRequest, DELETE, timeout_ms): the seed page's
// behaviour. A stream has no Response to return, so it ends with a *CancelledError then.
var (
	ErrInvalidRequest = errors.New("muxgate: invalid request")
	ErrConnect        = errors.New("muxgate: cannot connect")
	ErrConnectionLost = errors.New("muxgate: connection lost")
	ErrCancelled      = errors.New("muxgate: request cancelled")
	ErrSlowConsumer   = errors.New("muxgate: stream consumer too slow, request cancelled")
	ErrClosed         = errors.New("muxgate: client closed")
	// ErrMoved ends a request's call or stream on this connection when the gateway says the
	// request was resumed on another connection (SPEC.md §5.8). The request is not cancelled:
	// whoever resumed it gets the rest and its response. Whatever arrived before the move is
	// still yielded first.
	ErrMoved = errors.New("muxgate: request moved to another connection")
	// ErrResumeNotFound: a resume found nothing to continue (resume_result not_found).
	ErrResumeNotFound = errors.New("muxgate: no resumable request with this id and epoch")
	// ErrResumeFailed: see ResumeFailedError.
	ErrResumeFailed = errors.New("muxgate: could not reconnect to resume the request")
)

// Sentinels matched by code (errors.Is(err, ErrUnauthorized) is true for any *ProtocolError
// with code unauthorized, from an `error` message, a close 4001 or an HTTP 401).
var (
	ErrUnauthorized       = &ProtocolError{Code: protocol.CodeUnauthorized}
	ErrForbidden          = &ProtocolError{Code: protocol.CodeForbidden}
	ErrDuplicateRequestID = &ProtocolError{Code: protocol.CodeDuplicateRequestID}
	ErrTooManyStreams     = &ProtocolError{Code: protocol.CodeTooManyStreams}
	ErrRateLimited        = &ProtocolError{Code: protocol.CodeRateLimited}
	ErrUnavailable        = &ProtocolError{Code: protocol.CodeUnavailable}
	ErrProtocolViolation  = &ProtocolError{Code: protocol.CodeProtocolViolation}
)

// ProtocolError carries a wire error code (SPEC.md §7). Codes are open: treat unknown ones
// like internal.
type ProtocolError struct {
	Code      string
	Message   string
	RequestID string // the request the error is about, if any
}

func (e *ProtocolError) Error() string {
	s := "muxgate: " + e.Code
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.RequestID != "" {
		s += " (request " + e.RequestID + ")"
	}
	return s
}

// Is matches another *ProtocolError with the same code.
func (e *ProtocolError) Is(target error) bool {
	t, ok := target.(*ProtocolError)
	return ok && t.Code == e.Code
}

// ConnectError: the connection could not be opened.
type ConnectError struct {
	URL    string
	Status int // HTTP status of a refused handshake, 0 otherwise
	Err    error
}

func (e *ConnectError) Error() string {
	if e.Status != 0 {
		return fmt.Sprintf("muxgate: connect to %s: HTTP %d: %v", e.URL, e.Status, e.Err)
	}
	return fmt.Sprintf("muxgate: connect to %s: %v", e.URL, e.Err)
}

// Unwrap returns the cause.
func (e *ConnectError) Unwrap() error { return e.Err }

// Is reports ErrConnect.
func (e *ConnectError) Is(target error) bool { return target == ErrConnect }

// ConnectionLostError: the WebSocket closed while requests were in flight.
type ConnectionLostError struct {
	Code   int // WebSocket close code; -1 when the connection broke without a close frame
	Reason string
	Err    error // the cause: ErrClosed, a *ProtocolError the gateway announced, a network error
}

func (e *ConnectionLostError) Error() string {
	s := "muxgate: connection lost"
	if e.Code >= 0 {
		s += fmt.Sprintf(" (close %d", e.Code)
		if e.Reason != "" {
			s += " " + e.Reason
		}
		s += ")"
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns the cause.
func (e *ConnectionLostError) Unwrap() error { return e.Err }

// Is reports ErrConnectionLost.
func (e *ConnectionLostError) Is(target error) bool { return target == ErrConnectionLost }

// GoingAway reports a gateway shutdown (close 1001, SPEC.md §5.7).
func (e *ConnectionLostError) GoingAway() bool { return e.Code == protocol.CloseGoingAway }

// ResumeFailedError ends a resumable request whose connection dropped when the client gave up
// reconnecting to resume it (WithResumeTimeout after the drop, or a reconnection refused for
// good, such as unauthorized). The gateway keeps the request until its grace period ends,
// then cancels it (reason disconnect). errors.Is matches ErrResumeFailed and
// ErrConnectionLost; errors.As gives the drop's *ConnectionLostError.
type ResumeFailedError struct {
	RequestID string
	Lost      error // the *ConnectionLostError of the drop
	Err       error // why reconnecting failed: the last dial's error, ...
}

func (e *ResumeFailedError) Error() string {
	return fmt.Sprintf("muxgate: request %s could not be resumed: %v; reconnecting failed: %v", e.RequestID, e.Lost, e.Err)
}

// Unwrap returns the drop and the reconnection's error.
func (e *ResumeFailedError) Unwrap() []error { return []error{e.Lost, e.Err} }

// Is reports ErrResumeFailed.
func (e *ResumeFailedError) Is(target error) bool { return target == ErrResumeFailed }

// CancelledError: the request was cancelled before the caller had its answer.
type CancelledError struct {
	RequestID string
	// Response is the terminal response if it arrived (status cancelled, or completed when the
	// request won the race against the cancel), else nil.
	Response *Response
	// Cause is ctx.Err() when the caller's context ended, ErrSlowConsumer when a stream's
	// buffer overflowed, nil when the gateway cancelled the request (see Response.Reason).
	Cause error
}

func (e *CancelledError) Error() string {
	s := "muxgate: request " + e.RequestID + " cancelled"
	if e.Response != nil && e.Response.Reason != "" {
		s += " (" + string(e.Response.Reason) + ")"
	}
	if e.Cause != nil {
		s += ": " + e.Cause.Error()
	}
	return s
}

// Unwrap returns the cause (context.Canceled, context.DeadlineExceeded, ErrSlowConsumer).
func (e *CancelledError) Unwrap() error { return e.Cause }

// Is reports ErrCancelled.
func (e *CancelledError) Is(target error) bool { return target == ErrCancelled }

// RequestFailedError: the request ended with status failed.
type RequestFailedError struct{ Response *Response }

func (e *RequestFailedError) Error() string {
	code, msg := protocol.CodeInternal, "the request failed"
	if e.Response.Error != nil {
		code, msg = e.Response.Error.Code, e.Response.Error.Message
	}
	return fmt.Sprintf("muxgate: request %s failed: %s: %s", e.Response.RequestID, code, msg)
}

// invalidf reports our own bad input.
func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidRequest}, args...)...)
}
