package muxgate_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/muxgate/muxgate/go/muxgate"
	"github.com/muxgate/muxgate/go/protocol"
)

// Settings of the simulated backend (gateway/backends/simulated.py).
var (
	fast = map[string]any{"tokens": 8, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}
	// slow streams about 20 s unless cancelled.
	slow = map[string]any{"tokens": 4000, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}
)

var codecs = []muxgate.Codec{muxgate.JSON, muxgate.Msgpack}

func newClient(t *testing.T, url string, opts ...muxgate.Option) *muxgate.Client {
	t.Helper()
	c := muxgate.NewClient(append([]muxgate.Option{muxgate.WithURL(url)}, opts...)...)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

var ids atomic.Int64

func rid(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, time.Now().UnixNano(), ids.Add(1))
}

// waitStatus polls GET /v1/requests/{id} until its status is one of want.
func waitStatus(t *testing.T, c *muxgate.Client, id, user string, want ...string) *muxgate.RequestInfo {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := c.GetRequest(context.Background(), id, user)
		if err != nil {
			t.Fatalf("GET %s: %v", id, err)
		}
		for _, w := range want {
			if info.Status == w {
				return info
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("request %s: status %q, want one of %v", id, info.Status, want)
		}
		time.Sleep(10 * time.Millisecond) // polling the gateway's state: there is no event to await
	}
}

func TestChatBothCodecs(t *testing.T) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) {
			c := newClient(t, shared.URL, muxgate.WithCodec(codec))
			ctx := ctxT(t, 10*time.Second)
			resp, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "What is a checkpoint?", RequestID: rid("chat"), Metadata: fast})
			if err != nil {
				t.Fatal(err)
			}
			if resp.Status != muxgate.StatusCompleted || resp.Content == "" || !resp.Usage.Final || resp.Usage.OutputTokens == 0 {
				t.Fatalf("unexpected response %+v", resp)
			}
			var shape map[string]any
			raw, _ := json.Marshal(resp)
			_ = json.Unmarshal(raw, &shape)
			if shape["status"] != "completed" || shape["request_id"] != resp.RequestID || shape["content"] != resp.Content {
				t.Fatalf("JSON shape %s", raw)
			}
			// The simulated backend estimates every figure (SPEC.md §3.8); nothing was saved.
			if !reflect.DeepEqual(resp.Usage.Estimated, []string{"input_tokens", "output_tokens"}) ||
				!resp.Usage.IsEstimated(protocol.FigureOutputTokens) || resp.Usage.IsEstimated(protocol.FigureSavedTokens) {
				t.Fatalf("usage.estimated %#v", resp.Usage.Estimated)
			}
			if u, _ := shape["usage"].(map[string]any); !reflect.DeepEqual(u["estimated"], []any{"input_tokens", "output_tokens"}) {
				t.Fatalf("JSON shape of usage %s", raw)
			}
			// A conversation, and the default request id.
			resp, err = c.Chat(ctx, &muxgate.ChatRequest{Messages: []muxgate.ChatMessage{{Role: "system", Content: "be brief"}, {Role: "user", Content: "hi"}}, Metadata: fast})
			if err != nil || resp.Status != muxgate.StatusCompleted || !strings.HasPrefix(resp.RequestID, "req_") {
				t.Fatalf("conversation: %+v, %v", resp, err)
			}
		})
	}
}

func TestChatStreamEqualsChat(t *testing.T) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) {
			c := newClient(t, shared.URL, muxgate.WithCodec(codec))
			ctx := ctxT(t, 10*time.Second)
			meta := map[string]any{"tokens": 40, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0, "seed": 7}
			resp, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "same", Metadata: meta})
			if err != nil {
				t.Fatal(err)
			}
			var text strings.Builder
			var seq int64 = -1
			for chunk, err := range c.ChatStream(ctx, &muxgate.ChatRequest{Message: "same", Metadata: meta}) {
				if err != nil {
					t.Fatal(err)
				}
				if chunk.Seq <= seq {
					t.Fatalf("seq %d after %d", chunk.Seq, seq)
				}
				seq = chunk.Seq
				text.WriteString(chunk.Text)
			}
			if text.String() != resp.Content {
				t.Fatalf("streamed %q, chat %q", text.String(), resp.Content)
			}
		})
	}
}

