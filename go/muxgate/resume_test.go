package muxgate_test

// Resumable requests (SPEC.md §5.8): the chat options on the wire, and the client's state rules
// (§5.8's end) checked against a scripted peer that plays the gateway: it answers hello with
// welcome and every other client message with the lines its script returns for it (%s is the
// message's request_id), one frame each. Each broken rule has a conforming counterpart.
//
// A violation ends every request of the connection (as all protocol violations do), but the
// request it is about may have ended already (moved, a response): so each violation test
// keeps a witness request in flight on the same connection and checks that it fails with
// ErrProtocolViolation. Conforming tests check that the peer saw a single connection.

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/muxgate/muxgate/go/muxgate"
	"github.com/muxgate/muxgate/go/protocol"
)

type resumePeer struct {
	url   string
	conns atomic.Int32 // WebSocket connections accepted
	mu    sync.Mutex
	got   []protocol.Message // client messages after hello, in order
}

func (p *resumePeer) received() []protocol.Message {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]protocol.Message(nil), p.got...)
}

func newResumePeer(t *testing.T, answer func(m protocol.Message) []string) *resumePeer {
	t.Helper()
	p := &resumePeer{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{protocol.JSON.Subprotocol()}})
		if err != nil {
			return
		}
		defer ws.CloseNow()
		p.conns.Add(1)
		ctx := r.Context()
		for {
			_, frame, err := ws.Read(ctx)
			if err != nil {
				return
			}
			for _, res := range protocol.Decode(frame, protocol.JSON, protocol.SenderClient) {
				var lines []string
				if _, ok := res.Message.(*protocol.Hello); ok {
					lines = []string{`{"type":"welcome","connection_id":"scripted","limits":{"max_streams":2,"max_frame_bytes":1048576,"max_batch_messages":1024,"max_timeout_ms":60000}}`}
				} else if res.Message != nil {
					p.mu.Lock()
					p.got = append(p.got, res.Message)
					p.mu.Unlock()
					id := ""
					if o, ok := res.Message.Wire().Get("request_id"); ok {
						id = o.Str
					}
					for _, line := range answer(res.Message) {
						lines = append(lines, strings.ReplaceAll(line, "%s", id))
					}
				}
				for _, line := range lines {
					if ws.Write(ctx, websocket.MessageText, []byte(line)) != nil {
						return
					}
				}
			}
		}
	}))
	t.Cleanup(srv.Close)
	p.url = "ws" + strings.TrimPrefix(srv.URL, "http")
	return p
}

// onChat answers every chat with script, and nothing else.
func onChat(script ...string) func(protocol.Message) []string {
	return func(m protocol.Message) []string {
		if _, ok := m.(*protocol.Chat); ok {
			return script
		}
		return nil
	}
}

// onResume answers every resume with script, and nothing else.
func onResume(script ...string) func(protocol.Message) []string {
	return func(m protocol.Message) []string {
		if _, ok := m.(*protocol.Resume); ok {
			return script
		}
		return nil
	}
}

const (
	resumableMsg = `{"type":"resumable","request_id":"%s","epoch":"ep.1","grace_ms":30000}`
	movedMsg     = `{"type":"moved","request_id":"%s"}`
	resumedMsg   = `{"type":"resume_result","request_id":"%s","status":"resumed"}`
	notFoundMsg  = `{"type":"resume_result","request_id":"%s","status":"not_found"}`
	// a cancelled response whose final usage is still to come (no halt: a chat without steps)
	cancelledLate = `{"type":"response","request_id":"%s","status":"cancelled","content":"","reason":"api","usage":{"input_tokens":1,"output_tokens":0,"saved_tokens":0,"final":false}}`
)

func chunk(seq int, text string) string {
	return `{"type":"chunk","request_id":"%s","seq":` + strconv.Itoa(seq) + `,"text":"` + text + `"}`
}

func completedWith(content string) string {
	return `{"type":"response","request_id":"%s","status":"completed","content":"` + content + `","usage":{"input_tokens":1,"output_tokens":1,"saved_tokens":0}}`
}

// drain ranges a stream to its end: the chunks' texts joined, and the final error.
func drain(s *muxgate.Stream) (string, []muxgate.Event, error) {
	var b strings.Builder
	var events []muxgate.Event
	for ev, err := range s.Events() {
		if err != nil {
			return b.String(), events, err
		}
		events = append(events, ev)
		if ev.Step == nil {
			b.WriteString(ev.Chunk.Text)
		}
	}
	return b.String(), events, nil
}

