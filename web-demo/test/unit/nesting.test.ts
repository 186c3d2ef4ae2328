// SPEC.md §2.3: nesting is bounded; a line nested deeper is bad_frame, never an exception out
// of decode() (which promises it never throws), and the other lines of the frame still decode.
import { describe, expect, it } from "vitest";
import { decode } from "../../sdk/src/codec.js";
import { ProtocolError } from "../../sdk/src/errors.js";
import { MAX_NESTING_DEPTH } from "../../sdk/src/limits.js";

const pong = '{"type":"pong","id":"p"}';

function nestedError(depth: number): string {
  // An error message whose `x` (an unknown field, ignored when valid) holds `depth - 1` arrays.
  return `{"type":"error","code":"internal","message":"m","x":${"[".repeat(depth - 1)}1${"]".repeat(depth - 1)}}`;
}

describe("nesting", () => {
  it("accepts the deepest allowed message and refuses one level more", () => {
    const [ok] = decode(nestedError(MAX_NESTING_DEPTH), "json", "gateway");
    expect(ok).not.toBeInstanceOf(ProtocolError);
    const [deep] = decode(nestedError(MAX_NESTING_DEPTH + 1), "json", "gateway");
    expect(deep).toBeInstanceOf(ProtocolError);
    expect((deep as ProtocolError).code).toBe("bad_frame");
  });

  it("a line 100,000 deep is bad_frame and the lines around it still decode", () => {
    const deep = "[".repeat(100_000) + "12345678901234567890" + "]".repeat(100_000);
    const results = decode([pong, deep, pong].join("\n"), "json", "gateway");
    expect(results).toHaveLength(3);
    expect(results[0]).not.toBeInstanceOf(ProtocolError);
    expect(results[1]).toBeInstanceOf(ProtocolError);
    expect(results[2]).not.toBeInstanceOf(ProtocolError);
  });
});
