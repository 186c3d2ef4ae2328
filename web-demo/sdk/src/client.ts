/**
 * `Muxi`: a client of a muxgate gateway. One WebSocket per client, any number of concurrent
 * requests multiplexed over it by `request_id` (mirrors the Python `AsyncClient`).
 *
 * Cancellation is native: aborting a call's `AbortSignal`, leaving a `for await` over a stream
 * (`break`, `return`, an exception) or `stream.cancel()` queues the protocol's `cancel` frame at
 * once, so the gateway stops writing that request's chunks and halts its pipeline at the next
 * checkpoint (SPEC.md §5.3), while the connection stays open for the other requests.
 * `cancelRequest(id)` cancels by id: in-band when the request runs on this client's connection,
 * else over HTTP (`DELETE /v1/requests/{id}`), so any process with the credentials can cancel.
 *
 * The connection opens on the first call and reopens on the next call after it dropped, with
 * exponential backoff between failed attempts (and before reconnecting after close codes that
 * ask for it: 1013, 4008, 4029).
 *
 * Resumable requests (SPEC.md §5.8): a chat with `resumable: true` (or every chat, with the
 * client option `resumable: true`) outlives a dropped connection for its grace period, and the
 * client resumes it by itself. When the WebSocket drops — any close the client did not ask
 * for, an abnormal 1006 included, except 4001 (bad credentials) and 1001 (gateway shutdown) —
 * the client reconnects at once, then with exponential backoff and jitter (see
 * {@link ReconnectOptions}), and sends `resume` for every unfinished resumable request (those
 * whose epoch arrived) with the seq of the last chunk it received. The caller's `for await`
 * loop or `chat()` promise just goes on: the chunks join without a gap or a repeat, and one
 * response ends it. A cancel asked for meanwhile (`stream.cancel()`, an aborted signal,
 * leaving the loop, `cancelRequest`) is sent right after the resume. The client gives up
 * after `reconnect.resumeTimeoutMs` (30 s) without a connection (at once after a 4001 or a
 * protocol violation): the requests fail with {@link ResumeFailed}, and their pending cancels
 * go over HTTP. A request the gateway no longer has (its grace ended, a restart) ends with
 * `ResumeNotFound`; one resumed by another client (`moved`) with `RequestMoved`. Requests that
 * are not resumable fail with `ConnectionLost` as before. `autoResume: false` turns the
 * automatic resume off: then a dropped connection fails resumable streams too, and the
 * application resumes with `resumeStream` (what the stream's `epoch`, `graceMs` and `lastSeq`
 * are for, e.g. after a page reload).
 */

import type { CodecName } from "./codec.js";
import {
  type Connection,
  type ConnectionSettings,
  type Deferred,
  type Exchange,
  type ExchangeObserver,
  type WebSocketConstructor,
  Connection as Conn,
  deferred,
  toUsage,
} from "./connection.js";
import {
  ConnectError,
  ConnectionLost,
  InvalidRequest,
  MuxgateError,
  ProtocolError,
  ResumeFailed,
  TransportError,
  Unauthorized,
  errorFromCode,
} from "./errors.js";
import { MAX_GRACE_MS, MAX_TIMEOUT_MS, REQUEST_ID_PATTERN, USER_ID_PATTERN } from "./limits.js";
import type {
  CancelOptions, ChatParams, Chunk, Halt, RequestInfo, Response, ResumeParams, Step, Usage,
} from "./types.js";
import {
  type CancelStatus, type ChatMessage, type Message, type ResumeMessage, USAGE_FIGURES, checkOutgoing,
} from "./wire.js";

/**
 * Reconnecting. The pause after the n-th failed attempt (n = 0, 1, ...) is
 * `min(maxDelayMs, initialDelayMs * 2 ** n)` times a random factor in [0.5, 1) ("equal
 * jitter", so that clients that lost the same gateway spread out): 50-100 ms, 100-200 ms,
 * 200-400 ms, ... up to 2.5-5 s with the defaults ({@link reconnectDelay}).
 *
 * A call that needs the connection makes up to `attempts` attempts. Resuming after a drop
 * (SPEC.md §5.8) is bounded by time instead: the first attempt goes at once, the next ones
 * after the pauses above, and none starts later than `resumeTimeoutMs` after the drop; then the
 * requests waiting to be resumed fail with `ResumeFailed`. A connection that drops less than a
 * second after it opened (or closes with 1013, 4008 or 4029: the gateway asks for a pause) does
 * not earn an immediate retry: the next reconnection starts one backoff step further; and when
 * that connection had been opened to resume, the time limit still counts from the earlier
 * drop, so a flapping link can neither spin nor retry forever.
 */
export interface ReconnectOptions {
  /** Connection attempts per call before giving up with `ConnectError` (default 6). */
  attempts?: number;
  /** First backoff delay (default 100 ms); doubles per failed attempt, with jitter. */
  initialDelayMs?: number;
  /** Largest backoff delay (default 5000 ms). */
  maxDelayMs?: number;
  /** How long to keep reconnecting after a drop to resume the resumable requests, in ms
   * (default 30000; 0: a single attempt). */
  resumeTimeoutMs?: number;
}

/** The defaults of {@link ReconnectOptions}. */
export const RECONNECT_DEFAULTS = {
  attempts: 6,
  initialDelayMs: 100,
  maxDelayMs: 5000,
  resumeTimeoutMs: 30_000,
  /** A connection that lived less than this was not stable (see {@link ReconnectOptions}). */
  stableAfterMs: 1000,
} as const;

/**
 * The pause after the `failed`-th failed connection attempt (0-based): `min(maxDelayMs,
 * initialDelayMs * 2 ** failed)` times a factor in [0.5, 1) from `random` (default
 * `Math.random`).
 */
