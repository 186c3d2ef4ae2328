/**
 * One WebSocket to the gateway, multiplexed: the SDK's I/O edge (mirrors the Python SDK,
 * gateway/client/_connection.py).
 *
 * Theory of operation
 * -------------------
 * Incoming frames are decoded with `decode` and each message is routed by `request_id` to its
 * {@link Exchange}, which checks what SPEC.md §5.1 forbids: a chunk or step after the response, a
 * seq gap, content that differs from the chunks (G1-G3), a step started out of order or ended
 * twice (§3.12), a `usage` report nobody announced, a `cancel_result` for no cancel. A violation closes the connection and fails every request on
 * it with {@link ProtocolViolation}: nothing the gateway says afterwards can be trusted.
 *
 * Resumable requests (§5.8) add the client rules at the end of §5.8: a `resumable` message is
 * accepted once, only for a chat that asked for it, before anything else about the request; a
 * `moved` ends the request on this connection (client state MOVED: nothing more may arrive
 * about it but `cancel_result`s, of any status, since its response goes elsewhere) and fails
 * its caller with {@link RequestMoved}. A request this client resumes ({@link Connection.start}
 * with a `resume`) is tracked from `after_seq + 1`: nothing about it may arrive before its
 * `resume_result`; `not_found` ends it (GONE) with {@link ResumeNotFound}; a completed content
 * need only end with the text received since the resume, and step indices are not checked
 * against the steps before the resume (they are not replayed).
 *
 * An exchange outlives its connection when the request is resumable (§5.8): when the WebSocket
 * drops (any close the client did not ask for, except 4001 and 1001), an unfinished exchange that
 * knows its epoch is *detached* instead of failed: handed to {@link ConnectionEvents.onClose},
 * whose client reconnects and calls {@link Connection.resume} on the new connection. The
 * exchange keeps what its caller holds (the unread chunks, the text so far, the next seq, the
 * steps) and is re-armed there as a request this client resumes: tracked from the chunk after
 * the last one received, the content checked against the whole text. Cancels asked for while
 * it is detached, and those sent on the dropped connection and not answered, go out right after
 * the `resume`. Nothing is routed from a connection once it has ended, so no chunk of the old
 * connection can follow the resume point: the seqs join without a gap or a repeat.
 *
 * Sending is synchronous: messages are encoded into an outbox and flushed once per microtask
 * turn, so whatever is pending goes out as one batched frame (SPEC.md §2.4) within the
 * `welcome` limits, and a `cancel` can be queued from an abort handler without awaiting.
 *
 * Opening sends a `hello` (credentials and the default `user_id`: browsers cannot set
 * handshake headers, §4.4) and waits for `welcome`, so bad credentials fail at connect time with
 * {@link Unauthorized} and the limits are known before the first chat (§3.5).
 *
 * A request holds one of the connection's `max_streams` slots from its chat until it is
 * finished (§5.6: its response arrived, the late `usage` too if announced, and every cancel sent
 * for it was answered). Callers beyond the limit wait for a slot instead of being refused.
 */

import { type CodecName, SUBPROTOCOLS, codecOfSubprotocol, decode, encode, joinBatch, payloadBytes } from "./codec.js";
import {
  ConnectError,
  ConnectionLost,
  InvalidRequest,
  type MuxgateError,
  ProtocolError,
  ProtocolViolation,
  RequestFailed,
  RequestMoved,
  RequestRefused,
  ResumeNotFound,
  SlowConsumer,
  errorFromClose,
  errorFromCode,
} from "./errors.js";
import { DEFAULT_MAX_STREAMS, MAX_BATCH_MESSAGES, MAX_FRAME_BYTES } from "./limits.js";
import type { Chunk, Halt, ResumableInfo, Response, Step, Usage } from "./types.js";
import {
  type CancelStatus,
  type ChatMessage,
  type GatewayMessage,
  type Message,
  type ResponseMessage,
  type ResumableMessage,
  type ResumeMessage,
  type WireHalt,
  type WelcomeMessage,
  type WireLimits,
  type WireUsage,
  checkOutgoing,
} from "./wire.js";

/** The subset of the WebSocket API the SDK uses (browsers' native one, or the `ws` package). */
export interface WebSocketLike {
  readonly protocol: string;
  readonly readyState: number;
  binaryType: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ConnectionSettings {
  wsUrl: string;
  codec: CodecName;
  clientKey: string | undefined;
  token: string | undefined;
  userId: string | undefined;
  connectTimeoutMs: number;
  maxBufferedChars: number;
  WebSocket: WebSocketConstructor;
}

// Close code a client uses when the peer broke the protocol (RFC 6455 §7.4.1).
const CLOSE_PROTOCOL_ERROR = 1002;

export interface Deferred<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(error: unknown): void;
  settled: boolean;
}

export function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const d: Deferred<T> = {
    promise: new Promise<T>((res, rej) => ((resolve = res), (reject = rej))),
    resolve: (v) => { if (!d.settled) { d.settled = true; resolve(v); } },
    reject: (e) => { if (!d.settled) { d.settled = true; reject(e); } },
    settled: false,
  };
  d.promise.catch(() => {}); // a rejection nobody waits for is not an unhandled rejection
  return d;
}

