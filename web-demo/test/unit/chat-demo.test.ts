// The chat demo's pure parts: step and halt wording, and reading GET /v1/backend.
import { describe, expect, test } from "vitest";
import { haltLabel, stepLabel } from "../../src/chat/labels.js";
import { SIMULATED, clampSetting, fetchBackendInfo, isSimulated, parseBackendInfo, settingsMetadata } from "../../src/chat/backend.js";

describe("labels", () => {
  test.each([
    [{ index: 0, kind: "plan", name: "plan" }, "planning…"],
    [{ index: 1, kind: "llm_stream", name: "answer" }, "answering…"],
    [{ index: 4, kind: "llm_stream", name: "answer-continued" }, "answering (answer-continued)…"],
    [{ index: 2, kind: "tool", name: "search" }, "calling tool search…"],
    [{ index: 3, kind: "agent", name: "fact-check" }, "asking agent fact-check…"],
    [{ index: 5, kind: "rerank", name: "top-k" }, "rerank top-k…"],
  ])("step %o: %s", (step, label) => expect(stepLabel(step)).toBe(label));

  const tool = { index: 2, kind: "tool", name: "search" };
  const answer = { index: 1, kind: "llm_stream", name: "answer" };
  test.each([
    [{ state: "pending", step: tool, aborted: false }, undefined, "stopping after the tool call search…"],
    [{ state: "pending", step: { index: 0, kind: "plan", name: "plan" }, aborted: false }, undefined, "stopping after planning…"],
    [{ state: "pending", aborted: false }, answer, "stopping the model…"],
    [{ state: "pending", aborted: false }, undefined, "stopping at the next checkpoint…"],
    [{ state: "halted", step: tool, aborted: false }, undefined, "halted after search"],
    [{ state: "halted", step: answer, aborted: true }, undefined, "model stopped during answer"],
    [{ state: "halted", step: { index: 3, kind: "agent", name: "fact-check" }, aborted: true }, undefined, "stopped during fact-check"],
    [{ state: "halted", aborted: false }, undefined, "halted before any step"],
  ] as const)("halt %o: %s", (halt, running, label) => expect(haltLabel(halt, running)).toBe(label));
});

describe("GET /v1/backend", () => {
  const llama = {
    backend: "llama", model: "gemma-3-270m",
    settings: [
      { name: "max_tokens", type: "integer", min: 1, max: 512, default: 256 },
      { name: "temperature", type: "number", min: 0, max: 2, default: 0.7 },
    ],
  };

  test("a model backend: its name and settings", () => {
    const info = parseBackendInfo(llama);
    expect(info).toEqual(llama);
    expect(isSimulated(info)).toBe(false);
    expect(isSimulated(parseBackendInfo({ backend: "echo", model: null, settings: [] }))).toBe(true);
  });

  test("malformed bodies and settings count as simulated, or are dropped", () => {
    expect(parseBackendInfo(null)).toEqual(SIMULATED);
    expect(parseBackendInfo({ model: "x" })).toEqual(SIMULATED);
    const info = parseBackendInfo({ backend: "openai", model: "", settings: [{ name: "x", type: "string" }, { name: "t", type: "number", min: 2, max: 1 }, { name: "k", type: "integer", min: 1, max: 9, default: 99 }, { name: "temperature", type: "number", min: 0, max: 2, description: "sampling temperature" }] });
    expect(info).toEqual({ backend: "openai", model: null, settings: [
      { name: "k", type: "integer", min: 1, max: 9, default: 9 },
      { name: "temperature", type: "number", min: 0, max: 2, description: "sampling temperature" }, // no default: not sent unless set
    ] });
  });

  test("404 (a gateway without the endpoint) and network errors count as simulated", async () => {
    const answer = (status: number, body: unknown) => (async () => new Response(JSON.stringify(body), { status })) as unknown as typeof fetch;
    expect(await fetchBackendInfo(answer(404, { error: { code: "invalid_field", message: "no such endpoint" } }))).toEqual(SIMULATED);
    expect(await fetchBackendInfo((async () => { throw new TypeError("network"); }) as unknown as typeof fetch)).toEqual(SIMULATED);
    expect(await fetchBackendInfo(answer(200, llama))).toEqual(llama);
  });

  test("setting values are clamped to their bounds, integers rounded; empty ones are not sent", () => {
    const [maxTokens, temperature] = parseBackendInfo(llama).settings as [never, never];
    expect(clampSetting(maxTokens, "1000")).toBe(512);
    expect(clampSetting(maxTokens, "12.6")).toBe(13);
    expect(clampSetting(temperature, "0.35")).toBe(0.35);
    expect(clampSetting(temperature, "-1")).toBe(0);
    expect(clampSetting(temperature, "")).toBeUndefined();
    expect(clampSetting(temperature, "abc")).toBeUndefined();
    expect(settingsMetadata(parseBackendInfo(llama).settings, { max_tokens: 64, temperature: undefined })).toEqual({ max_tokens: 64 });
  });
});
