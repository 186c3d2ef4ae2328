/** What the SDK hands back: camelCase views of the wire messages (SPEC.md §3). */

import type {
  CancelReason, CancelStatus, HaltState, JsonValue, ResponseStatus, ResumeStatus, Role, StepState, UsageFigure,
} from "./wire.js";

export type { CancelReason, CancelStatus, HaltState, JsonValue, ResponseStatus, ResumeStatus, Role, StepState, UsageFigure };

/** Token accounting of one request (SPEC.md §5.4). `final` false: the figures may still grow. */
export interface Usage {
  inputTokens: number;
  outputTokens: number;
  /** An estimate of the tokens a cancel avoided; 0 unless cancelled. */
  savedTokens: number;
  final: boolean;
  /**
   * Which figures are the gateway's estimates rather than the model provider's counts
   * (SPEC.md §3.8): wire names, in the order "input_tokens", "output_tokens", "saved_tokens".
   * Absent: the gateway does not say (an older gateway); empty: every figure is reported.
   */
  estimated?: UsageFigure[];
}

/** The terminal response of one request (SPEC.md §3.7): exactly one per chat. */
export interface Response {
  requestId: string;
  status: ResponseStatus;
  /** The whole answer when completed; "" when cancelled or failed (no partial results). */
  content: string;
  /** Why it was cancelled (present exactly when cancelled). */
  reason?: CancelReason;
  /** What failed (present exactly when failed). */
  error?: { code: string; message: string };
  usage: Usage;
  /** Where the pipeline halts: only when cancelled, for a chat with `steps: true` (SPEC.md §3.12). */
  halt?: Halt;
}

/** A pipeline step, as `halt.step` names it (SPEC.md §3.12). */
export interface StepInfo {
  /** 0 for the request's first step, then 1, 2, ... in the order steps start. */
  index: number;
  /** `plan`, `llm`, `llm_stream` (abortable), `tool`, `agent`, or a kind this SDK does not know. */
  kind: string;
  /** The pipeline's name of the step (a tool's or agent's name, `answer`, ...), for display. */
  name: string;
}

/** One `step` message: a pipeline step started or ended (SPEC.md §3.12). */
export interface Step extends StepInfo {
  requestId: string;
  state: StepState;
}

/**
 * Where the pipeline of a cancelled request halts (SPEC.md §3.12). In the cancelled response:
 * `pending` with the non-abortable `step` it is finishing first (absent: it halts at its next
 * checkpoint), or `halted`. With the final usage: `halted`, `step` the last step started and
 * `aborted` true if that step was cut mid-way (an LLM stream told to stop).
 */
export interface Halt {
  state: HaltState;
  step?: StepInfo;
  aborted: boolean;
}

/** What the `resumable` message of a request says (SPEC.md §3.13): what a `resume` names. */
export interface ResumableInfo {
  requestId: string;
  /** This incarnation of the request: give it to {@link ResumeParams.epoch}. */
  epoch: string;
  /** How long the gateway keeps the request after its connection closed, waiting for a resume. */
  graceMs: number;
}

/** One piece of streamed text. Boundaries carry no meaning. */
export interface Chunk {
  requestId: string;
  seq: number;
  text: string;
}

/** `GET /v1/requests/{id}` (SPEC.md §8.2). */
export interface RequestInfo {
  requestId: string;
  status: "active" | "cancelling" | "cancelled" | "completed" | "failed" | "not_found";
  reason?: CancelReason;
  error?: { code: string; message: string };
  usage?: Usage;
}

/** A turn of a conversation (`messages` instead of `message`). */
export interface Turn {
  role: Role;
  content: string;
}

export interface ChatParams {
  /** A single user message; or give `messages`. */
  message?: string;
  messages?: Turn[];
  /** Client-chosen id (default: a random `req_...`); unique per user among unfinished requests. */
  requestId?: string;
  /** The user the request is for (default: the client's `userId`). */
  userId?: string;
  /** The gateway's deadline for the request; expiry cancels it with reason `timeout`. */
  timeoutMs?: number;
  /** Passed to the backend (e.g. the simulated backend's `tokens`, `token_delay_ms`). */
  metadata?: { [key: string]: JsonValue };
  /** Aborting sends the `cancel` frame and rejects with `signal.reason`. */
  signal?: AbortSignal;
  /**
   * Ask the gateway for the pipeline's steps and, after a cancel, where it halts (SPEC.md
   * §3.12). Default: true when `onStep` or `onHalt` is given (then `false` is refused), else
   * false. A gateway older than §3.12 ignores it (no steps, no halt).
   */
  steps?: boolean;
  /** Called for each `step` message of the request, in stream order: a step behind chunks
   * the loop has not read yet is reported once it has read them (or left the loop). */
  onStep?: (step: Step) => void;
  /** Called with the cancelled response's `halt` and usage, then (if that one was `pending`)
   * with the final `halted` one and the final usage. */
  onHalt?: (halt: Halt, usage: Usage) => void;
  /**
   * Ask the gateway to keep the request through a closed connection (SPEC.md §5.8): the
   * connection dropping detaches the request instead of cancelling it, and the client
   * reconnects and resumes it by itself (the stream or `chat()` just goes on; see `Muxi` and
   * `MuxiOptions.autoResume`), or {@link Muxi.resumeStream} continues it on another client
   * within the grace period. Default: true when `graceMs` or `onResumable` is given (then
   * `false` is refused), else the client's `resumable` option (default false). The gateway
   * answers with the request's epoch and grace (`stream.epoch`, `stream.graceMs`,
   * `onResumable`); a gateway older than §5.8 ignores it (they stay undefined, and a closed
   * connection fails the request with `ConnectionLost` as usual). A connection that drops
   * before the epoch arrived also fails it: there is nothing to name in a resume.
   */
  resumable?: boolean;
  /** How long the gateway should keep the detached request waiting for a resume, in ms
   * (1..3600000, `limits.MAX_GRACE_MS`); the gateway caps it (see `stream.graceMs`). */
  graceMs?: number;
  /** Called once with the request's epoch and granted grace, when its `resumable` message
   * arrives (before any chunk): how a `chat()` caller learns what to resume. */
  onResumable?: (info: ResumableInfo) => void;
}

/**
 * {@link Muxi.resumeStream}: continue a resumable request of this user on this client's
 * connection, from the chunk after `afterSeq` (SPEC.md §3.4, §5.8).
 */
export interface ResumeParams {
  /** The request to continue. */
  requestId: string;
  /** Its epoch, from its `resumable` message (`stream.epoch`, `onResumable`). */
  epoch: string;
  /** The seq of the last chunk the caller has (`stream.lastSeq`); absent: none, replay all. */
  afterSeq?: number;
  /** The user the request is for (default: the client's `userId`). */
  userId?: string;
  /** Whether the chat being resumed had `stream: true` (default true; `chat()` sends false):
   * a non-streamed request sends no chunks, only its whole content. */
  stream?: boolean;
  /** Aborting cancels the request on the gateway (a `cancel`) and rejects with `signal.reason`. */
  signal?: AbortSignal;
  /** As in {@link ChatParams.onStep}: the live steps (steps are not replayed, §5.8). */
  onStep?: (step: Step) => void;
  onHalt?: (halt: Halt, usage: Usage) => void;
}

export interface CancelOptions {
  userId?: string;
  signal?: AbortSignal;
}