export function toUsage(u: WireUsage): Usage {
  const usage: Usage = { inputTokens: u.input_tokens, outputTokens: u.output_tokens, savedTokens: u.saved_tokens, final: u.final };
  if (u.estimated !== undefined) usage.estimated = [...u.estimated];
  return usage;
}

export function toHalt(h: WireHalt): Halt {
  const halt: Halt = { state: h.state, aborted: h.aborted };
  if (h.step !== undefined) halt.step = { ...h.step };
  return halt;
}

function toResponse(m: ResponseMessage): Response {
  const r: Response = { requestId: m.request_id, status: m.status, content: m.content, usage: toUsage(m.usage) };
  if (m.reason !== undefined) r.reason = m.reason;
  if (m.error !== undefined) r.error = { ...m.error };
  if (m.halt !== undefined) r.halt = toHalt(m.halt);
  return r;
}

/** What the caller of a chat listens to besides chunks (`ChatParams.onStep`, `onHalt`). */
export interface ExchangeObserver {
  onStep?: (step: Step) => void;
  onHalt?: (halt: Halt, usage: Usage) => void;
  onResumable?: (info: ResumableInfo) => void;
  /** The exchange exists: its chat is queued for the wire. @internal */
  onCreated?: (exchange: Exchange) => void;
}

/** Calls an application callback; what it throws is reported (as an event listener's would
 * be), never taken for a protocol error of the gateway. */
function callBack<A extends unknown[]>(fn: ((...args: A) => void) | undefined, ...args: A): void {
  if (fn === undefined) return;
  try {
    fn(...args);
  } catch (exc) {
    queueMicrotask(() => { throw exc; });
  }
}

/** One request on one connection, as this client has seen it. */
export class Exchange {
  readonly requestId: string;
  readonly chatUserId: string | undefined;
  /** The effective user (SPEC.md §4.5) as far as the client can tell ("" = anonymous). */
  readonly user: string;
  readonly stream: boolean;
  /** The chat asked for `resumable: true`, or this exchange resumes a request (§5.8). */
  readonly resumable: boolean;
  /** The connection the request runs on; undefined before its chat or resume is on the wire,
   * once it ended, and while it is detached (waiting for the client to resume it). */
  conn: Connection | undefined;
  /** How many `resume_result` `resumed` answers the request had (its resumes that worked). */
  resumes = 0;
  /** Cancels to send right after the next `resume` (each with the caller's deferred of the
   * `cancel_result`, or null): asked for while detached, or sent on a connection that dropped
   * before answering them (a cancel is idempotent: the second answer is `already_cancelled`). */
  readonly deferredCancels: (Deferred<CancelStatus> | null)[] = [];
  /** The request's incarnation: from its `resumable` message, or the `resume` sent for it. */
  epoch: string | undefined;
  /** The grace the gateway granted (`resumable.grace_ms`); unknown for a resumed request. */
  graceMs: number | undefined;
  /** A `resume` was sent and its `resume_result` has not arrived: nothing else may. */
  awaitingResume = false;
  /** The first seq tracked here: 0, or `after_seq + 1` for a resume (earlier chunks arrived
   * on an earlier connection). */
  readonly firstSeq: number;
  /** Client states MOVED (`moved`) and GONE (`resume_result` `not_found`), §5.8: nothing more
   * about the request arrives on this connection but `cancel_result`s. */
  endedHere: "moved" | "gone" | undefined;
  /** Something about the request arrived (resumable, resume_result, chunk, step, response,
   * moved): an `error` naming it can no longer be the refusal of its chat or resume. */
  heard = false;
  nextSeq = 0;
  /** Everything streamed so far (after a resume: since the resume), kept to check G3 while it
   * can fit in a frame. */
  text = "";
  private textKept = true;
  /** Chunks not yet read by the consumer; only kept while someone streams (bounded). */
  readonly chunks: Chunk[] = [];
  bufferedChars = 0;
  keepChunks: boolean;
  cancelSent = false;
  response: Response | undefined;
  error: MuxgateError | undefined;
  refused = false;
  usagePending = false;
  finalUsage: Deferred<Usage> | undefined;
  /** One entry per cancel sent and not yet answered: the caller's deferred, or null. */
  readonly pendingCancels: (Deferred<CancelStatus> | null)[] = [];
  /**
   * The `step` messages taken in, in order (SPEC.md §3.12). Steps are taken in *in stream
   * order*: a step that arrives while chunks before it wait unread in {@link chunks} waits too,
   * until the consumer has read them (or they are dropped), so that `onStep` and the chunks
   * the loop reads come out in the gateway's order (as the Python SDK does).
   */
  readonly steps: Step[] = [];
  /** The index the next started step must carry (checked on arrival). */
  nextStep = 0;
  /** Started steps not yet ended, on the wire (checked on arrival). */
  private readonly wireOpen = new Set<number>();
  /** After a resume the steps started before it are unknown here (they are not replayed,
   * §5.8): the first step started since sets the index (`stepsAnchored` false until then; it
   * must only be above the steps seen ending), and a step below it that ends is one started
   * before the resume, accepted once (`endedBefore`). For a chat: anchored at 0 from the start. */
  private stepsAnchored: boolean;
  private firstLiveStep: number;
  private readonly endedBefore = new Set<number>();
  /** Steps below this index were seen on an earlier connection of this exchange: one of them
   * may end after a resume only if it was still open (0 for a fresh resume: none seen). */
  private stepFloor = 0;
  /** Started steps not yet ended among those taken in, by index. */
  private readonly openSteps = new Map<number, Step>();
  /** Steps that arrived behind unread chunks: each waits for the chunk of seq `before`. */
  private readonly queuedSteps: { before: number; step: Step }[] = [];
  /** The latest `halt`: the cancelled response's, then the usage message's. */
  halt: Halt | undefined;
  private listeners = new Set<() => void>();