// expectViolation runs a case against a peer answering with answer, while a witness request
// runs on the same connection, and checks that the SDK caught a protocol violation, the one
// whose message contains want.
func expectViolation(t *testing.T, want string, answer func(protocol.Message) []string, run func(context.Context, *muxgate.Client)) {
	t.Helper()
	peer := newResumePeer(t, func(m protocol.Message) []string {
		if chat, ok := m.(*protocol.Chat); ok && chat.RequestID == "witness" {
			return nil // never answered: it ends with the connection
		}
		return answer(m)
	})
	client := newClient(t, peer.url)
	ctx := ctxT(t, 10*time.Second)
	witness, err := client.OpenStream(ctx, &muxgate.ChatRequest{RequestID: "witness", Message: "w"})
	if err != nil {
		t.Fatal(err)
	}
	run(ctx, client)
	if _, _, err := drain(witness); !errors.Is(err, muxgate.ErrProtocolViolation) || !strings.Contains(err.Error(), want) {
		t.Fatalf("the connection's other request ended with %v; want the protocol violation %q", err, want)
	}
}

func streamChat(t *testing.T, client *muxgate.Client, req *muxgate.ChatRequest) (*muxgate.Stream, string, error) {
	t.Helper()
	s, err := client.OpenStream(ctxT(t, 10*time.Second), req)
	if err != nil {
		return nil, "", err
	}
	text, _, err := drain(s)
	return s, text, err
}

func TestResumableChatOptions(t *testing.T) {
	peer := newResumePeer(t, onChat(completedWith("")))
	client := newClient(t, peer.url)
	ctx := ctxT(t, 10*time.Second)
	for _, c := range []struct {
		req       muxgate.ChatRequest
		resumable bool
		graceMs   int64
	}{
		{muxgate.ChatRequest{Message: "a"}, false, 0},
		{muxgate.ChatRequest{Message: "b", Resumable: true}, true, 0},
		{muxgate.ChatRequest{Message: "c", Resumable: true, Grace: time.Minute}, true, 60000},
		{muxgate.ChatRequest{Message: "d", Resumable: true, Grace: 1500*time.Millisecond + 1}, true, 1501}, // rounded up
		{muxgate.ChatRequest{Message: "e", Resumable: true, Grace: time.Hour}, true, protocol.MaxGraceMs},
	} {
		if _, err := client.Chat(ctx, &c.req); err != nil {
			t.Fatal(err)
		}
		got := peer.received()
		chat := got[len(got)-1].(*protocol.Chat)
		if *chat.Message != c.req.Message || chat.Resumable != c.resumable || chat.GraceMs != c.graceMs {
			t.Fatalf("%+v sent resumable %v grace_ms %d; want %v %d", c.req, chat.Resumable, chat.GraceMs, c.resumable, c.graceMs)
		}
	}
	sent := len(peer.received())
	for _, req := range []muxgate.ChatRequest{
		{Message: "x", Grace: time.Second}, // a grace period needs Resumable
		{Message: "x", Resumable: true, Grace: time.Hour + time.Millisecond},
		{Message: "x", Resumable: true, Grace: -time.Second},
	} {
		if _, err := client.Chat(ctx, &req); !errors.Is(err, muxgate.ErrInvalidRequest) {
			t.Fatalf("%+v: %v; want ErrInvalidRequest", req, err)
		}
	}
	if n := len(peer.received()); n != sent {
		t.Fatalf("an invalid chat was sent (%d messages, want %d)", n, sent)
	}
}

