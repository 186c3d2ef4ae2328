package muxgate_test

// Automatic resume (SPEC.md §5.8, WithAutoResume) against a real gateway: the client talks to
// it through a TCP proxy in this process that the tests sever (both sides closed, as a network
// failure would), hold (new connections accepted but not forwarded: the client is stuck
// reconnecting until released) or refuse (WebSocket handshakes closed at once; plain HTTP
// still forwarded).

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/muxgate/muxgate/go/muxgate"
)

type tcpProxy struct {
	t        *testing.T
	ln       net.Listener
	target   string
	accepted atomic.Int32
	held     chan struct{} // one token per connection put on hold
	wg       sync.WaitGroup

	mu       sync.Mutex
	conns    map[net.Conn]net.Conn // both sides of every forwarded connection, to the other side
	clients  map[net.Conn]bool     // the client sides among them
	orphans  map[net.Conn]bool     // gateway sides whose client side was cut (half-open)
	holding  bool
	waiting  []net.Conn // held connections
	refuseWS bool
	closed   bool
}

// newProxy forwards a local port to the gateway g; its URL is p.url().
func newProxy(t *testing.T, g *gateway) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(g.HTTP)
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{t: t, ln: ln, target: u.Host, held: make(chan struct{}, 64),
		conns: map[net.Conn]net.Conn{}, clients: map[net.Conn]bool{}, orphans: map[net.Conn]bool{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *tcpProxy) url() string { return "ws://" + p.ln.Addr().String() }

func (p *tcpProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		p.mu.Lock()
		switch {
		case p.closed:
			_ = c.Close()
		case p.holding:
			p.waiting = append(p.waiting, c)
			p.held <- struct{}{}
		default:
			p.forwardLocked(c)
		}
		p.mu.Unlock()
	}
}

// forwardLocked pipes c to the gateway (p.mu held).
func (p *tcpProxy) forwardLocked(c net.Conn) {
	refuseWS := p.refuseWS
	p.conns[c], p.clients[c] = nil, true
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		in := bufio.NewReader(c)
		if refuseWS {
			line, err := in.Peek(len("GET /v1/ws"))
			if err != nil || string(line) == "GET /v1/ws" {
				p.drop(c)
				return
			}
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			p.drop(c)
			return
		}
		p.mu.Lock()
		if _, open := p.conns[c]; open && !p.closed {
			p.conns[c], p.conns[up] = up, c
		} else { // cut meanwhile
			_ = up.Close()
		}
		p.mu.Unlock()
		done := make(chan struct{})
		go func() {
			_, _ = io.Copy(c, up)
			if p.orphaned(up) { // the gateway does not know: it writes on into the void
				_, _ = io.Copy(io.Discard, up)
			}
			p.drop(c, up)
			close(done)
		}()
		_, _ = io.Copy(up, in)
		if p.orphaned(up) {
			p.drop(c)
		} else {
			p.drop(c, up)
		}
		<-done
	}()
}

func (p *tcpProxy) orphaned(up net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.orphans[up]
}

func (p *tcpProxy) drop(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		_ = c.Close()
		delete(p.conns, c)
		delete(p.clients, c)
	}
}

// cut severs every connection going through (the client's and the gateway's side).
func (p *tcpProxy) cut() { p.sever(false) }

// cutClientSide severs the client's side of every connection only: the gateway's side stays
// open and what the gateway sends is read and dropped, so it does not see the drop (a
// half-open connection) until the client's resume moves the request away from it.
func (p *tcpProxy) cutClientSide() { p.sever(true) }

func (p *tcpProxy) sever(halfOpen bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c, other := range p.conns {
		if halfOpen && !p.clients[c] {
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // a reset, as a broken network shows it
		}
		_ = c.Close()
		delete(p.conns, c)
		delete(p.clients, c)
		if halfOpen && other != nil {
			p.orphans[other] = true
		}
	}
}

// hold makes new connections wait (each puts a token in p.held) until release.
func (p *tcpProxy) hold() {
	p.mu.Lock()
	p.holding = true
	p.mu.Unlock()
}

func (p *tcpProxy) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.holding = false
	for _, c := range p.waiting {
		p.forwardLocked(c)
	}
	p.waiting = nil
}