  /** For a `chat`, or a `resume` of a request whose chat had `stream` (§5.8). */
  constructor(start: ChatMessage | ResumeMessage, user: string, private readonly observer: ExchangeObserver = {}, stream = true) {
    this.requestId = start.request_id;
    this.chatUserId = start.user_id;
    this.user = user;
    if (start.type === "chat") {
      this.stream = start.stream;
      this.resumable = start.resumable === true;
      this.firstSeq = 0;
      this.stepsAnchored = true;
      this.firstLiveStep = 0;
    } else {
      this.stream = stream;
      this.resumable = true;
      this.epoch = start.epoch;
      this.awaitingResume = true;
      this.firstSeq = this.nextSeq = start.after_seq === undefined ? 0 : start.after_seq + 1;
      this.stepsAnchored = false;
      this.firstLiveStep = Infinity;
    }
    this.keepChunks = this.stream;
    observer.onCreated?.(this);
  }

  /** The pipeline has halted: a completed or failed response, or a cancelled one's final usage. */
  get halted(): boolean {
    return this.response !== undefined && !this.usagePending;
  }

  /** The latest started step not yet ended, while the pipeline runs. */
  get currentStep(): Step | undefined {
    if (this.halted || this.error !== undefined) return undefined;
    let latest: Step | undefined;
    for (const step of this.openSteps.values()) if (latest === undefined || step.index > latest.index) latest = step;
    return latest;
  }

  /** A `step` message arrived (§3.12, §5.1): before the response; started in index order,
   * ended once, after it started. Taken in at once, or after the unread chunks before it. */
  addStep(step: Step): void {
    const id = this.requestId;
    this.checkLive("step");
    if (this.response !== undefined) throw new ProtocolViolation(`step after the response of ${id}`, id);
    this.heard = true;
    if (step.state === "started") {
      if (!this.stepsAnchored && step.index >= this.nextStep) {
        // The first step started since the resume: its index is not checked against history.
        this.stepsAnchored = true;
        this.nextStep = this.firstLiveStep = step.index;
      }
      if (step.index !== this.nextStep) throw new ProtocolViolation(`step ${step.index} of ${id} started, expected ${this.nextStep}`, id);
      this.nextStep++;
      this.wireOpen.add(step.index);
    } else if (this.wireOpen.has(step.index)) {
      this.wireOpen.delete(step.index);
    } else if (step.index < this.firstLiveStep && step.index >= this.stepFloor && !this.endedBefore.has(step.index)) {
      // Started before the resume, on an earlier connection: ends at most once here too.
      this.endedBefore.add(step.index);
      if (!this.stepsAnchored) this.nextStep = Math.max(this.nextStep, step.index + 1);
    } else {
      throw new ProtocolViolation(`step ${step.index} of ${id} ended but is not running`, id);
    }
    if (this.chunks.length > 0) {
      this.queuedSteps.push({ before: this.nextSeq, step });
    } else {
      this.takeSteps();
      this.takeStep(step);
    }
  }

  /** Takes in the queued steps due before the chunk of seq `seq` (all of them by default):
   * the consumer is about to read that chunk, or reads no more queued chunks. */
  takeSteps(seq = Infinity): void {
    while (this.queuedSteps.length > 0 && this.queuedSteps[0]!.before <= seq) this.takeStep(this.queuedSteps.shift()!.step);
  }

  /** Drops the unread chunks (nobody will read them), taking in the steps among them. */
  dropChunks(): void {
    this.chunks.length = 0;
    this.bufferedChars = 0;
    this.takeSteps();
  }

  private takeStep(step: Step): void {
    if (step.state === "started") this.openSteps.set(step.index, step);
    else this.openSteps.delete(step.index);
    this.steps.push(step);
    callBack(this.observer.onStep, step);
    this.notify();
  }

