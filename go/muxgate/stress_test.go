package muxgate_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/muxgate/muxgate/go/muxgate"
)

// 200 goroutines share one client (and its one WebSocket) with random cancels of every kind.
// Every request gets exactly one terminal result, no chunk reaches a consumer after it, and
// the SDK's protocol checks (a chunk after the response, a seq gap, content differing from the
// chunks, an unannounced usage: G1-G3) never fire.
func TestConcurrent200SharedClient(t *testing.T) {
	c := newClient(t, shared.URL, muxgate.WithCodec(muxgate.Msgpack))
	other := newClient(t, shared.URL) // cancels from elsewhere go over HTTP
	ctx := ctxT(t, 60*time.Second)
	const n = 200
	type result struct {
		id        string
		terminals int
		chunks    int
		err       error
		resp      *muxgate.Response
		late      bool // a chunk after the terminal result
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 42))
			r := &results[i]
			r.id = fmt.Sprintf("%s-%03d", rid("many"), i)
			meta := map[string]any{"tokens": 5 + rng.IntN(60), "token_delay_ms": 1 + rng.IntN(3), "plan_ms": 0, "tool_ms": rng.IntN(20)}
			req := &muxgate.ChatRequest{Message: fmt.Sprintf("question %d", i), RequestID: r.id, Metadata: meta}
			after := time.Duration(rng.IntN(150)) * time.Millisecond
			switch kind := i % 5; kind {
			case 0, 3: // Chat or ChatAsync cancelled by a random deadline
				cctx, cancel := context.WithTimeout(ctx, after)
				defer cancel()
				if kind == 0 {
					r.resp, r.err = c.Chat(cctx, req)
				} else {
					r.resp, r.err = c.ChatAsync(cctx, req).Wait()
				}
				r.terminals++
			case 1, 2, 4: // a stream: cancelled by context, left early, or cancelled by id
				cctx, cancel := context.WithCancel(ctx)
				defer cancel()
				stopAt := 1 + rng.IntN(30)
				if kind == 1 {
					timer := time.AfterFunc(after, cancel)
					defer timer.Stop()
				}
				for chunk, err := range c.ChatStream(cctx, req) {
					if r.terminals > 0 {
						r.late = true
					}
					if err != nil {
						r.err = err
						r.terminals++
						continue
					}
					_ = chunk
					r.chunks++
					if kind == 2 && r.chunks == stopAt {
						r.terminals++ // leaving the loop is this consumer's end
						break
					}
					if kind == 4 && r.chunks == stopAt {
						go func() { _, _ = other.CancelRequest(ctx, r.id, "") }()
					}
				}
				if r.err == nil && (kind != 2 || r.chunks < stopAt) {
					r.terminals++ // completed: the loop ended on its own
				}
			}
		}()
	}
	wg.Wait()
	counts := map[string]int{}
	for _, r := range results {
		if r.terminals != 1 || r.late {
			t.Fatalf("%s: %d terminal results, late chunk %v", r.id, r.terminals, r.late)
		}
		var ce *muxgate.CancelledError
		switch {
		case r.err == nil:
			counts["completed or left"]++
		case errors.As(r.err, &ce):
			counts["cancelled"]++
		default:
			t.Fatalf("%s: unexpected error %v", r.id, r.err)
		}
	}
	t.Logf("%v", counts)
	// The gateway ends every one of them (none stays active).
	for _, r := range results {
		var ce *muxgate.CancelledError
		if errors.As(r.err, &ce) && ce.Response == nil {
			// cancelled while waiting for a stream slot: maybe never sent
			waitStatus(t, c, r.id, "", "completed", "cancelled", "not_found")
		} else {
			waitStatus(t, c, r.id, "", "completed", "cancelled")
		}
	}
}

// Beyond welcome.limits.max_streams, calls wait for a free slot instead of being refused.
func TestWaitsForStreamSlots(t *testing.T) {
	g := newGateway(t, []string{"--max-streams", "2"})
	c := newClient(t, g.URL)
	ctx := ctxT(t, 20*time.Second)
	tasks := make([]*muxgate.Task, 8)
	for i := range tasks {
		tasks[i] = c.ChatAsync(ctx, &muxgate.ChatRequest{Message: "q", Metadata: map[string]any{"tokens": 10, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}})
	}
	for _, task := range tasks {
		if resp, err := task.Wait(); err != nil || resp.Status != muxgate.StatusCompleted {
			t.Fatalf("%+v %v", resp, err)
		}
	}
}

