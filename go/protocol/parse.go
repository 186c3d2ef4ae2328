package protocol

// From decoded values to messages (SPEC.md §3.1): absent and null are the same for optional
// and defaulted fields; types are exact; unknown fields are ignored at every level.

type fields struct{ o *Object }

// get returns the field's value; null counts as absent.
func (f fields) get(name string) (Value, bool) {
	v, ok := f.o.Get(name)
	if !ok || v.Kind == KindNull {
		return Value{}, false
	}
	return v, true
}

func (f fields) required(name string) (Value, error) {
	v, ok := f.get(name)
	if !ok {
		return Value{}, invalid("%s is required", name)
	}
	return v, nil
}

func asStr(name string, v Value) (string, error) {
	if v.Kind != KindString {
		return "", invalid("%s must be a string", name)
	}
	return v.Str, nil
}

func asInt(name string, v Value) (int64, error) {
	if v.Kind != KindInt {
		return 0, invalid("%s must be an integer", name)
	}
	if v.Overflow {
		return 0, invalid("%s is out of range", name)
	}
	return v.Int, nil
}

func (f fields) reqStr(name string) (string, error) {
	v, err := f.required(name)
	if err != nil {
		return "", err
	}
	return asStr(name, v)
}

func (f fields) optStr(name string) (*string, error) {
	v, ok := f.get(name)
	if !ok {
		return nil, nil
	}
	s, err := asStr(name, v)
	return &s, err
}

// optNonEmpty reads an optional string whose empty value is invalid (ids, enums): "" is then
// refused here, since the typed field uses "" for absent.
func (f fields) optNonEmpty(name string, ok func(string) bool) (string, error) {
	s, err := f.optStr(name)
	if err != nil || s == nil {
		return "", err
	}
	if !ok(*s) {
		return "", invalid("%s is not valid", name)
	}
	return *s, nil
}

func (f fields) reqInt(name string) (int64, error) {
	v, err := f.required(name)
	if err != nil {
		return 0, err
	}
	return asInt(name, v)
}

func (f fields) object(name string, required bool) (*Object, error) {
	v, ok := f.get(name)
	if !ok {
		if required {
			return nil, invalid("%s is required", name)
		}
		return nil, nil
	}
	if v.Kind != KindObject {
		return nil, invalid("%s must be an object", name)
	}
	return v.Object, nil
}

func (f fields) pingID() (PingID, error) {
	v, ok := f.get("id")
	if !ok {
		return PingID{}, nil
	}
	switch v.Kind {
	case KindString:
		return PingID{Set: true, Str: v.Str}, nil
	case KindInt:
		i, err := asInt("id", v)
		return PingID{Set: true, IsInt: true, Int: i}, err
	}
	return PingID{}, invalid("id must be a string or an integer")
}

func parseUsage(o *Object) (Usage, error) {
	f := fields{o}
	var u Usage
	var err error
	if u.InputTokens, err = f.reqInt("input_tokens"); err != nil {
		return u, err
	}
	if u.OutputTokens, err = f.reqInt("output_tokens"); err != nil {
		return u, err
	}
	if u.SavedTokens, err = f.reqInt("saved_tokens"); err != nil {
		return u, err
	}
	u.Final = true
	if v, ok := f.get("final"); ok {
		if v.Kind != KindBool {
			return u, invalid("usage.final must be a boolean")
		}
		u.Final = v.Bool
	}
	if v, ok := f.get("estimated"); ok {
		if v.Kind != KindArray {
			return u, invalid("usage.estimated must be an array")
		}
		names := make([]string, len(v.Array))
		for i, item := range v.Array {
			if item.Kind != KindString {
				return u, invalid("usage.estimated entries must be strings")
			}
			names[i] = item.Str
		}
		if u.Estimated, err = canonicalEstimated(names); err != nil {
			return u, err
		}
	}
	return u, nil
}

func parseLimits(o *Object) (Limits, error) {
	f := fields{o}
	l := DefaultLimits()
	for _, p := range []struct {
		name string
		dst  *int64
	}{{"max_streams", &l.MaxStreams}, {"max_frame_bytes", &l.MaxFrameBytes}, {"max_batch_messages", &l.MaxBatchMessages}, {"max_timeout_ms", &l.MaxTimeoutMs}} {
		if v, ok := f.get(p.name); ok {
			i, err := asInt("limits."+p.name, v)
			if err != nil {
				return l, err
			}
			*p.dst = i
		}
	}
	return l, nil
}

func parseStepInfo(o *Object, prefix string) (StepInfo, error) {
	f := fields{o}
	var i StepInfo
	var err error
	if i.Index, err = f.reqInt(prefix + "index"); err != nil {
		return i, err
	}
	if i.Kind, err = f.reqStr(prefix + "kind"); err != nil {
		return i, err
	}
	i.Name, err = f.reqStr(prefix + "name")
	return i, err
}