  /** Refuses a message about the request (`what`) that may not arrive now: before the
   * `resume_result` of a resume, or after `moved` / a `not_found` resume (§5.8). */
  checkLive(what: string): void {
    const id = this.requestId;
    if (this.awaitingResume) throw new ProtocolViolation(`${what} for ${id} before its resume_result`, id);
    if (this.endedHere === "moved") throw new ProtocolViolation(`${what} for ${id} after it moved`, id);
    if (this.endedHere === "gone") throw new ProtocolViolation(`${what} for ${id} after resume_result not_found`, id);
  }

  /** The `resumable` message (§3.13, §5.8): once, only for a chat that asked for it, before
   * anything else about the request. */
  setResumable(m: ResumableMessage): void {
    const id = this.requestId;
    this.checkLive("resumable");
    if (!this.resumable) throw new ProtocolViolation(`resumable for ${id}, whose chat did not ask for it`, id);
    if (this.epoch !== undefined) throw new ProtocolViolation(`a second resumable for ${id}`, id);
    if (this.heard) throw new ProtocolViolation(`resumable for ${id} after other messages about it`, id);
    this.heard = true;
    this.epoch = m.epoch;
    this.graceMs = m.grace_ms;
    callBack(this.observer.onResumable, { requestId: id, epoch: m.epoch, graceMs: m.grace_ms });
    this.notify();
  }

  /** Whether the request can be resumed after its connection dropped (§5.8): resumable, its
   * epoch known, not answered yet, and not refused, moved or gone. */
  get detachable(): boolean {
    return this.resumable && this.epoch !== undefined && !this.done && !this.refused && this.endedHere === undefined;
  }

  /** The connection dropped; the gateway keeps the request for a resume (§5.8). The cancels
   * sent there and not answered are sent again after the resume (their answers were lost). */
  detach(): void {
    this.conn = undefined;
    this.deferredCancels.push(...this.pendingCancels.splice(0));
  }

  /** The caller gave up while the request is detached: a cancel goes out right after the
   * resume (a Stop is never lost). Returns the deferred of its `cancel_result` if asked for. */
  cancelDetached(wantResult: boolean): Deferred<CancelStatus> | null {
    const waiter = wantResult ? deferred<CancelStatus>() : null;
    this.keepChunks = false;
    this.dropChunks();
    if (this.done) {
      waiter?.reject(this.error ?? new ConnectionLost("the request has ended"));
    } else if (wantResult || !this.cancelSent) {
      this.deferredCancels.push(waiter);
      this.cancelSent = true;
    }
    return waiter;
  }

  /** The `resume` for this detached exchange is on `conn`'s wire: track the request there as a
   * resumed one (§5.8), from the chunk after the last one received; the text, the unread chunks
   * and the steps carry over. */
  rearm(conn: Connection): void {
    this.conn = conn;
    this.awaitingResume = true;
    this.heard = false;
    // Steps are not replayed: those that started while detached are skipped, and one that was
    // open before may end after the resume.
    this.stepsAnchored = false;
    this.firstLiveStep = Infinity;
    this.stepFloor = this.nextStep;
    this.endedBefore.clear();
  }

  /** Ends the request on this connection (MOVED or GONE, §5.8): its caller gets `error`. */
  endHere(how: "moved" | "gone", error: MuxgateError): void {
    this.heard = true;
    this.endedHere = how;
    if (!this.done) this.error = error;
    this.keepChunks = false; // the chunks already received stay readable; no more come
    this.notify();
  }

  /** A `halt` arrived with `usage` (in the cancelled response or the usage message). */
  setHalt(halt: Halt | undefined, usage: Usage): void {
    if (halt === undefined) return;
    this.halt = halt;
    callBack(this.observer.onHalt, halt, usage);
  }

  /** The caller has its answer: a response, or an error. */
  get done(): boolean {
    return this.response !== undefined || this.error !== undefined;
  }

  /** SPEC.md §5.6: nothing more will arrive about this request on this connection. */
  get finished(): boolean {
    const ended = this.response !== undefined || this.refused || this.endedHere !== undefined;
    return ended && !this.usagePending && this.pendingCancels.length === 0;
  }

  /** Resolves at the next change (a chunk, the answer, an error). */
  changed(): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => { this.listeners.delete(wake); resolve(); };
      this.listeners.add(wake);
    });
  }

  notify(): void {
    for (const wake of [...this.listeners]) wake();
  }

  /** The response; throws the request's error, or {@link RequestFailed}. */
  outcome(): Response {
    if (this.response === undefined) throw this.error!;
    if (this.response.status === "failed") throw new RequestFailed(this.response);
    return this.response;
  }

  addText(text: string): void {
    if (!this.textKept) return;
    this.text += text;
    if (this.text.length > MAX_FRAME_BYTES) { this.textKept = false; this.text = ""; }
  }

  /** Whether the completed content can be checked against the chunks (G3). */
  get textComplete(): boolean {
    return this.textKept;
  }

  fail(error: MuxgateError): void {
    if (!this.done) this.error = error;
    this.takeSteps(); // what arrived stays known
    this.finalUsage?.reject(error);
    for (const waiter of this.pendingCancels.splice(0)) waiter?.reject(error);
    for (const waiter of this.deferredCancels.splice(0)) waiter?.reject(error);
    this.notify();
  }
}