// The client rules of SPEC.md §5.8 for a chat: each script breaks one, and the SDK reports it
// as it reports every protocol violation (the connection closes, the request fails).
func TestResumableViolations(t *testing.T) {
	for _, c := range []struct {
		name   string
		req    muxgate.ChatRequest
		script []string
		want   string
	}{
		{"resumable for a chat that did not ask", muxgate.ChatRequest{Message: "hi"}, []string{resumableMsg}, "resumable for a chat that did not ask"},
		{"a second resumable", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{resumableMsg, resumableMsg}, "a second resumable"},
		{"resumable after a chunk", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{chunk(0, "a"), resumableMsg}, "resumable after other messages"},
		{"resumable after a step", muxgate.ChatRequest{Message: "hi", Resumable: true, Steps: true}, []string{step(0, "started"), resumableMsg}, "resumable after other messages"},
		{"resumable after the response", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{cancelledLate, resumableMsg}, "resumable after other messages"},
		{"moved for a chat that was not resumable", muxgate.ChatRequest{Message: "hi"}, []string{movedMsg}, "moved for a request not known to be resumable"},
		{"moved without a resumable message", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{chunk(0, "a"), movedMsg}, "moved for a request not known to be resumable"},
		{"moved after the response", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{resumableMsg, cancelledLate, movedMsg}, "moved after the response"},
		// After moved the request is forgotten here (no cancel outstanding): anything about it
		// is about an unknown request.
		{"chunk after moved", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{resumableMsg, chunk(0, "a"), movedMsg, chunk(1, "b")}, "chunk for unknown request"},
		{"step after moved", muxgate.ChatRequest{Message: "hi", Resumable: true, Steps: true}, []string{resumableMsg, movedMsg, step(0, "started")}, "step for unknown request"},
		{"response after moved", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{resumableMsg, movedMsg, completedWith("")}, "response for unknown request"},
		{"moved twice", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{resumableMsg, movedMsg, movedMsg}, "moved for unknown request"},
		{"resume_result for a chat", muxgate.ChatRequest{Message: "hi", Resumable: true}, []string{resumableMsg, resumedMsg}, "resume_result for no resume"},
	} {
		t.Run(c.name, func(t *testing.T) {
			expectViolation(t, c.want, onChat(c.script...), func(_ context.Context, client *muxgate.Client) {
				_, text, err := streamChat(t, client, &c.req)
				t.Logf("the stream ended with %q, %v", text, err)
			})
		})
	}

	// While a cancel sent before the move is unanswered the request is still known here: only
	// its cancel_result may come.
	for _, after := range []string{chunk(1, "b"), step(0, "started"), completedWith("ab"), cancelledLate, resumableMsg} {
		kind := after[len(`{"type":"`):strings.Index(after, `","`)]
		t.Run(kind+" after moved, cancel unanswered", func(t *testing.T) {
			answer := func(m protocol.Message) []string {
				switch m.(type) {
				case *protocol.Chat:
					return []string{resumableMsg, chunk(0, "a")}
				case *protocol.Cancel:
					return []string{movedMsg, after}
				}
				return nil
			}
			expectViolation(t, kind+" after moved", answer, func(ctx context.Context, client *muxgate.Client) {
				s, err := client.OpenStream(ctx, &muxgate.ChatRequest{Message: "hi", Resumable: true, Steps: true})
				if err != nil {
					t.Fatal(err)
				}
				for ev, err := range s.Events() {
					if err == nil && ev.Chunk.Seq == 0 {
						_, err = client.CancelRequest(ctx, s.RequestID(), "")
					}
					t.Logf("%+v, %v", ev, err)
					if err != nil {
						break
					}
				}
			})
		})
	}
}

func TestResumableGranted(t *testing.T) {
	peer := newResumePeer(t, onChat(resumableMsg, chunk(0, "Once"), chunk(1, " upon"), completedWith("Once upon")))
	client := newClient(t, peer.url)
	s, text, err := streamChat(t, client, &muxgate.ChatRequest{Message: "hi", Resumable: true, Grace: time.Minute})
	if err != nil || text != "Once upon" {
		t.Fatalf("%q, %v", text, err)
	}
	r, ok := s.Resumption()
	if !ok || r.Epoch != "ep.1" || r.Grace != 30*time.Second || r.RequestID != s.RequestID() {
		t.Fatalf("Resumption() = %+v, %v", r, ok)
	}
	req, ok := s.ResumeRequest()
	if !ok || req.Epoch != "ep.1" || req.FromSeq != 2 || req.RequestID != s.RequestID() {
		t.Fatalf("ResumeRequest() = %+v, %v", req, ok)
	}

	// An older gateway ignores chat.resumable: no grant, and nothing to resume by.
	old := newResumePeer(t, onChat(chunk(0, "x"), completedWith("x")))
	s, _, err = streamChat(t, newClient(t, old.url), &muxgate.ChatRequest{Message: "hi", Resumable: true})
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := s.Resumption(); ok {
		t.Fatalf("Resumption() = %+v without a resumable message", r)
	}
	if _, ok := s.ResumeRequest(); ok {
		t.Fatal("ResumeRequest() without a resumable message")
	}
}

