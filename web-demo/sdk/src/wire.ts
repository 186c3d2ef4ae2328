/**
 * Wire messages (SPEC.md §3) as plain objects in canonical field order (§9), and their
 * validation. A message object here is exactly what goes on the wire: snake_case fields,
 * optional fields absent (never `undefined`, never `null`), defaulted fields present.
 *
 * {@link parseMessage} turns a decoded peer object into a message or throws a
 * {@link ProtocolError} with the code the spec prescribes (bad_frame, unknown_type,
 * invalid_field) and the object's `request_id` when it had a valid one.
 * {@link checkOutgoing} runs the same checks on a message we are about to send.
 */

import { ProtocolError } from "./errors.js";
import * as limits from "./limits.js";

export type Sender = "client" | "gateway";
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

export type Role = "system" | "user" | "assistant" | "tool";
export type ResponseStatus = "completed" | "cancelled" | "failed";
export type CancelReason = "client" | "api" | "timeout" | "disconnect" | "shutdown";
export type CancelStatus = "cancelled" | "already_cancelled" | "already_completed" | "not_found";
/** `resume_result.status` (SPEC.md §3.13, §5.8). */
export type ResumeStatus = "resumed" | "not_found";
export type StepState = "started" | "ended";
export type HaltState = "pending" | "halted";

/** The figures `usage.estimated` may name, in canonical order (SPEC.md §3.8). */
export const USAGE_FIGURES = ["input_tokens", "output_tokens", "saved_tokens"] as const;
export type UsageFigure = (typeof USAGE_FIGURES)[number];

export interface WireUsage {
  input_tokens: number;
  output_tokens: number;
  saved_tokens: number;
  final: boolean;
  /** The figures that are the gateway's estimates; absent: the gateway does not say (§3.8). */
  estimated?: UsageFigure[];
}
/** A pipeline step as `halt.step` names it (SPEC.md §3.12). */
export interface WireStepInfo { index: number; kind: string; name: string }
/** Where a cancelled request's pipeline halts (SPEC.md §3.12); `aborted` always written. */
export interface WireHalt { state: HaltState; step?: WireStepInfo; aborted: boolean }
export interface WireLimits {
  max_streams: number;
  max_frame_bytes: number;
  max_batch_messages: number;
  max_timeout_ms: number;
}
export interface HelloMessage { type: "hello"; token?: string; client_key?: string; user_id?: string }
export interface ChatMessage {
  type: "chat";
  request_id: string;
  message?: string;
  messages?: { role: Role; content: string }[];
  stream: boolean;
  user_id?: string;
  timeout_ms?: number;
  metadata?: { [key: string]: JsonValue };
  /** Ask for `step` messages and `halt` objects (§3.12); canonical: present only when true (§9). */
  steps?: boolean;
  /** Survive a closed connection, resumable with `resume` (§5.8); canonical: present only when true (§9). */
  resumable?: boolean;
  /** How long a detached request waits for a `resume`, 1..MAX_GRACE_MS; only with `resumable: true`. */
  grace_ms?: number;
}
export interface CancelMessage { type: "cancel"; request_id: string; user_id?: string; reason?: string }
/** Continue a resumable request on this connection after the chunk `after_seq` (§3.4, §5.8). */
export interface ResumeMessage { type: "resume"; request_id: string; epoch: string; after_seq?: number; user_id?: string }
export interface PingMessage { type: "ping"; id?: string | number }
export interface WelcomeMessage { type: "welcome"; connection_id: string; user_id?: string; limits: WireLimits }
export interface ChunkMessage { type: "chunk"; request_id: string; seq: number; text: string }
export interface StepMessage {
  type: "step";
  request_id: string;
  index: number;
  kind: string;
  name: string;
  state: StepState;
}
export interface ResponseMessage {
  type: "response";
  request_id: string;
  status: ResponseStatus;
  content: string;
  reason?: CancelReason;
  error?: { code: string; message: string };
  usage: WireUsage;
  /** Only when cancelled, for a chat with `steps: true` (§3.12). */
  halt?: WireHalt;
}
export interface UsageMessage { type: "usage"; request_id: string; usage: WireUsage; halt?: WireHalt }
export interface CancelResultMessage { type: "cancel_result"; request_id: string; status: CancelStatus }
/** The first message about a chat with `resumable: true`: its incarnation and grace (§3.13). */
export interface ResumableMessage { type: "resumable"; request_id: string; epoch: string; grace_ms: number }
/** The answer to one `resume` (§3.13). */
export interface ResumeResultMessage { type: "resume_result"; request_id: string; status: ResumeStatus }
/** The request was resumed on another connection: nothing more about it comes on this one (§3.13). */
export interface MovedMessage { type: "moved"; request_id: string }
export interface ErrorMessage { type: "error"; code: string; message: string; request_id?: string }
export interface PongMessage { type: "pong"; id?: string | number }

