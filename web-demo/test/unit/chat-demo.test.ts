// The chat demo's pure parts: step and halt wording, reading GET /v1/backend, and what the page
// keeps in sessionStorage to resume its answers after a reload.
import { describe, expect, test } from "vitest";
import { MAX_TURNS, type Turn, loadCount, loadTurns, saveCount, saveTurns } from "../../src/chat/saved.js";
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

describe("sessionStorage (resuming after a reload)", () => {
  /** A Storage with a size quota (characters), as a browser's. */
  class FakeStorage implements Storage {
    readonly items = new Map<string, string>();
    constructor(private readonly quota = Infinity) {}
    get length() { return this.items.size; }
    clear() { this.items.clear(); }
    getItem(key: string) { return this.items.get(key) ?? null; }
    key(i: number) { return [...this.items.keys()][i] ?? null; }
    removeItem(key: string) { this.items.delete(key); }
    setItem(key: string, value: string) {
      if (value.length > this.quota) throw new DOMException("quota", "QuotaExceededError");
      this.items.set(key, value);
    }
  }
  const turn = (n: number, extra: Partial<Turn> = {}): Turn =>
    ({ requestId: `r${n}`, prompt: "p", answer: "x".repeat(100), chunks: 3, started: 1, state: "completed", ...extra });

  test("a streaming turn round-trips with its epoch, last seq and text; per conversation", () => {
    const storage = new FakeStorage();
    const streaming = turn(2, { state: "streaming", epoch: "g7.1", lastSeq: 41, answer: "Once upon" });
    saveTurns(storage, 0, [turn(1), streaming]);
    saveTurns(storage, 1, [turn(9)]);
    expect(loadTurns(storage, 0)).toEqual([turn(1), streaming]);
    expect(loadTurns(storage, 1)).toEqual([turn(9)]);
    expect(loadTurns(storage, 2)).toEqual([]);
    expect([...storage.items.keys()]).toEqual(["muxgate-demo:conversation:0", "muxgate-demo:conversation:1"]);
  });

  test("unreadable or malformed items load as nothing; malformed turns are dropped", () => {
    const storage = new FakeStorage();
    storage.setItem("muxgate-demo:conversation:0", "{not json");
    expect(loadTurns(storage, 0)).toEqual([]);
    storage.setItem("muxgate-demo:conversation:0", JSON.stringify({ turns: [] }));
    expect(loadTurns(storage, 0)).toEqual([]);
    storage.setItem("muxgate-demo:conversation:0", JSON.stringify([
      turn(1), { ...turn(2), state: "weird" }, { ...turn(3), lastSeq: -1 }, { ...turn(4), epoch: 5 }, null, turn(5, { state: "streaming", lastSeq: 0 }),
    ]));
    expect(loadTurns(storage, 0).map((t) => t.requestId)).toEqual(["r1", "r5"]);
    expect(loadTurns(undefined, 0)).toEqual([]);
    expect(() => saveTurns(undefined, 0, [turn(1)])).not.toThrow();
  });

  test("only the last MAX_TURNS turns are kept; when the storage is full, the streaming ones still are", () => {
    const storage = new FakeStorage();
    const many = Array.from({ length: MAX_TURNS + 5 }, (_, i) => turn(i));
    saveTurns(storage, 0, many);
    expect(loadTurns(storage, 0).map((t) => t.requestId)).toEqual(many.slice(5).map((t) => t.requestId));
    const small = new FakeStorage(500);
    const streaming = turn(99, { state: "streaming", epoch: "e", lastSeq: 3 });
    saveTurns(small, 0, [...Array.from({ length: 10 }, (_, i) => turn(i)), streaming]);
    expect(loadTurns(small, 0)).toEqual([streaming]);
    const none = new FakeStorage(10);
    expect(() => saveTurns(none, 0, [streaming])).not.toThrow();
  });

  test("the number of conversations", () => {
    const storage = new FakeStorage();
    expect(loadCount(storage, 2)).toBe(2);
    saveCount(storage, 4);
    expect(loadCount(storage, 2)).toBe(4);
    for (const bad of ["0", "-1", "1.5", "abc", "1000"]) {
      storage.setItem("muxgate-demo:count", bad);
      expect(loadCount(storage, 2)).toBe(2);
    }
  });
});
