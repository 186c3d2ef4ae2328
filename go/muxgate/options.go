package muxgate

import (
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/muxgate/muxgate/go/protocol"
)

// DefaultURL is the gateway's default address (SPEC.md §2.1).
const DefaultURL = "ws://localhost:8001"

// Codec selects the wire encoding (the WebSocket subprotocol).
type Codec = protocol.Codec

// The two codecs: JSON text frames (muxgate.v1.json, the default) and msgpack binary frames
// (muxgate.v1.msgpack).
const (
	JSON    = protocol.JSON
	Msgpack = protocol.Msgpack
)

// Option configures a Client. Options win over the environment, which wins over defaults:
//
//	option              environment           default
//	WithURL             MUXGATE_URL           ws://localhost:8001
//	WithClientKey       MUXGATE_CLIENT_KEY    none
//	WithToken           MUXGATE_TOKEN         none
//	WithUserID          MUXGATE_USER_ID       none (the anonymous user)
//	WithCodec                                 JSON
type Option func(*settings)

// WithURL sets the gateway: ws://, wss://, http:// or https://host[:port][/prefix]. The
// WebSocket endpoint is /v1/ws under it (a URL already ending in /v1/ws is kept) and the HTTP
// API is on the same host and prefix.
func WithURL(u string) Option { return func(s *settings) { s.url = u } }

// WithClientKey sets the client key of a trusted server (X-Muxi-Client-Key).
func WithClientKey(key string) Option { return func(s *settings) { s.clientKey = &key } }

// WithToken sets a user token (Authorization: Bearer).
func WithToken(token string) Option { return func(s *settings) { s.token = &token } }

// WithUserID sets the default user of every call.
func WithUserID(id string) Option { return func(s *settings) { s.userID = &id } }

// WithCodec selects JSON (default) or Msgpack.
func WithCodec(c Codec) Option { return func(s *settings) { s.codec = c } }

// WithConnectTimeout bounds opening the connection (handshake and welcome, with retries and
// backoff while the gateway is unreachable or restarting); it is also the HTTP timeout.
// Default 10s.
func WithConnectTimeout(d time.Duration) Option { return func(s *settings) { s.connectTimeout = d } }

// WithCancelWait bounds how long a call whose context ended waits for the gateway's
// cancelled response before returning (default 2s). The cancel frame is sent at once either way.
func WithCancelWait(d time.Duration) Option { return func(s *settings) { s.cancelWait = d } }

// WithStreamBuffer bounds the text (in bytes) a stream may hold for a consumer that has not
// read it yet (default 4 MiB). Beyond it the request is cancelled and the stream ends with
// ErrSlowConsumer, so that one slow consumer never blocks the connection's other streams.
func WithStreamBuffer(n int) Option { return func(s *settings) { s.streamBuffer = n } }

// WithAutoResume turns the automatic resume of resumable requests on (the default) or off.
// On: when the connection drops (not closed by Close, nor by a gateway shutdown, 1001, nor
// refusing the credentials, 4001), the client reconnects by itself and resumes every
// unfinished request that asked for it (ChatRequest.Resumable) from the last chunk it
// received (SPEC.md §5.8); the Chat call, the ChatStream loop or the Stream go on with no gap,
// no repeat and one end. Off: such a request ends with a *ConnectionLostError like any other,
// and the gateway keeps it for its grace period, for Client.Resume (by hand, or from another
// process). It is on by default because asking for Resumable is already the opt-in, per
// request: a caller who asked for it wants the request to survive a drop.
func WithAutoResume(on bool) Option { return func(s *settings) { s.autoResume = on } }

// WithResumeTimeout bounds the automatic resume: the client stops reconnecting this long after
// the first drop since its connection was last stable (it lived at least a second), and the
// requests still waiting end with a *ResumeFailedError (default 30s). A request whose grace
// period ends first is answered not_found once the client is back (ErrResumeNotFound). Calls
// made while the client reconnects wait for the same dial (within their contexts).
func WithResumeTimeout(d time.Duration) Option { return func(s *settings) { s.resumeTimeout = d } }

