package protocol

import (
	"math"
	"unicode/utf8"
)

// Message is one protocol object (SPEC.md §3). Every message validates itself (Validate) with
// the rules of its table in SPEC.md; Wire returns it as an ordered map in canonical field
// order (SPEC.md §9), optional fields absent when unset.
type Message interface {
	Type() string
	Validate() error
	Wire() *Object
}

// Role is the author of one turn in chat.messages.
type Role string

// The roles of chat.messages[].role.
const (
	RoleSystem    Role = "system"
	RoleUser      Role = "user"
	RoleAssistant Role = "assistant"
	RoleTool      Role = "tool"
)

// ResponseStatus is how a request ended (response.status).
type ResponseStatus string

// The statuses of a terminal response.
const (
	StatusCompleted ResponseStatus = "completed"
	StatusCancelled ResponseStatus = "cancelled"
	StatusFailed    ResponseStatus = "failed"
)

// CancelReason is why a request was cancelled (response.reason).
type CancelReason string

// The reasons of a cancelled response (SPEC.md §5.3).
const (
	ReasonClient     CancelReason = "client"
	ReasonAPI        CancelReason = "api"
	ReasonTimeout    CancelReason = "timeout"
	ReasonDisconnect CancelReason = "disconnect"
	ReasonShutdown   CancelReason = "shutdown"
)

// CancelStatus is the outcome of one cancel (cancel_result.status, HTTP DELETE body).
type CancelStatus string

// The outcomes of a cancel (SPEC.md §5.3, G4).
const (
	CancelCancelled        CancelStatus = "cancelled"
	CancelAlreadyCancelled CancelStatus = "already_cancelled"
	CancelAlreadyCompleted CancelStatus = "already_completed"
	CancelNotFound         CancelStatus = "not_found"
)

// ResumeStatus is the outcome of one resume (resume_result.status, SPEC.md §5.8).
type ResumeStatus string

// The outcomes of a resume.
const (
	// ResumeResumed: the request continues on this connection; its chunks after the resume's
	// after_seq follow, then whatever else it sends.
	ResumeResumed ResumeStatus = "resumed"
	// ResumeNotFound: nothing to resume for this user, id and epoch (never resumable, its
	// grace period is over, another user's, another incarnation of the id, a gateway restart);
	// nothing about the request follows.
	ResumeNotFound ResumeStatus = "not_found"
)

// Valid reports whether s is one of the two outcomes.
func (s ResumeStatus) Valid() bool { return s == ResumeResumed || s == ResumeNotFound }

// StepState is whether a pipeline step began or finished (step.state, SPEC.md §3.12).
type StepState string

// The states of a step message.
const (
	StepStarted StepState = "started"
	StepEnded   StepState = "ended"
)

// The step kinds the spec names (SPEC.md §3.12). Kinds are open, like error codes: a receiver
// accepts any kind matching STEP_KIND_PATTERN (ValidStepKind), known or not.
const (
	StepKindPlan      = "plan"       // planning / task decomposition
	StepKindLLM       = "llm"        // a non-abortable LLM call
	StepKindLLMStream = "llm_stream" // an abortable streaming LLM call
	StepKindTool      = "tool"       // an MCP tool call (non-abortable)
	StepKindAgent     = "agent"      // an A2A agent call (non-abortable)
)

// HaltState is whether the pipeline of a cancelled request has halted (halt.state).
type HaltState string

// The states of a halt object (SPEC.md §3.12).
const (
	// HaltPending: not yet; it is finishing Halt.Step (non-abortable), or, without a step, runs
	// to its next checkpoint. Only in a cancelled response whose usage is not final.
	HaltPending HaltState = "pending"
	// HaltHalted: it halted, after Halt.Step (or inside it when Halt.Aborted).
	HaltHalted HaltState = "halted"
)

func (s StepState) valid() bool { return s == StepStarted || s == StepEnded }

func (s HaltState) valid() bool { return s == HaltPending || s == HaltHalted }

func (r Role) valid() bool {
	return r == RoleSystem || r == RoleUser || r == RoleAssistant || r == RoleTool
}