export interface ConnectionEvents {
  /**
   * The connection ended with `error`. `detached`: the resumable exchanges it ran that the
   * gateway keeps for a resume (§5.8), when the connection dropped (a close the client did not
   * ask for, other than 4001 and 1001) and {@link resumeAfterDrop} is on; the listener resumes
   * them (or fails them). Every other unfinished exchange has failed with `error`.
   */
  onClose(conn: Connection, error: MuxgateError, detached: Exchange[]): void;
  /** Whether the resumable exchanges of a dropped connection are to be detached (resumed by
   * the listener) rather than failed. Default: failed. */
  resumeAfterDrop?: () => boolean;
}

/** Close codes after which resumable requests are not resumed: 4001 (the credentials will fail
 * again) and 1001 (a gateway shutdown cancels every request, detached ones too, §5.7). */
const NO_RESUME_AFTER = new Set([4001, 1001]);

/** One open WebSocket to the gateway. Create with {@link Connection.open}. */
export class Connection {
  readonly exchanges = new Map<string, Exchange>();
  welcome: WelcomeMessage | undefined;
  limits: WireLimits = {
    max_streams: DEFAULT_MAX_STREAMS,
    max_frame_bytes: MAX_FRAME_BYTES,
    max_batch_messages: MAX_BATCH_MESSAGES,
    max_timeout_ms: 3_600_000,
  };
  /** Why the connection ended; set once, when it does. */
  error: MuxgateError | undefined;
  closeCode: number | undefined;
  /** When the connection opened (`Date.now()`). */
  readonly openedAt = Date.now();
  private readonly welcomed = deferred<WelcomeMessage>();
  private closeError: MuxgateError | undefined;
  private outbox: (string | Uint8Array)[] = [];
  private flushScheduled = false;
  private slotWaiters: (() => void)[] = [];

  private constructor(
    private readonly ws: WebSocketLike,
    readonly settings: ConnectionSettings,
    private readonly events: ConnectionEvents,
  ) {}

  /** Connects, sends `hello`, waits for `welcome` (within `settings.connectTimeoutMs`). */
  static open(settings: ConnectionSettings, events: ConnectionEvents): Promise<Connection> {
    const url = settings.wsUrl;
    let ws: WebSocketLike;
    try {
      ws = new settings.WebSocket(url, [SUBPROTOCOLS[settings.codec]]);
    } catch (exc) {
      return Promise.reject(new ConnectError(`connect to ${url}: ${String(exc)}`));
    }
    ws.binaryType = "arraybuffer";
    const conn = new Connection(ws, settings, events);
    return new Promise<Connection>((resolve, reject) => {
      const timer = setTimeout(() => {
        fail(new ConnectError(`connect to ${url}: timed out after ${settings.connectTimeoutMs} ms`));
        conn.abort();
      }, settings.connectTimeoutMs);
      let opened = false;
      const fail = (error: MuxgateError) => { clearTimeout(timer); reject(error); };
      ws.onopen = () => {
        opened = true;
        if (codecOfSubprotocol(ws.protocol) !== settings.codec) {
          fail(new ProtocolViolation(`the gateway chose subprotocol ${JSON.stringify(ws.protocol)}`));
          conn.abort(CLOSE_PROTOCOL_ERROR, "wrong subprotocol");
          return;
        }
        const hello: Message = { type: "hello" };
        if (settings.token !== undefined) hello.token = settings.token;
        if (settings.clientKey !== undefined) hello.client_key = settings.clientKey;
        if (settings.userId !== undefined) hello.user_id = settings.userId;
        try {
          conn.send(hello);
        } catch (exc) {
          fail(exc as MuxgateError);
          conn.abort();
        }
      };
      ws.onerror = () => {
        if (!opened) {
          // Browsers say nothing more (a refused handshake looks like a network error).
          fail(new ConnectError(`connect to ${url}: could not open the WebSocket`));
        }
      };
      ws.onmessage = (ev) => conn.onFrame(ev.data);
      ws.onclose = (ev) => {
        conn.closeCode = ev.code;
        // A drop: the client did not close it (nor saw a protocol violation or an error that
        // ends the connection): the gateway detached the resumable requests (§5.8).
        const dropped = conn.closeError === undefined && !NO_RESUME_AFTER.has(ev.code);
        conn.end(conn.closeError ?? errorFromClose(ev.code, ev.reason ?? ""), dropped);
        if (!opened) fail(new ConnectError(`connect to ${url}: the WebSocket closed (${ev.code})`));
      };
      conn.welcomed.promise.then(
        () => { clearTimeout(timer); resolve(conn); },
        (error: MuxgateError) => fail(error),
      );
    });
  }

  get isOpen(): boolean {
    return this.error === undefined;
  }

  get connectionId(): string | undefined {
    return this.welcome?.connection_id;
  }

  /** The connection's default user: `welcome.user_id`, else the anonymous user. */
  userOf(userId: string | undefined): string {
    return userId ?? this.welcome?.user_id ?? "";
  }

  // -- sending ------------------------------------------------------------------------------