// refuse closes WebSocket handshakes at once (true) or forwards them again (false).
func (p *tcpProxy) refuse(on bool) {
	p.mu.Lock()
	p.refuseWS = on
	p.mu.Unlock()
}

func (p *tcpProxy) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	_ = p.ln.Close()
	p.mu.Lock()
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
	for _, c := range p.waiting {
		_ = c.Close()
	}
	p.waiting = nil
	p.mu.Unlock()
	p.wg.Wait()
}

// awaitHeld waits until the client is stuck reconnecting on a held connection.
func (p *tcpProxy) awaitHeld(t *testing.T) {
	t.Helper()
	select {
	case <-p.held:
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not reconnect")
	}
}

// noLeaks checks, after the test's other cleanups (the clients' Close), that no goroutine
// started during the test is left.
func noLeaks(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// direct is a client of the gateway itself, for GET (the proxy may be holding connections).
func direct(t *testing.T) *muxgate.Client { return newClient(t, shared.URL) }

// Several resumable requests at once (streams with steps, ChatStream loops, a Chat), the
// connection cut at random points several times per stream, every other time on the client's
// side only (the gateway still thinks the old connection runs them: the resume moves them):
// every stream yields each seq once, in order, and ends once, completed, with the text of the
// final content.
func TestAutoResumeRandomCuts(t *testing.T) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) {
			noLeaks(t)
			seed := rand.Uint64()
			t.Logf("seed %d", seed)
			rng := rand.New(rand.NewPCG(seed, 0))
			proxy := newProxy(t, shared)
			client := newClient(t, proxy.url(), muxgate.WithCodec(codec))
			ctx := ctxT(t, 60*time.Second)

			const streams, cutsPerStream, tokens = 5, 2, 240
			meta := map[string]any{"tokens": tokens, "token_delay_ms": 3, "plan_ms": 0, "tool_ms": 0}
			var cuts atomic.Int32
			cutPoints := func() map[int64]bool {
				at := map[int64]bool{}
				for len(at) < cutsPerStream {
					at[1+rng.Int64N(tokens-20)] = true
				}
				return at
			}
			type result struct {
				name, text, content string
				err                 error
			}
			results := make(chan result, streams+1)
			var wg sync.WaitGroup
			// A Chat (no chunks) rides along through the cuts the streams make. A request can
			// be resumed once its epoch arrived (the gateway's first message about it): the
			// streams are sent after the gateway accepted it, and cut only once each stream
			// has its first chunk.
			chatID := rid("chat")
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := client.Chat(ctx, &muxgate.ChatRequest{Message: "a long answer", RequestID: chatID, Metadata: meta, Resumable: true})
				r := result{name: "chat", err: err}
				if err == nil {
					r.text, r.content = resp.Content, resp.Content
					if resp.Status != muxgate.StatusCompleted || len(resp.Content) == 0 {
						r.err = fmt.Errorf("chat: %+v", resp)
					}
				}
				results <- r
			}()
			waitStatus(t, direct(t), chatID, "", "active")
			var started sync.WaitGroup
			started.Add(streams)
			allStarted := make(chan struct{})
			go func() {
				started.Wait()
				close(allStarted)
			}()
			for i := range streams {
				at := cutPoints()
				req := &muxgate.ChatRequest{Message: fmt.Sprintf("story %d", i), RequestID: rid("cut"), Metadata: meta, Resumable: true}
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := result{name: req.RequestID}
					defer func() { results <- r }()
					var once sync.Once
					defer once.Do(started.Done)
					var b strings.Builder
					want := int64(0)
					onChunk := func(ch muxgate.Chunk) error {
						if ch.Seq != want {
							return fmt.Errorf("chunk seq %d, want %d (a gap or a repeat)", ch.Seq, want)
						}
						want++
						b.WriteString(ch.Text)
						once.Do(started.Done)
						if at[ch.Seq] {
							select {
							case <-allStarted:
							case <-ctx.Done():
								return ctx.Err()
							}
							if cuts.Add(1)%2 == 0 {
								proxy.cutClientSide()
							} else {
								proxy.cut()
							}
						}
						return nil
					}
					if i%2 == 0 { // a Stream with steps
						req.Steps = true
						s, err := client.OpenStream(ctx, req)
						if err != nil {
							r.err = err
							return
						}
						defer s.Close()
						for ev, err := range s.Events() {
							if err != nil {
								r.err = err
								break
							}
							if ev.Step == nil {
								if r.err = onChunk(ev.Chunk); r.err != nil {
									return
								}
							}
						}
						if resp := s.Response(); resp != nil {
							r.content = resp.Content
						}
						if r.err == nil && len(s.Steps()) == 0 {
							r.err = errors.New("no steps")
						}
					} else { // a ChatStream loop
						for ch, err := range client.ChatStream(ctx, req) {
							if err != nil {
								r.err = err
								break
							}
							if r.err = onChunk(ch); r.err != nil {
								return
							}
						}
						if r.err == nil { // the same prompt and settings give the same answer
							resp, err := direct(t).Chat(ctx, &muxgate.ChatRequest{Message: req.Message, Metadata: meta})
							if r.err = err; err == nil {
								r.content = resp.Content
							}
						}
					}
					r.text = b.String()
				}()
			}
			wg.Wait()
			close(results)
			for r := range results {
				if r.err != nil {
					t.Errorf("%s: %v", r.name, r.err)
				} else if r.text != r.content || r.text == "" {
					t.Errorf("%s: streamed %q, content %q", r.name, r.text, r.content)
				}
			}
			if n := proxy.accepted.Load(); n < 2 || cuts.Load() == 0 {
				t.Fatalf("%d connections, %d cuts: nothing was resumed", n, cuts.Load())
			}
			t.Logf("%d cuts, %d connections", cuts.Load(), proxy.accepted.Load())
		})
	}
}