func (s ResponseStatus) valid() bool {
	return s == StatusCompleted || s == StatusCancelled || s == StatusFailed
}

func (r CancelReason) valid() bool {
	switch r {
	case ReasonClient, ReasonAPI, ReasonTimeout, ReasonDisconnect, ReasonShutdown:
		return true
	}
	return false
}

// Valid reports whether s is one of the four outcomes.
func (s CancelStatus) Valid() bool {
	switch s {
	case CancelCancelled, CancelAlreadyCancelled, CancelAlreadyCompleted, CancelNotFound:
		return true
	}
	return false
}

// ChatMessage is one turn of chat.messages.
type ChatMessage struct {
	Role    Role
	Content string
}

// The figures of a usage object that Usage.Estimated may name (SPEC.md §3.8).
const (
	FigureInputTokens  = "input_tokens"
	FigureOutputTokens = "output_tokens"
	FigureSavedTokens  = "saved_tokens"
)

// UsageFigures lists the figures Usage.Estimated may name, in canonical order.
func UsageFigures() []string {
	return []string{FigureInputTokens, FigureOutputTokens, FigureSavedTokens}
}

func usageFigureIndex(name string) int {
	switch name {
	case FigureInputTokens:
		return 0
	case FigureOutputTokens:
		return 1
	case FigureSavedTokens:
		return 2
	}
	return -1
}

// Usage is the token accounting of one request (SPEC.md §3.8, §5.4).
type Usage struct {
	InputTokens  int64
	OutputTokens int64
	SavedTokens  int64
	Final        bool
	// Estimated names the figures that are the gateway's estimates rather than the provider's
	// own counts (usage.estimated, SPEC.md §3.8): distinct names from UsageFigures. nil means
	// absent (the sender does not say); a non-nil empty slice means every figure is reported.
	// Parsing yields them in canonical order; encoding writes them in canonical order.
	Estimated []string
}

// canonicalEstimated returns the names in canonical order, or an error for an unknown name
// or a name given twice; nil stays nil.
func canonicalEstimated(names []string) ([]string, error) {
	if names == nil {
		return nil, nil
	}
	var seen [3]bool
	for _, name := range names {
		i := usageFigureIndex(name)
		if i < 0 {
			return nil, invalid("usage.estimated entries must be one of input_tokens, output_tokens, saved_tokens")
		}
		if seen[i] {
			return nil, invalid("usage.estimated lists %s twice", name)
		}
		seen[i] = true
	}
	out := make([]string, 0, len(names))
	for i, name := range UsageFigures() {
		if seen[i] {
			out = append(out, name)
		}
	}
	return out, nil
}

// ErrorInfo is response.error of a failed request.
type ErrorInfo struct {
	Code    string
	Message string
}

// StepInfo names one pipeline step: halt.step, and the identity of a Step message.
type StepInfo struct {
	Index int64
	Kind  string // STEP_KIND_PATTERN; open (StepKindPlan, StepKindTool, ... or any other)
	Name  string // 1..MaxStepNameChars characters, for display
}

// Halt says where the pipeline of a cancelled request halts (response.halt, usage.halt;
// SPEC.md §3.12), for a chat with steps true.
//
// State HaltPending (in the cancelled response): Step is the non-abortable step the pipeline is
// finishing, after which it halts; nil when it halts at its next checkpoint without waiting for
// a step. State HaltHalted (in the usage message, or a response whose usage is final): Step is
// the last step the pipeline started (nil: it halted before any step started), and Aborted says
// the step was stopped mid-way (an abortable LLM stream) rather than finished.
type Halt struct {
	State   HaltState
	Step    *StepInfo // nil = absent
	Aborted bool
}

// Limits are the gateway's operational limits (welcome.limits, SPEC.md §3.5).
type Limits struct {
	MaxStreams       int64
	MaxFrameBytes    int64
	MaxBatchMessages int64
	MaxTimeoutMs     int64
}

// DefaultLimits are the limits a client assumes before welcome and for absent fields.
func DefaultLimits() Limits {
	return Limits{DefaultMaxStreams, MaxFrameBytes, MaxBatchMessages, MaxTimeoutMs}
}

