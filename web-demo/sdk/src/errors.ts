/**
 * The SDK's errors: one small tree (mirrors the Python SDK, gateway/client/_errors.py).
 *
 * ```text
 * MuxgateError                  .code: the wire error code when there is one (SPEC.md §7)
 *  ├── InvalidRequest           our own bad input, refused before anything is sent
 *  ├── TransportError           the network, not the request
 *  │    ├── ConnectError        could not open the WebSocket / reach the HTTP API
 *  │    └── ConnectionLost      the WebSocket closed while the request was in flight
 *  │         │                  (.closeCode, .closeReason); the next call reconnects
 *  │         ├── GatewayShuttingDown   closed with 1001: the gateway is draining
 *  │         └── ResumeFailed   a resumable request could not go on after its connection
 *  │                            dropped: reconnecting gave up (.requestId, .cause)
 *  ├── ProtocolViolation        the gateway broke the protocol (SPEC.md §5.1, G1-G3)
 *  ├── Unauthorized             credentials missing or invalid (error/close 4001, HTTP 401)
 *  ├── RequestRefused           an `error` refused a chat or cancel (.requestId), e.g.
 *  │    │                       too_many_streams, duplicate_request_id, rate_limited
 *  │    └── Forbidden           valid credentials that may not act for that user (HTTP 403)
 *  ├── SlowConsumer             a stream's reader fell too far behind its bounded buffer
 *  ├── RequestFailed            the request ended with status `failed` (.response)
 *  ├── RequestMoved             a resumable request was resumed on another connection
 *  │                            (`moved`, SPEC.md §5.8): it goes on there, not here (.requestId)
 *  └── ResumeNotFound           a `resume` found nothing to continue (`resume_result`
 *                               `not_found`, SPEC.md §5.8) (.requestId)
 * ```
 *
 * A *cancelled* request is not an error: `chat()` resolves with its `Response` whose `status`
 * is `"cancelled"` (the seed page's behaviour). Aborting an `AbortSignal` rejects with the
 * signal's `reason` (an `AbortError` `DOMException` by default), as `fetch` does, after the SDK
 * has sent the `cancel` frame.
 *
 * {@link ProtocolError} is not part of the tree: it is what the codec reports for one bad
 * message of a frame (the gateway's view of the peer's bad input, used by the vectors).
 */

import type { Response } from "./types.js";

export class MuxgateError extends Error {
  /** The wire error code (SPEC.md §7), when there is one. */
  readonly code: string | undefined;
  constructor(message: string, code?: string) {
    super(message);
    this.name = new.target.name;
    this.code = code;
  }
}

export class InvalidRequest extends MuxgateError {}

export class TransportError extends MuxgateError {}

export class ConnectError extends TransportError {
  /** The HTTP status of a refused handshake or API call, if known. */
  readonly status: number | undefined;
  constructor(message: string, status?: number) {
    super(message);
    this.status = status;
  }
}

export class ConnectionLost extends TransportError {
  readonly closeCode: number | undefined;
  readonly closeReason: string;
  constructor(message: string, closeCode?: number, closeReason = "") {
    super(message);
    this.closeCode = closeCode;
    this.closeReason = closeReason;
  }
}

export class GatewayShuttingDown extends ConnectionLost {}

/**
 * A resumable request (SPEC.md §5.8) could not go on after its connection dropped: the client
 * kept reconnecting for `reconnect.resumeTimeoutMs` (or stopped at once: the gateway refused the
 * credentials, or broke the protocol) and gave up. `closeCode` and `closeReason` are those of
 * the drop; `cause` is the last reconnection attempt's error. The request may still run on the
 * gateway until its grace period ends; a cancel asked for meanwhile (Stop) was sent over HTTP
 * (`DELETE /v1/requests/{id}`) instead.
 */
