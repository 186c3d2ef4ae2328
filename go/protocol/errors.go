package protocol

import "fmt"

// ErrorCode is a wire error code (SPEC.md §7). Codes are open: a gateway may send codes this
// package does not name; treat those like CodeInternal.
type ErrorCode = string

// The error codes of SPEC.md §7.
const (
	CodeBadFrame           ErrorCode = "bad_frame"
	CodeUnknownType        ErrorCode = "unknown_type"
	CodeInvalidField       ErrorCode = "invalid_field"
	CodeDuplicateRequestID ErrorCode = "duplicate_request_id"
	CodeTooManyStreams     ErrorCode = "too_many_streams"
	CodeUnauthorized       ErrorCode = "unauthorized"
	CodeForbidden          ErrorCode = "forbidden"
	CodeRateLimited        ErrorCode = "rate_limited"
	CodeFrameTooLarge      ErrorCode = "frame_too_large"
	CodeProtocolViolation  ErrorCode = "protocol_violation"
	CodeBackendError       ErrorCode = "backend_error"
	CodeUnavailable        ErrorCode = "unavailable"
	CodeInternal           ErrorCode = "internal"

	// In a failed response's error when the backend's model server failed (SPEC.md §7.2).
	CodeUpstreamUnavailable  ErrorCode = "upstream_unavailable"
	CodeUpstreamRateLimited  ErrorCode = "upstream_rate_limited"
	CodeUpstreamRejected     ErrorCode = "upstream_rejected"
	CodeUpstreamError        ErrorCode = "upstream_error"
	CodeUpstreamTimeout      ErrorCode = "upstream_timeout"
	CodeUpstreamBadResponse  ErrorCode = "upstream_bad_response"
	CodeUpstreamDisconnected ErrorCode = "upstream_disconnected"
	CodeUpstreamBusy         ErrorCode = "upstream_busy"

	// In a failed response's error when an MCP tool call failed (SPEC.md §7.2).
	CodeToolError       ErrorCode = "tool_error"
	CodeToolTimeout     ErrorCode = "tool_timeout"
	CodeToolUnavailable ErrorCode = "tool_unavailable"

	// In a failed response's error when a remote A2A agent call failed (SPEC.md §7.2).
	CodeAgentError       ErrorCode = "agent_error"
	CodeAgentTimeout     ErrorCode = "agent_timeout"
	CodeAgentUnavailable ErrorCode = "agent_unavailable"
)

// WebSocket close codes the gateway uses (SPEC.md §2.6).
const (
	CloseNormal          = 1000
	CloseGoingAway       = 1001
	CloseProtocolError   = 1002 // RFC 6455; what a client sends when the gateway broke the protocol
	ClosePolicyViolation = 1008
	CloseMessageTooBig   = 1009
	CloseInternalError   = 1011
	CloseTryAgainLater   = 1013
	CloseUnauthorized    = 4001
	CloseSlowConsumer    = 4008
	CloseRateLimited     = 4029
)

// ProtocolError is a message the protocol forbids. Remote: the peer sent it (answer it with an
// `error` carrying Code); otherwise we were about to send it (a bug or bad input of the caller).
// RequestID is set when the refused object carried a valid request_id (SPEC.md §3.1).
type ProtocolError struct {
	Code      ErrorCode
	Message   string
	RequestID string
	Remote    bool
}

func (e *ProtocolError) Error() string {
	if e.RequestID != "" {
		return fmt.Sprintf("%s: %s (request %s)", e.Code, e.Message, e.RequestID)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

func invalid(format string, args ...any) *ProtocolError {
	return &ProtocolError{Code: CodeInvalidField, Message: fmt.Sprintf(format, args...)}
}

func badFrame(msg string) *ProtocolError {
	return &ProtocolError{Code: CodeBadFrame, Message: msg, Remote: true}
}