export type ClientMessage = HelloMessage | ChatMessage | CancelMessage | ResumeMessage | PingMessage;
export type GatewayMessage =
  | WelcomeMessage | ChunkMessage | StepMessage | ResponseMessage | UsageMessage | CancelResultMessage
  | ResumableMessage | ResumeResultMessage | MovedMessage | ErrorMessage | PongMessage;
export type Message = ClientMessage | GatewayMessage;

const CLIENT_TYPES = new Set(["hello", "chat", "cancel", "resume", "ping"]);
const GATEWAY_TYPES = new Set([
  "welcome", "chunk", "step", "response", "usage", "cancel_result", "resumable", "resume_result", "moved", "error", "pong",
]);

/** Marks msgpack maps that had `bin` keys (kept apart, SPEC.md §2.3): a non-enumerable count. */
export const BIN_KEYS: unique symbol = Symbol("muxgate.binKeys");

/** A msgpack float whose value is integral: not an integer on the wire (SPEC.md §3.1). */
export class Float64 {
  constructor(readonly value: number) {}
}
/** A msgpack extension value: never a JSON value. */
export class ExtValue {
  constructor(readonly extType: number, readonly data: Uint8Array) {}
}

// --- checks --------------------------------------------------------------------------------------

class FieldError extends Error {}
const invalid = (message: string) => new FieldError(message);

type Obj = Record<string, unknown>;

