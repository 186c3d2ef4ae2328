package muxgate_test

// Pipeline steps and halts (SPEC.md §3.12) against the real gateway and its simulated backend,
// whose pipeline is: plan, answer (llm_stream: the first half of the text), search (tool),
// fact-check (agent, only when agent_ms > 0), answer-continued (llm_stream: the rest).

import (
	"context"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/muxgate/muxgate/go/muxgate"
)

// stepOrder checks the steps' numbering as a client sees it: started 0, 1, 2, ... without gap;
// each ended once, after its start. It returns the kinds of the started steps.
func stepOrder(t *testing.T, steps []muxgate.Step) []string {
	t.Helper()
	var kinds []string
	running := map[int64]bool{}
	for _, s := range steps {
		switch s.State {
		case muxgate.StepStarted:
			if s.Index != int64(len(kinds)) {
				t.Fatalf("step %d started, want %d: %+v", s.Index, len(kinds), steps)
			}
			kinds = append(kinds, s.Kind)
			running[s.Index] = true
		case muxgate.StepEnded:
			if !running[s.Index] {
				t.Fatalf("step %d ended but was not running: %+v", s.Index, steps)
			}
			delete(running, s.Index)
		default:
			t.Fatalf("step state %q", s.State)
		}
	}
	return kinds
}

// Cancel during the tool call: the tool step runs to its end, so the cancelled response says
// the halt is pending on that step, and the final usage says the pipeline halted after it.
func TestStepsCancelDuringTool(t *testing.T) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) {
			c := newClient(t, shared.URL, muxgate.WithCodec(codec))
			ctx := ctxT(t, 20*time.Second)
			var onStep []muxgate.Step
			stream, err := c.OpenStream(ctx, &muxgate.ChatRequest{
				Message:   "Find flights to Lisbon",
				RequestID: rid("steps-tool"),
				Steps:     true,
				OnStep:    func(s muxgate.Step) { onStep = append(onStep, s) },
				Metadata:  map[string]any{"tokens": 40, "token_delay_ms": 1, "plan_ms": 10, "tool_ms": 700},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer stream.Close()
			var (
				steps      []muxgate.Step
				chunks     int
				current    = map[int64]string{} // running steps, by index: their kind
				tool       muxgate.Step
				cancelled  *muxgate.CancelledError
				afterTool  int // events after the tool step started
				cancelSent bool
			)
			for ev, err := range stream.Events() {
				if err != nil {
					if !errors.As(err, &cancelled) {
						t.Fatalf("stream ended with %v, want a *CancelledError", err)
					}
					break
				}
				if cancelSent {
					afterTool++
				}
				if ev.Step == nil {
					chunks++
					// In order with the steps: text comes only while an LLM stream step runs.
					streaming := false
					for _, kind := range current {
						streaming = streaming || kind == muxgate.StepKindLLMStream
					}
					if !streaming {
						t.Fatalf("chunk %d outside an llm_stream step (running: %v)", ev.Chunk.Seq, current)
					}
					continue
				}
				s := *ev.Step
				if s.RequestID != stream.RequestID() {
					t.Fatalf("step of another request: %+v", s)
				}
				steps = append(steps, s)
				if s.State == muxgate.StepStarted {
					current[s.Index] = s.Kind
				} else {
					delete(current, s.Index)
				}
				if s.Kind == muxgate.StepKindTool && s.State == muxgate.StepStarted && !cancelSent {
					tool, cancelSent = s, true
					if cur, ok := stream.CurrentStep(); !ok || cur != s {
						t.Fatalf("CurrentStep() = %+v, %v; want %+v", cur, ok, s)
					}
					// In-band, from inside the loop: the stream then ends with the cancelled response.
					if res, err := c.CancelRequest(ctx, stream.RequestID(), ""); err != nil || res != muxgate.ResultCancelled {
						t.Fatalf("CancelRequest: %v, %v", res, err)
					}
				}
			}
			if cancelled == nil || tool.Name == "" {
				t.Fatalf("no tool step, or the stream was not cancelled (steps %+v)", steps)
			}
			if afterTool != 0 {
				t.Fatalf("%d events after the cancel was answered", afterTool)
			}
			kinds := stepOrder(t, steps)
			if want := []string{"plan", "llm_stream", "tool"}; !reflect.DeepEqual(kinds, want) {
				t.Fatalf("started kinds %v, want %v", kinds, want)
			}
			if chunks == 0 {
				t.Fatal("no chunk before the tool step (the first half of the answer)")
			}
			if !reflect.DeepEqual(onStep, steps) || !reflect.DeepEqual(stream.Steps(), steps) {
				t.Fatalf("OnStep saw %+v, Steps() %+v, Events %+v", onStep, stream.Steps(), steps)
			}

			resp := cancelled.Response
			if resp == nil || resp.Status != muxgate.StatusCancelled || resp.Reason != muxgate.ReasonClient || stream.Response() != resp {
				t.Fatalf("response %+v", resp)
			}
			toolInfo := &muxgate.StepInfo{Index: tool.Index, Kind: muxgate.StepKindTool, Name: tool.Name}
			wantPending := &muxgate.Halt{State: muxgate.HaltPending, Step: toolInfo}
			if resp.Usage.Final || !reflect.DeepEqual(resp.Halt, wantPending) {
				t.Fatalf("cancelled during a tool call: usage %+v, halt %+v; want not final, halt %+v", resp.Usage, resp.Halt, wantPending)
			}
			if got := stream.Halt(); !reflect.DeepEqual(got, wantPending) {
				t.Fatalf("Stream.Halt() before the usage message = %+v", got)
			}

			usage, err := c.FinalUsage(ctx, resp)
			if err != nil || !usage.Final {
				t.Fatalf("FinalUsage: %+v, %v", usage, err)
			}
			wantHalted := &muxgate.Halt{State: muxgate.HaltHalted, Step: toolInfo} // the tool finished
			halt, err := c.FinalHalt(ctx, resp)
			if err != nil || !reflect.DeepEqual(halt, wantHalted) {
				t.Fatalf("FinalHalt: %+v, %v; want %+v", halt, err, wantHalted)
			}
			if got := stream.Halt(); !reflect.DeepEqual(got, wantHalted) {
				t.Fatalf("Stream.Halt() after the usage message = %+v", got)
			}
			// No step after the response (the SDK would have failed the connection), and the
			// tool step never ended: it was cut by the cancel.
			if got := stream.Steps(); !reflect.DeepEqual(got, steps) {
				t.Fatalf("steps after the response: %+v", got[len(steps):])
			}
			if cur, ok := stream.CurrentStep(); !ok || cur != tool {
				t.Fatalf("CurrentStep() = %+v, %v; want the tool step", cur, ok)
			}
			// The connection is healthy: the next request on it works.
			if r, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "again", Metadata: fast}); err != nil || r.Status != muxgate.StatusCompleted {
				t.Fatalf("next chat: %+v, %v", r, err)
			}
		})
	}
}