// PingID is ping.id / pong.id: absent, a string, or an integer.
type PingID struct {
	Set   bool
	IsInt bool
	Int   int64
	Str   string
}

// Client -> gateway.

// Hello is the optional first message: credentials and a default user (SPEC.md §3.2).
type Hello struct {
	Token     *string
	ClientKey *string
	UserID    string // "" = absent
}

// Chat starts one request (SPEC.md §3.3). Exactly one of Message and Messages is set.
type Chat struct {
	RequestID string
	Message   *string
	Messages  []ChatMessage // nil = absent
	Stream    bool
	UserID    string // "" = absent
	TimeoutMs int64  // 0 = absent
	Metadata  *Object
	// Steps asks for step messages and halt objects (SPEC.md §3.12). Optional, default false,
	// written only when true (so older encodings keep their bytes).
	Steps bool
	// Resumable asks the gateway to keep the request through a closed connection, for a
	// resume on another (SPEC.md §5.8). Optional, default false, written only when true.
	Resumable bool
	// GraceMs is how long a detached request waits for a resume, 1..MaxGraceMs; only with
	// Resumable. 0 = absent (the gateway's default).
	GraceMs int64
}

// Cancel asks the gateway to cancel one request (SPEC.md §3.4).
type Cancel struct {
	RequestID string
	UserID    string // "" = absent
	Reason    *string
}

// Resume continues a resumable request of the user on this connection, from the chunk after
// AfterSeq (SPEC.md §3.4, §5.8). It is answered by one ResumeResult (or an Error).
type Resume struct {
	RequestID string
	Epoch     string // EPOCH_PATTERN: the request's incarnation, from its Resumable message
	AfterSeq  *int64 // the last chunk the client has, 0..2^53-1; nil = absent (replay from seq 0)
	UserID    string // "" = absent
}

// Ping asks for a Pong with the same ID.
type Ping struct{ ID PingID }

// Gateway -> client.

// Welcome is the gateway's first message (SPEC.md §3.5).
type Welcome struct {
	ConnectionID string
	UserID       string // "" = absent
	Limits       Limits
}

// Chunk is one piece of a request's streamed text (SPEC.md §3.6).
type Chunk struct {
	RequestID string
	Seq       int64
	Text      string
}

// Step is one pipeline step of a request that started or ended (SPEC.md §3.12); only for a
// chat with steps true, before its response, in order with its chunks.
type Step struct {
	RequestID string
	Index     int64 // 0 for the first step started, then 1, 2, ... in the order steps start
	Kind      string
	Name      string
	State     StepState
}

// Info is the step's identity (index, kind, name) as a halt object names it.
func (m *Step) Info() StepInfo { return StepInfo{Index: m.Index, Kind: m.Kind, Name: m.Name} }

// Response is the terminal response of a request (SPEC.md §3.7).
type Response struct {
	RequestID string
	Status    ResponseStatus
	Content   string
	Reason    CancelReason // "" = absent; set exactly when cancelled
	Error     *ErrorInfo   // set exactly when failed
	Usage     Usage
	Halt      *Halt // nil = absent; only when cancelled, for a chat with steps true
}

// UsageReport is the `usage` message: the final figures of a cancelled request (SPEC.md §3.8).
type UsageReport struct {
	RequestID string
	Usage     Usage
	Halt      *Halt // nil = absent; state halted, for a chat with steps true
}

// CancelResult answers one cancel (SPEC.md §3.9).
type CancelResult struct {
	RequestID string
	Status    CancelStatus
}

// Resumable is the first message about a request whose chat had resumable true (SPEC.md
// §3.13): the epoch a resume names and the grace period the gateway granted.
type Resumable struct {
	RequestID string
	Epoch     string
	GraceMs   int64 // 1..MaxGraceMs
}

// ResumeResult answers one Resume (SPEC.md §3.13).
type ResumeResult struct {
	RequestID string
	Status    ResumeStatus
}