export function reconnectDelay(failed: number, options: ReconnectOptions = {}, random: () => number = Math.random): number {
  const initial = options.initialDelayMs ?? RECONNECT_DEFAULTS.initialDelayMs;
  const max = options.maxDelayMs ?? RECONNECT_DEFAULTS.maxDelayMs;
  const base = Math.min(max, initial * 2 ** Math.max(0, failed));
  return base / 2 + random() * (base / 2);
}

export interface MuxiOptions {
  /** `ws(s)://` or `http(s)://` URL of the gateway; without a path the WebSocket is `/v1/ws`.
   * Default: in a browser the page's own origin, in Node `MUXGATE_URL` or `ws://localhost:8001`. */
  url?: string;
  /** A client key (trusted servers only, never browsers; Node default `MUXGATE_CLIENT_KEY`). */
  clientKey?: string;
  /** A user token (HS256 JWT, for browsers; Node default `MUXGATE_TOKEN`). */
  token?: string;
  /** The default user of every call (Node default `MUXGATE_USER_ID`; none: the anonymous user). */
  userId?: string;
  /** `"json"` (default) or `"msgpack"`. */
  codec?: CodecName;
  /** A WebSocket implementation; default `globalThis.WebSocket`, else the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /** `fetch` for the HTTP API; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  connectTimeoutMs?: number;
  reconnect?: ReconnectOptions;
  /** The default of every chat's {@link ChatParams.resumable} (default false). */
  resumable?: boolean;
  /**
   * Resume the resumable requests by itself when the connection drops (default true; see the
   * module comment and {@link ReconnectOptions}). `false`: a drop fails them with
   * `ConnectionLost` like any request, and the application may call `resumeStream`.
   */
  autoResume?: boolean;
  /** Unread characters a stream may buffer before it is cancelled with `SlowConsumer`
   * (default 8 Mi): memory per request stays bounded whatever the consumer does. */
  maxBufferedChars?: number;
  /** Called when the connection opens or closes (e.g. to show it in a UI). */
  onConnectionChange?: (state: ConnectionState) => void;
}

export interface ConnectionState {
  connected: boolean;
  connectionId?: string;
  /** Why it closed (when `connected` is false after a connection). */
  error?: MuxgateError;
  /** How many resumable requests wait for the client to reconnect and resume them (only when
   * `connected` is false: the client is reconnecting by itself). */
  resuming?: number;
}

const DEFAULT_PORT = 8001;
const WS_PATH = "/v1/ws";
const RETRY_AFTER_CLOSE = new Set([1013, 4008, 4029]);

function env(name: string): string | undefined {
  const proc = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  const value = proc?.env?.[name];
  return value === "" ? undefined : value;
}

function defaultUrl(): string {
  const loc = (globalThis as { location?: { protocol: string; host: string } }).location;
  if (loc !== undefined && (loc.protocol === "http:" || loc.protocol === "https:")) {
    return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}${WS_PATH}`;
  }
  return env("MUXGATE_URL") ?? `ws://localhost:${DEFAULT_PORT}`;
}

/** (WebSocket URL, HTTP base URL without trailing slash) for a gateway URL. */
export function gatewayUrls(url: string): { wsUrl: string; httpUrl: string } {
  let parsed: URL;
  try {
    parsed = new URL(url.trim());
  } catch {
    throw new InvalidRequest(`gateway URL must be ws(s):// or http(s)://host[:port]: ${JSON.stringify(url)}`);
  }
  const scheme = parsed.protocol.replace(/:$/, "");
  const secure = scheme === "wss" || scheme === "https";
  if (!["ws", "wss", "http", "https"].includes(scheme) || !parsed.host) {
    throw new InvalidRequest(`gateway URL must be ws(s):// or http(s)://host[:port]: ${JSON.stringify(url)}`);
  }
  let path = parsed.pathname.replace(/\/+$/, "");
  if (path.endsWith(WS_PATH)) path = path.slice(0, -WS_PATH.length);
  return {
    wsUrl: `${secure ? "wss" : "ws"}://${parsed.host}${path}${WS_PATH}${parsed.search}`,
    httpUrl: `${secure ? "https" : "http"}://${parsed.host}${path}`,
  };
}

function checkRequestId(requestId: unknown): asserts requestId is string {
  if (typeof requestId !== "string" || !REQUEST_ID_PATTERN.test(requestId)) {
    throw new InvalidRequest(`requestId must be 1-128 characters of [A-Za-z0-9._:-]: ${JSON.stringify(requestId)}`, "invalid_field");
  }
}

function checkUserId(userId: unknown): void {
  if (userId !== undefined && (typeof userId !== "string" || !USER_ID_PATTERN.test(userId))) {
    throw new InvalidRequest(`userId must be 1-128 characters of [A-Za-z0-9._:@-]: ${JSON.stringify(userId)}`, "invalid_field");
  }
}

/** `message` in canonical form; our own bad input is {@link InvalidRequest}. */
function checked<M extends Message>(message: M): M {
  try {
    return checkOutgoing(message);
  } catch (exc) {
    if (exc instanceof ProtocolError) throw new InvalidRequest(exc.message, exc.code);
    throw exc;
  }
}

function newRequestId(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (c?.randomUUID) return `req_${c.randomUUID().replaceAll("-", "")}`;
  return `req_${Date.now().toString(36)}${Math.random().toString(36).slice(2)}`;
}

function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException("This operation was aborted", "AbortError");
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

