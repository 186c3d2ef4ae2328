package protocol

import (
	"errors"
	"strings"
	"testing"
)

// chat.steps, step and halt (SPEC.md §3.12), beyond the shared vectors: what Encode refuses,
// and the canonical bytes of messages built in Go.

func mustEncode(t *testing.T, m Message) string {
	t.Helper()
	frame, err := Encode(m, JSON)
	if err != nil {
		t.Fatalf("encode %T: %v", m, err)
	}
	return string(frame)
}

func refused(t *testing.T, m Message) {
	t.Helper()
	if _, err := Encode(m, JSON); err == nil {
		t.Fatalf("encoded %#v, want invalid_field", m)
	} else if pe := (*ProtocolError)(nil); !errors.As(err, &pe) || pe.Code != CodeInvalidField || pe.Remote {
		t.Fatalf("error %v, want a local invalid_field", err)
	}
}

func TestChatStepsWrittenOnlyWhenTrue(t *testing.T) {
	msg := "hi"
	chat := &Chat{RequestID: "r1", Message: &msg, Stream: true}
	if got, want := mustEncode(t, chat), `{"type":"chat","request_id":"r1","message":"hi","stream":true}`; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
	chat.Steps = true
	chat.TimeoutMs = 5
	if got, want := mustEncode(t, chat), `{"type":"chat","request_id":"r1","message":"hi","stream":true,"timeout_ms":5,"steps":true}`; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
	for _, c := range []Codec{JSON, Msgpack} {
		r := Decode(EncodeUnchecked(chat, c), c, SenderClient)
		if r[0].Err != nil || !r[0].Message.(*Chat).Steps {
			t.Fatalf("%s: steps lost: %+v", c, r[0])
		}
	}
}

func TestStepValidation(t *testing.T) {
	ok := func() *Step {
		return &Step{RequestID: "r1", Index: 2, Kind: StepKindTool, Name: "flight_search", State: StepStarted}
	}
	if got, want := mustEncode(t, ok()), `{"type":"step","request_id":"r1","index":2,"kind":"tool","name":"flight_search","state":"started"}`; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
	// Kinds are open: any snake_case word of at most 32 characters.
	for _, kind := range []string{"a", "vector_lookup_2", strings.Repeat("k", MaxStepKindLength)} {
		s := ok()
		s.Kind = kind
		mustEncode(t, s)
	}
	s := ok()
	s.Name = strings.Repeat("é", MaxStepNameChars) // characters, not bytes
	mustEncode(t, s)
	for name, mutate := range map[string]func(*Step){
		"kind empty":      func(s *Step) { s.Kind = "" },
		"kind uppercase":  func(s *Step) { s.Kind = "Tool" },
		"kind digit":      func(s *Step) { s.Kind = "2tool" },
		"kind dash":       func(s *Step) { s.Kind = "llm-stream" },
		"kind too long":   func(s *Step) { s.Kind = strings.Repeat("k", MaxStepKindLength+1) },
		"name empty":      func(s *Step) { s.Name = "" },
		"name too long":   func(s *Step) { s.Name = strings.Repeat("n", MaxStepNameChars+1) },
		"name bad utf-8":  func(s *Step) { s.Name = "\xff" },
		"index negative":  func(s *Step) { s.Index = -1 },
		"index too large": func(s *Step) { s.Index = MaxSafeInteger + 1 },
		"state unknown":   func(s *Step) { s.State = "running" },
		"state empty":     func(s *Step) { s.State = "" },
		"bad request_id":  func(s *Step) { s.RequestID = "a b" },
	} {
		t.Run(name, func(t *testing.T) {
			s := ok()
			mutate(s)
			refused(t, s)
		})
	}
	if got := ok().Info(); got != (StepInfo{Index: 2, Kind: "tool", Name: "flight_search"}) {
		t.Fatalf("Info() = %+v", got)
	}
}