// Moved says that a request this connection ran was resumed on another connection: nothing
// more about it comes on this one, except cancel_results (SPEC.md §3.13, §5.8).
type Moved struct {
	RequestID string
}

// Error refuses a client message or frame (SPEC.md §3.10).
type Error struct {
	Code      string
	Message   string
	RequestID string // "" = absent
}

// Pong answers one ping.
type Pong struct{ ID PingID }

// Type names.
func (*Hello) Type() string        { return "hello" }
func (*Chat) Type() string         { return "chat" }
func (*Cancel) Type() string       { return "cancel" }
func (*Resume) Type() string       { return "resume" }
func (*Ping) Type() string         { return "ping" }
func (*Welcome) Type() string      { return "welcome" }
func (*Chunk) Type() string        { return "chunk" }
func (*Step) Type() string         { return "step" }
func (*Response) Type() string     { return "response" }
func (*UsageReport) Type() string  { return "usage" }
func (*CancelResult) Type() string { return "cancel_result" }
func (*Resumable) Type() string    { return "resumable" }
func (*ResumeResult) Type() string { return "resume_result" }
func (*Moved) Type() string        { return "moved" }
func (*Error) Type() string        { return "error" }
func (*Pong) Type() string         { return "pong" }

// --- validation ---------------------------------------------------------------------------

func checkStr(name, s string, minChars, maxChars int) error {
	if !utf8.ValidString(s) {
		return invalid("%s must be valid UTF-8", name)
	}
	if len(s) < minChars { // bytes >= chars, so this also catches a too short string early
		return invalid("%s must have %d-%d characters", name, minChars, maxChars)
	}
	if len(s) > maxChars { // only count code points when the bytes could exceed the limit
		if n := chars(s); n > maxChars {
			return invalid("%s must have %d-%d characters", name, minChars, maxChars)
		}
	}
	return nil
}

func checkRequestID(s string) error {
	if !ValidRequestID(s) {
		return invalid("request_id must be 1-128 characters of [A-Za-z0-9._:-]")
	}
	return nil
}

func checkOptUserID(s string) error {
	if s != "" && !ValidUserID(s) {
		return invalid("user_id must be 1-128 characters of [A-Za-z0-9._:@-]")
	}
	return nil
}

func checkRange(name string, v, lo, hi int64) error {
	if v < lo || v > hi {
		return invalid("%s must be in %d..%d", name, lo, hi)
	}
	return nil
}

func (id PingID) validate() error {
	if !id.Set {
		return nil
	}
	if id.IsInt {
		return checkRange("id", id.Int, -MaxSafeInteger, MaxSafeInteger)
	}
	return checkStr("id", id.Str, 0, MaxPingIDChars)
}

func (u Usage) validate() error {
	for _, f := range []struct {
		name string
		v    int64
	}{{"usage.input_tokens", u.InputTokens}, {"usage.output_tokens", u.OutputTokens}, {"usage.saved_tokens", u.SavedTokens}} {
		if err := checkRange(f.name, f.v, 0, MaxSafeInteger); err != nil {
			return err
		}
	}
	_, err := canonicalEstimated(u.Estimated)
	return err
}

func (i StepInfo) validate(prefix string) error {
	if err := checkRange(prefix+"index", i.Index, 0, MaxSafeInteger); err != nil {
		return err
	}
	if !ValidStepKind(i.Kind) {
		return invalid("%skind must be a snake_case word of at most %d characters", prefix, MaxStepKindLength)
	}
	return checkStr(prefix+"name", i.Name, 1, MaxStepNameChars)
}

func (h *Halt) validate() error {
	if !h.State.valid() {
		return invalid("halt.state must be one of: pending, halted")
	}
	if h.Step != nil {
		if err := h.Step.validate("halt.step."); err != nil {
			return err
		}
	}
	if h.Aborted && (h.State != HaltHalted || h.Step == nil) {
		return invalid("halt.aborted names a step the pipeline halted in")
	}
	return nil
}