// A consumer that stops reading costs only its own stream: its bounded buffer overflows, its
// request is cancelled, and the other streams of the connection go on.
func TestSlowConsumerDoesNotBlockOthers(t *testing.T) {
	c := newClient(t, shared.URL, muxgate.WithStreamBuffer(512))
	ctx := ctxT(t, 20*time.Second)
	id := rid("slowpoke")
	next, stop := iterPull(c.ChatStream(ctx, &muxgate.ChatRequest{Message: "fast and long", RequestID: id,
		Metadata: map[string]any{"tokens": 5000, "token_delay_ms": 1, "plan_ms": 0, "tool_ms": 0}}))
	defer stop()
	if _, err, ok := next(); !ok || err != nil {
		t.Fatalf("first chunk: %v", err)
	}
	// While that consumer sleeps, another stream on the same connection runs to completion.
	n := 0
	for _, err := range c.ChatStream(ctx, &muxgate.ChatRequest{Message: "other", Metadata: map[string]any{"tokens": 200, "token_delay_ms": 1, "plan_ms": 0, "tool_ms": 0}}) {
		if err != nil {
			t.Fatal(err)
		}
		n++
	}
	if info := waitStatus(t, c, id, "", "cancelled"); info.Reason != muxgate.ReasonClient {
		t.Fatalf("reason %q", info.Reason)
	}
	for {
		_, err, ok := next()
		if !ok {
			t.Fatal("stream ended without an error")
		}
		if err != nil {
			if !errors.Is(err, muxgate.ErrSlowConsumer) || !errors.Is(err, muxgate.ErrCancelled) {
				t.Fatalf("%v", err)
			}
			break
		}
	}
}

func TestUnauthorized(t *testing.T) {
	g := newGateway(t, []string{"--client-key", "k1"})
	ctx := ctxT(t, 10*time.Second)
	anon := newClient(t, g.URL)
	_, err := anon.Chat(ctx, &muxgate.ChatRequest{Message: "x"})
	if !errors.Is(err, muxgate.ErrUnauthorized) {
		t.Fatalf("%v", err)
	}
	if _, err := anon.CancelRequest(ctx, "some-id", ""); !errors.Is(err, muxgate.ErrUnauthorized) {
		t.Fatalf("HTTP: %v", err)
	}
	wrong := newClient(t, g.URL, muxgate.WithClientKey("nope"))
	if _, err := wrong.Chat(ctx, &muxgate.ChatRequest{Message: "x"}); !errors.Is(err, muxgate.ErrUnauthorized) {
		t.Fatalf("%v", err)
	}
	t.Setenv("MUXGATE_CLIENT_KEY", "k1")
	ok := newClient(t, g.URL, muxgate.WithUserID("user123"))
	resp, err := ok.Chat(ctx, &muxgate.ChatRequest{Message: "x", Metadata: fast})
	if err != nil || resp.Status != muxgate.StatusCompleted {
		t.Fatalf("%+v %v", resp, err)
	}
	if res, err := ok.CancelRequest(ctx, resp.RequestID, ""); err != nil || res != muxgate.ResultAlreadyCompleted {
		t.Fatalf("%v %v", res, err)
	}
}

// The gateway restarts on the same port: requests in flight fail with ErrConnectionLost (the
// gateway cancelled them, G7) and the next call reconnects, retrying with backoff while the
// gateway is still down.
func TestReconnectAfterGatewayRestart(t *testing.T) {
	g := newGateway(t, []string{"--shutdown-grace", "0.2"})
	c := newClient(t, g.URL)
	ctx := ctxT(t, 40*time.Second)
	if _, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "before", Metadata: fast}); err != nil {
		t.Fatal(err)
	}

	// Abrupt: SIGKILL.
	id := rid("killed")
	task := c.ChatAsync(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow})
	waitStatus(t, c, id, "", "active")
	g.stop(syscall.SIGKILL)
	_, err := task.Wait()
	var lost *muxgate.ConnectionLostError
	if !errors.As(err, &lost) || !errors.Is(err, muxgate.ErrConnectionLost) {
		t.Fatalf("in flight at SIGKILL: %v", err)
	}
	// A call made while the gateway is down waits, retrying, until it is back.
	got := make(chan error, 1)
	go func() {
		_, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "during", Metadata: fast})
		got <- err
	}()
	if err := g.restart(); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatalf("call across the restart: %v\n%s", err, g.log())
	}

	// Graceful: SIGTERM drains; a request outliving the grace is cancelled with reason shutdown
	// and the connection closes with 1001.
	id = rid("drained")
	task = c.ChatAsync(ctx, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow})
	waitStatus(t, c, id, "", "active")
	g.stop(syscall.SIGTERM)
	resp, err := task.Wait()
	switch {
	case err == nil && resp.Status == muxgate.StatusCancelled && resp.Reason == muxgate.ReasonShutdown:
	case errors.As(err, &lost) && lost.GoingAway():
	default:
		t.Fatalf("in flight at SIGTERM: %+v %v", resp, err)
	}
	if err := g.restart(); err != nil {
		t.Fatal(err)
	}
	if resp, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "after", Metadata: fast}); err != nil || resp.Status != muxgate.StatusCompleted {
		t.Fatalf("after restart: %+v %v", resp, err)
	}
}