func TestChatAsync(t *testing.T) {
	c := newClient(t, shared.URL)
	ctx := ctxT(t, 10*time.Second)
	tasks := make([]*muxgate.Task, 10)
	for i := range tasks {
		tasks[i] = c.ChatAsync(ctx, &muxgate.ChatRequest{Message: fmt.Sprintf("q%d", i), Metadata: fast})
	}
	for _, task := range tasks {
		<-task.Done()
		resp, err := task.Wait()
		if err != nil || resp.Status != muxgate.StatusCompleted || resp.RequestID != task.RequestID() {
			t.Fatalf("%+v %v", resp, err)
		}
	}
}

func TestCancelByContext(t *testing.T) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) {
			c := newClient(t, shared.URL, muxgate.WithCodec(codec))
			id := rid("ctx")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			task := c.ChatAsync(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow})
			waitStatus(t, c, id, "", "active")
			start := time.Now()
			cancel()
			_, err := task.Wait()
			if !errors.Is(err, context.Canceled) || !errors.Is(err, muxgate.ErrCancelled) {
				t.Fatalf("err %v", err)
			}
			var ce *muxgate.CancelledError
			if !errors.As(err, &ce) || ce.Response == nil || ce.Response.Status != muxgate.StatusCancelled || ce.Response.Reason != muxgate.ReasonClient {
				t.Fatalf("cancelled error %+v", ce)
			}
			if time.Since(start) > 2*time.Second {
				t.Fatalf("cancel took %v", time.Since(start))
			}
			usage, err := c.FinalUsage(ctxT(t, 10*time.Second), ce.Response)
			if err != nil || !usage.Final || usage.SavedTokens == 0 {
				t.Fatalf("final usage %+v %v", usage, err)
			}
			info := waitStatus(t, c, id, "", "cancelled")
			if info.Reason != muxgate.ReasonClient {
				t.Fatalf("reason %q", info.Reason)
			}
		})
	}
}

// The promise: a deadline cancels the request on the gateway without a CancelRequest.
func TestCancelByDeadline(t *testing.T) {
	c := newClient(t, shared.URL)
	id := rid("deadline")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	resp, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow})
	if resp != nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("%+v %v", resp, err)
	}
	info := waitStatus(t, c, id, "", "cancelled", "cancelling")
	if info.Reason != muxgate.ReasonClient {
		t.Fatalf("the gateway saw reason %q", info.Reason)
	}
	// Calling CancelRequest afterwards, as the seed does, is harmless.
	res, err := c.CancelRequest(context.Background(), id, "")
	if err != nil || res != muxgate.ResultAlreadyCancelled {
		t.Fatalf("%v %v", res, err)
	}
}

// The gateway's own deadline (timeout_ms): a cancelled response, not an error, as on the seed.
func TestGatewayTimeout(t *testing.T) {
	c := newClient(t, shared.URL)
	resp, err := c.Chat(ctxT(t, 10*time.Second), &muxgate.ChatRequest{Message: "long", Timeout: 200 * time.Millisecond, Metadata: slow})
	if err != nil || resp.Status != muxgate.StatusCancelled || resp.Reason != muxgate.ReasonTimeout || resp.Content != "" {
		t.Fatalf("%+v %v", resp, err)
	}
}

func TestStreamCancelByContextMidStream(t *testing.T) {
	c := newClient(t, shared.URL, muxgate.WithCodec(muxgate.Msgpack))
	id := rid("sctx")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	chunks := 0
	var last error
	for _, err := range c.ChatStream(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow}) {
		if err != nil {
			last = err
			continue
		}
		if last != nil {
			t.Fatal("a chunk after the terminal error")
		}
		chunks++
		if chunks == 5 {
			cancel()
		}
	}
	if !errors.Is(last, context.Canceled) {
		t.Fatalf("stream ended with %v", last)
	}
	if info := waitStatus(t, c, id, "", "cancelled"); info.Reason != muxgate.ReasonClient {
		t.Fatalf("reason %q", info.Reason)
	}
}

func TestStreamBreakCancels(t *testing.T) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) {
			c := newClient(t, shared.URL, muxgate.WithCodec(codec))
			id := rid("break")
			n := 0
			for chunk, err := range c.ChatStream(ctxT(t, 10*time.Second), &muxgate.ChatRequest{Message: "Write a long essay...", RequestID: id, Metadata: slow}) {
				if err != nil {
					t.Fatal(err)
				}
				_ = chunk
				n++
				if n >= 10 {
					break
				}
			}
			if info := waitStatus(t, c, id, "", "cancelled"); info.Reason != muxgate.ReasonClient {
				t.Fatalf("reason %q", info.Reason)
			}
		})
	}
}