// moved ends the request here with ErrMoved (not a violation, not a hang): the chunks before it
// are still yielded, the connection goes on serving other requests with the request's stream
// slot free, and a cancel_result of any status may still answer a cancel sent before the move.
func TestMoved(t *testing.T) {
	cancelled := make(chan struct{})
	peer := newResumePeer(t, func(m protocol.Message) []string {
		switch m := m.(type) {
		case *protocol.Chat:
			if *m.Message == "hold" {
				return nil // runs until cancelled
			}
			return []string{resumableMsg, chunk(0, "Once")}
		case *protocol.Cancel:
			if m.RequestID != "story" {
				return []string{`{"type":"response","request_id":"%s","status":"cancelled","content":"","reason":"client","usage":{"input_tokens":1,"output_tokens":0,"saved_tokens":0}}`,
					`{"type":"cancel_result","request_id":"%s","status":"cancelled"}`}
			}
			close(cancelled)
			// The request moved before the gateway read the cancel: its response went to the
			// other connection, so already_completed is possible although none came here.
			return []string{chunk(1, " upon"), movedMsg, `{"type":"cancel_result","request_id":"%s","status":"already_completed"}`}
		}
		return nil
	})
	client := newClient(t, peer.url)
	ctx := ctxT(t, 10*time.Second)
	s, err := client.OpenStream(ctx, &muxgate.ChatRequest{RequestID: "story", Message: "story", Resumable: true})
	if err != nil {
		t.Fatal(err)
	}
	var text string
	var last error
	answered := make(chan struct{})
	for ev, err := range s.Events() {
		if err != nil {
			last = err
			break
		}
		text += ev.Chunk.Text
		if ev.Chunk.Seq == 0 {
			go func() {
				defer close(answered)
				res, err := client.CancelRequest(ctx, s.RequestID(), "")
				if err != nil || res != muxgate.ResultAlreadyCompleted {
					t.Errorf("CancelRequest: %v, %v", res, err)
				}
			}()
			<-cancelled
		}
	}
	if !errors.Is(last, muxgate.ErrMoved) || errors.Is(last, muxgate.ErrProtocolViolation) || text != "Once upon" {
		t.Fatalf("stream ended with %q, %v; want the text before the move, then ErrMoved", text, last)
	}
	if s.Response() != nil {
		t.Fatalf("a moved request has no response here: %+v", s.Response())
	}
	<-answered
	s.Close() // nothing to cancel: the request runs on elsewhere
	// The moved request's stream slot is free here: two requests run at once in max_streams 2.
	hctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	var holds []*muxgate.Stream
	for range 2 {
		h, err := client.OpenStream(hctx, &muxgate.ChatRequest{Message: "hold"})
		if err != nil {
			t.Fatalf("no stream slot after the move: %v", err)
		}
		holds = append(holds, h)
	}
	cancel() // both ran at once; now cancel them
	for _, h := range holds {
		if _, _, err := drain(h); !errors.Is(err, muxgate.ErrCancelled) {
			t.Fatalf("hold: %v", err)
		}
	}
	if n := peer.conns.Load(); n != 1 {
		t.Fatalf("%d connections; the move must not break the first", n)
	}
	cancels := 0
	for _, m := range peer.received() {
		if c, ok := m.(*protocol.Cancel); ok && c.RequestID == "story" {
			cancels++
		}
	}
	if cancels != 1 {
		t.Fatalf("%d cancels sent for the moved request; want only the caller's (Close after a move cancels nothing)", cancels)
	}
	// Chat (not only streams) ends with ErrMoved too.
	moved := newResumePeer(t, onChat(resumableMsg, movedMsg))
	if _, err := newClient(t, moved.url).Chat(ctx, &muxgate.ChatRequest{Message: "hi", Resumable: true}); !errors.Is(err, muxgate.ErrMoved) {
		t.Fatalf("Chat: %v; want ErrMoved", err)
	}
}

func resumeReq(fromSeq int64) *muxgate.ResumeRequest {
	return &muxgate.ResumeRequest{RequestID: "r9", Epoch: "ep.1", FromSeq: fromSeq}
}