func TestHaltValidation(t *testing.T) {
	tool := &StepInfo{Index: 1, Kind: StepKindTool, Name: "flight_search"}
	cancelled := func(final bool, h *Halt) *Response {
		return &Response{RequestID: "r1", Status: StatusCancelled, Reason: ReasonClient, Usage: Usage{Final: final}, Halt: h}
	}
	usage := func(h *Halt) *UsageReport { return &UsageReport{RequestID: "r1", Usage: Usage{Final: true}, Halt: h} }

	got := mustEncode(t, cancelled(false, &Halt{State: HaltPending, Step: tool}))
	if want := `"usage":{"input_tokens":0,"output_tokens":0,"saved_tokens":0,"final":false},"halt":{"state":"pending","step":{"index":1,"kind":"tool","name":"flight_search"},"aborted":false}}`; !strings.HasSuffix(got, want) {
		t.Fatalf("got %s, want it to end with %s", got, want)
	}
	got = mustEncode(t, usage(&Halt{State: HaltHalted, Step: tool, Aborted: true}))
	if want := `"halt":{"state":"halted","step":{"index":1,"kind":"tool","name":"flight_search"},"aborted":true}}`; !strings.HasSuffix(got, want) {
		t.Fatalf("got %s, want it to end with %s", got, want)
	}
	mustEncode(t, cancelled(false, &Halt{State: HaltPending}))
	mustEncode(t, cancelled(true, &Halt{State: HaltHalted}))
	mustEncode(t, cancelled(false, &Halt{State: HaltHalted, Step: tool, Aborted: true}))
	mustEncode(t, usage(&Halt{State: HaltHalted}))
	mustEncode(t, usage(nil))

	for name, m := range map[string]Message{
		"halt on completed":          &Response{RequestID: "r1", Status: StatusCompleted, Usage: Usage{Final: true}, Halt: &Halt{State: HaltHalted}},
		"halt on failed":             &Response{RequestID: "r1", Status: StatusFailed, Error: &ErrorInfo{Code: "backend_error"}, Usage: Usage{Final: true}, Halt: &Halt{State: HaltHalted}},
		"pending with final usage":   cancelled(true, &Halt{State: HaltPending}),
		"pending aborted":            cancelled(false, &Halt{State: HaltPending, Step: tool, Aborted: true}),
		"aborted without step":       cancelled(false, &Halt{State: HaltHalted, Aborted: true}),
		"state unknown":              cancelled(false, &Halt{State: "stopped"}),
		"state empty":                cancelled(false, &Halt{}),
		"step kind invalid":          cancelled(false, &Halt{State: HaltPending, Step: &StepInfo{Kind: "LLM", Name: "x"}}),
		"step name empty":            cancelled(false, &Halt{State: HaltPending, Step: &StepInfo{Kind: "llm"}}),
		"step index negative":        cancelled(false, &Halt{State: HaltPending, Step: &StepInfo{Index: -1, Kind: "llm", Name: "x"}}),
		"usage halt pending":         usage(&Halt{State: HaltPending}),
		"usage aborted without step": usage(&Halt{State: HaltHalted, Aborted: true}),
	} {
		t.Run(name, func(t *testing.T) { refused(t, m) })
	}
}

// A step is a gateway message: from a client it is an unknown type (SPEC.md §3.1).
func TestStepDirection(t *testing.T) {
	frame := EncodeUnchecked(&Step{RequestID: "r1", Kind: "plan", Name: "plan", State: StepStarted}, JSON)
	if r := Decode(frame, JSON, SenderClient); r[0].Err == nil || r[0].Err.Code != CodeUnknownType || r[0].Err.RequestID != "r1" {
		t.Fatalf("step from a client: %+v", r[0])
	}
	if r := Decode(frame, JSON, SenderGateway); r[0].Err != nil {
		t.Fatalf("step from the gateway: %v", r[0].Err)
	}
}