// halt reads the optional halt object (absent or null: nil).
func (f fields) halt() (*Halt, error) {
	o, err := f.object("halt", false)
	if err != nil || o == nil {
		return nil, err
	}
	hf := fields{o}
	h := &Halt{}
	state, err := hf.reqStr("state")
	if err != nil {
		return nil, err
	}
	h.State = HaltState(state)
	so, err := hf.object("step", false)
	if err != nil {
		return nil, err
	}
	if so != nil {
		info, err := parseStepInfo(so, "")
		if err != nil {
			return nil, err
		}
		h.Step = &info
	}
	if v, ok := hf.get("aborted"); ok {
		if v.Kind != KindBool {
			return nil, invalid("halt.aborted must be a boolean")
		}
		h.Aborted = v.Bool
	}
	return h, nil
}

func parseChatMessages(v Value) ([]ChatMessage, error) {
	if v.Kind != KindArray {
		return nil, invalid("messages must be a list")
	}
	if len(v.Array) < 1 || len(v.Array) > MaxMessages {
		return nil, invalid("messages must have 1-%d entries", MaxMessages)
	}
	turns := make([]ChatMessage, len(v.Array))
	for i, item := range v.Array {
		if item.Kind != KindObject {
			return nil, invalid("messages[] must be an object")
		}
		f := fields{item.Object}
		role, err := f.reqStr("role")
		if err != nil {
			return nil, err
		}
		content, err := f.reqStr("content")
		if err != nil {
			return nil, err
		}
		turns[i] = ChatMessage{Role: Role(role), Content: content}
	}
	return turns, nil
}