// startCut opens a resumable stream through the proxy, reads its first chunk (its text is
// returned), then holds new connections and cuts: the client is stuck reconnecting when it
// returns.
func startCut(t *testing.T, ctx context.Context, proxy *tcpProxy, client *muxgate.Client, req *muxgate.ChatRequest) (*muxgate.Stream, string, func() (muxgate.Event, error, bool)) {
	t.Helper()
	s, err := client.OpenStream(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	next, stop := pullEvents(s)
	t.Cleanup(stop)
	ev, err, ok := next()
	if err != nil || !ok {
		t.Fatalf("first event: %v", err)
	}
	proxy.hold()
	proxy.cut()
	proxy.awaitHeld(t)
	return s, ev.Chunk.Text, next
}

// pullEvents pulls a stream's events one by one.
func pullEvents(s *muxgate.Stream) (func() (muxgate.Event, error, bool), func()) {
	return iter.Pull2(s.Events())
}

// drainRest reads what is left of a stream: the chunks' text and its end.
func drainRest(next func() (muxgate.Event, error, bool)) (string, error) {
	var b strings.Builder
	for {
		ev, err, ok := next()
		if !ok {
			return b.String(), nil
		}
		if err != nil {
			return b.String(), err
		}
		b.WriteString(ev.Chunk.Text)
	}
}

// A cancel asked for while the client is reconnecting is not lost: it goes out right after
// the resume, in-band (reason client), whether it came from the context, Stream.Close or
// CancelRequest.
func TestAutoResumeCancelDuringReconnect(t *testing.T) {
	for _, how := range []string{"context", "Close", "CancelRequest"} {
		t.Run(how, func(t *testing.T) {
			noLeaks(t)
			proxy := newProxy(t, shared)
			client := newClient(t, proxy.url(), muxgate.WithCancelWait(20*time.Second))
			ctx, cancel := context.WithCancel(ctxT(t, 30*time.Second))
			defer cancel()
			id := rid("cancel-" + how)
			s, _, next := startCut(t, ctx, proxy, client, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow, Resumable: true})
			switch how {
			case "context":
				cancel()
			case "Close":
				_ = s.Close()
			case "CancelRequest":
				// It waits for the resume (the call gives up on its own context meanwhile):
				// the cancel stays queued for right after the resume.
				cctx, ccancel := context.WithTimeout(ctx, 300*time.Millisecond)
				_, err := client.CancelRequest(cctx, id, "")
				ccancel()
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("CancelRequest while reconnecting: %v; want it to wait for the resume", err)
				}
			}
			if info, err := direct(t).GetRequest(ctxT(t, 10*time.Second), id, ""); err != nil || info.Status != "active" {
				t.Fatalf("%+v, %v: the request must still run while the client reconnects", info, err)
			}
			proxy.release()
			_, err := drainRest(next)
			var ce *muxgate.CancelledError
			if !errors.As(err, &ce) || ce.Response == nil || ce.Response.Status != muxgate.StatusCancelled || ce.Response.Reason != muxgate.ReasonClient {
				t.Fatalf("the stream ended with %v; want the cancelled response (reason client)", err)
			}
			if how == "context" && !errors.Is(err, context.Canceled) {
				t.Fatalf("%v; want it to wrap context.Canceled", err)
			}
			info := waitStatus(t, direct(t), id, "", "cancelled")
			if info.Reason != muxgate.ReasonClient {
				t.Fatalf("cancelled with reason %q, want client (in-band, after the resume)", info.Reason)
			}
			if n := proxy.accepted.Load(); n != 2 {
				t.Fatalf("%d connections, want 2", n)
			}
		})
	}
}