// WithHTTPClient sets the client of the HTTP API calls (CancelRequest over DELETE, GetRequest).
func WithHTTPClient(c *http.Client) Option { return func(s *settings) { s.httpClient = c } }

type settings struct {
	url            string
	clientKey      *string
	token          *string
	userID         *string
	codec          Codec
	connectTimeout time.Duration
	cancelWait     time.Duration
	streamBuffer   int
	httpClient     *http.Client
	autoResume     bool
	resumeTimeout  time.Duration

	wsURL, httpURL string
	user           string // resolved default user ("" = none)
	key, tok       string
}

func resolve(opts []Option) (settings, error) {
	s := settings{codec: JSON, connectTimeout: 10 * time.Second, cancelWait: 2 * time.Second, streamBuffer: 4 << 20,
		autoResume: true, resumeTimeout: 30 * time.Second}
	for _, o := range opts {
		o(&s)
	}
	env := func(p *string, name string) string {
		if p != nil {
			return *p
		}
		return os.Getenv(name)
	}
	if s.url == "" {
		s.url = os.Getenv("MUXGATE_URL")
	}
	if s.url == "" {
		s.url = DefaultURL
	}
	s.key = env(s.clientKey, "MUXGATE_CLIENT_KEY")
	s.tok = env(s.token, "MUXGATE_TOKEN")
	s.user = env(s.userID, "MUXGATE_USER_ID")
	var err error
	if s.wsURL, s.httpURL, err = gatewayURLs(s.url); err != nil {
		return s, err
	}
	if s.key != "" && s.tok != "" {
		// SPEC.md §4.4 (3): presenting both is refused as unauthorized; say so up front.
		return s, invalidf("give a client key or a token, not both")
	}
	if s.user != "" && !protocol.ValidUserID(s.user) {
		return s, invalidf("user id must be 1-128 characters of [A-Za-z0-9._:@-]: %q", s.user)
	}
	if s.connectTimeout <= 0 || s.cancelWait < 0 || s.streamBuffer <= 0 || s.resumeTimeout <= 0 {
		return s, invalidf("timeouts and buffer sizes must be positive")
	}
	if s.codec != JSON && s.codec != Msgpack {
		return s, invalidf("unknown codec %d", s.codec)
	}
	return s, nil
}

var httpSchemes = map[string]string{"ws": "http", "wss": "https", "http": "http", "https": "https"}

// gatewayURLs returns the WebSocket URL and the HTTP base (no trailing slash) of a gateway URL,
// as gateway/client/_config.py does.
func gatewayURLs(raw string) (string, string, error) {
	u, err := url.Parse(strings.TrimSpace(raw))
	if err != nil {
		return "", "", invalidf("gateway URL: %v", err)
	}
	scheme, ok := httpSchemes[strings.ToLower(u.Scheme)]
	if !ok || u.Host == "" {
		return "", "", invalidf("gateway URL must be ws(s):// or http(s)://host[:port]: %q", raw)
	}
	path := strings.TrimSuffix(strings.TrimRight(u.Path, "/"), protocol.WSPath)
	wsScheme := "ws"
	if scheme == "https" {
		wsScheme = "wss"
	}
	ws := url.URL{Scheme: wsScheme, Host: u.Host, Path: path + protocol.WSPath, RawQuery: u.RawQuery}
	base := url.URL{Scheme: scheme, Host: u.Host, Path: path}
	return ws.String(), base.String(), nil
}

// credentials are the headers of the handshake and of every HTTP call (SPEC.md §4, §8).
func (s *settings) credentials() http.Header {
	h := http.Header{}
	if s.key != "" {
		h.Set("X-Muxi-Client-Key", s.key)
	}
	if s.tok != "" {
		h.Set("Authorization", "Bearer "+s.tok)
	}
	h.Set("User-Agent", "muxgate-go")
	return h
}

func (s *settings) requestURL(id string) string {
	// REQUEST_ID_PATTERN holds only characters that are safe in a path segment.
	return fmt.Sprintf("%s/v1/requests/%s", s.httpURL, id)
}