func (l Limits) validate() error {
	if err := checkRange("limits.max_streams", l.MaxStreams, 1, MaxStreamsLimit); err != nil {
		return err
	}
	if err := checkRange("limits.max_frame_bytes", l.MaxFrameBytes, MinFrameBytesLimit, MaxFrameBytes); err != nil {
		return err
	}
	if err := checkRange("limits.max_batch_messages", l.MaxBatchMessages, 1, MaxBatchMessages); err != nil {
		return err
	}
	return checkRange("limits.max_timeout_ms", l.MaxTimeoutMs, 1, MaxTimeoutMs)
}

func checkErrorCode(name, code string) error {
	if !ValidErrorCode(code) {
		return invalid("%s must be a snake_case word of at most 64 characters", name)
	}
	return nil
}

// checkJSONValue: metadata must be plain JSON (SPEC.md §2.5): depth, safe integers, finite
// floats, no bin or ext, string keys.
func checkJSONValue(v Value, depth int) error {
	switch v.Kind {
	case KindNull, KindBool:
		return nil
	case KindString:
		if !utf8.ValidString(v.Str) {
			return invalid("metadata strings must be valid UTF-8")
		}
		return nil
	case KindInt:
		if v.Overflow || v.Int < -MaxSafeInteger || v.Int > MaxSafeInteger {
			return invalid("metadata integers must be within +-(2**53-1)")
		}
		return nil
	case KindFloat:
		if math.IsNaN(v.Float) || math.IsInf(v.Float, 0) {
			return invalid("metadata numbers must be finite")
		}
		return nil
	case KindArray:
		if depth > MaxMetadataDepth {
			return invalid("metadata nests deeper than %d", MaxMetadataDepth)
		}
		for _, item := range v.Array {
			if err := checkJSONValue(item, depth+1); err != nil {
				return err
			}
		}
		return nil
	case KindObject:
		if depth > MaxMetadataDepth {
			return invalid("metadata nests deeper than %d", MaxMetadataDepth)
		}
		for _, m := range v.Object.Members {
			if m.BinKey {
				return invalid("metadata keys must be strings")
			}
			if !utf8.ValidString(m.Key) {
				return invalid("metadata keys must be valid UTF-8")
			}
			if err := checkJSONValue(m.Value, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	return invalid("metadata must contain only JSON values")
}

func checkMetadata(o *Object) error {
	if o == nil {
		return nil
	}
	v := ObjectValue(o)
	if err := checkJSONValue(v, 1); err != nil {
		return err
	}
	if n := len(AppendJSON(nil, v)); n > MaxMetadataBytes {
		return invalid("metadata exceeds %d bytes as JSON", MaxMetadataBytes)
	}
	return nil
}

func optStr(name string, s *string, maxChars int) error {
	if s == nil {
		return nil
	}
	return checkStr(name, *s, 0, maxChars)
}

// Validate checks the message against SPEC.md §3.2.
func (m *Hello) Validate() error {
	if err := optStr("token", m.Token, MaxTokenChars); err != nil {
		return err
	}
	if err := optStr("client_key", m.ClientKey, MaxClientKeyChars); err != nil {
		return err
	}
	return checkOptUserID(m.UserID)
}

// Validate checks the message against SPEC.md §3.3.
func (m *Chat) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if (m.Message == nil) == (m.Messages == nil) {
		return invalid("exactly one of message and messages is required")
	}
	if err := optStr("message", m.Message, MaxMessageChars); err != nil {
		return err
	}
	if m.Messages != nil {
		if len(m.Messages) < 1 || len(m.Messages) > MaxMessages {
			return invalid("messages must have 1-%d entries", MaxMessages)
		}
		for _, t := range m.Messages {
			if !t.Role.valid() {
				return invalid("messages[].role must be one of: system, user, assistant, tool")
			}
			if err := checkStr("messages[].content", t.Content, 0, MaxMessageChars); err != nil {
				return err
			}
		}
	}
	if err := checkOptUserID(m.UserID); err != nil {
		return err
	}
	if m.TimeoutMs != 0 {
		if err := checkRange("timeout_ms", m.TimeoutMs, 1, MaxTimeoutMs); err != nil {
			return err
		}
	}
	if err := checkMetadata(m.Metadata); err != nil {
		return err
	}
	if m.GraceMs != 0 {
		if !m.Resumable {
			return invalid("grace_ms is only for a resumable chat")
		}
		return checkRange("grace_ms", m.GraceMs, 1, MaxGraceMs)
	}
	return nil
}

func checkEpoch(s string) error {
	if !ValidEpoch(s) {
		return invalid("epoch must be 1-64 characters of [A-Za-z0-9._:-]")
	}
	return nil
}

// Validate checks the message against SPEC.md §3.4.
func (m *Resume) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if err := checkEpoch(m.Epoch); err != nil {
		return err
	}
	if m.AfterSeq != nil {
		if err := checkRange("after_seq", *m.AfterSeq, 0, MaxSafeInteger); err != nil {
			return err
		}
	}
	return checkOptUserID(m.UserID)
}

// Validate checks the message against SPEC.md §3.13.
func (m *Resumable) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if err := checkEpoch(m.Epoch); err != nil {
		return err
	}
	return checkRange("grace_ms", m.GraceMs, 1, MaxGraceMs)
}