export class ResumeFailed extends ConnectionLost {
  readonly requestId: string;
  constructor(message: string, requestId: string, closeCode?: number, closeReason = "", cause?: unknown) {
    super(message, closeCode, closeReason);
    this.requestId = requestId;
    if (cause !== undefined) (this as { cause?: unknown }).cause = cause;
  }
}

export class ProtocolViolation extends MuxgateError {
  readonly requestId: string | undefined;
  constructor(message: string, requestId?: string) {
    super(message, "protocol_violation");
    this.requestId = requestId;
  }
}

export class Unauthorized extends MuxgateError {
  constructor(message = "missing or invalid credentials") {
    super(message, "unauthorized");
  }
}

export class RequestRefused extends MuxgateError {
  readonly requestId: string | undefined;
  readonly detail: string;
  constructor(code: string, detail: string, requestId?: string) {
    super(`${code}: ${detail}`, code);
    this.detail = detail;
    this.requestId = requestId;
  }
}

export class Forbidden extends RequestRefused {
  constructor(detail: string, requestId?: string) {
    super("forbidden", detail, requestId);
  }
}

export class SlowConsumer extends MuxgateError {
  readonly requestId: string;
  constructor(requestId: string, limit: number) {
    super(`stream ${requestId} buffered more than ${limit} characters unread; it was cancelled`);
    this.requestId = requestId;
  }
}

export class RequestFailed extends MuxgateError {
  readonly response: Response;
  readonly requestId: string;
  constructor(response: Response) {
    const code = response.error?.code ?? "internal";
    const message = response.error?.message ?? "the request failed";
    super(`request ${response.requestId} failed: ${code}: ${message}`, code);
    this.response = response;
    this.requestId = response.requestId;
  }
}

/**
 * The request was resumed on another connection (a `moved` message, SPEC.md §5.8): nothing more
 * about it comes on this one. Its stream ends here with this error, after the chunks received
 * before the `moved`; the request itself goes on (its chunks and response go to the connection
 * that resumed it), so this is not a cancel. `.code` is undefined: no wire error code.
 */
export class RequestMoved extends MuxgateError {
  readonly requestId: string;
  constructor(requestId: string) {
    super(`request ${requestId} was resumed on another connection (moved)`);
    this.requestId = requestId;
  }
}

/**
 * A `resume` found nothing to continue (`resume_result` `not_found`, SPEC.md §5.8): no such
 * request of this user, another incarnation of the id (another epoch, or the gateway
 * restarted), or it is no longer resumable (its grace period ended). Nothing about it follows.
 * Also how a resumable stream ends when the client's own resume after a dropped connection
 * finds nothing (the client was away longer than the grace period).
 */
export class ResumeNotFound extends MuxgateError {
  readonly requestId: string;
  constructor(requestId: string) {
    super(`nothing to resume for request ${requestId} (not_found)`);
    this.requestId = requestId;
  }
}

/** One refused message of a decoded frame: the error the gateway (or a client) answers with. */
export class ProtocolError extends Error {
  readonly code: string;
  readonly requestId: string | undefined;
  constructor(code: string, message: string, requestId?: string) {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
    this.requestId = requestId;
  }
}

/** The exception for a gateway `error` message or an HTTP error body. */
export function errorFromCode(code: string, message: string, requestId?: string): MuxgateError {
  if (code === "unauthorized") return new Unauthorized(message);
  if (code === "forbidden") return new Forbidden(message, requestId);
  return new RequestRefused(code, message, requestId);
}

/** The exception for requests in flight when the WebSocket closed (SPEC.md §2.6). */
export function errorFromClose(code: number | undefined, reason: string): MuxgateError {
  const shown = code !== undefined ? `${code} ${reason}`.trim() : "no close frame";
  if (code === 1001) return new GatewayShuttingDown(`the gateway is shutting down (close ${shown})`, code, reason);
  if (code === 4001) return new Unauthorized(`the gateway refused the credentials (close ${shown})`);
  return new ConnectionLost(`connection lost (close ${shown})`, code, reason);
}