  /** Queues one message for the next flush (never blocks; flushes batch). */
  send(message: Message): void {
    if (this.error !== undefined) throw this.error;
    let canonical: Message;
    try {
      canonical = checkOutgoing(message);
    } catch (exc) {
      if (exc instanceof ProtocolError) throw new InvalidRequest(exc.message, exc.code);
      throw exc;
    }
    const data = encode(canonical, this.settings.codec);
    const size = payloadBytes(data);
    if (size > this.limits.max_frame_bytes) {
      throw new InvalidRequest(
        `${message.type} message of ${size} bytes exceeds the gateway's max_frame_bytes (${this.limits.max_frame_bytes})`,
      );
    }
    this.outbox.push(data);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(() => this.flush());
    }
  }

  private flush(): void {
    this.flushScheduled = false;
    const outbox = this.outbox;
    while (outbox.length && this.error === undefined) {
      const batch = [outbox.shift()!];
      let size = payloadBytes(batch[0]!);
      while (
        outbox.length &&
        batch.length < this.limits.max_batch_messages &&
        size + 1 + payloadBytes(outbox[0]!) <= this.limits.max_frame_bytes
      ) {
        size += 1 + payloadBytes(outbox[0]!);
        batch.push(outbox.shift()!);
      }
      try {
        this.ws.send(joinBatch(batch, this.settings.codec));
      } catch {
        return; // the socket is closing: onclose fails what is in flight
      }
    }
  }

  /**
   * Sends `chat` (or `resume`: the low-level way to continue a resumable request here, §5.8)
   * once a stream slot is free; its exchange is registered when this resolves. For a resume,
   * `stream` says whether the chat being resumed had `stream: true`.
   */
  async start(message: ChatMessage | ResumeMessage, isAborted: () => boolean, observer?: ExchangeObserver, stream = true): Promise<Exchange> {
    const rid = message.request_id;
    this.checkUnique(rid);
    while (this.exchanges.size >= this.limits.max_streams) {
      if (this.error !== undefined) throw this.error;
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
      if (isAborted()) throw new Error("aborted");
    }
    if (this.error !== undefined) throw this.error;
    this.checkUnique(rid);
    const exchange = new Exchange(message, this.userOf(message.user_id), observer, stream);
    this.send(message);
    exchange.conn = this;
    this.exchanges.set(rid, exchange);
    return exchange;
  }

  /**
   * Continues the detached `exchange` here (§5.8), once a stream slot is free: sends `resume`
   * with its epoch and the seq of the last chunk it received (none: from seq 0), then the
   * cancels asked for meanwhile. The exchange is registered here when this resolves; if it
   * throws, the exchange stays detached (the connection ended: resume it on the next one) or
   * the error is the resume's own (refused locally).
   */
  async resume(exchange: Exchange): Promise<void> {
    const rid = exchange.requestId;
    while (this.exchanges.size >= this.limits.max_streams) {
      if (this.error !== undefined) throw this.error;
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    }
    if (this.error !== undefined) throw this.error;
    if (exchange.done || exchange.epoch === undefined) return; // ended meanwhile (the client closed)
    this.checkUnique(rid);
    const resume: Message = { type: "resume", request_id: rid, epoch: exchange.epoch };
    if (exchange.nextSeq > 0) resume.after_seq = exchange.nextSeq - 1;
    if (exchange.chatUserId !== undefined) resume.user_id = exchange.chatUserId;
    this.send(resume);
    exchange.rearm(this);
    this.exchanges.set(rid, exchange);
    for (const waiter of exchange.deferredCancels.splice(0)) this.sendCancel(exchange, waiter);
  }

  private checkUnique(requestId: string): void {
    // SPEC.md §5.6: unique per connection among unfinished requests (a resume of a request
    // running here is refused likewise, §5.8). Refused here, because the gateway's error would
    // be indistinguishable from one about the running request.
    if (this.exchanges.has(requestId)) {
      throw new RequestRefused("duplicate_request_id", "request_id is active on this connection", requestId);
    }
  }

  /** Queues a `cancel` for `exchange`; from now on its chunks are dropped. Returns a deferred
   * of the `cancel_result` if asked for. */
  cancel(exchange: Exchange, wantResult = false): Deferred<CancelStatus> | null {
    const waiter = wantResult ? deferred<CancelStatus>() : null;
    if (this.error !== undefined) {
      waiter?.reject(this.error);
      return waiter;
    }
    this.sendCancel(exchange, waiter);
    return waiter;
  }

  private sendCancel(exchange: Exchange, waiter: Deferred<CancelStatus> | null): void {
    const cancel: Message = { type: "cancel", request_id: exchange.requestId };
    if (exchange.chatUserId !== undefined) cancel.user_id = exchange.chatUserId;
    this.send(cancel);
    exchange.cancelSent = true;
    exchange.pendingCancels.push(waiter);
    exchange.keepChunks = false;
    exchange.dropChunks();
  }

  /** The caller gave up on `exchange` (aborted, stream left): cancel it on the gateway unless
   * it already has its answer or a cancel is on its way. */
  stop(exchange: Exchange): void {
    exchange.keepChunks = false;
    exchange.dropChunks();
    if (this.error === undefined && !exchange.done && !exchange.cancelSent) this.cancel(exchange);
  }

  // -- closing ------------------------------------------------------------------------------

  /** Sends what is queued (cancels go out first), then closes with 1000. */
  close(): void {
    if (this.error !== undefined) return;
    this.closeError = new ConnectionLost("the client closed the connection", 1000);
    this.flush();
    try {
      this.ws.close(1000);
    } catch {
      /* already closing */
    }
    this.end(this.closeError);
  }

  abort(code = 1000, reason = ""): void {
    this.closeError ??= new ConnectionLost("connection aborted");
    try {
      this.ws.close(code, reason);
    } catch {
      /* already closing */
    }
    this.end(this.closeError);
  }

  private end(error: MuxgateError, dropped = false): void {
    if (this.error !== undefined) return;
    this.error = error;
    this.welcomed.reject(error);
    const exchanges = [...this.exchanges.values()];
    this.exchanges.clear();
    const resume = dropped && (this.events.resumeAfterDrop?.() ?? false);
    const detached: Exchange[] = [];
    for (const exchange of exchanges) {
      if (exchange.conn === this) exchange.conn = undefined;
      if (resume && exchange.detachable) {
        exchange.detach(); // the gateway keeps it (§5.8): the client resumes it elsewhere
        detached.push(exchange);
      } else {
        exchange.fail(error);
      }
    }
    this.outbox = [];
    for (const wake of this.slotWaiters.splice(0)) wake();
    this.events.onClose(this, error, detached);
  }

  private violation(error: ProtocolViolation): void {
    this.closeError = error;
    this.abort(CLOSE_PROTOCOL_ERROR, "protocol violation");
  }

  // -- reading ------------------------------------------------------------------------------

  private onFrame(data: unknown): void {
    if (this.error !== undefined) return;
    const isText = typeof data === "string";
    if (isText !== (this.settings.codec === "json")) {
      this.violation(new ProtocolViolation("a frame of the wrong kind for the codec"));
      return;
    }
    const payload = isText ? (data as string) : new Uint8Array(data as ArrayBuffer);
    try {
      for (const item of decode(payload, this.settings.codec, "gateway")) {
        if (this.error !== undefined) return;
        if (item instanceof ProtocolError) {
          if (item.code === "unknown_type") continue; // SPEC.md §3.1, §10: newer gateways may send more
          throw new ProtocolViolation(`the gateway sent an invalid message: ${item.code}: ${item.message}`, item.requestId);
        }
        this.onMessage(item as GatewayMessage);
      }
    } catch (exc) {
      this.violation(exc instanceof ProtocolViolation ? exc : new ProtocolViolation(`internal client error: ${String(exc)}`));
    }
  }

  private exchange(requestId: string, what: string): Exchange {
    const exchange = this.exchanges.get(requestId);
    if (exchange === undefined || exchange.refused) {
      throw new ProtocolViolation(`${what} for unknown request ${requestId}`, requestId);
    }
    return exchange;
  }

  private onMessage(m: GatewayMessage): void {
    if (this.welcome === undefined && m.type !== "welcome" && m.type !== "error") {
      throw new ProtocolViolation(`${m.type} before welcome`);
    }
    switch (m.type) {
      case "chunk": {
        const ex = this.exchange(m.request_id, "chunk");
        ex.checkLive("chunk");
        if (ex.response !== undefined) throw new ProtocolViolation(`chunk after the response of ${m.request_id}`, m.request_id);
        ex.heard = true;
        if (!ex.stream) throw new ProtocolViolation(`chunk for non-streamed request ${m.request_id}`, m.request_id);
        if (m.seq !== ex.nextSeq) throw new ProtocolViolation(`chunk seq ${m.seq} of ${m.request_id}, expected ${ex.nextSeq}`, m.request_id);
        ex.nextSeq++;
        ex.addText(m.text);
        if (ex.keepChunks) {
          ex.chunks.push({ requestId: m.request_id, seq: m.seq, text: m.text });
          ex.bufferedChars += m.text.length;
          if (ex.bufferedChars > this.settings.maxBufferedChars) {
            // Bounded per-request buffer: a reader this far behind is dropped, not buffered.
            ex.error = new SlowConsumer(m.request_id, this.settings.maxBufferedChars);
            this.stop(ex);
          }
          ex.notify();
        }
        return;
      }
      case "step": {
        const ex = this.exchange(m.request_id, "step");
        ex.addStep({ requestId: m.request_id, index: m.index, kind: m.kind, name: m.name, state: m.state });
        return;
      }
      case "response": {
        const ex = this.exchange(m.request_id, "response");
        ex.checkLive("response");
        if (ex.response !== undefined) throw new ProtocolViolation(`a second response for ${m.request_id}`, m.request_id);
        // After a resume only the chunks since it arrived here: the content ends with them (§5.8).
        const matches = ex.firstSeq === 0 ? m.content === ex.text : m.content.endsWith(ex.text);
        if (m.status === "completed" && ex.stream && ex.textComplete && !matches) {
          throw new ProtocolViolation(`content of ${m.request_id} differs from its chunks (G3)`, m.request_id);
        }
        ex.heard = true;
        ex.response = toResponse(m);
        if (!m.usage.final) {
          ex.usagePending = true;
          ex.finalUsage = deferred<Usage>();
        }
        ex.setHalt(ex.response.halt, ex.response.usage);
        ex.notify();
        this.maybeFinished(ex);
        return;
      }
      case "usage": {
        const ex = this.exchange(m.request_id, "usage");
        ex.checkLive("usage");
        if (!ex.usagePending) throw new ProtocolViolation(`usage for ${m.request_id} that announced none`, m.request_id);
        ex.usagePending = false;
        const final = toUsage(m.usage);
        if (m.halt !== undefined) ex.setHalt(toHalt(m.halt), final);
        ex.finalUsage?.resolve(final);
        ex.notify();
        this.maybeFinished(ex);
        return;
      }
      case "cancel_result": {
        const ex = this.exchanges.get(m.request_id);
        if (ex === undefined || ex.pendingCancels.length === 0) {
          throw new ProtocolViolation(`cancel_result for no cancel of ${m.request_id}`, m.request_id);
        }
        if (ex.awaitingResume && !ex.refused) {
          throw new ProtocolViolation(`cancel_result for ${m.request_id} before its resume_result`, m.request_id);
        }
        // MOVED, GONE: the response went elsewhere (or nowhere), so any outcome may be true.
        if (!ex.refused && ex.endedHere === undefined) {
          const status = ex.response?.status;
          const ok =
            m.status === "not_found" ||
            ((m.status === "cancelled" || m.status === "already_cancelled") && status === "cancelled") ||
            (m.status === "already_completed" && (status === "completed" || status === "failed"));
          if (!ok) throw new ProtocolViolation(`cancel_result ${m.status} for ${m.request_id} in state ${status ?? "active"}`, m.request_id);
        }
        ex.pendingCancels.shift()?.resolve(m.status);
        this.maybeFinished(ex);
        return;
      }
      case "resumable":
        this.exchange(m.request_id, "resumable").setResumable(m);
        return;
      case "resume_result": {
        const ex = this.exchange(m.request_id, "resume_result");
        if (!ex.awaitingResume) throw new ProtocolViolation(`resume_result for ${m.request_id}, which awaits no resume`, m.request_id);
        ex.awaitingResume = false;
        ex.heard = true;
        if (m.status === "not_found") ex.endHere("gone", new ResumeNotFound(m.request_id));
        else {
          ex.resumes++;
          ex.notify();
        }
        this.maybeFinished(ex);
        return;
      }
      case "moved": {
        const ex = this.exchange(m.request_id, "moved");
        ex.checkLive("moved");
        if (ex.response !== undefined) throw new ProtocolViolation(`moved after the response of ${m.request_id}`, m.request_id);
        // Only a request some resume could name: its epoch came first (resumable, or our resume).
        if (ex.epoch === undefined) throw new ProtocolViolation(`moved for ${m.request_id}, which is not resumable`, m.request_id);
        ex.endHere("moved", new RequestMoved(m.request_id));
        this.maybeFinished(ex);
        return;
      }
      case "error":
        this.onError(m.code, m.message, m.request_id);
        return;
      case "welcome":
        if (this.welcome !== undefined) throw new ProtocolViolation("a second welcome");
        this.welcome = m;
        this.limits = m.limits;
        this.welcomed.resolve(m);
        return;
      case "pong":
        return;
    }
  }

  private onError(code: string, message: string, requestId: string | undefined): void {
    const error = errorFromCode(code, message, requestId);
    const ex = requestId !== undefined ? this.exchanges.get(requestId) : undefined;
    if (ex === undefined) {
      // Not about a request of ours: about the connection (unauthorized before the close 4001),
      // or a message the gateway could not attribute. Some request may never be answered: end
      // the connection rather than hang.
      this.closeError = error;
      if (code !== "unauthorized") this.abort(1000, "unexpected gateway error");
      else if (this.welcome === undefined) this.welcomed.reject(error);
      return;
    }
    if (!ex.heard && !ex.refused) {
      // The chat itself was refused (SPEC.md §3.3), or the resume (§3.4): no request exists
      // here, no response follows.
      ex.refused = true;
      ex.awaitingResume = false;
      ex.error = error;
      ex.keepChunks = false;
      ex.notify();
    } else if (ex.pendingCancels.length) {
      ex.pendingCancels.shift()?.reject(error);
    } else {
      throw new ProtocolViolation(`error ${code} about request ${requestId} that sent nothing to refuse`, requestId);
    }
    this.maybeFinished(ex);
  }

  private maybeFinished(ex: Exchange): void {
    if (ex.finished && this.exchanges.get(ex.requestId) === ex) {
      this.exchanges.delete(ex.requestId);
      this.slotWaiters.shift()?.();
    }
  }
}