func TestCancelRequestInBandAndOutcomes(t *testing.T) {
	c := newClient(t, shared.URL)
	ctx := ctxT(t, 10*time.Second)
	id := rid("inband")
	task := c.ChatAsync(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id, UserID: "user123", Metadata: slow})
	res, err := c.CancelRequest(ctx, id, "user123") // right away: waits for the chat, then in-band
	if err != nil || res != muxgate.ResultCancelled {
		t.Fatalf("%v %v", res, err)
	}
	resp, err := task.Wait()
	if err != nil || resp.Status != muxgate.StatusCancelled || resp.Reason != muxgate.ReasonClient || resp.Content != "" {
		t.Fatalf("%+v %v", resp, err)
	}
	if res, err = c.CancelRequest(ctx, id, "user123"); err != nil || res != muxgate.ResultAlreadyCancelled {
		t.Fatalf("second cancel: %v %v", res, err)
	}
	// Another user cannot see it (G9).
	if res, err = c.CancelRequest(ctx, id, "someone-else"); err != nil || res != muxgate.ResultNotFound {
		t.Fatalf("other user: %v %v", res, err)
	}
	done, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "short", Metadata: fast})
	if err != nil {
		t.Fatal(err)
	}
	if res, err = c.CancelRequest(ctx, done.RequestID, ""); err != nil || res != muxgate.ResultAlreadyCompleted {
		t.Fatalf("completed: %v %v", res, err)
	}
	if res, err = c.CancelRequest(ctx, rid("never"), ""); err != nil || res != muxgate.ResultNotFound {
		t.Fatalf("unknown: %v %v", res, err)
	}
}

// CancelRequest from a second client goes over HTTP DELETE (reason api).
func TestCancelRequestFromSecondClient(t *testing.T) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) {
			a := newClient(t, shared.URL, muxgate.WithCodec(codec), muxgate.WithUserID("alice"))
			b := newClient(t, shared.URL, muxgate.WithUserID("alice"))
			ctx := ctxT(t, 10*time.Second)
			id := rid("second")
			var chunks atomic.Int64
			ended := make(chan error, 1)
			started := make(chan struct{})
			go func() {
				var last error
				for _, err := range a.ChatStream(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow}) {
					if err != nil {
						last = err
						continue
					}
					if chunks.Add(1) == 1 {
						close(started)
					}
				}
				ended <- last
			}()
			select {
			case <-started:
			case <-ctx.Done():
				t.Fatal("no chunk")
			}
			res, err := b.CancelRequest(ctx, id, "")
			if err != nil || res != muxgate.ResultCancelled {
				t.Fatalf("%v %v", res, err)
			}
			err = <-ended
			var ce *muxgate.CancelledError
			if !errors.As(err, &ce) || ce.Cause != nil || ce.Response.Reason != muxgate.ReasonAPI {
				t.Fatalf("stream ended with %v", err)
			}
			if res, _ := b.CancelRequest(ctx, id, ""); res != muxgate.ResultAlreadyCancelled {
				t.Fatalf("again: %v", res)
			}
			// The same, for Chat: a cancelled Response, no error.
			id2 := rid("second-chat")
			task := a.ChatAsync(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id2, Metadata: slow})
			waitStatus(t, b, id2, "", "active")
			if res, err := b.CancelRequest(ctx, id2, ""); err != nil || res != muxgate.ResultCancelled {
				t.Fatalf("%v %v", res, err)
			}
			resp, err := task.Wait()
			if err != nil || resp.Status != muxgate.StatusCancelled || resp.Reason != muxgate.ReasonAPI {
				t.Fatalf("%+v %v", resp, err)
			}
		})
	}
}

// A cancel racing the end of the request: either outcome, always consistent (G4).
func TestCancelRacingCompletion(t *testing.T) {
	c := newClient(t, shared.URL)
	ctx := ctxT(t, 30*time.Second)
	seen := map[string]int{}
	for i := range 60 {
		id := rid("race")
		task := c.ChatAsync(ctx, &muxgate.ChatRequest{Message: "race", RequestID: id, Metadata: map[string]any{"tokens": 3, "token_delay_ms": 1, "plan_ms": 0, "tool_ms": 0}})
		if i%3 == 0 {
			<-time.After(time.Duration(i%7) * time.Millisecond) // vary the moment of the cancel
		}
		res, err := c.CancelRequest(ctx, id, "")
		if err != nil {
			t.Fatal(err)
		}
		resp, err := task.Wait()
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case res == muxgate.ResultCancelled && resp.Status == muxgate.StatusCancelled && resp.Content == "":
		case res == muxgate.ResultAlreadyCompleted && resp.Status == muxgate.StatusCompleted && resp.Content != "":
		default:
			t.Fatalf("inconsistent: cancel %s, response %+v", res, resp)
		}
		seen[string(res)]++
	}
	t.Logf("outcomes: %v", seen)
}