// A resume: seq from after_seq + 1; the steps before it unknown; a completed content that ends
// with the text received since.
func TestResumeConforming(t *testing.T) {
	peer := newResumePeer(t, onResume(resumedMsg,
		chunk(1, " upon"),
		`{"type":"step","request_id":"%s","index":3,"kind":"tool","name":"t3","state":"ended"}`, // started before the resume
		`{"type":"step","request_id":"%s","index":5,"kind":"tool","name":"t5","state":"started"}`,
		`{"type":"step","request_id":"%s","index":5,"kind":"tool","name":"t5","state":"ended"}`,
		chunk(2, " a time."),
		completedWith("Once upon a time.")))
	client := newClient(t, peer.url)
	s, err := client.Resume(ctxT(t, 10*time.Second), &muxgate.ResumeRequest{RequestID: "r9", Epoch: "ep.1", UserID: "u1", FromSeq: 1})
	if err != nil {
		t.Fatal(err)
	}
	text, events, err := drain(s)
	if err != nil || text != " upon a time." || len(events) != 5 || events[0].Chunk.Seq != 1 || events[4].Chunk.Seq != 2 {
		t.Fatalf("%q, %v, %+v", text, err, events)
	}
	if resp := s.Response(); resp == nil || resp.Content != "Once upon a time." {
		t.Fatalf("response %+v", resp)
	}
	sent := peer.received()[0].(*protocol.Resume)
	if sent.RequestID != "r9" || sent.Epoch != "ep.1" || sent.AfterSeq == nil || *sent.AfterSeq != 0 || sent.UserID != "u1" {
		t.Fatalf("sent %+v", sent)
	}
	if r, ok := s.Resumption(); !ok || r.Epoch != "ep.1" || r.Grace != 0 {
		t.Fatalf("Resumption() = %+v, %v", r, ok)
	}
	if req, ok := s.ResumeRequest(); !ok || req.FromSeq != 3 || req.UserID != "u1" {
		t.Fatalf("ResumeRequest() = %+v, %v", req, ok)
	}

	// FromSeq 0: no after_seq; every chunk again, and the content must equal them.
	peer = newResumePeer(t, onResume(resumedMsg, chunk(0, "Once"), completedWith("Once")))
	s, err = newClient(t, peer.url).Resume(ctxT(t, 10*time.Second), resumeReq(0))
	if err != nil {
		t.Fatal(err)
	}
	if text, _, err := drain(s); err != nil || text != "Once" {
		t.Fatalf("%q, %v", text, err)
	}
	if sent := peer.received()[0].(*protocol.Resume); sent.AfterSeq != nil {
		t.Fatalf("after_seq %d sent for FromSeq 0", *sent.AfterSeq)
	}
}

func TestResumeNotFoundAndRefused(t *testing.T) {
	peer := newResumePeer(t, func(m protocol.Message) []string {
		if r, ok := m.(*protocol.Resume); ok {
			if r.Epoch == "busy" {
				return []string{`{"type":"error","code":"too_many_streams","message":"full","request_id":"%s"}`}
			}
			return []string{notFoundMsg}
		}
		return []string{completedWith("ok")}
	})
	client := newClient(t, peer.url)
	ctx := ctxT(t, 10*time.Second)
	if s, err := client.Resume(ctx, resumeReq(4)); !errors.Is(err, muxgate.ErrResumeNotFound) || s != nil {
		t.Fatalf("%v, %v; want ErrResumeNotFound", s, err)
	}
	if _, err := client.Resume(ctx, &muxgate.ResumeRequest{RequestID: "r9", Epoch: "busy"}); !errors.Is(err, muxgate.ErrTooManyStreams) {
		t.Fatalf("%v; want the gateway's refusal", err)
	}
	// Neither left anything behind: the same id starts a chat on the same connection.
	if resp, err := client.Chat(ctx, &muxgate.ChatRequest{RequestID: "r9", Message: "hi"}); err != nil || resp.Content != "ok" {
		t.Fatalf("%+v, %v", resp, err)
	}
	for _, bad := range []*muxgate.ResumeRequest{
		{RequestID: "r9"},                            // no epoch
		{RequestID: "r9", Epoch: "a/b"},              // not EPOCH_PATTERN
		{RequestID: "r9", Epoch: "e", FromSeq: -1},   // negative
		{RequestID: "bad id", Epoch: "e"},            // not REQUEST_ID_PATTERN
		{RequestID: "r9", Epoch: "e", UserID: "a b"}, // not USER_ID_PATTERN
	} {
		if _, err := client.Resume(ctx, bad); !errors.Is(err, muxgate.ErrInvalidRequest) {
			t.Fatalf("%+v: %v; want ErrInvalidRequest", bad, err)
		}
	}
}