// A request whose grace period ends while the client cannot reconnect is answered not_found
// once it is back: the stream ends with ErrResumeNotFound.
func TestAutoResumeGraceExpired(t *testing.T) {
	noLeaks(t)
	proxy := newProxy(t, shared)
	client := newClient(t, proxy.url())
	ctx := ctxT(t, 30*time.Second)
	id := rid("grace")
	s, _, next := startCut(t, ctx, proxy, client, &muxgate.ChatRequest{Message: "long", RequestID: id, Metadata: slow, Resumable: true, Grace: 300 * time.Millisecond})
	if r, ok := s.Resumption(); !ok || r.Grace != 300*time.Millisecond {
		t.Fatalf("Resumption() = %+v, %v", r, ok)
	}
	info := waitStatus(t, direct(t), id, "", "cancelled") // the grace is over: the gateway cancels it
	if info.Reason != muxgate.ReasonDisconnect {
		t.Fatalf("reason %q, want disconnect", info.Reason)
	}
	proxy.release()
	if _, err := drainRest(next); !errors.Is(err, muxgate.ErrResumeNotFound) {
		t.Fatalf("the stream ended with %v; want ErrResumeNotFound", err)
	}
	// The client goes on on its new connection.
	if _, err := client.Chat(ctx, &muxgate.ChatRequest{Message: "after", Metadata: fast}); err != nil {
		t.Fatal(err)
	}
}

// Only resumable requests are resumed: on the same connection, a request that did not ask
// ends with a *ConnectionLostError as before (the gateway cancelled it, G7).
func TestAutoResumeOnlyResumable(t *testing.T) {
	noLeaks(t)
	proxy := newProxy(t, shared)
	client := newClient(t, proxy.url())
	ctx := ctxT(t, 30*time.Second)
	meta := map[string]any{"tokens": 300, "token_delay_ms": 3, "plan_ms": 0, "tool_ms": 0}
	plainID := rid("plain")
	plain, err := client.OpenStream(ctx, &muxgate.ChatRequest{Message: "plain", RequestID: plainID, Metadata: slow})
	if err != nil {
		t.Fatal(err)
	}
	nextPlain, stop := pullEvents(plain)
	defer stop()
	if _, err, _ := nextPlain(); err != nil {
		t.Fatal(err)
	}
	kept, err := client.OpenStream(ctx, &muxgate.ChatRequest{Message: "kept", Metadata: meta, Resumable: true})
	if err != nil {
		t.Fatal(err)
	}
	nextKept, stopKept := pullEvents(kept)
	defer stopKept()
	ev, err, _ := nextKept()
	if err != nil {
		t.Fatal(err)
	}
	proxy.cut()
	_, err = drainRest(nextPlain)
	var lost *muxgate.ConnectionLostError
	if !errors.As(err, &lost) || errors.Is(err, muxgate.ErrResumeFailed) {
		t.Fatalf("the plain stream ended with %v; want a *ConnectionLostError", err)
	}
	rest, err := drainRest(nextKept)
	if err != nil {
		t.Fatalf("the resumable stream ended with %v", err)
	}
	if resp := kept.Response(); resp == nil || ev.Chunk.Text+rest != resp.Content {
		t.Fatalf("streamed %q, response %+v", ev.Chunk.Text+rest, resp)
	}
	waitStatus(t, direct(t), plainID, "", "cancelled")
}

