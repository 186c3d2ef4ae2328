package muxgate

import (
	"encoding/json"
	"time"

	"github.com/muxgate/muxgate/go/protocol"
)

// ChatRequest is one chat. Exactly one of Message and Messages is used (Messages wins when
// set and Message is empty).
type ChatRequest struct {
	// Message is a single user message.
	Message string
	// Messages is a conversation, oldest first.
	Messages []ChatMessage
	// RequestID names the request (1-128 of [A-Za-z0-9._:-]); default req_<32 hex digits>.
	RequestID string
	// UserID is the user the request is for; default the client's (WithUserID).
	UserID string
	// Timeout is the gateway's deadline for the request (timeout_ms, SPEC.md §5.5): when it
	// expires the response is cancelled with reason timeout. Zero: the gateway's maximum.
	// To stop waiting on the client side, use the context.
	Timeout time.Duration
	// Metadata is passed to the backend (e.g. the simulated backend's "tokens",
	// "token_delay_ms"); JSON values only. It is sent as encoding/json marshals it: keys
	// sorted, and a float with an integral value becomes an integer.
	Metadata map[string]any
}

// ChatMessage is one turn of a conversation.
type ChatMessage struct {
	Role    string `json:"role"` // system, user, assistant or tool
	Content string `json:"content"`
}

// Status is how a request ended.
type Status string

// The statuses of a Response.
const (
	StatusCompleted Status = "completed"
	StatusCancelled Status = "cancelled"
	StatusFailed    Status = "failed"
)

// Reason says why a request was cancelled.
type Reason string

// The reasons of a cancelled Response (SPEC.md §5.3).
const (
	ReasonClient     Reason = "client"     // a cancel message (this SDK: context, CancelRequest in-band)
	ReasonAPI        Reason = "api"        // DELETE /v1/requests/{id}
	ReasonTimeout    Reason = "timeout"    // ChatRequest.Timeout or the gateway's maximum
	ReasonDisconnect Reason = "disconnect" // the connection that ran it closed
	ReasonShutdown   Reason = "shutdown"   // the gateway stopped
)

// CancelResult is the outcome of a cancel: the protocol's status word (SPEC.md §5.3).
type CancelResult string

// The outcomes of CancelRequest; none of them is an error.
const (
	ResultCancelled        CancelResult = "cancelled"
	ResultAlreadyCancelled CancelResult = "already_cancelled"
	ResultAlreadyCompleted CancelResult = "already_completed"
	ResultNotFound         CancelResult = "not_found"
)

// Usage is the token accounting of a request (SPEC.md §5.4). Final is false when the figures
// may still grow: a cancelled request's pipeline runs on to its next checkpoint; the final
// figures follow (Client.FinalUsage).
type Usage struct {
	InputTokens  int64 `json:"input_tokens"`
	OutputTokens int64 `json:"output_tokens"`
	SavedTokens  int64 `json:"saved_tokens"`
	Final        bool  `json:"final"`
	// Estimated names the figures that are the gateway's estimates rather than the model
	// provider's own counts (SPEC.md §3.8), in the order "input_tokens", "output_tokens",
	// "saved_tokens" (protocol.FigureInputTokens, ...). nil: the gateway does not say (an older
	// gateway, or an HTTP body without it); empty: every figure is reported.
	Estimated []string `json:"estimated,omitempty"`
}

// IsEstimated reports whether the gateway said that figure (e.g. "output_tokens") is an
// estimate; false when it said nothing (Estimated nil).
func (u Usage) IsEstimated(figure string) bool {
	for _, name := range u.Estimated {
		if name == figure {
			return true
		}
	}
	return false
}

// MarshalJSON writes estimated exactly when the gateway sent it: [] for "every figure is
// reported", nothing when it did not say.
func (u Usage) MarshalJSON() ([]byte, error) {
	type plain struct {
		InputTokens  int64     `json:"input_tokens"`
		OutputTokens int64     `json:"output_tokens"`
		SavedTokens  int64     `json:"saved_tokens"`
		Final        bool      `json:"final"`
		Estimated    *[]string `json:"estimated,omitempty"`
	}
	p := plain{u.InputTokens, u.OutputTokens, u.SavedTokens, u.Final, nil}
	if u.Estimated != nil {
		p.Estimated = &u.Estimated
	}
	return json.Marshal(p)
}

// ErrorInfo says what failed.
type ErrorInfo struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Response is the terminal response of a request; as JSON it has the seed page's shape
// {"content": "", "status": "cancelled", "request_id": ...} plus reason, error and usage.
type Response struct {
	Content   string     `json:"content"`
	Status    Status     `json:"status"`
	RequestID string     `json:"request_id"`
	Reason    Reason     `json:"reason,omitempty"`
	Error     *ErrorInfo `json:"error,omitempty"`
	Usage     Usage      `json:"usage"`

	late   *lateUsage // the late usage message, when Usage.Final is false
	userID string     // the chat's user_id field, to ask over HTTP
}

// Chunk is a piece of a streamed answer. Boundaries carry no meaning (SPEC.md §5.2); when the
// consumer falls behind, pending pieces are merged, and Seq is that of the first one.
type Chunk struct {
	RequestID string
	Seq       int64
	Text      string
}

// RequestInfo is GET /v1/requests/{id} (SPEC.md §8.2).
type RequestInfo struct {
	RequestID string     `json:"request_id"`
	Status    string     `json:"status"` // active, cancelling, cancelled, completed, failed, not_found
	Reason    Reason     `json:"reason,omitempty"`
	Error     *ErrorInfo `json:"error,omitempty"`
	Usage     *Usage     `json:"usage,omitempty"`
}

// lateUsage is filled by the connection when the `usage` message arrives, or failed.
type lateUsage struct {
	done  chan struct{}
	usage Usage
	err   error
}

func usageOf(u protocol.Usage) Usage {
	var estimated []string
	if u.Estimated != nil {
		estimated = append(make([]string, 0, len(u.Estimated)), u.Estimated...)
	}
	return Usage{u.InputTokens, u.OutputTokens, u.SavedTokens, u.Final, estimated}
}

func responseOf(m *protocol.Response, userID string) *Response {
	r := &Response{
		Content:   m.Content,
		Status:    Status(m.Status),
		RequestID: m.RequestID,
		Reason:    Reason(m.Reason),
		Usage:     usageOf(m.Usage),
		userID:    userID,
	}
	if m.Error != nil {
		r.Error = &ErrorInfo{m.Error.Code, m.Error.Message}
	}
	if !m.Usage.Final {
		r.late = &lateUsage{done: make(chan struct{})}
	}
	return r
}