// The client rules of SPEC.md §5.8 for a resume.
func TestResumeViolations(t *testing.T) {
	for _, c := range []struct {
		name    string
		fromSeq int64
		script  []string
		want    string
	}{
		{"chunk before the resume_result", 1, []string{chunk(1, "a"), resumedMsg}, "chunk before the resume_result"},
		{"step before the resume_result", 1, []string{step(0, "started"), resumedMsg}, "step before the resume_result"},
		{"response before the resume_result", 1, []string{completedWith("a"), resumedMsg}, "response before the resume_result"},
		{"moved before the resume_result", 1, []string{movedMsg, resumedMsg}, "moved before the resume_result"},
		{"a second resume_result", 1, []string{resumedMsg, resumedMsg}, "resume_result for no resume"},
		{"resumable after a resume", 1, []string{resumedMsg, resumableMsg}, "a second resumable"},
		{"seq not after_seq + 1", 1, []string{resumedMsg, chunk(0, "a")}, "seq out of order"},
		{"seq gap after the resume", 1, []string{resumedMsg, chunk(1, "a"), chunk(3, "b")}, "seq out of order"},
		{"content not ending with the text since the resume", 1, []string{resumedMsg, chunk(1, " upon"), completedWith("Once upon a time.")}, "completed content differs"},
		{"content other than the whole replay", 0, []string{resumedMsg, chunk(0, "upon"), completedWith("Once upon")}, "completed content differs"},
		{"step started out of order after the first", 1, []string{resumedMsg, step(4, "started"), step(6, "started")}, "step started out of order"},
		{"step ended twice after the resume", 1, []string{resumedMsg, step(2, "ended"), step(2, "ended")}, "step ended that is not running"},
		{"step ended that started since and is not running", 1, []string{resumedMsg, step(4, "started"), step(5, "ended")}, "step ended that is not running"},
		{"step started after its end", 1, []string{resumedMsg, step(2, "ended"), step(2, "started")}, "step started after its end"},
		{"chunk after not_found", 1, []string{notFoundMsg, chunk(1, "a")}, "chunk for unknown request"},
	} {
		t.Run(c.name, func(t *testing.T) {
			expectViolation(t, c.want, onResume(c.script...), func(ctx context.Context, client *muxgate.Client) {
				s, err := client.Resume(ctx, resumeReq(c.fromSeq))
				if err == nil {
					_, _, err = drain(s)
				}
				if err == nil {
					t.Error("the resumed stream completed")
				}
				t.Logf("the resume ended with %v", err)
			})
		})
	}
}

// Cancelling the context of a Resume before its resume_result cancels the request, and a
// cancel_result of any status may follow a not_found.
func TestResumeContextCancelled(t *testing.T) {
	got := make(chan protocol.Message, 4)
	peer := newResumePeer(t, func(m protocol.Message) []string {
		switch m.(type) {
		case *protocol.Resume:
			got <- m
			return nil // the resume_result comes with the cancel's answer
		case *protocol.Cancel:
			got <- m
			return []string{notFoundMsg, `{"type":"cancel_result","request_id":"%s","status":"cancelled"}`}
		}
		return []string{completedWith("ok")}
	})
	client := newClient(t, peer.url)
	ctx, cancel := context.WithCancel(ctxT(t, 10*time.Second))
	go func() {
		<-got // the resume
		cancel()
	}()
	if _, err := client.Resume(ctx, resumeReq(1)); !errors.Is(err, muxgate.ErrCancelled) || !errors.Is(err, context.Canceled) {
		t.Fatalf("%v; want a *CancelledError wrapping context.Canceled", err)
	}
	select {
	case m := <-got:
		if _, ok := m.(*protocol.Cancel); !ok {
			t.Fatalf("sent %T, want a cancel", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no cancel sent")
	}
	// The not_found and the cancel_result after it are no violation: the connection serves on.
	resp, err := client.Chat(ctxT(t, 10*time.Second), &muxgate.ChatRequest{Message: "x"})
	if err != nil || resp.Content != "ok" || peer.conns.Load() != 1 {
		t.Fatalf("%+v, %v, %d connections", resp, err, peer.conns.Load())
	}
}
