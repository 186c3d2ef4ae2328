/**
 * Codecs: messages to frame payloads and frames back to messages (SPEC.md §2, §9).
 *
 * - `json` (`muxgate.v1.json`): text frames; one compact JSON object per message, a batch
 *   joined by `\n`. `JSON.stringify` of a canonically ordered object is canonical (§9).
 * - `msgpack` (`muxgate.v1.msgpack`): binary frames; one map per message, a batch concatenated.
 */

import { Encoder } from "@msgpack/msgpack";
import { ProtocolError } from "./errors.js";
import { MAX_BATCH_MESSAGES, MAX_FRAME_BYTES, MAX_NESTING_DEPTH } from "./limits.js";
import { MalformedMsgpack, MsgpackReader } from "./msgpack.js";
import { type Message, type Sender, parseMessage } from "./wire.js";

export type CodecName = "json" | "msgpack";

export const SUBPROTOCOLS: Record<CodecName, string> = {
  json: "muxgate.v1.json",
  msgpack: "muxgate.v1.msgpack",
};

export function codecOfSubprotocol(name: string): CodecName | undefined {
  if (name === "" || name === SUBPROTOCOLS.json) return "json"; // none negotiated: JSON (§2.2)
  if (name === SUBPROTOCOLS.msgpack) return "msgpack";
  return undefined;
}

const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const msgpackEncoder = new Encoder({ ignoreUndefined: true });

/** One message as a frame payload: a string for JSON (a text frame), bytes for msgpack. The
 * message must already be canonical (see `checkOutgoing`). */
export function encode(message: Message, codec: "json"): string;
export function encode(message: Message, codec: "msgpack"): Uint8Array;
export function encode(message: Message, codec: CodecName): string | Uint8Array;
export function encode(message: Message, codec: CodecName): string | Uint8Array {
  if (codec === "json") return JSON.stringify(message);
  return msgpackEncoder.encode(message);
}

/** Byte size of an encoded payload on the wire. */
export function payloadBytes(payload: string | Uint8Array): number {
  return typeof payload === "string" ? utf8Length(payload) : payload.length;
}

function utf8Length(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) { n += 4; i++; }
    else n += 3;
  }
  return n;
}

/** Joins encoded messages into one frame payload (SPEC.md §2.4). */
export function joinBatch(payloads: (string | Uint8Array)[], codec: CodecName): string | Uint8Array {
  if (codec === "json") return (payloads as string[]).join("\n");
  const parts = payloads as Uint8Array[];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

export function encodeBatch(messages: Message[], codec: CodecName): string | Uint8Array {
  return joinBatch(messages.map((m) => encode(m, codec)), codec);
}

const LONE_SURROGATE = /\p{Surrogate}/u;

/**
 * JSON.parse accepts what SPEC.md §2.3 refuses: lone surrogates, overflowing numbers, and
 * nesting deeper than MAX_NESTING_DEPTH. The depth bound also bounds this recursion: a line
 * nested thousands deep would otherwise overflow the stack here, out of decode().
 */
function wellFormed(value: unknown, depth = 1): boolean {
  if (typeof value === "string") return !LONE_SURROGATE.test(value);
  if (typeof value === "number") return Number.isFinite(value);
  if (typeof value !== "object" || value === null) return true;
  if (depth > MAX_NESTING_DEPTH) return false;
  if (Array.isArray(value)) return value.every((item) => wellFormed(item, depth + 1));
  for (const key of Object.keys(value)) {
    if (LONE_SURROGATE.test(key) || !wellFormed((value as Record<string, unknown>)[key], depth + 1)) return false;
  }
  return true;
}

function isBlank(line: string): boolean {
  for (let i = 0; i < line.length; i++) {
    const c = line.charCodeAt(i);
    if (c !== 0x20 && c !== 0x09 && c !== 0x0d) return false;
  }
  return true;
}

function splitLines(data: string | Uint8Array): (string | Uint8Array)[] {
  if (typeof data === "string") return data.split("\n");
  const lines: Uint8Array[] = [];
  let start = 0;
  for (let i = data.indexOf(0x0a); i !== -1; i = data.indexOf(0x0a, start)) {
    lines.push(data.subarray(start, i));
    start = i + 1;
  }
  lines.push(data.subarray(start));
  return lines;
}

/** One JSON line decoded; a bad line becomes an error in its place, the others still decode. */
function jsonObjects(data: string | Uint8Array): unknown[] {
  const out: unknown[] = [];
  for (const raw of splitLines(data)) {
    let line: string;
    if (typeof raw === "string") line = raw;
    else {
      try {
        line = utf8.decode(raw);
      } catch {
        out.push(new ProtocolError("bad_frame", "invalid UTF-8"));
        continue;
      }
    }
    if (isBlank(line)) continue;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch {
      out.push(new ProtocolError("bad_frame", "invalid JSON"));
      continue;
    }
    out.push(wellFormed(value) ? value : new ProtocolError("bad_frame", "invalid JSON"));
    if (out.length > MAX_BATCH_MESSAGES) break; // too many already: no need to parse the rest
  }
  return out;
}

function msgpackObjects(bytes: Uint8Array): unknown[] {
  const reader = new MsgpackReader(bytes);
  const out: unknown[] = [];
  try {
    while (!reader.done && out.length <= MAX_BATCH_MESSAGES) out.push(reader.read());
  } catch (exc) {
    if (!(exc instanceof MalformedMsgpack) && !(exc instanceof RangeError)) throw exc;
    out.push(new ProtocolError("bad_frame", exc.message)); // nothing after it can be trusted
  }
  return out;
}

/**
 * Decodes one frame from `sender` into its messages, in order; a message that fails is
 * replaced by its {@link ProtocolError} (G6). Never throws. `data` is a string for a text
 * frame and bytes for a binary one; JSON accepts both (bytes must be UTF-8), msgpack only bytes.
 */
export function decode(data: string | Uint8Array, codec: CodecName, sender: Sender): (Message | ProtocolError)[] {
  if (data.length === 0) return [new ProtocolError("bad_frame", "empty frame")];
  const size = typeof data === "string" ? (data.length * 3 > MAX_FRAME_BYTES ? utf8Length(data) : data.length) : data.length;
  if (size > MAX_FRAME_BYTES) return [new ProtocolError("frame_too_large", `frame exceeds ${MAX_FRAME_BYTES} bytes`)];
  let objects: unknown[];
  if (codec === "json") {
    objects = jsonObjects(data);
  } else if (typeof data === "string") {
    return [new ProtocolError("bad_frame", "msgpack needs binary frames")];
  } else {
    objects = msgpackObjects(data);
  }
  if (objects.length === 0) return [new ProtocolError("bad_frame", "empty frame")];
  if (objects.length > MAX_BATCH_MESSAGES) {
    return [new ProtocolError("frame_too_large", `frame carries more than ${MAX_BATCH_MESSAGES} messages`)];
  }
  return objects.map((obj) => {
    if (obj instanceof ProtocolError) return obj;
    try {
      return parseMessage(obj, sender);
    } catch (exc) {
      if (exc instanceof ProtocolError) return exc;
      return new ProtocolError("bad_frame", String(exc));
    }
  });
}