function isPlainObject(v: unknown): v is Obj {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

const LONE_SURROGATE = /\p{Surrogate}/u;

function checkStr(name: string, v: unknown, maxChars: number, minChars = 0): asserts v is string {
  if (typeof v !== "string") throw invalid(`${name} must be a string`);
  // A string of n UTF-16 units has between n/2 and n code points: count only near the bounds.
  if (v.length > maxChars || v.length < minChars) {
    const n = limits.charCount(v);
    if (n > maxChars || n < minChars) throw invalid(`${name} must have ${minChars}-${maxChars} characters`);
  }
  if (LONE_SURROGATE.test(v)) throw invalid(`${name} is not valid Unicode (lone surrogate)`);
}

function checkInt(name: string, v: unknown, min: number, max: number): asserts v is number {
  if (typeof v !== "number" || !Number.isInteger(v)) throw invalid(`${name} must be an integer`);
  if (v < min || v > max) throw invalid(`${name} must be in ${min}..${max}`);
}

function checkBool(name: string, v: unknown): asserts v is boolean {
  if (typeof v !== "boolean") throw invalid(`${name} must be a boolean`);
}

function checkRequestId(v: unknown): asserts v is string {
  if (typeof v !== "string" || !limits.REQUEST_ID_PATTERN.test(v)) {
    throw invalid("request_id must be 1-128 characters of [A-Za-z0-9._:-]");
  }
}

function checkEpoch(v: unknown): asserts v is string {
  if (typeof v !== "string" || !limits.EPOCH_PATTERN.test(v)) throw invalid("epoch must be 1-64 characters of [A-Za-z0-9._:-]");
}

function checkUserId(v: unknown): void {
  if (v !== undefined && (typeof v !== "string" || !limits.USER_ID_PATTERN.test(v))) {
    throw invalid("user_id must be 1-128 characters of [A-Za-z0-9._:@-]");
  }
}

function checkEnum<T extends string>(name: string, v: unknown, allowed: readonly T[]): asserts v is T {
  if (typeof v !== "string" || !(allowed as readonly string[]).includes(v)) {
    throw invalid(`${name} must be one of: ${allowed.join(", ")}`);
  }
}

function checkErrorCode(name: string, v: unknown): asserts v is string {
  if (typeof v !== "string") throw invalid(`${name} must be a string`);
  if (!limits.ERROR_CODE_PATTERN.test(v)) throw invalid(`${name} must be a snake_case word of at most 64 characters`);
}

function checkPingId(v: unknown): void {
  if (v === undefined) return;
  if (typeof v === "string") checkStr("id", v, limits.MAX_PING_ID_CHARS);
  else if (typeof v === "number" && Number.isInteger(v)) checkInt("id", v, -limits.MAX_SAFE_INTEGER, limits.MAX_SAFE_INTEGER);
  else throw invalid("id must be a string or an integer");
}

/** Metadata: plain JSON values only (SPEC.md §2.5). Returns the value with integral msgpack
 * floats unwrapped to numbers (a language with one number type cannot keep them apart, §9). */
function jsonValue(v: unknown, depth: number): JsonValue {
  if (v === null || typeof v === "boolean") return v;
  if (typeof v === "string") {
    if (LONE_SURROGATE.test(v)) throw invalid("metadata strings must be valid Unicode");
    return v;
  }
  if (typeof v === "number") {
    if (!Number.isFinite(v)) throw invalid("metadata numbers must be finite");
    if (Number.isInteger(v) && Math.abs(v) > limits.MAX_SAFE_INTEGER) {
      throw invalid("metadata integers must be within +-(2**53-1)");
    }
    return v;
  }
  if (v instanceof Float64) {
    if (!Number.isFinite(v.value)) throw invalid("metadata numbers must be finite");
    return v.value;
  }
  if (typeof v === "bigint") throw invalid("metadata integers must be within +-(2**53-1)");
  if (Array.isArray(v)) {
    if (depth > limits.MAX_METADATA_DEPTH) throw invalid(`metadata nests deeper than ${limits.MAX_METADATA_DEPTH}`);
    return v.map((item) => jsonValue(item, depth + 1));
  }
  if (isPlainObject(v)) {
    if (depth > limits.MAX_METADATA_DEPTH) throw invalid(`metadata nests deeper than ${limits.MAX_METADATA_DEPTH}`);
    if ((v as { [BIN_KEYS]?: number })[BIN_KEYS]) throw invalid("metadata keys must be strings");
    const out: { [key: string]: JsonValue } = {};
    for (const key of Object.keys(v)) {
      if (LONE_SURROGATE.test(key)) throw invalid("metadata keys must be valid Unicode");
      define(out, key, jsonValue(v[key], depth + 1));
    }
    return out;
  }
  throw invalid("metadata must contain only JSON values");
}

/** Sets `key` as an own enumerable property, also when it is `__proto__`. */
export function define(obj: Obj, key: string, value: unknown): void {
  if (key === "__proto__") Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
  else obj[key] = value;
}

const encoder = new TextEncoder();

function metadata(v: unknown): { [key: string]: JsonValue } | undefined {
  if (v === undefined) return undefined;
  if (!isPlainObject(v)) throw invalid("metadata must be an object");
  const out = jsonValue(v, 1) as { [key: string]: JsonValue };
  if (encoder.encode(JSON.stringify(out)).length > limits.MAX_METADATA_BYTES) {
    throw invalid(`metadata exceeds ${limits.MAX_METADATA_BYTES} bytes as JSON`);
  }
  return out;
}

// --- from wire objects -----------------------------------------------------------------------------

/** A field's value; `null` means absent (SPEC.md §3.1). */
function field(o: Obj, name: string, required = false): unknown {
  const v = Object.prototype.hasOwnProperty.call(o, name) ? o[name] : undefined;
  if (v === undefined || v === null) {
    if (required) throw invalid(`${name} is required`);
    return undefined;
  }
  return v;
}

function object(name: string, v: unknown): Obj {
  if (!isPlainObject(v)) throw invalid(`${name} must be an object`);
  return v;
}

/** Builds an object from [key, value] pairs in order, skipping undefined values. */
function ordered<T>(pairs: [string, unknown][]): T {
  const out: Obj = {};
  for (const [k, v] of pairs) if (v !== undefined) out[k] = v;
  return out as T;
}

function usage(v: unknown): WireUsage {
  const o = object("usage", v);
  const input = field(o, "input_tokens", true);
  const output = field(o, "output_tokens", true);
  const saved = field(o, "saved_tokens", true);
  const final = field(o, "final") ?? true;
  checkInt("usage.input_tokens", input, 0, limits.MAX_SAFE_INTEGER);
  checkInt("usage.output_tokens", output, 0, limits.MAX_SAFE_INTEGER);
  checkInt("usage.saved_tokens", saved, 0, limits.MAX_SAFE_INTEGER);
  checkBool("usage.final", final);
  const estimated = field(o, "estimated");
  const u: WireUsage = { input_tokens: input, output_tokens: output, saved_tokens: saved, final };
  if (estimated !== undefined) u.estimated = estimatedOf(estimated);
  return u;
}

/** `usage.estimated`: distinct known figure names, returned in canonical order (§3.8). */
function estimatedOf(v: unknown): UsageFigure[] {
  if (!Array.isArray(v)) throw invalid("usage.estimated must be an array");
  const seen = new Set<string>();
  for (const item of v) {
    if (typeof item !== "string" || !(USAGE_FIGURES as readonly string[]).includes(item)) {
      throw invalid(`usage.estimated entries must be one of ${USAGE_FIGURES.join(", ")}`);
    }
    if (seen.has(item)) throw invalid(`usage.estimated lists ${item} twice`);
    seen.add(item);
  }
  return USAGE_FIGURES.filter((name) => seen.has(name));
}

function limitsOf(v: unknown): WireLimits {
  const o = object("limits", v);
  const streams = field(o, "max_streams") ?? limits.DEFAULT_MAX_STREAMS;
  const frame = field(o, "max_frame_bytes") ?? limits.MAX_FRAME_BYTES;
  const batch = field(o, "max_batch_messages") ?? limits.MAX_BATCH_MESSAGES;
  const timeout = field(o, "max_timeout_ms") ?? limits.MAX_TIMEOUT_MS;
  checkInt("limits.max_streams", streams, 1, 1_000_000);
  checkInt("limits.max_frame_bytes", frame, 1024, limits.MAX_FRAME_BYTES);
  checkInt("limits.max_batch_messages", batch, 1, limits.MAX_BATCH_MESSAGES);
  checkInt("limits.max_timeout_ms", timeout, 1, limits.MAX_TIMEOUT_MS);
  return { max_streams: streams, max_frame_bytes: frame, max_batch_messages: batch, max_timeout_ms: timeout };
}

const STEP_STATES = ["started", "ended"] as const;
const HALT_STATES = ["pending", "halted"] as const;

/** `step.index`, `step.kind`, `step.name` (also `halt.step`'s), §3.12. */
function stepFields(o: Obj, prefix: string): WireStepInfo {
  const index = field(o, "index", true);
  const kind = field(o, "kind", true);
  const name = field(o, "name", true);
  checkInt(`${prefix}.index`, index, 0, limits.MAX_SAFE_INTEGER);
  if (typeof kind !== "string" || !limits.STEP_KIND_PATTERN.test(kind)) {
    throw invalid(`${prefix}.kind must be a snake_case word of at most 32 characters`);
  }
  checkStr(`${prefix}.name`, name, limits.MAX_STEP_NAME_CHARS, 1);
  return { index, kind, name };
}

/** The `halt` object (§3.12): `aborted` defaults to false and needs a halted step. */
function haltOf(v: unknown): WireHalt | undefined {
  if (v === undefined) return undefined;
  const o = object("halt", v);
  const state = field(o, "state", true);
  checkEnum("halt.state", state, HALT_STATES);
  const stepValue = field(o, "step");
  const step = stepValue === undefined ? undefined : stepFields(object("halt.step", stepValue), "halt.step");
  const aborted = field(o, "aborted") ?? false;
  checkBool("halt.aborted", aborted);
  if (aborted && (state !== "halted" || step === undefined)) throw invalid("halt.aborted names a step the pipeline halted in");
  return ordered([["state", state], ["step", step], ["aborted", aborted]]);
}

const ROLES = ["system", "user", "assistant", "tool"] as const;
const STATUSES = ["completed", "cancelled", "failed"] as const;
const REASONS = ["client", "api", "timeout", "disconnect", "shutdown"] as const;
const CANCEL_STATUSES = ["cancelled", "already_cancelled", "already_completed", "not_found"] as const;
const RESUME_STATUSES = ["resumed", "not_found"] as const;

function chatMessages(v: unknown): { role: Role; content: string }[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v)) throw invalid("messages must be a list");
  if (v.length < 1 || v.length > limits.MAX_MESSAGES) throw invalid(`messages must have 1-${limits.MAX_MESSAGES} entries`);
  return v.map((item) => {
    const turn = object("messages[]", item);
    const role = field(turn, "role", true);
    const content = field(turn, "content", true);
    checkEnum("messages[].role", role, ROLES);
    checkStr("messages[].content", content, limits.MAX_MESSAGE_CHARS);
    return { role, content };
  });
}