func fromWire(typ string, o *Object) (Message, error) {
	f := fields{o}
	var err error
	switch typ {
	case "hello":
		m := &Hello{}
		if m.Token, err = f.optStr("token"); err != nil {
			return nil, err
		}
		if m.ClientKey, err = f.optStr("client_key"); err != nil {
			return nil, err
		}
		m.UserID, err = f.optNonEmpty("user_id", ValidUserID)
		return m, err
	case "chat":
		m := &Chat{Stream: true}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		if m.Message, err = f.optStr("message"); err != nil {
			return nil, err
		}
		if v, ok := f.get("messages"); ok {
			if m.Messages, err = parseChatMessages(v); err != nil {
				return nil, err
			}
		}
		if v, ok := f.get("stream"); ok {
			if v.Kind != KindBool {
				return nil, invalid("stream must be a boolean")
			}
			m.Stream = v.Bool
		}
		if m.UserID, err = f.optNonEmpty("user_id", ValidUserID); err != nil {
			return nil, err
		}
		if v, ok := f.get("timeout_ms"); ok {
			if m.TimeoutMs, err = asInt("timeout_ms", v); err != nil {
				return nil, err
			}
			if m.TimeoutMs == 0 {
				return nil, invalid("timeout_ms must be in 1..%d", MaxTimeoutMs)
			}
		}
		if m.Metadata, err = f.object("metadata", false); err != nil {
			return nil, err
		}
		if v, ok := f.get("steps"); ok {
			if v.Kind != KindBool {
				return nil, invalid("steps must be a boolean")
			}
			m.Steps = v.Bool
		}
		if v, ok := f.get("resumable"); ok {
			if v.Kind != KindBool {
				return nil, invalid("resumable must be a boolean")
			}
			m.Resumable = v.Bool
		}
		if v, ok := f.get("grace_ms"); ok {
			if m.GraceMs, err = asInt("grace_ms", v); err != nil {
				return nil, err
			}
			if m.GraceMs == 0 { // 0 is the typed field's "absent"
				return nil, invalid("grace_ms must be in 1..%d", MaxGraceMs)
			}
		}
		return m, nil
	case "cancel":
		m := &Cancel{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		if m.UserID, err = f.optNonEmpty("user_id", ValidUserID); err != nil {
			return nil, err
		}
		m.Reason, err = f.optStr("reason")
		return m, err
	case "resume":
		m := &Resume{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		if m.Epoch, err = f.reqStr("epoch"); err != nil {
			return nil, err
		}
		if v, ok := f.get("after_seq"); ok {
			seq, err := asInt("after_seq", v)
			if err != nil {
				return nil, err
			}
			m.AfterSeq = &seq
		}
		m.UserID, err = f.optNonEmpty("user_id", ValidUserID)
		return m, err
	case "ping":
		id, err := f.pingID()
		return &Ping{ID: id}, err
	case "pong":
		id, err := f.pingID()
		return &Pong{ID: id}, err
	case "welcome":
		m := &Welcome{}
		if m.ConnectionID, err = f.reqStr("connection_id"); err != nil {
			return nil, err
		}
		if m.UserID, err = f.optNonEmpty("user_id", ValidUserID); err != nil {
			return nil, err
		}
		lo, err := f.object("limits", true)
		if err != nil {
			return nil, err
		}
		m.Limits, err = parseLimits(lo)
		return m, err
	case "chunk":
		m := &Chunk{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		if m.Seq, err = f.reqInt("seq"); err != nil {
			return nil, err
		}
		m.Text, err = f.reqStr("text")
		return m, err
	case "step":
		m := &Step{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		info, err := parseStepInfo(o, "")
		if err != nil {
			return nil, err
		}
		m.Index, m.Kind, m.Name = info.Index, info.Kind, info.Name
		state, err := f.reqStr("state")
		m.State = StepState(state)
		return m, err
	case "response":
		m := &Response{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		status, err := f.reqStr("status")
		if err != nil {
			return nil, err
		}
		m.Status = ResponseStatus(status)
		if m.Content, err = f.reqStr("content"); err != nil {
			return nil, err
		}
		reason, err := f.optNonEmpty("reason", func(s string) bool { return CancelReason(s).valid() })
		if err != nil {
			return nil, err
		}
		m.Reason = CancelReason(reason)
		eo, err := f.object("error", false)
		if err != nil {
			return nil, err
		}
		if eo != nil {
			ef := fields{eo}
			info := &ErrorInfo{}
			if info.Code, err = ef.reqStr("code"); err != nil {
				return nil, err
			}
			if info.Message, err = ef.reqStr("message"); err != nil {
				return nil, err
			}
			m.Error = info
		}
		uo, err := f.object("usage", true)
		if err != nil {
			return nil, err
		}
		if m.Usage, err = parseUsage(uo); err != nil {
			return nil, err
		}
		m.Halt, err = f.halt()
		return m, err
	case "usage":
		m := &UsageReport{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		uo, err := f.object("usage", true)
		if err != nil {
			return nil, err
		}
		if m.Usage, err = parseUsage(uo); err != nil {
			return nil, err
		}
		m.Halt, err = f.halt()
		return m, err
	case "cancel_result":
		m := &CancelResult{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		status, err := f.reqStr("status")
		m.Status = CancelStatus(status)
		return m, err
	case "resumable":
		m := &Resumable{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		if m.Epoch, err = f.reqStr("epoch"); err != nil {
			return nil, err
		}
		m.GraceMs, err = f.reqInt("grace_ms")
		return m, err
	case "resume_result":
		m := &ResumeResult{}
		if m.RequestID, err = f.reqStr("request_id"); err != nil {
			return nil, err
		}
		status, err := f.reqStr("status")
		m.Status = ResumeStatus(status)
		return m, err
	case "moved":
		m := &Moved{}
		m.RequestID, err = f.reqStr("request_id")
		return m, err
	case "error":
		m := &Error{}
		if m.Code, err = f.reqStr("code"); err != nil {
			return nil, err
		}
		if m.Message, err = f.reqStr("message"); err != nil {
			return nil, err
		}
		m.RequestID, err = f.optNonEmpty("request_id", ValidRequestID)
		return m, err
	}
	panic("protocol: unhandled type " + typ) // guarded by the type tables
}

var senderTypes = [2]map[string]bool{
	SenderClient: {"hello": true, "chat": true, "cancel": true, "resume": true, "ping": true},
	SenderGateway: {"welcome": true, "chunk": true, "step": true, "response": true, "usage": true, "cancel_result": true,
		"resumable": true, "resume_result": true, "moved": true, "error": true, "pong": true},
}

// Sender is who sent a frame; it decides which types are valid (SPEC.md §3.1).
type Sender int

// The two senders.
const (
	SenderClient Sender = iota
	SenderGateway
)

func (s Sender) String() string {
	if s == SenderClient {
		return "client"
	}
	return "gateway"
}

// ParseMessage validates one decoded value sent by sender (SPEC.md §3.1 validation order:
// bad_frame, then unknown_type, then invalid_field). The error is always a remote
// *ProtocolError carrying the object's request_id when it had a valid one.
func ParseMessage(v Value, sender Sender) (Message, error) {
	if v.Kind != KindObject {
		return nil, badFrame("a message must be an object")
	}
	t, ok := v.Object.Get("type")
	if !ok || t.Kind != KindString {
		return nil, badFrame("a message needs a string 'type'")
	}
	rid := ""
	if r, ok := v.Object.Get("request_id"); ok && r.Kind == KindString && ValidRequestID(r.Str) {
		rid = r.Str
	}
	if !senderTypes[sender][t.Str] {
		shown := t.Str
		if len(shown) > 64 {
			shown = shown[:64] + "..."
		}
		return nil, &ProtocolError{Code: CodeUnknownType, Message: "unknown " + sender.String() + " message type " + shown, RequestID: rid, Remote: true}
	}
	m, err := fromWire(t.Str, v.Object)
	if err == nil {
		err = m.Validate()
	}
	if err != nil {
		pe := err.(*ProtocolError)
		return nil, &ProtocolError{Code: pe.Code, Message: pe.Message, RequestID: rid, Remote: true}
	}
	return m, nil
}