async function loadWebSocket(): Promise<WebSocketConstructor> {
  const native = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (native !== undefined) return native;
  // Node without a global WebSocket (Node 20): the `ws` package. The specifier is a variable
  // so that bundlers never pull `ws` into a browser build.
  const name = "ws";
  try {
    const mod = (await import(/* @vite-ignore */ name)) as { default?: WebSocketConstructor; WebSocket?: WebSocketConstructor };
    return (mod.WebSocket ?? mod.default)!;
  } catch {
    throw new ConnectError("no WebSocket implementation: install the `ws` package or pass options.WebSocket");
  }
}

/**
 * The streamed chunks of one chat, as an async iterator (see {@link Muxi.chatStream}), or of
 * a resumed request (see {@link Muxi.resumeStream}).
 *
 * A resumable stream (SPEC.md §5.8) goes on across dropped connections: the client resumes it
 * by itself (see {@link Muxi}), and the loop just sees the next chunk; `resumes` counts the
 * resumes. A stream whose request was resumed on another connection (`moved`) yields the
 * chunks received before that, then its iteration throws {@link RequestMoved}: the request
 * goes on elsewhere, and `response` stays undefined here. A resume that finds nothing
 * (`resume_result` `not_found`) throws {@link ResumeNotFound}; one the client gave up
 * reconnecting for, {@link ResumeFailed}.
 */
export class ChatStream implements AsyncIterableIterator<Chunk> {
  /** The final response once iteration has ended (completed or cancelled). */
  response: Response | undefined;
  private readonly observer: ExchangeObserver;
  /** The request as the connection sees it, from the moment its chat is on the wire. */
  private view: Exchange | undefined;
  private exchange: Exchange | undefined;
  private starting: Promise<void> | undefined;
  private closed = false;
  private aborted: { reason: unknown } | undefined;
  private readonly onAbort = () => this.abort();

  /** @internal `start`: the `chat` to send, or the `resume` (of a chat with `stream`). */
  constructor(
    private readonly client: Muxi,
    private readonly start: ChatMessage | ResumeMessage,
    private readonly signal: AbortSignal | undefined,
    observer: ExchangeObserver = {},
    private readonly streamed = true,
  ) {
    this.observer = { ...observer, onCreated: (exchange) => (this.view = exchange) };
    if (signal?.aborted) this.aborted = { reason: abortReason(signal) };
    signal?.addEventListener("abort", this.onAbort, { once: true });
  }

  get requestId(): string {
    return this.start.request_id;
  }

  /** Everything streamed so far (including text received after a cancel was sent), over every
   * connection the request ran on; for a stream of {@link Muxi.resumeStream}, the text since
   * its resume (the chunks after `afterSeq`). */
  get text(): string {
    return this.view?.text ?? "";
  }

  /** The request's epoch, which {@link Muxi.resumeStream} names (SPEC.md §5.8): from its
   * `resumable` message (a chat with `resumable: true`, once the gateway answered; undefined
   * from a gateway older than §5.8), or the epoch this stream resumed. */
  get epoch(): string | undefined {
    return this.view?.epoch ?? (this.start.type === "resume" ? this.start.epoch : undefined);
  }

  /** How long the gateway keeps the request after a dropped connection, waiting for a resume
   * (the `resumable` message's `grace_ms`: the chat's `graceMs` capped, or the gateway's
   * default). Undefined until it arrived, and for a resumed stream (not said again). */
  get graceMs(): number | undefined {
    return this.view?.graceMs;
  }

  /** The seq of the last chunk received (read by the loop or not), the `afterSeq` of a resume;
   * undefined before the first chunk. For a resumed stream, at least its `afterSeq`. */
  get lastSeq(): number | undefined {
    const next = this.view?.nextSeq ?? (this.start.type === "resume" && this.start.after_seq !== undefined ? this.start.after_seq + 1 : 0);
    return next > 0 ? next - 1 : undefined;
  }

  /** How many times the request was resumed (SPEC.md §5.8): by the client after a dropped
   * connection, and, for a stream of {@link Muxi.resumeStream}, its own resume. */
  get resumes(): number {
    return this.view?.resumes ?? 0;
  }

  /** The `step` messages received so far, in order (a chat with `steps: true`, SPEC.md §3.12).
   * Steps that started and ended while the request was detached are not among them (a resume
   * does not replay steps). */
  get steps(): readonly Step[] {
    return this.view?.steps ?? [];
  }

  /** The latest started step not yet ended; `undefined` before the first step and once the
   * pipeline has halted (completed, failed, or the final usage of a cancel arrived). */
  get currentStep(): Step | undefined {
    return this.view?.currentStep;
  }