// Validate checks the message against SPEC.md §3.13.
func (m *ResumeResult) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if !m.Status.Valid() {
		return invalid("status must be one of: resumed, not_found")
	}
	return nil
}

// Validate checks the message against SPEC.md §3.13.
func (m *Moved) Validate() error { return checkRequestID(m.RequestID) }

// Validate checks the message against SPEC.md §3.4.
func (m *Cancel) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if err := checkOptUserID(m.UserID); err != nil {
		return err
	}
	return optStr("reason", m.Reason, MaxReasonChars)
}

// Validate checks the message against SPEC.md §3.4.
func (m *Ping) Validate() error { return m.ID.validate() }

// Validate checks the message against SPEC.md §3.11.
func (m *Pong) Validate() error { return m.ID.validate() }

// Validate checks the message against SPEC.md §3.5.
func (m *Welcome) Validate() error {
	if err := checkStr("connection_id", m.ConnectionID, 1, MaxConnectionIDChars); err != nil {
		return err
	}
	if err := checkOptUserID(m.UserID); err != nil {
		return err
	}
	return m.Limits.validate()
}

// Validate checks the message against SPEC.md §3.6.
func (m *Chunk) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if err := checkRange("seq", m.Seq, 0, MaxSafeInteger); err != nil {
		return err
	}
	return checkStr("text", m.Text, 1, MaxFrameBytes)
}

// Validate checks the message against SPEC.md §3.12.
func (m *Step) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if err := m.Info().validate("step."); err != nil {
		return err
	}
	if !m.State.valid() {
		return invalid("step.state must be one of: started, ended")
	}
	return nil
}

// Validate checks the message against SPEC.md §3.7.
func (m *Response) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if !m.Status.valid() {
		return invalid("status must be one of: completed, cancelled, failed")
	}
	if err := checkStr("content", m.Content, 0, math.MaxInt); err != nil {
		return err
	}
	if m.Status != StatusCompleted && m.Content != "" {
		return invalid("content must be empty unless completed (no partial results)")
	}
	if m.Status == StatusCancelled {
		if !m.Reason.valid() {
			return invalid("reason must be one of: client, api, timeout, disconnect, shutdown")
		}
	} else if m.Reason != "" {
		return invalid("reason is only for cancelled responses")
	}
	if m.Status == StatusFailed {
		if m.Error == nil {
			return invalid("error is required for failed responses")
		}
		if err := checkErrorCode("error.code", m.Error.Code); err != nil {
			return err
		}
		if err := checkStr("error.message", m.Error.Message, 0, MaxErrorMessageChars); err != nil {
			return err
		}
	} else if m.Error != nil {
		return invalid("error is only for failed responses")
	}
	if err := m.Usage.validate(); err != nil {
		return err
	}
	if !m.Usage.Final && m.Status != StatusCancelled {
		return invalid("usage.final may be false only for cancelled responses")
	}
	if m.Halt != nil {
		if err := m.Halt.validate(); err != nil {
			return err
		}
		if m.Status != StatusCancelled {
			return invalid("halt is only for cancelled responses")
		}
		if m.Halt.State == HaltPending && m.Usage.Final {
			return invalid("a pending halt comes with usage.final false")
		}
	}
	return nil
}