// When the client cannot reconnect within WithResumeTimeout, the requests end with a
// *ResumeFailedError (a *ConnectionLostError too), and a cancel asked for meanwhile goes over
// HTTP DELETE (reason api) instead of being lost.
func TestAutoResumeGivesUp(t *testing.T) {
	noLeaks(t)
	proxy := newProxy(t, shared)
	client := newClient(t, proxy.url(), muxgate.WithResumeTimeout(700*time.Millisecond))
	ctx := ctxT(t, 30*time.Second)
	stoppedID, waitingID := rid("stopped"), rid("waiting")
	stopped, _, nextStopped := startCut(t, ctx, proxy, client, &muxgate.ChatRequest{Message: "a", RequestID: stoppedID, Metadata: slow, Resumable: true})
	_ = stopped.Close() // queued for after the resume, which never comes
	proxy.refuse(true)
	proxy.release() // the held handshake is refused too
	_, err := drainRest(nextStopped)
	var lost *muxgate.ConnectionLostError
	var failed *muxgate.ResumeFailedError
	if !errors.Is(err, muxgate.ErrResumeFailed) || !errors.Is(err, muxgate.ErrConnectionLost) ||
		!errors.As(err, &lost) || !errors.As(err, &failed) || failed.RequestID != stoppedID {
		t.Fatalf("the stream ended with %v; want a *ResumeFailedError", err)
	}
	t.Logf("%v", err)
	info := waitStatus(t, direct(t), stoppedID, "", "cancelled")
	if info.Reason != muxgate.ReasonAPI {
		t.Fatalf("reason %q, want api (the Stop went over HTTP)", info.Reason)
	}
	// Another resumable request on the next connection, then no reconnection at all: a Chat
	// ends with the error too.
	proxy.refuse(false)
	task := client.ChatAsync(ctx, &muxgate.ChatRequest{Message: "b", RequestID: waitingID, Metadata: slow, Resumable: true})
	waitStatus(t, direct(t), waitingID, "", "active")
	proxy.refuse(true)
	proxy.cut()
	if _, err := task.Wait(); !errors.Is(err, muxgate.ErrResumeFailed) {
		t.Fatalf("Chat: %v; want ErrResumeFailed", err)
	}
	if info := waitStatus(t, direct(t), waitingID, "", "active", "cancelled"); info.Status != "active" {
		t.Fatalf("%+v: nobody cancelled it; the gateway keeps it for its grace period", info)
	}
	if _, err := direct(t).CancelRequest(ctx, waitingID, ""); err != nil {
		t.Fatal(err)
	}
}