  /** Where the cancelled request's pipeline halts: the response's `halt` (often `pending`), then
   * the final one from the usage message (`halted`). `undefined` unless cancelled with steps. */
  get halt(): Halt | undefined {
    return this.view?.halt;
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async next(): Promise<IteratorResult<Chunk, undefined>> {
    if (this.aborted) throw this.aborted.reason;
    if (this.closed && this.exchange === undefined) return { done: true, value: undefined };
    if (this.exchange === undefined) {
      this.starting ??= this.client._start(this.start, () => this.aborted !== undefined, this.observer, this.streamed).then(([, exchange]) => {
        this.exchange = exchange;
        if (this.aborted || this.closed) this.client._stop(exchange);
      });
      await this.raceAbort(this.starting);
    }
    const exchange = this.exchange!;
    for (;;) {
      const aborted = this.aborted as { reason: unknown } | undefined; // may change across awaits
      if (aborted) throw aborted.reason;
      const chunk = exchange.chunks.shift();
      if (chunk !== undefined) {
        exchange.bufferedChars -= chunk.text.length;
        exchange.takeSteps(chunk.seq); // the steps before it, in stream order
        return { done: false, value: chunk };
      }
      exchange.takeSteps(); // every chunk read: the steps after them
      if (exchange.done || this.closed) {
        this.finish();
        if (exchange.done) this.response = this.client._outcome(exchange); // throws RequestFailed or the connection's error
        return { done: true, value: undefined };
      }
      await this.raceAbort(exchange.changed());
    }
  }

  /** Leaving `for await` early calls this: cancel the request unless it already has its answer. */
  async return(): Promise<IteratorResult<Chunk, undefined>> {
    this.closed = true;
    this.finish();
    if (this.exchange) this.client._stop(this.exchange);
    return { done: true, value: undefined };
  }

  async throw(error?: unknown): Promise<IteratorResult<Chunk, undefined>> {
    await this.return();
    throw error;
  }

  /** Cancels the request and waits for its final response (`cancelled`, or `completed` if it
   * won the race); `undefined` if the chat was never sent. Throws {@link RequestMoved} if the
   * request moved to another connection first (no cancel is sent then: it runs there). While
   * the client reconnects to resume the request, the cancel goes out right after the resume;
   * if the client gives up, over HTTP, and this throws {@link ResumeFailed}. */
  async cancel(): Promise<Response | undefined> {
    this.closed = true;
    this.finish();
    if (this.starting && !this.exchange) await this.starting.catch(() => {});
    const { exchange } = this;
    if (!exchange) return undefined;
    this.client._stop(exchange); // detached: sent right after the resume
    while (!exchange.done) await exchange.changed();
    this.response = this.client._outcome(exchange);
    return this.response;
  }

  private abort(): void {
    if (this.aborted || !this.signal) return;
    this.aborted = { reason: abortReason(this.signal) };
    if (this.exchange) {
      this.client._stop(this.exchange);
      this.exchange.notify();
    }
  }

  private finish(): void {
    this.signal?.removeEventListener("abort", this.onAbort);
  }

  private raceAbort<T>(promise: Promise<T>): Promise<T> {
    const signal = this.signal;
    if (!signal) return promise;
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => reject(abortReason(signal));
      if (signal.aborted) return onAbort();
      signal.addEventListener("abort", onAbort, { once: true });
      promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
    });
  }
}

type Started = [Connection, Exchange];

function observerOf(params: ChatParams | ResumeParams): ExchangeObserver {
  const callbacks = params as ChatParams;
  for (const name of ["onStep", "onHalt", "onResumable"] as const) {
    if (callbacks[name] !== undefined && typeof callbacks[name] !== "function") {
      throw new InvalidRequest(`${name} must be a function`, "invalid_field");
    }
  }
  return { onStep: callbacks.onStep, onHalt: callbacks.onHalt, onResumable: callbacks.onResumable };
}

/** A client of a muxgate gateway (the seed page's `Muxi`). See the module comment. */
export class Muxi {
  readonly wsUrl: string;
  readonly httpUrl: string;
  readonly codec: CodecName;
  readonly userId: string | undefined;
  private readonly clientKey: string | undefined;
  private readonly token: string | undefined;
  private readonly options: MuxiOptions;
  private conn: Connection | undefined;
  private connecting: Promise<Connection> | undefined;
  private closed = false;
  private lastClose: { code: number | undefined; at: number } | undefined;
  private failedAttempts = 0;
  /** Resumable requests whose connection dropped, waiting to be resumed (SPEC.md §5.8). */
  private readonly detached = new Map<string, Exchange>();
  /** The task that reconnects and resumes {@link detached}, while it runs. */
  private resumer: Promise<void> | undefined;
  /** The latest drop that detached requests (for the error if resuming gives up). */
  private dropError: MuxgateError | undefined;
  /** When the current resume episode began: its time limit counts from here. */
  private resumeSince = 0;
  /** The latest drop continued an episode (a connection opened to resume did not last). */
  private episodeContinued = false;
  /** Unstable connections in a row (dropped within `stableAfterMs`, or asked to slow down):
   * the backoff step the next reconnection to resume starts at. */
  private flaps = 0;
  /** The resume episode each connection opened to resume belongs to (see {@link onClose}). */
  private readonly episodes = new WeakMap<Connection, number>();
  /** Requests whose chat is not on the wire yet: a cancel for their id waits for them. */
  private readonly starting = new Map<string, Deferred<Started | undefined>>();
  private readonly finalUsages = new WeakMap<Response, { exchange: Exchange; userId: string | undefined }>();

  constructor(options: MuxiOptions = {}) {
    this.options = options;
    const { wsUrl, httpUrl } = gatewayUrls(options.url ?? defaultUrl());
    this.wsUrl = wsUrl;
    this.httpUrl = httpUrl;
    this.codec = options.codec ?? "json";
    if (this.codec !== "json" && this.codec !== "msgpack") throw new InvalidRequest(`codec must be "json" or "msgpack", not ${JSON.stringify(this.codec)}`);
    this.clientKey = options.clientKey ?? (options.token === undefined ? env("MUXGATE_CLIENT_KEY") : undefined);
    this.token = options.token ?? (options.clientKey === undefined ? env("MUXGATE_TOKEN") : undefined);
    if (this.clientKey !== undefined && this.token !== undefined) {
      throw new InvalidRequest("give either a client key or a token, not both (SPEC.md §4.4)");
    }
    this.userId = options.userId ?? env("MUXGATE_USER_ID");
    checkUserId(this.userId);
    for (const name of ["resumable", "autoResume"] as const) {
      if (options[name] !== undefined && typeof options[name] !== "boolean") throw new InvalidRequest(`${name} must be a boolean`);
    }
    const timeout = options.reconnect?.resumeTimeoutMs;
    if (timeout !== undefined && !(typeof timeout === "number" && timeout >= 0)) {
      throw new InvalidRequest("reconnect.resumeTimeoutMs must be a number >= 0");
    }
  }