func TestInvalidRequestsSendNothing(t *testing.T) {
	c := newClient(t, shared.URL)
	ctx := ctxT(t, 5*time.Second)
	for _, req := range []*muxgate.ChatRequest{
		{Message: "x", RequestID: "has space"},
		{Message: "x", UserID: "bad/user"},
		{Message: "x", Messages: []muxgate.ChatMessage{{Role: "user", Content: "y"}}},
		{Messages: []muxgate.ChatMessage{{Role: "robot", Content: "y"}}},
		{Message: "x", Timeout: 2 * time.Hour},
		{Message: "x", Metadata: map[string]any{"f": func() {}}},
	} {
		if _, err := c.Chat(ctx, req); !errors.Is(err, muxgate.ErrInvalidRequest) {
			t.Fatalf("%+v: %v", req, err)
		}
	}
	if _, err := c.CancelRequest(ctx, "", ""); !errors.Is(err, muxgate.ErrInvalidRequest) {
		t.Fatal(err)
	}
	bad := muxgate.NewClient(muxgate.WithURL("ftp://x"))
	defer bad.Close()
	if _, err := bad.Chat(ctx, &muxgate.ChatRequest{Message: "x"}); !errors.Is(err, muxgate.ErrInvalidRequest) {
		t.Fatal(err)
	}
}

func TestDuplicateRequestID(t *testing.T) {
	c := newClient(t, shared.URL)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	id := rid("dup")
	task := c.ChatAsync(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow})
	waitStatus(t, c, id, "", "active")
	if _, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "again", RequestID: id}); !errors.Is(err, muxgate.ErrDuplicateRequestID) {
		t.Fatalf("local duplicate: %v", err)
	}
	// Another connection of the same user: the gateway refuses it (SPEC.md §5.6).
	other := newClient(t, shared.URL)
	_, err := other.Chat(ctx, &muxgate.ChatRequest{Message: "again", RequestID: id})
	var pe *muxgate.ProtocolError
	if !errors.As(err, &pe) || pe.Code != "duplicate_request_id" || pe.RequestID != id {
		t.Fatalf("gateway duplicate: %v", err)
	}
	cancel()
	_, _ = task.Wait()
}

func TestURLForms(t *testing.T) {
	u := strings.TrimSuffix(shared.URL, "/v1/ws")
	for _, form := range []string{u, u + "/", shared.URL, shared.HTTP} {
		c := newClient(t, form)
		if c.URL() != shared.URL || c.HTTPURL() != shared.HTTP {
			t.Fatalf("%s: %s %s", form, c.URL(), c.HTTPURL())
		}
		if _, err := c.Chat(ctxT(t, 5*time.Second), &muxgate.ChatRequest{Message: "x", Metadata: fast}); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("MUXGATE_URL", shared.HTTP)
	c := newClient(t, "")
	if c.URL() != shared.URL {
		t.Fatalf("MUXGATE_URL: %s", c.URL())
	}
}

func TestCloseEndsRequests(t *testing.T) {
	c := muxgate.NewClient(muxgate.WithURL(shared.URL))
	id := rid("close")
	task := c.ChatAsync(context.Background(), &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow})
	waitStatus(t, c, id, "", "active")
	_ = c.Close()
	_, err := task.Wait()
	if !errors.Is(err, muxgate.ErrConnectionLost) || !errors.Is(err, muxgate.ErrClosed) {
		t.Fatalf("%v", err)
	}
	probe := newClient(t, shared.URL)
	if info := waitStatus(t, probe, id, "", "cancelled"); info.Reason != muxgate.ReasonDisconnect {
		t.Fatalf("reason %q", info.Reason)
	}
	if _, err := c.Chat(context.Background(), &muxgate.ChatRequest{Message: "x"}); !errors.Is(err, muxgate.ErrClosed) {
		t.Fatal(err)
	}
}
