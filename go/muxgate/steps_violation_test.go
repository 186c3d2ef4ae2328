package muxgate_test

// The SDK's checks of step messages and halts (SPEC.md §5.1, §3.12). A conforming gateway never
// breaks them, so a scripted peer does: it answers hello with welcome, reads the chat, then
// sends its script (%s is the chat's request_id).

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/muxgate/muxgate/go/muxgate"
	"github.com/muxgate/muxgate/go/protocol"
)

func scriptedPeer(t *testing.T, script ...string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{protocol.JSON.Subprotocol()}})
		if err != nil {
			return
		}
		defer ws.CloseNow()
		ctx := r.Context()
		send := func(s string) bool { return ws.Write(ctx, websocket.MessageText, []byte(s)) == nil }
		id := ""
		for id == "" {
			_, frame, err := ws.Read(ctx)
			if err != nil {
				return
			}
			for _, res := range protocol.Decode(frame, protocol.JSON, protocol.SenderClient) {
				switch m := res.Message.(type) {
				case *protocol.Hello:
					if !send(`{"type":"welcome","connection_id":"scripted","limits":{"max_streams":4,"max_frame_bytes":1048576,"max_batch_messages":1024,"max_timeout_ms":60000}}`) {
						return
					}
				case *protocol.Chat:
					id = m.RequestID
				}
			}
		}
		for _, line := range script {
			if !send(strings.ReplaceAll(line, "%s", id)) {
				return
			}
		}
		for { // until the client closes
			if _, _, err := ws.Read(ctx); err != nil {
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	return "ws" + strings.TrimPrefix(srv.URL, "http")
}

func step(index int, state string) string {
	return fmt.Sprintf(`{"type":"step","request_id":"%%s","index":%d,"kind":"tool","name":"t%d","state":"%s"}`, index, index, state)
}

const (
	completed     = `{"type":"response","request_id":"%s","status":"completed","content":"","usage":{"input_tokens":1,"output_tokens":0,"saved_tokens":0}}`
	pendingCancel = `{"type":"response","request_id":"%s","status":"cancelled","content":"","reason":"api","usage":{"input_tokens":1,"output_tokens":0,"saved_tokens":0,"final":false},"halt":{"state":"pending"}}`
	haltedUsage   = `{"type":"usage","request_id":"%s","usage":{"input_tokens":1,"output_tokens":0,"saved_tokens":0},"halt":{"state":"halted","step":{"index":0,"kind":"tool","name":"t0"}}}`
)

func TestStepChecks(t *testing.T) {
	for _, c := range []struct {
		name   string
		steps  bool
		script []string
	}{
		{"step for a chat without steps", false, []string{step(0, "started")}},
		{"halt for a chat without steps", false, []string{pendingCancel}},
		{"first step not 0", true, []string{step(1, "started")}},
		{"gap", true, []string{step(0, "started"), step(2, "started")}},
		{"started twice", true, []string{step(0, "started"), step(0, "started")}},
		{"ended before started", true, []string{step(0, "ended")}},
		{"ended twice", true, []string{step(0, "started"), step(0, "ended"), step(0, "ended")}},
	} {
		t.Run(c.name, func(t *testing.T) {
			client := newClient(t, scriptedPeer(t, c.script...))
			var seen []muxgate.Step
			req := &muxgate.ChatRequest{Message: "hi", Steps: c.steps}
			if c.steps {
				req.OnStep = func(s muxgate.Step) { seen = append(seen, s) }
			}
			resp, err := client.Chat(ctxT(t, 10*time.Second), req)
			if !errors.Is(err, muxgate.ErrProtocolViolation) {
				t.Fatalf("got %+v, %v; want a protocol violation", resp, err)
			}
			t.Logf("%v (steps handed over before it: %d)", err, len(seen))
		})
	}

	t.Run("step after the response", func(t *testing.T) {
		client := newClient(t, scriptedPeer(t, step(0, "started"), pendingCancel, step(1, "started")))
		resp, err := client.Chat(ctxT(t, 10*time.Second), &muxgate.ChatRequest{Message: "hi", Steps: true})
		if err != nil || resp.Halt == nil || resp.Halt.State != muxgate.HaltPending {
			t.Fatalf("%+v, %v", resp, err)
		}
		if _, err := client.FinalHalt(ctxT(t, 10*time.Second), resp); !errors.Is(err, muxgate.ErrProtocolViolation) {
			t.Fatalf("FinalHalt: %v; want the protocol violation that broke the connection", err)
		}
	})

	t.Run("conforming", func(t *testing.T) { // overlapping steps, then the halt in the usage
		client := newClient(t, scriptedPeer(t, step(0, "started"), step(1, "started"), step(1, "ended"),
			`{"type":"step","request_id":"%s","index":2,"kind":"future_kind","name":"n","state":"started"}`,
			pendingCancel, haltedUsage))
		var seen []muxgate.Step
		ctx := ctxT(t, 10*time.Second)
		stream, err := client.OpenStream(ctx, &muxgate.ChatRequest{Message: "hi", OnStep: func(s muxgate.Step) { seen = append(seen, s) }})
		if err != nil {
			t.Fatal(err)
		}
		var events []muxgate.Event
		var last error
		for ev, err := range stream.Events() {
			if err != nil {
				last = err
				break
			}
			events = append(events, ev)
		}
		if !errors.Is(last, muxgate.ErrCancelled) || len(events) != 4 || len(seen) != 4 || seen[3].Kind != "future_kind" {
			t.Fatalf("end %v, events %+v, OnStep %+v", last, events, seen)
		}
		if cur, ok := stream.CurrentStep(); !ok || cur.Index != 2 { // 0 and 2 run; 2 started last
			t.Fatalf("CurrentStep() = %+v, %v", cur, ok)
		}
		halt, err := client.FinalHalt(ctx, stream.Response())
		if err != nil || halt.State != muxgate.HaltHalted || halt.Step.Name != "t0" || stream.Halt().State != muxgate.HaltHalted {
			t.Fatalf("FinalHalt %+v, %v; Stream.Halt %+v", halt, err, stream.Halt())
		}
	})
}