// Cancel while the answer streams from the model: the halt waits for no step (pending without
// one), and the pipeline halted inside the LLM stream (aborted).
func TestStepsCancelDuringLLMStream(t *testing.T) {
	c := newClient(t, shared.URL)
	ctx := ctxT(t, 20*time.Second)
	stream, err := c.OpenStream(ctx, &muxgate.ChatRequest{
		Message: "Write a long story", Steps: true, Metadata: slow,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	var answer muxgate.Step
	var cancelled *muxgate.CancelledError
	for ev, err := range stream.Events() {
		if err != nil {
			if !errors.As(err, &cancelled) {
				t.Fatal(err)
			}
			break
		}
		if ev.Step != nil && ev.Step.Kind == muxgate.StepKindLLMStream && answer.Name == "" {
			answer = *ev.Step
		}
		if ev.Step == nil && ev.Chunk.Seq == 5 { // mid-stream
			if _, err := c.CancelRequest(ctx, stream.RequestID(), ""); err != nil {
				t.Fatal(err)
			}
		}
	}
	if cancelled == nil || cancelled.Response == nil || answer.Name == "" {
		t.Fatalf("not cancelled mid-stream: %v, answer step %+v", cancelled, answer)
	}
	resp := cancelled.Response
	if want := (&muxgate.Halt{State: muxgate.HaltPending}); !reflect.DeepEqual(resp.Halt, want) {
		t.Fatalf("response halt %+v, want %+v", resp.Halt, want)
	}
	halt, err := c.FinalHalt(ctx, resp)
	want := &muxgate.Halt{State: muxgate.HaltHalted, Step: &muxgate.StepInfo{Index: answer.Index, Kind: answer.Kind, Name: answer.Name}, Aborted: true}
	if err != nil || !reflect.DeepEqual(halt, want) {
		t.Fatalf("FinalHalt: %+v, %v; want %+v", halt, err, want)
	}
}

// Chat (stream false) with OnStep: the steps arrive all the same, on the caller's goroutine;
// a completed response has no halt. ChatStream hands them to OnStep between its chunks.
func TestStepsChatAndChatStream(t *testing.T) {
	c := newClient(t, shared.URL, muxgate.WithCodec(muxgate.Msgpack))
	ctx := ctxT(t, 20*time.Second)
	meta := map[string]any{"tokens": 12, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0, "agent_ms": 1}
	var steps []muxgate.Step
	resp, err := c.Chat(ctx, &muxgate.ChatRequest{
		Message: "Find flights", Metadata: meta,
		OnStep: func(s muxgate.Step) { steps = append(steps, s) }, // implies Steps
	})
	if err != nil || resp.Status != muxgate.StatusCompleted || resp.Halt != nil {
		t.Fatalf("%+v, %v", resp, err)
	}
	kinds := stepOrder(t, steps)
	if want := []string{"plan", "llm_stream", "tool", "agent", "llm_stream"}; !reflect.DeepEqual(kinds, want) || len(steps) != 2*len(want) {
		t.Fatalf("steps %+v, want every one of %v started and ended", steps, want)
	}
	if halt, err := c.FinalHalt(ctx, resp); halt != nil || err != nil {
		t.Fatalf("FinalHalt of a completed request: %+v, %v", halt, err)
	}

	var order []string // "s" for a step, "c" for a chunk
	steps = nil
	for chunk, err := range c.ChatStream(ctx, &muxgate.ChatRequest{
		Message: "Find flights", Metadata: meta,
		OnStep: func(s muxgate.Step) { steps = append(steps, s); order = append(order, "s") },
	}) {
		if err != nil {
			t.Fatal(err)
		}
		if chunk.Text != "" {
			order = append(order, "c")
		}
	}
	stepOrder(t, steps)
	if len(steps) != 10 || order[0] != "s" || order[len(order)-1] != "s" {
		t.Fatalf("order %v", order)
	}
}

// Without Steps the gateway sends none (the SDK would fail the connection on one), and a
// cancelled response carries no halt.
func TestNoStepsUnlessAsked(t *testing.T) {
	c := newClient(t, shared.URL)
	ctx := ctxT(t, 20*time.Second)
	stream, err := c.OpenStream(ctx, &muxgate.ChatRequest{Message: "Write", Metadata: slow})
	if err != nil {
		t.Fatal(err)
	}
	var cancelled *muxgate.CancelledError
	n := 0
	for ev, err := range stream.Events() {
		if err != nil {
			if !errors.As(err, &cancelled) {
				t.Fatal(err)
			}
			break
		}
		if ev.Step != nil {
			t.Fatalf("a step for a chat without steps: %+v", ev.Step)
		}
		if n++; n == 3 {
			if _, err := c.CancelRequest(ctx, stream.RequestID(), ""); err != nil {
				t.Fatal(err)
			}
		}
	}
	if cancelled == nil || cancelled.Response.Halt != nil || stream.Halt() != nil || len(stream.Steps()) != 0 {
		t.Fatalf("%v, halt %+v, steps %+v", cancelled, stream.Halt(), stream.Steps())
	}
	if _, err := c.FinalUsage(ctx, cancelled.Response); err != nil {
		t.Fatal(err)
	}
	if halt, err := c.FinalHalt(ctx, cancelled.Response); halt != nil || err != nil {
		t.Fatalf("FinalHalt: %+v, %v", halt, err)
	}
}

// A Stream is ranged once; Close before the end cancels the request on the gateway; a
// cancelled context ends the loop with a *CancelledError wrapping it.
func TestStreamHandleLifecycle(t *testing.T) {
	c := newClient(t, shared.URL)
	ctx := ctxT(t, 20*time.Second)
	stream, err := c.OpenStream(ctx, &muxgate.ChatRequest{Message: "Write", Steps: true, Metadata: slow})
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range stream.Events() {
		if err != nil {
			t.Fatal(err)
		}
		break // leaving early cancels
	}
	for _, err := range stream.Events() {
		if !errors.Is(err, muxgate.ErrInvalidRequest) {
			t.Fatalf("second range: %v", err)
		}
	}
	waitStatus(t, c, stream.RequestID(), "", "cancelling", "cancelled")

	stream, err = c.OpenStream(ctx, &muxgate.ChatRequest{Message: "Write", Steps: true, Metadata: slow})
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Close()
	_ = stream.Close()
	waitStatus(t, c, stream.RequestID(), "", "cancelling", "cancelled")

	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err = c.OpenStream(cctx, &muxgate.ChatRequest{Message: "Write", Steps: true, Metadata: slow})
	if err != nil {
		t.Fatal(err)
	}
	var last error
	for ev, err := range stream.Events() {
		if err != nil {
			last = err
			break
		}
		if ev.Step == nil {
			cancel()
		}
	}
	var ce *muxgate.CancelledError
	if !errors.As(last, &ce) || !errors.Is(last, context.Canceled) {
		t.Fatalf("loop ended with %v", last)
	}
	if ce.Response != nil && (ce.Response.Halt == nil || ce.Response.Halt.State != muxgate.HaltPending) {
		t.Fatalf("halt %+v", ce.Response.Halt)
	}
}
