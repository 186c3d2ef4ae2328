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
	// Steps asks the gateway for the pipeline's steps (chat.steps, SPEC.md §3.12): Step
	// messages as steps start and end (planning, LLM calls, tool and agent calls), and, when
	// the request is cancelled, Halt objects saying where the pipeline halts. An older gateway
	// ignores it and sends none.
	Steps bool
	// Resumable asks the gateway to keep the request through a dropped connection
	// (chat.resumable, SPEC.md §5.8): when the connection closes the request is detached, not
	// cancelled, and runs on for its grace period, waiting for a resume. The gateway's grant
	// (the epoch a resume names, the grace period) is on the handle: Stream.Resumption. The
	// client reconnects by itself and resumes it from the last chunk received, and the call or
	// stream goes on with no gap and no repeat (WithAutoResume, WithResumeTimeout); it ends
	// with ErrResumeNotFound if the gateway no longer has it, a *ResumeFailedError if the
	// client cannot reconnect in time. With WithAutoResume(false) it ends with a
	// *ConnectionLostError, and Client.Resume (with Stream.ResumeRequest) continues it. If the
	// request is resumed elsewhere, its call or stream here ends with ErrMoved. An older
	// gateway ignores it (then Stream.Resumption reports nothing, and a drop ends it).
	Resumable bool
	// Grace is how long a detached resumable request waits for a resume (chat.grace_ms,
	// rounded up to a millisecond, at most one hour); zero: the gateway's default. Only with
	// Resumable. The gateway may grant less (Stream.Resumption).
	Grace time.Duration
	// OnStep, when set, is called with every step of the request in the order the gateway sent
	// it, interleaved with the chunks in wire order; it implies Steps. It runs on the goroutine
	// that consumes the request (the caller of Chat, the Task of ChatAsync, the range loop of
	// ChatStream or Stream.Events, before that step's event is yielded), never on the
	// connection's reader and never concurrently with itself. A slow OnStep delays only its
	// own request (what it has not taken yet is bounded like a stream's chunks).
	OnStep func(Step)
}

// Resumption is what the gateway granted a resumable request (its resumable message, SPEC.md
// §3.13).
type Resumption struct {
	RequestID string
	// Epoch names this incarnation of the request id: a resume must give it, so that it never
	// continues a different request that reused the id (or one from before a gateway restart).
	Epoch string
	// Grace is how long the request outlives a dropped connection, waiting for a resume. Zero
	// on a stream opened by Client.Resume (the gateway does not repeat it).
	Grace time.Duration
}

// ResumeRequest names a resumable request to continue on this client's connection
// (Client.Resume, SPEC.md §5.8). Stream.ResumeRequest builds it for a stream whose connection
// dropped.
type ResumeRequest struct {
	// RequestID is the request's id.
	RequestID string
	// Epoch is the request's epoch, from its Resumption.
	Epoch string
	// UserID is the user the request is for; default the client's (WithUserID).
	UserID string
	// FromSeq is the seq of the first chunk wanted: the number of chunks the caller already
	// has. Zero replays every chunk; n > 0 sends after_seq n-1.
	FromSeq int64
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
	// Halt is where the pipeline halts, in a cancelled response of a chat with Steps: state
	// pending (Usage.Final is false; the halted one follows, Client.FinalHalt, Stream.Halt) or
	// halted. nil otherwise.
	Halt *Halt `json:"halt,omitempty"`

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

// StepState says whether a step began or finished.
type StepState string

// The states of a Step.
const (
	StepStarted StepState = "started"
	StepEnded   StepState = "ended"
)

// The step kinds the protocol names today (SPEC.md §3.12). Kinds are open: a newer gateway may
// send others, which the SDK passes on.
const (
	StepKindPlan      = protocol.StepKindPlan      // planning / task decomposition
	StepKindLLM       = protocol.StepKindLLM       // a non-abortable LLM call
	StepKindLLMStream = protocol.StepKindLLMStream // an abortable streaming LLM call
	StepKindTool      = protocol.StepKindTool      // an MCP tool call (non-abortable)
	StepKindAgent     = protocol.StepKindAgent     // an A2A agent call (non-abortable)
)

// Step is one pipeline step of a request that started or ended (ChatRequest.Steps). Index
// counts the request's steps from 0 in the order they start; a started step ends at most once
// (never when it failed or was cut by a cancel); steps may overlap.
type Step struct {
	RequestID string    `json:"request_id"`
	Index     int64     `json:"index"`
	Kind      string    `json:"kind"` // StepKindPlan, StepKindTool, ... or a kind the SDK does not know
	Name      string    `json:"name"` // the tool's or agent's name, "answer", ...: for display
	State     StepState `json:"state"`
}

// StepInfo names a step in a Halt.
type StepInfo struct {
	Index int64  `json:"index"`
	Kind  string `json:"kind"`
	Name  string `json:"name"`
}

// HaltState says whether a cancelled request's pipeline has halted.
type HaltState string

// The states of a Halt.
const (
	// HaltPending: not yet. The pipeline finishes Halt.Step (a non-abortable tool, agent or
	// LLM call) and halts after it; with no step, it halts at its next checkpoint.
	HaltPending HaltState = "pending"
	// HaltHalted: it halted, after Halt.Step, or inside it when Aborted (an LLM stream told to
	// stop). No step: it halted before any step started.
	HaltHalted HaltState = "halted"
)

// Halt is where the pipeline of a cancelled request halts (SPEC.md §3.12), for a chat with
// Steps: pending in the cancelled Response, halted in the final usage that follows.
type Halt struct {
	State   HaltState `json:"state"`
	Step    *StepInfo `json:"step,omitempty"`
	Aborted bool      `json:"aborted"`
}

// Event is one item of Stream.Events, in the order the gateway sent them: a step when Step is
// set, else a chunk of text.
type Event struct {
	Step  *Step
	Chunk Chunk
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
	halt  *Halt
	err   error
}

func usageOf(u protocol.Usage) Usage {
	var estimated []string
	if u.Estimated != nil {
		estimated = append(make([]string, 0, len(u.Estimated)), u.Estimated...)
	}
	return Usage{u.InputTokens, u.OutputTokens, u.SavedTokens, u.Final, estimated}
}

func stepOf(m *protocol.Step) Step {
	return Step{RequestID: m.RequestID, Index: m.Index, Kind: m.Kind, Name: m.Name, State: StepState(m.State)}
}

func haltOf(h *protocol.Halt) *Halt {
	if h == nil {
		return nil
	}
	out := &Halt{State: HaltState(h.State), Aborted: h.Aborted}
	if h.Step != nil {
		out.Step = &StepInfo{Index: h.Step.Index, Kind: h.Step.Kind, Name: h.Step.Name}
	}
	return out
}

func (h *Halt) clone() *Halt {
	if h == nil {
		return nil
	}
	out := *h
	if h.Step != nil {
		info := *h.Step
		out.Step = &info
	}
	return &out
}

func responseOf(m *protocol.Response, userID string) *Response {
	r := &Response{
		Content:   m.Content,
		Status:    Status(m.Status),
		RequestID: m.RequestID,
		Reason:    Reason(m.Reason),
		Usage:     usageOf(m.Usage),
		Halt:      haltOf(m.Halt),
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
