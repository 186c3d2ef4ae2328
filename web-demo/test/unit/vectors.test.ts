// The shared protocol vectors (protocol/vectors/README.md): byte-identical re-encoding and the
// exact error codes for every invalid frame, in both codecs.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { describe, expect, test } from "vitest";
import { ProtocolError, checkOutgoing, decode, encode } from "@muxgate/sdk";
import type { CodecName, Message, Sender } from "@muxgate/sdk";

const dir = fileURLToPath(new URL("../../../protocol/vectors/", import.meta.url));
const load = (name: string) => JSON.parse(readFileSync(dir + name, "utf8"));
const messages = load("messages.json");
const batches = load("batches.json");
const invalid = load("invalid.json");

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const bytes = (h: string) => new Uint8Array(Buffer.from(h, "hex"));

type Outcome = { message: unknown } | { error: string; request_id?: string };
function outcome(r: Message | ProtocolError): Outcome {
  if (r instanceof ProtocolError) return r.requestId === undefined ? { error: r.code } : { error: r.code, request_id: r.requestId };
  return { message: r };
}
/** Same keys in the same order, same value types (JSON text comparison keeps order). */
function sameWire(a: unknown, b: unknown) {
  expect(JSON.stringify(a)).toBe(JSON.stringify(b));
  expect(a).toEqual(b);
}

test("vector files are version 1", () => {
  for (const f of [messages, batches, invalid]) expect(f.version).toBe(1);
});

describe("messages", () => {
  for (const e of messages.messages as any[]) test(e.name, () => {
    const sender = e.sender as Sender;
    const [fromJson] = decode(e.json, "json", sender);
    const fromMsgpack = decode(bytes(e.msgpack_hex), "msgpack", sender);
    expect(fromMsgpack).toHaveLength(1);
    expect(fromJson).not.toBeInstanceOf(ProtocolError);
    sameWire(fromJson, e.message);
    sameWire(fromMsgpack[0], e.message);
    const built = checkOutgoing(e.message as Message);
    sameWire(built, fromJson);
    expect(encode(built, "json")).toBe(e.json);
    expect(hex(encode(built, "msgpack"))).toBe(e.msgpack_hex);
  });
});

describe("decode_only", () => {
  for (const e of messages.decode_only as any[]) test(e.name, () => {
    const input = e.input_hex !== undefined ? bytes(e.input_hex) : e.input;
    const results = decode(e.codec === "msgpack" && typeof input === "string" ? new TextEncoder().encode(input) : input, e.codec, e.sender);
    expect(results.map(outcome)).toEqual([{ message: e.message }]);
    sameWire(results[0], e.message);
    expect(encode(results[0] as Message, "json")).toBe(e.canonical_json);
    expect(hex(encode(results[0] as Message, "msgpack"))).toBe(e.canonical_msgpack_hex);
  });
});

function runFrame(e: any) {
  const codec = e.codec as CodecName;
  const expected = e.expected as Outcome[];
  if (e.input_hex !== undefined) {
    const results = decode(bytes(e.input_hex), codec, e.sender);
    expect(results.map(outcome)).toEqual(expected);
    results.forEach((r, i) => "message" in expected[i]! && sameWire(r, (expected[i] as { message: unknown }).message));
    return;
  }
  const asText = decode(e.input, codec === "json" ? "json" : "msgpack", e.sender);
  if (codec === "json") {
    expect(asText.map(outcome)).toEqual(expected);
    asText.forEach((r, i) => "message" in expected[i]! && sameWire(r, (expected[i] as { message: unknown }).message));
  }
  // As UTF-8 bytes too: the same results (README: runners whose decoder takes both).
  const asBytes = decode(new TextEncoder().encode(e.input), codec, e.sender);
  expect(asBytes.map(outcome)).toEqual(expected);
}

describe("batches", () => {
  for (const e of batches.batches as any[]) test(e.name, () => runFrame(e));
});

describe("invalid", () => {
  for (const e of invalid.invalid as any[]) test(e.name, () => runFrame(e));
});

describe("built by the runner (too large for a data file)", () => {
  const ping = (n: number) => Array.from({ length: n }, (_, i) => `{"type":"ping","id":${i}}`).join("\n");
  test("1024 pings decode, 1025 are frame_too_large", () => {
    expect(decode(ping(1024), "json", "client")).toHaveLength(1024);
    expect(decode(ping(1025), "json", "client").map(outcome)).toEqual([{ error: "frame_too_large" }]);
  });
  for (const codec of ["json", "msgpack"] as const) {
    test(`${codec}: a frame of exactly 1048576 bytes is accepted, one more byte is frame_too_large`, () => {
      const frame = (size: number) => {
        const base = encode({ type: "chat", request_id: "r", message: "", stream: true }, codec);
        const overhead = (typeof base === "string" ? base.length : base.length) + 8; // 8: str32 header slack
        let msg = "x".repeat(size - overhead);
        for (;;) {
          const f = encode({ type: "chat", request_id: "r", message: msg, stream: true }, codec);
          const n = typeof f === "string" ? new TextEncoder().encode(f).length : f.length;
          if (n === size) return f;
          msg = n < size ? msg + "x".repeat(size - n) : msg.slice(0, msg.length - (n - size));
        }
      };
      const ok = decode(frame(1_048_576), codec, "client").map(outcome);
      expect(ok).toHaveLength(1);
      expect(ok[0]).toHaveProperty("error", "invalid_field"); // a message over MAX_MESSAGE_CHARS, but decoded
      expect(decode(frame(1_048_577), codec, "client").map(outcome)).toEqual([{ error: "frame_too_large" }]);
      // Measured in UTF-8 bytes: 349526 three-byte characters are fewer than 1048576 characters.
      if (codec === "json") expect(decode(`"${"€".repeat(349_526)}"`, "json", "client").map(outcome)).toEqual([{ error: "frame_too_large" }]);
    });
  }
  test("lone surrogates and overflowing numbers are bad_frame in JSON (not pinned by vectors)", () => {
    expect(decode('{"type":"ping","id":"\\ud800"}', "json", "client").map(outcome)).toEqual([{ error: "bad_frame" }]);
    expect(decode('{"type":"ping","id":1e400}', "json", "client").map(outcome)).toEqual([{ error: "bad_frame" }]);
  });
  test("an integral msgpack float is not an integer; uint64 beyond 2^53 is refused", () => {
    // {"type":"ping","id":1.0} with id as float64
    expect(decode(bytes("82a474797065a470696e67a26964cb3ff0000000000000"), "msgpack", "client").map(outcome)).toEqual([{ error: "invalid_field" }]);
    // id = 2^53 as uint64
    expect(decode(bytes("82a474797065a470696e67a26964cf0020000000000000"), "msgpack", "client").map(outcome)).toEqual([{ error: "invalid_field" }]);
  });
});