  /** How many resumable requests wait for the client to reconnect and resume them. */
  get resuming(): number {
    return this.detached.size;
  }

  /** Whether the WebSocket is open now. */
  get connected(): boolean {
    return this.conn?.isOpen ?? false;
  }

  /** The gateway's id of the current connection (from `welcome`), if connected. */
  get connectionId(): string | undefined {
    return this.connected ? this.conn?.connectionId : undefined;
  }

  // -- chat ---------------------------------------------------------------------------------

  /**
   * Sends one chat and resolves with its {@link Response}: `completed`, or `cancelled` (by
   * `cancelRequest`, a timeout, another client...). A `failed` request rejects with
   * `RequestFailed`; aborting `params.signal` cancels the request on the gateway and rejects
   * with the signal's reason. The request counts as started at once: `cancelRequest` with its
   * id, even right away, cancels it in-band. A resumable request (`resumable: true`) goes on
   * across a dropped connection (the client resumes it, and this promise just resolves with
   * its response); it rejects with `RequestMoved` if another client resumed it, with
   * `ResumeNotFound` or `ResumeFailed` if it could not be resumed.
   */
  chat(params: ChatParams): Promise<Response> {
    let chat: ChatMessage;
    let observer: ExchangeObserver;
    try {
      chat = this.buildChat(params, false);
      observer = observerOf(params);
    } catch (exc) {
      return Promise.reject(exc);
    }
    const signal = params.signal;
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    let started: Started | undefined;
    let aborted = false;
    const result = new Promise<Response>((resolve, reject) => {
      const onAbort = () => {
        aborted = true;
        if (started) this._stop(started[1]);
        reject(abortReason(signal!));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      const done = () => signal?.removeEventListener("abort", onAbort);
      this._start(chat, () => aborted, observer)
        .then(async (s) => {
          started = s;
          const exchange = s[1];
          if (aborted) return this._stop(exchange);
          while (!exchange.done) await exchange.changed();
          resolve(this._outcome(exchange));
        })
        .catch(reject)
        .finally(done);
    });
    return result;
  }

  /**
   * A streamed chat: `for await (const chunk of client.chatStream({...}))` yields chunks
   * (`chunk.text`) as they arrive; the chat is sent when iteration starts. Afterwards
   * `stream.response` is the final response. Leaving the loop early (`break`, an exception),
   * `stream.cancel()` or aborting `params.signal` cancels the request. A request cancelled
   * otherwise (`cancelRequest`, a timeout) ends the loop normally with a `cancelled` response.
   * With `resumable: true` the stream goes on across a dropped connection (the client resumes
   * it by itself, unless `autoResume: false`); `stream.epoch`, `stream.graceMs` and
   * `stream.lastSeq` say what {@link resumeStream} needs to continue it elsewhere (another
   * client, a reloaded page).
   */
  chatStream(params: ChatParams): ChatStream {
    const chat = this.buildChat(params, true);
    return new ChatStream(this, chat, params.signal, observerOf(params));
  }

  /**
   * Continues a resumable request (SPEC.md §5.8) on this client's connection (opened, or
   * reopened after a drop, as for a chat): sends `resume {request_id, epoch, after_seq}` when
   * iteration starts, then yields the chunks after `afterSeq` that the request sent (or kept
   * while detached) and the live ones; afterwards `stream.response` is its response, whose
   * `content` is the whole answer (also the part received before the resume). A request
   * running on another connection moves here (that one gets `moved`). Iteration throws
   * {@link ResumeNotFound} when there is nothing to resume (unknown id or epoch, another
   * user's, or past its grace period), and `RequestRefused` when the gateway refuses the
   * resume (e.g. `invalid_field` for an `afterSeq` beyond the last chunk, `too_many_streams`).
   * Leaving the loop early or aborting `params.signal` cancels the request, as for a chat.
   * Once resumed, the request is resumable like any: a dropped connection resumes it again by
   * itself (unless `autoResume: false`).
   */
  resumeStream(params: ResumeParams): ChatStream {
    this.checkOpen();
    checkRequestId(params.requestId);
    checkUserId(params.userId);
    if (params.stream !== undefined && typeof params.stream !== "boolean") throw new InvalidRequest("stream must be a boolean", "invalid_field");
    const resume: Message = { type: "resume", request_id: params.requestId, epoch: params.epoch };
    if (params.afterSeq !== undefined) resume.after_seq = params.afterSeq;
    if (params.userId !== undefined) resume.user_id = params.userId;
    return new ChatStream(this, checked(resume), params.signal, observerOf(params), params.stream ?? true);
  }

  // -- cancel and inspect -------------------------------------------------------------------

  /**
   * Cancels a request by id and resolves with the outcome: `cancelled`, `already_cancelled`,
   * `already_completed` or `not_found` (never thrown). In-band (a `cancel` frame, reason
   * `client`) when the request runs on this client's connection (or waits to be resumed on the
   * next one: the cancel goes out right after the resume); otherwise
   * `DELETE /v1/requests/{id}` (reason `api`), also when the connection is lost before the
   * in-band answer. `userId` defaults to the client's.
   */
  async cancelRequest(requestId: string, options: CancelOptions = {}): Promise<CancelStatus> {
    checkRequestId(requestId);
    checkUserId(options.userId);
    this.checkOpen();
    const announced = this.starting.get(requestId);
    if (announced) await announced.promise.catch(() => undefined); // its chat goes out first
    const conn = this.conn?.isOpen ? this.conn : undefined;
    const exchange = conn?.exchanges.get(requestId) ?? this.detached.get(requestId);
    const wanted = options.userId ?? this.userId;
    if (exchange && !exchange.refused && (wanted === undefined || wanted === exchange.user)) {
      const waiter = exchange.conn !== undefined ? exchange.conn.cancel(exchange, true)! : exchange.cancelDetached(true)!;
      try {
        return await waiter.promise;
      } catch (exc) {
        // Lost with the connection (G7), or never sent (resuming gave up): ask over HTTP below.
        if (!(exc instanceof TransportError)) throw exc;
      }
    }
    const res = await this.http("DELETE", requestId, options.userId, options.signal);
    return res.status as CancelStatus;
  }

  /** `GET /v1/requests/{id}`: status, cancel reason, error and usage of a request of this user. */
  async getRequest(requestId: string, options: CancelOptions = {}): Promise<RequestInfo> {
    checkRequestId(requestId);
    checkUserId(options.userId);
    this.checkOpen();
    const body = await this.http("GET", requestId, options.userId, options.signal);
    const info: RequestInfo = { requestId, status: body.status as RequestInfo["status"] };
    if (typeof body.reason === "string") info.reason = body.reason as RequestInfo["reason"];
    if (body.error && typeof body.error === "object") info.error = body.error as RequestInfo["error"];
    if (body.usage && typeof body.usage === "object") {
      const u = body.usage as Record<string, unknown>;
      info.usage = toUsage({
        input_tokens: Number(u.input_tokens), output_tokens: Number(u.output_tokens),
        saved_tokens: Number(u.saved_tokens), final: u.final !== false,
      });
      if (Array.isArray(u.estimated)) {
        // Only the known names, in canonical order (SPEC.md §3.8); absent stays absent.
        const names = new Set(u.estimated);
        info.usage.estimated = USAGE_FIGURES.filter((name) => names.has(name));
      }
    }
    return info;
  }

  /**
   * The final token figures of `response` (SPEC.md §5.4): a cancelled response may carry
   * figures that still grow until the pipeline halts; the final ones follow in a `usage`
   * message, which this waits for, or reads over HTTP if the connection dropped first.
   */
  async finalUsage(response: Response, options: { timeoutMs?: number } = {}): Promise<Usage> {
    if (response.usage.final) return response.usage;
    const deadline = Date.now() + (options.timeoutMs ?? 10_000);
    const known = this.finalUsages.get(response);
    if (known?.exchange.finalUsage) {
      const timer = deferred<undefined>();
      const t = setTimeout(() => timer.resolve(undefined), Math.max(0, deadline - Date.now()));
      try {
        const usage = await Promise.race([known.exchange.finalUsage.promise, timer.promise]);
        if (usage) return usage;
      } catch {
        /* the connection dropped first: the figures are kept for GET (§5.4) */
      } finally {
        clearTimeout(t);
      }
    }
    for (let delay = 50; ; delay = Math.min(delay * 2, 500)) {
      const info = await this.getRequest(response.requestId, { userId: known?.userId });
      if (info.usage?.final) return info.usage;
      if (Date.now() + delay > deadline) throw new MuxgateError(`the final usage of ${response.requestId} is not known yet`);
      await sleep(delay);
    }
  }

  /** Closes the connection. Requests in flight fail with `ConnectionLost` (the gateway cancels
   * them, reason `disconnect`; a resumable one it keeps for its grace period instead, SPEC.md
   * §5.8: cancel it first to stop it), and so do those waiting to be resumed (a cancel asked
   * for one of them goes over HTTP). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const announced of this.starting.values()) announced.resolve(undefined);
    this.failDetached(() => new ConnectionLost("the client closed the connection", 1000));
    const conn = this.conn;
    this.conn = undefined;
    conn?.close();
  }

  // -- internals ----------------------------------------------------------------------------

  private checkOpen(): void {
    if (this.closed) throw new MuxgateError("the client is closed");
  }

  private buildChat(params: ChatParams, stream: boolean): ChatMessage {
    this.checkOpen();
    const requestId = params.requestId ?? newRequestId();
    checkRequestId(requestId);
    checkUserId(params.userId);
    if (params.timeoutMs !== undefined && !(params.timeoutMs > 0 && params.timeoutMs <= MAX_TIMEOUT_MS)) {
      throw new InvalidRequest(`timeoutMs must be in (0, ${MAX_TIMEOUT_MS}]`, "invalid_field");
    }
    const chat: Message = { type: "chat", request_id: requestId, stream };
    if (params.message !== undefined) chat.message = params.message;
    if (params.messages !== undefined) chat.messages = params.messages.map((m) => ({ role: m.role, content: m.content }));
    if (params.userId !== undefined) chat.user_id = params.userId;
    if (params.timeoutMs !== undefined) chat.timeout_ms = Math.max(1, Math.ceil(params.timeoutMs));
    if (params.metadata !== undefined) chat.metadata = params.metadata;
    const listens = params.onStep !== undefined || params.onHalt !== undefined;
    if (params.steps === false && listens) throw new InvalidRequest("onStep and onHalt need steps (not steps: false)", "invalid_field");
    const steps = params.steps ?? listens;
    if (steps !== false) chat.steps = steps; // checkOutgoing refuses a non-boolean
    const wantsResume = params.graceMs !== undefined || params.onResumable !== undefined;
    if (params.resumable === false && wantsResume) {
      throw new InvalidRequest("graceMs and onResumable need resumable (not resumable: false)", "invalid_field");
    }
    const resumable = params.resumable ?? (wantsResume || this.options.resumable === true);
    if (resumable !== false) chat.resumable = resumable; // checkOutgoing refuses a non-boolean
    if (params.graceMs !== undefined) {
      if (typeof params.graceMs !== "number" || !(params.graceMs > 0 && params.graceMs <= MAX_GRACE_MS)) {
        throw new InvalidRequest(`graceMs must be in (0, ${MAX_GRACE_MS}]`, "invalid_field");
      }
      chat.grace_ms = Math.max(1, Math.ceil(params.graceMs));
    }
    return checked(chat);
  }

  /** The exchange's response (or its error), remembered for {@link finalUsage}. @internal */
  _outcome(exchange: Exchange): Response {
    const response = exchange.outcome();
    if (!response.usage.final) this.finalUsages.set(response, { exchange, userId: exchange.chatUserId });
    return response;
  }

  /** The caller gave up on `exchange`: cancel it on the gateway (now, or right after its
   * resume while it is detached) unless it already has its answer. @internal */
  _stop(exchange: Exchange): void {
    if (exchange.conn !== undefined) exchange.conn.stop(exchange);
    else if (this.detached.get(exchange.requestId) === exchange) exchange.cancelDetached(false);
    else {
      exchange.keepChunks = false;
      exchange.dropChunks();
    }
  }

  /** Connects if needed and puts `chat` (or a `resume`) on the wire. @internal */
  async _start(message: ChatMessage | ResumeMessage, isAborted: () => boolean, observer?: ExchangeObserver, stream = true): Promise<Started> {
    const rid = message.request_id;
    if (this.starting.has(rid)) throw errorFromCode("duplicate_request_id", "request_id is being started", rid);
    if (this.detached.has(rid)) throw errorFromCode("duplicate_request_id", "request_id is being resumed", rid);
    const announced = deferred<Started | undefined>();
    this.starting.set(rid, announced);
    try {
      const conn = await this.connection(isAborted);
      if (isAborted()) throw new DOMException("This operation was aborted", "AbortError");
      const exchange = await conn.start(message, isAborted, observer, stream);
      const started: Started = [conn, exchange];
      announced.resolve(started);
      return started;
    } catch (exc) {
      announced.resolve(undefined);
      throw exc;
    } finally {
      if (this.starting.get(rid) === announced) this.starting.delete(rid);
    }
  }

  private connection(isAborted: () => boolean = () => false): Promise<Connection> {
    this.checkOpen();
    if (this.conn?.isOpen) return Promise.resolve(this.conn);
    this.connecting ??= this.reconnect(isAborted).finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private backoff(failed: number): number {
    return reconnectDelay(failed, this.options.reconnect);
  }

  private get resumeTimeoutMs(): number {
    return this.options.reconnect?.resumeTimeoutMs ?? RECONNECT_DEFAULTS.resumeTimeoutMs;
  }

  /**
   * Opens the connection, with backoff between failed attempts: up to `reconnect.attempts`
   * of them, or, while requests wait to be resumed, until `resumeTimeoutMs` after the drop
   * (see {@link ReconnectOptions}; the first attempt to resume goes at once unless the link
   * flaps).
   */
  private async reconnect(isAborted: () => boolean): Promise<Connection> {
    const attempts = Math.max(1, this.options.reconnect?.attempts ?? RECONNECT_DEFAULTS.attempts);
    const WebSocket = this.options.WebSocket ?? (await loadWebSocket());
    const settings: ConnectionSettings = {
      wsUrl: this.wsUrl,
      codec: this.codec,
      clientKey: this.clientKey,
      token: this.token,
      userId: this.userId,
      connectTimeoutMs: this.options.connectTimeoutMs ?? 10_000,
      maxBufferedChars: this.options.maxBufferedChars ?? 8 * 1024 * 1024,
      WebSocket,
    };
    // A flapping link (connections that drop at once): start further along the backoff, and
    // within the time limit of the episode (connections that open do not extend it).
    const resuming = this.detached.size > 0;
    let failed = resuming ? this.flaps : 0;
    let wait = failed > 0 ? this.backoff(failed - 1) : 0;
    if (resuming && this.episodeContinued && Date.now() + wait > this.resumeSince + this.resumeTimeoutMs) {
      throw new ConnectError(`connect to ${this.wsUrl}: the connection dropped ${failed} times in a row soon after it opened`);
    }
    // The gateway asked us to slow down (1013 at capacity, 4008 slow, 4029 rate): back off first.
    const last = this.lastClose;
    if (last?.code !== undefined && RETRY_AFTER_CLOSE.has(last.code)) {
      wait = Math.max(wait, last.at + this.backoff(this.failedAttempts + 3) - Date.now());
    }
    if (wait > 0) await sleep(wait);
    for (let attempt = 0; ; attempt++) {
      this.checkOpen();
      try {
        const conn = await Conn.open(settings, {
          onClose: (c, error, detached) => this.onClose(c, error, detached),
          resumeAfterDrop: () => this.options.autoResume !== false && !this.closed,
        });
        if (this.closed) {
          conn.close();
          this.checkOpen();
        }
        this.failedAttempts = 0;
        this.conn = conn;
        if (this.detached.size > 0) this.episodes.set(conn, this.resumeSince);
        this.options.onConnectionChange?.({ connected: true, connectionId: conn.connectionId! });
        return conn;
      } catch (exc) {
        // Credentials fail again (4001), a gateway that breaks the protocol will again. A call
        // that gave up does not stop a reconnection that requests wait for to be resumed.
        if (!(exc instanceof ConnectError) || (isAborted() && this.detached.size === 0)) throw exc;
        this.failedAttempts++;
        const delay = this.backoff(failed++);
        const giveUp = this.detached.size > 0
          ? Date.now() + delay > this.resumeSince + this.resumeTimeoutMs
          : attempt + 1 >= attempts;
        if (giveUp) throw exc;
        await sleep(delay);
      }
    }
  }

  /** A connection ended; `detached`: its resumable requests, which the gateway keeps for a
   * resume (it dropped, and `autoResume` is on). */
  private onClose(conn: Connection, error: MuxgateError, detached: Exchange[]): void {
    const now = Date.now();
    this.lastClose = { code: conn.closeCode, at: now };
    if (detached.length > 0) {
      const unstable = now - conn.openedAt < RECONNECT_DEFAULTS.stableAfterMs;
      this.flaps = unstable || RETRY_AFTER_CLOSE.has(conn.closeCode ?? 0) ? this.flaps + 1 : 0;
      // A connection opened to resume that did not last: the same episode (its time limit
      // runs on). Otherwise the time limit starts now.
      const episode = this.episodes.get(conn);
      this.episodeContinued = unstable && episode !== undefined;
      this.resumeSince = this.episodeContinued ? episode! : now;
      this.dropError = error;
      for (const exchange of detached) this.detached.set(exchange.requestId, exchange);
    }
    if (this.conn === conn) {
      this.conn = undefined;
      const state: ConnectionState = { connected: false, error };
      if (this.detached.size > 0) state.resuming = this.detached.size;
      this.options.onConnectionChange?.(state);
    }
    if (this.detached.size > 0) this.startResumer();
  }

  private startResumer(): void {
    if (this.resumer !== undefined || this.closed) return;
    this.resumer = this.resumeDetached()
      .catch((exc: unknown) => this.giveUp(exc)) // a bug must not leave the callers waiting
      .finally(() => {
        this.resumer = undefined;
        if (this.detached.size > 0) this.startResumer(); // detached while it was finishing
      });
  }

  /** Reconnects and resumes every detached request, until none is left (a drop meanwhile puts
   * its requests back); giving up fails them with {@link ResumeFailed}. */
  private async resumeDetached(): Promise<void> {
    while (this.detached.size > 0 && !this.closed) {
      let conn: Connection;
      try {
        conn = await this.connection();
      } catch (exc) {
        this.giveUp(exc);
        return;
      }
      for (const [rid, exchange] of [...this.detached]) {
        if (exchange.done) {
          this.detached.delete(rid);
          continue;
        }
        try {
          await conn.resume(exchange); // after it, the cancels asked for meanwhile
        } catch (exc) {
          if (exc instanceof TransportError && !conn.isOpen) continue; // dropped again: next round
          this.detached.delete(rid);
          exchange.fail(exc instanceof MuxgateError ? exc : new MuxgateError(String(exc)));
          continue;
        }
        // Still detached if the connection dropped right after (it is back in the map).
        if (exchange.conn === conn || exchange.done) this.detached.delete(rid);
      }
    }
  }

  /** Resuming gave up (`last`: the last attempt's error): the detached requests fail with
   * {@link ResumeFailed}; a Stop asked for one of them goes over HTTP. */
  private giveUp(last: unknown): void {
    const dropped = this.dropError;
    const code = dropped instanceof ConnectionLost ? dropped.closeCode : undefined;
    const reason = dropped instanceof ConnectionLost ? dropped.closeReason : "";
    const why = last instanceof Error ? last.message : String(last);
    this.failDetached((rid) => new ResumeFailed(
      `request ${rid} could not be resumed: ${dropped?.message ?? "the connection dropped"}, then reconnecting failed (${why})`,
      rid, code, reason, last,
    ));
    if (!this.connected && !this.closed) {
      this.options.onConnectionChange?.({ connected: false, error: last instanceof MuxgateError ? last : dropped ?? new ConnectionLost(why) });
    }
  }

  /** Fails every detached request with `error(requestId)`; the cancels that were asked for
   * them (without a caller waiting for the answer) go over HTTP, so that a Stop is not lost. */
  private failDetached(error: (requestId: string) => MuxgateError): void {
    const exchanges = [...this.detached.values()];
    this.detached.clear();
    for (const exchange of exchanges) {
      const stopped = exchange.deferredCancels.includes(null);
      exchange.fail(error(exchange.requestId)); // cancelRequest callers fall back to HTTP
      if (stopped) void this.http("DELETE", exchange.requestId, exchange.chatUserId, undefined).catch(() => {});
    }
  }

  private async http(
    method: "GET" | "DELETE",
    requestId: string,
    userId: string | undefined,
    signal: AbortSignal | undefined,
  ): Promise<Record<string, unknown>> {
    const headers: Record<string, string> = {};
    if (this.clientKey !== undefined) headers["X-Muxi-Client-Key"] = this.clientKey;
    if (this.token !== undefined) headers.Authorization = `Bearer ${this.token}`;
    const user = userId ?? this.userId;
    if (user !== undefined) headers["X-Muxi-User-Id"] = user;
    const doFetch = this.options.fetch ?? globalThis.fetch;
    const url = `${this.httpUrl}/v1/requests/${encodeURIComponent(requestId)}`;
    let res: globalThis.Response;
    try {
      res = await doFetch(url, { method, headers, signal: signal ?? null });
    } catch (exc) {
      if (signal?.aborted) throw exc;
      throw new ConnectError(`${method} ${url}: ${String(exc)}`);
    }
    let body: Record<string, unknown> = {};
    try {
      body = (await res.json()) as Record<string, unknown>;
    } catch {
      /* not JSON: judged by the status below */
    }
    // 200 cancelled/already_cancelled, 409 already_completed, 404 not_found: answers, not errors.
    if (res.status === 200 || res.status === 404 || (method === "DELETE" && res.status === 409)) {
      if (typeof body.status === "string") return body;
    }
    const error = (body.error ?? {}) as { code?: string; message?: string };
    if (res.status === 401) throw new Unauthorized(error.message);
    if (typeof error.code === "string") throw errorFromCode(error.code, error.message ?? `HTTP ${res.status}`, requestId);
    throw new ConnectError(`${method} ${url}: HTTP ${res.status}`, res.status);
  }
}