function fromWire(type: string, o: Obj): Message {
  switch (type) {
    case "hello": {
      const token = field(o, "token");
      const clientKey = field(o, "client_key");
      const userId = field(o, "user_id");
      if (token !== undefined) checkStr("token", token, limits.MAX_TOKEN_CHARS);
      if (clientKey !== undefined) checkStr("client_key", clientKey, limits.MAX_CLIENT_KEY_CHARS);
      checkUserId(userId);
      return ordered([["type", type], ["token", token], ["client_key", clientKey], ["user_id", userId]]);
    }
    case "chat": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const message = field(o, "message");
      const messages = field(o, "messages");
      if ((message === undefined) === (messages === undefined)) throw invalid("exactly one of message and messages is required");
      if (message !== undefined) checkStr("message", message, limits.MAX_MESSAGE_CHARS);
      const turns = chatMessages(messages);
      const stream = field(o, "stream") ?? true;
      checkBool("stream", stream);
      const userId = field(o, "user_id");
      checkUserId(userId);
      const timeoutMs = field(o, "timeout_ms");
      if (timeoutMs !== undefined) checkInt("timeout_ms", timeoutMs, 1, limits.MAX_TIMEOUT_MS);
      const meta = metadata(field(o, "metadata"));
      const steps = field(o, "steps") ?? false;
      checkBool("steps", steps);
      const resumable = field(o, "resumable") ?? false;
      checkBool("resumable", resumable);
      const graceMs = field(o, "grace_ms");
      if (graceMs !== undefined) {
        if (!resumable) throw invalid("grace_ms is only for a resumable chat");
        checkInt("grace_ms", graceMs, 1, limits.MAX_GRACE_MS);
      }
      return ordered([
        ["type", type], ["request_id", requestId], ["message", message], ["messages", turns], ["stream", stream],
        ["user_id", userId], ["timeout_ms", timeoutMs], ["metadata", meta], ["steps", steps || undefined],
        ["resumable", resumable || undefined], ["grace_ms", graceMs],
      ]);
    }
    case "cancel": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const userId = field(o, "user_id");
      checkUserId(userId);
      const reason = field(o, "reason");
      if (reason !== undefined) checkStr("reason", reason, limits.MAX_REASON_CHARS);
      return ordered([["type", type], ["request_id", requestId], ["user_id", userId], ["reason", reason]]);
    }
    case "resume": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const epoch = field(o, "epoch", true);
      checkEpoch(epoch);
      const afterSeq = field(o, "after_seq");
      if (afterSeq !== undefined) checkInt("after_seq", afterSeq, 0, limits.MAX_SAFE_INTEGER);
      const userId = field(o, "user_id");
      checkUserId(userId);
      return ordered([["type", type], ["request_id", requestId], ["epoch", epoch], ["after_seq", afterSeq], ["user_id", userId]]);
    }
    case "ping":
    case "pong": {
      const id = field(o, "id");
      checkPingId(id);
      return ordered([["type", type], ["id", id]]);
    }
    case "welcome": {
      const connectionId = field(o, "connection_id", true);
      checkStr("connection_id", connectionId, limits.MAX_CONNECTION_ID_CHARS, 1);
      const userId = field(o, "user_id");
      checkUserId(userId);
      const lim = limitsOf(field(o, "limits", true));
      return ordered([["type", type], ["connection_id", connectionId], ["user_id", userId], ["limits", lim]]);
    }
    case "chunk": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const seq = field(o, "seq", true);
      checkInt("seq", seq, 0, limits.MAX_SAFE_INTEGER);
      const text = field(o, "text", true);
      checkStr("text", text, limits.MAX_FRAME_BYTES, 1);
      return { type, request_id: requestId, seq, text };
    }
    case "step": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const { index, kind, name } = stepFields(o, "step");
      const state = field(o, "state", true);
      checkEnum("step.state", state, STEP_STATES);
      return { type, request_id: requestId, index, kind, name, state };
    }
    case "response": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const status = field(o, "status", true);
      checkEnum("status", status, STATUSES);
      const content = field(o, "content", true);
      if (typeof content !== "string") throw invalid("content must be a string");
      checkStr("content", content, Number.MAX_SAFE_INTEGER);
      if (status !== "completed" && content) throw invalid("content must be empty unless completed (no partial results)");
      const reason = field(o, "reason");
      if (status === "cancelled") checkEnum("reason", reason, REASONS);
      else if (reason !== undefined) throw invalid("reason is only for cancelled responses");
      const errorValue = field(o, "error");
      let error: { code: string; message: string } | undefined;
      if (errorValue !== undefined) {
        const e = object("error", errorValue);
        const code = field(e, "code", true);
        const message = field(e, "message", true);
        checkErrorCode("error.code", code);
        checkStr("error.message", message, limits.MAX_ERROR_MESSAGE_CHARS);
        error = { code, message };
      }
      if (status === "failed") {
        if (error === undefined) throw invalid("error is required for failed responses");
      } else if (error !== undefined) throw invalid("error is only for failed responses");
      const u = usage(field(o, "usage", true));
      if (!u.final && status !== "cancelled") throw invalid("usage.final may be false only for cancelled responses");
      const halt = haltOf(field(o, "halt"));
      if (halt !== undefined) {
        if (status !== "cancelled") throw invalid("halt is only for cancelled responses");
        if (halt.state === "pending" && u.final) throw invalid("a pending halt comes with usage.final false");
      }
      return ordered([
        ["type", type], ["request_id", requestId], ["status", status], ["content", content], ["reason", reason],
        ["error", error], ["usage", u], ["halt", halt],
      ]);
    }
    case "usage": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const u = usage(field(o, "usage", true));
      if (!u.final) throw invalid("usage must be an object with final: true");
      const halt = haltOf(field(o, "halt"));
      if (halt !== undefined && halt.state !== "halted") throw invalid("usage.halt must be an object with state halted");
      return ordered([["type", type], ["request_id", requestId], ["usage", u], ["halt", halt]]);
    }
    case "cancel_result": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const status = field(o, "status", true);
      checkEnum("status", status, CANCEL_STATUSES);
      return { type, request_id: requestId, status };
    }
    case "resumable": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const epoch = field(o, "epoch", true);
      checkEpoch(epoch);
      const graceMs = field(o, "grace_ms", true);
      checkInt("grace_ms", graceMs, 1, limits.MAX_GRACE_MS);
      return { type, request_id: requestId, epoch, grace_ms: graceMs };
    }
    case "resume_result": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      const status = field(o, "status", true);
      checkEnum("status", status, RESUME_STATUSES);
      return { type, request_id: requestId, status };
    }
    case "moved": {
      const requestId = field(o, "request_id", true);
      checkRequestId(requestId);
      return { type, request_id: requestId };
    }
    case "error": {
      const code = field(o, "code", true);
      checkErrorCode("code", code);
      const message = field(o, "message", true);
      checkStr("message", message, limits.MAX_ERROR_MESSAGE_CHARS);
      const requestId = field(o, "request_id");
      if (requestId !== undefined) checkRequestId(requestId);
      return ordered([["type", type], ["code", code], ["message", message], ["request_id", requestId]]);
    }
  }
  throw new Error(`unhandled type ${type}`);
}

