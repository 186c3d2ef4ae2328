/** What the SDK hands back: camelCase views of the wire messages (SPEC.md §3). */

import type { CancelReason, CancelStatus, JsonValue, ResponseStatus, Role, UsageFigure } from "./wire.js";

export type { CancelReason, CancelStatus, JsonValue, ResponseStatus, Role, UsageFigure };

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
}

export interface CancelOptions {
  userId?: string;
  signal?: AbortSignal;
}