// Validate checks the message against SPEC.md §3.8.
func (m *UsageReport) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if err := m.Usage.validate(); err != nil {
		return err
	}
	if !m.Usage.Final {
		return invalid("usage must be an object with final: true")
	}
	if m.Halt != nil {
		if err := m.Halt.validate(); err != nil {
			return err
		}
		if m.Halt.State != HaltHalted {
			return invalid("usage.halt must be an object with state halted")
		}
	}
	return nil
}

// Validate checks the message against SPEC.md §3.9.
func (m *CancelResult) Validate() error {
	if err := checkRequestID(m.RequestID); err != nil {
		return err
	}
	if !m.Status.Valid() {
		return invalid("status must be one of: cancelled, already_cancelled, already_completed, not_found")
	}
	return nil
}

// Validate checks the message against SPEC.md §3.10.
func (m *Error) Validate() error {
	if err := checkErrorCode("code", m.Code); err != nil {
		return err
	}
	if err := checkStr("message", m.Message, 0, MaxErrorMessageChars); err != nil {
		return err
	}
	if m.RequestID != "" {
		return checkRequestID(m.RequestID)
	}
	return nil
}

// --- to the wire (canonical order, SPEC.md §9) ------------------------------------------

func head(m Message) *Object {
	o := &Object{Members: make([]Member, 0, 8)}
	o.Set("type", String(m.Type()))
	return o
}

func setOptStr(o *Object, key string, s *string) {
	if s != nil {
		o.Set(key, String(*s))
	}
}

func setNonEmpty(o *Object, key, s string) {
	if s != "" {
		o.Set(key, String(s))
	}
}

func (id PingID) set(o *Object) {
	if !id.Set {
		return
	}
	if id.IsInt {
		o.Set("id", Int(id.Int))
	} else {
		o.Set("id", String(id.Str))
	}
}

func usageWire(u Usage) Value {
	o := &Object{Members: make([]Member, 0, 5)}
	o.Set("input_tokens", Int(u.InputTokens))
	o.Set("output_tokens", Int(u.OutputTokens))
	o.Set("saved_tokens", Int(u.SavedTokens))
	o.Set("final", Bool(u.Final))
	if u.Estimated != nil { // optional: absent when the sender does not say
		names, _ := canonicalEstimated(u.Estimated) // validated before encoding
		items := make([]Value, len(names))
		for i, name := range names {
			items[i] = String(name)
		}
		o.Set("estimated", Array(items...))
	}
	return ObjectValue(o)
}

// haltWire: state, the optional step (index, kind, name), aborted (always written).
func haltWire(h *Halt) Value {
	o := &Object{Members: make([]Member, 0, 3)}
	o.Set("state", String(string(h.State)))
	if h.Step != nil {
		s := &Object{Members: make([]Member, 0, 3)}
		s.Set("index", Int(h.Step.Index))
		s.Set("kind", String(h.Step.Kind))
		s.Set("name", String(h.Step.Name))
		o.Set("step", ObjectValue(s))
	}
	o.Set("aborted", Bool(h.Aborted))
	return ObjectValue(o)
}

// Wire returns the canonical map.
func (m *Hello) Wire() *Object {
	o := head(m)
	setOptStr(o, "token", m.Token)
	setOptStr(o, "client_key", m.ClientKey)
	setNonEmpty(o, "user_id", m.UserID)
	return o
}