function validRequestId(o: Obj): string | undefined {
  const id = Object.prototype.hasOwnProperty.call(o, "request_id") ? o.request_id : undefined;
  return typeof id === "string" && limits.REQUEST_ID_PATTERN.test(id) ? id : undefined;
}

/**
 * Validate one decoded object sent by `sender` (SPEC.md §3.1 validation order). Unknown fields
 * are dropped. Throws {@link ProtocolError}.
 */
export function parseMessage(obj: unknown, sender: Sender): Message {
  if (!isPlainObject(obj)) throw new ProtocolError("bad_frame", "a message must be an object");
  const type = Object.prototype.hasOwnProperty.call(obj, "type") ? obj.type : undefined;
  if (typeof type !== "string") throw new ProtocolError("bad_frame", "a message needs a string 'type'");
  const types = sender === "client" ? CLIENT_TYPES : GATEWAY_TYPES;
  if (!types.has(type)) {
    const shown = type.length <= 64 ? type : `${type.slice(0, 64)}...`;
    throw new ProtocolError("unknown_type", `unknown ${sender} message type ${JSON.stringify(shown)}`, validRequestId(obj));
  }
  try {
    return fromWire(type, obj);
  } catch (exc) {
    if (exc instanceof FieldError) throw new ProtocolError("invalid_field", exc.message, validRequestId(obj));
    throw exc;
  }
}

/**
 * Validate a message we are about to send; returns it in canonical form (field order, absent
 * optional fields, present defaults). Throws {@link ProtocolError} `invalid_field` (the client
 * maps it to `InvalidRequest`).
 */
export function checkOutgoing<M extends Message>(message: M): M {
  const sender: Sender = CLIENT_TYPES.has(message.type) ? "client" : "gateway";
  const copy: Obj = {};
  for (const [k, v] of Object.entries(message)) if (v !== undefined) define(copy, k, v);
  return parseMessage(copy, sender) as M;
}
