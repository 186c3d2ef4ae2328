// usage.estimated (SPEC.md §3.8): which figures are the gateway's estimates.
import { describe, expect, test } from "vitest";
import { ProtocolError, USAGE_FIGURES, checkOutgoing, decode, encode } from "@muxgate/sdk";
import type { Message } from "@muxgate/sdk";
import { toUsage } from "../../sdk/src/connection.js";

const frame = (estimated: string) =>
  `{"type":"usage","request_id":"r1","usage":{"input_tokens":3,"output_tokens":2,"saved_tokens":1,"final":true,"estimated":${estimated}}}`;

function decodeOne(text: string): Message | ProtocolError {
  const results = decode(text, "json", "gateway");
  expect(results).toHaveLength(1);
  return results[0]!;
}

describe("usage.estimated", () => {
  test("the figures, in canonical order", () => {
    expect(USAGE_FIGURES).toEqual(["input_tokens", "output_tokens", "saved_tokens"]);
  });

  test("any order is accepted and re-encoded canonically, after final", () => {
    const m = decodeOne(frame('["saved_tokens","input_tokens"]'));
    expect(m).not.toBeInstanceOf(ProtocolError);
    expect(encode(m as Message, "json")).toBe(frame('["input_tokens","saved_tokens"]'));
  });

  test("absent and null stay absent; empty stays empty", () => {
    const absent = decodeOne(frame("null")) as Message;
    expect(encode(absent, "json")).toBe(
      '{"type":"usage","request_id":"r1","usage":{"input_tokens":3,"output_tokens":2,"saved_tokens":1,"final":true}}',
    );
    const empty = decodeOne(frame("[]")) as Message;
    expect(encode(empty, "json")).toBe(frame("[]"));
  });

  test.each(['"output_tokens"', '["cached_tokens"]', '["final"]', '["output_tokens","output_tokens"]', "[1]", "{}"])(
    "%s is invalid_field",
    (estimated) => {
      const r = decodeOne(frame(estimated));
      expect(r).toBeInstanceOf(ProtocolError);
      expect((r as ProtocolError).code).toBe("invalid_field");
      expect((r as ProtocolError).requestId).toBe("r1");
    },
  );

  test("checkOutgoing refuses a bad list and orders a good one", () => {
    const usage = { input_tokens: 1, output_tokens: 1, saved_tokens: 0, final: true };
    const ok = checkOutgoing({
      type: "usage", request_id: "r1", usage: { ...usage, estimated: ["output_tokens", "input_tokens"] },
    } as Message);
    expect((ok as { usage: { estimated?: string[] } }).usage.estimated).toEqual(["input_tokens", "output_tokens"]);
    expect(() =>
      checkOutgoing({ type: "usage", request_id: "r1", usage: { ...usage, estimated: ["input_tokens", "input_tokens"] } } as unknown as Message),
    ).toThrow(ProtocolError);
  });

  test("the SDK's Usage carries it only when the gateway sent it", () => {
    const wire = { input_tokens: 3, output_tokens: 2, saved_tokens: 0, final: true };
    expect(toUsage(wire)).toEqual({ inputTokens: 3, outputTokens: 2, savedTokens: 0, final: true });
    expect("estimated" in toUsage(wire)).toBe(false);
    expect(toUsage({ ...wire, estimated: ["output_tokens"] }).estimated).toEqual(["output_tokens"]);
    expect(toUsage({ ...wire, estimated: [] }).estimated).toEqual([]);
  });
});