// Wire returns the canonical map.
func (m *Chat) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	setOptStr(o, "message", m.Message)
	if m.Messages != nil {
		items := make([]Value, len(m.Messages))
		for i, t := range m.Messages {
			turn := &Object{Members: make([]Member, 0, 2)}
			turn.Set("role", String(string(t.Role)))
			turn.Set("content", String(t.Content))
			items[i] = ObjectValue(turn)
		}
		o.Set("messages", Array(items...))
	}
	o.Set("stream", Bool(m.Stream))
	setNonEmpty(o, "user_id", m.UserID)
	if m.TimeoutMs != 0 {
		o.Set("timeout_ms", Int(m.TimeoutMs))
	}
	if m.Metadata != nil {
		o.Set("metadata", ObjectValue(m.Metadata))
	}
	if m.Steps { // written only when true (SPEC.md §9)
		o.Set("steps", Bool(true))
	}
	if m.Resumable { // likewise
		o.Set("resumable", Bool(true))
	}
	if m.GraceMs != 0 {
		o.Set("grace_ms", Int(m.GraceMs))
	}
	return o
}

// Wire returns the canonical map.
func (m *Resume) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	o.Set("epoch", String(m.Epoch))
	if m.AfterSeq != nil {
		o.Set("after_seq", Int(*m.AfterSeq))
	}
	setNonEmpty(o, "user_id", m.UserID)
	return o
}

// Wire returns the canonical map.
func (m *Cancel) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	setNonEmpty(o, "user_id", m.UserID)
	setOptStr(o, "reason", m.Reason)
	return o
}

// Wire returns the canonical map.
func (m *Ping) Wire() *Object { o := head(m); m.ID.set(o); return o }

// Wire returns the canonical map.
func (m *Pong) Wire() *Object { o := head(m); m.ID.set(o); return o }

// Wire returns the canonical map.
func (m *Welcome) Wire() *Object {
	o := head(m)
	o.Set("connection_id", String(m.ConnectionID))
	setNonEmpty(o, "user_id", m.UserID)
	l := &Object{Members: make([]Member, 0, 4)}
	l.Set("max_streams", Int(m.Limits.MaxStreams))
	l.Set("max_frame_bytes", Int(m.Limits.MaxFrameBytes))
	l.Set("max_batch_messages", Int(m.Limits.MaxBatchMessages))
	l.Set("max_timeout_ms", Int(m.Limits.MaxTimeoutMs))
	o.Set("limits", ObjectValue(l))
	return o
}

// Wire returns the canonical map.
func (m *Chunk) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	o.Set("seq", Int(m.Seq))
	o.Set("text", String(m.Text))
	return o
}

// Wire returns the canonical map.
func (m *Step) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	o.Set("index", Int(m.Index))
	o.Set("kind", String(m.Kind))
	o.Set("name", String(m.Name))
	o.Set("state", String(string(m.State)))
	return o
}

// Wire returns the canonical map.
func (m *Response) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	o.Set("status", String(string(m.Status)))
	o.Set("content", String(m.Content))
	setNonEmpty(o, "reason", string(m.Reason))
	if m.Error != nil {
		e := &Object{Members: make([]Member, 0, 2)}
		e.Set("code", String(m.Error.Code))
		e.Set("message", String(m.Error.Message))
		o.Set("error", ObjectValue(e))
	}
	o.Set("usage", usageWire(m.Usage))
	if m.Halt != nil {
		o.Set("halt", haltWire(m.Halt))
	}
	return o
}

// Wire returns the canonical map.
func (m *UsageReport) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	o.Set("usage", usageWire(m.Usage))
	if m.Halt != nil {
		o.Set("halt", haltWire(m.Halt))
	}
	return o
}

// Wire returns the canonical map.
func (m *CancelResult) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	o.Set("status", String(string(m.Status)))
	return o
}

// Wire returns the canonical map.
func (m *Resumable) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	o.Set("epoch", String(m.Epoch))
	o.Set("grace_ms", Int(m.GraceMs))
	return o
}

// Wire returns the canonical map.
func (m *ResumeResult) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	o.Set("status", String(string(m.Status)))
	return o
}

// Wire returns the canonical map.
func (m *Moved) Wire() *Object {
	o := head(m)
	o.Set("request_id", String(m.RequestID))
	return o
}

// Wire returns the canonical map.
func (m *Error) Wire() *Object {
	o := head(m)
	o.Set("code", String(m.Code))
	o.Set("message", String(m.Message))
	setNonEmpty(o, "request_id", m.RequestID)
	return o
}