// WithAutoResume(false): a resumable stream ends with a *ConnectionLostError when its
// connection drops, and Client.Resume continues it by hand.
func TestAutoResumeOff(t *testing.T) {
	noLeaks(t)
	proxy := newProxy(t, shared)
	client := newClient(t, proxy.url(), muxgate.WithAutoResume(false))
	ctx := ctxT(t, 30*time.Second)
	meta := map[string]any{"tokens": 300, "token_delay_ms": 3, "plan_ms": 0, "tool_ms": 0}
	s, err := client.OpenStream(ctx, &muxgate.ChatRequest{Message: "off", Metadata: meta, Resumable: true})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	var end error
	for ev, err := range s.Events() {
		if err != nil {
			end = err
			break
		}
		b.WriteString(ev.Chunk.Text)
		if ev.Chunk.Seq == 3 {
			proxy.cut()
		}
	}
	if !errors.Is(end, muxgate.ErrConnectionLost) || errors.Is(end, muxgate.ErrResumeFailed) {
		t.Fatalf("the stream ended with %v; want a *ConnectionLostError", end)
	}
	req, ok := s.ResumeRequest()
	if !ok {
		t.Fatal("no ResumeRequest")
	}
	if n := proxy.accepted.Load(); n != 1 {
		t.Fatalf("%d connections: the client reconnected by itself", n)
	}
	r, err := client.Resume(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	rest, _, err := drain(r)
	if err != nil || r.Response() == nil || b.String()+rest != r.Response().Content {
		t.Fatalf("%q + %q, %v, %+v", b.String(), rest, err, r.Response())
	}
}

// Resumed elsewhere while the client reconnects: the client's own resume moves the request
// back to it, and the other connection's stream ends with ErrMoved; the client's stream goes
// on with no gap and no repeat.
func TestAutoResumeMovesBack(t *testing.T) {
	noLeaks(t)
	proxy := newProxy(t, shared)
	client := newClient(t, proxy.url())
	ctx := ctxT(t, 30*time.Second)
	meta := map[string]any{"tokens": 400, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}
	id := rid("moved")
	s, first, next := startCut(t, ctx, proxy, client, &muxgate.ChatRequest{Message: "m", RequestID: id, Metadata: meta, Resumable: true})
	r, _ := s.Resumption()
	other, err := direct(t).Resume(ctx, &muxgate.ResumeRequest{RequestID: id, Epoch: r.Epoch})
	if err != nil {
		t.Fatal(err)
	}
	nextOther, stop := pullEvents(other)
	defer stop()
	if _, err, _ := nextOther(); err != nil {
		t.Fatal(err)
	}
	proxy.release()
	if _, err := drainRest(nextOther); !errors.Is(err, muxgate.ErrMoved) {
		t.Fatalf("the other stream ended with %v; want ErrMoved", err)
	}
	rest, err := drainRest(next)
	if err != nil {
		t.Fatal(err)
	}
	if resp := s.Response(); resp == nil || first+rest != resp.Content {
		t.Fatalf("streamed %q + %q, response %+v", first, rest, resp)
	}
}

// What the consumer has not read when the connection drops is yielded first, then the rest
// from the resume; the steps seen before the drop stay on the handle. The answer's first half
// arrives at once, then the tool call pauses it: the client holds unread chunks when cut.
func TestAutoResumeKeepsUnread(t *testing.T) {
	noLeaks(t)
	proxy := newProxy(t, shared)
	client := newClient(t, proxy.url())
	ctx := ctxT(t, 30*time.Second)
	meta := map[string]any{"tokens": 60, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 1500}
	s, err := client.OpenStream(ctx, &muxgate.ChatRequest{Message: "unread", Metadata: meta, Resumable: true, Steps: true})
	if err != nil {
		t.Fatal(err)
	}
	next, stop := pullEvents(s)
	defer stop()
	var b strings.Builder
	for b.Len() == 0 { // up to the first chunk
		ev, err, ok := next()
		if err != nil || !ok {
			t.Fatalf("%v, %v", err, ok)
		}
		b.WriteString(ev.Chunk.Text)
	}
	// The connection's reader runs ahead of the consumer; no event says how far: poll the
	// handle until the tool call started (after every chunk of the first half, in wire order).
	for {
		if step, ok := s.CurrentStep(); ok && step.Kind == muxgate.StepKindTool {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the tool call did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	req, _ := s.ResumeRequest()
	if req.FromSeq < 2 {
		t.Fatalf("%d chunks received, want more than the one read", req.FromSeq)
	}
	before := len(s.Steps())
	proxy.hold()
	proxy.cut()
	proxy.awaitHeld(t)
	proxy.release()
	// Read nothing until the new connection brought a chunk (so the unread ones had to move
	// over to it); polled, as above.
	for {
		if now, _ := s.ResumeRequest(); now.FromSeq > req.FromSeq {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("nothing came after the resume")
		}
		time.Sleep(5 * time.Millisecond)
	}
	rest, err := drainRest(next)
	if err != nil {
		t.Fatal(err)
	}
	if resp := s.Response(); resp == nil || b.String()+rest != resp.Content {
		t.Fatalf("streamed %q + %q, response %+v", b.String(), rest, resp)
	}
	steps := s.Steps()
	if len(steps) <= before || steps[0].Kind != muxgate.StepKindPlan {
		t.Fatalf("steps %+v (had %d before the drop)", steps, before)
	}
	if n := proxy.accepted.Load(); n != 2 {
		t.Fatalf("%d connections, want 2", n)
	}
}
