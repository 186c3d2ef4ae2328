// Pipeline steps and halts (SPEC.md §3.12) against a real gateway with the simulated backend,
// whose pipeline is plan -> answer (llm_stream) -> search (tool) -> [fact-check (agent)] ->
// answer-continued (llm_stream); its metadata sets how long each step takes.
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { Muxi, type CodecName, type GatewayMessage, type Halt, type Step, type Usage } from "@muxgate/sdk";
import { type Gateway, startGateway, waitFor } from "../support/gateway.js";
import { checkWire, recordingWebSocket } from "../support/recording.js";

let gw: Gateway;
const clients: Muxi[] = [];
function client(codec: CodecName, log: GatewayMessage[]): Muxi {
  const c = new Muxi({ url: gw.url, codec, WebSocket: recordingWebSocket(log) });
  clients.push(c);
  return c;
}
let n = 0;
const rid = (prefix: string) => `${prefix}-${Date.now().toString(36)}-${n++}`;

beforeAll(async () => { gw = await startGateway(); });
afterAll(async () => {
  for (const c of clients) c.close();
  await gw?.stop();
});

/** The request's messages on the wire: steps only before the response, none after. */
function wireOf(log: GatewayMessage[], id: string): GatewayMessage[] {
  const list = checkWire(log, [id]).get(id)!;
  const at = list.findIndex((m) => m.type === "response");
  expect(list.slice(at + 1).filter((m) => m.type === "step")).toEqual([]);
  return list;
}

describe.each(["json", "msgpack"] as CodecName[])("%s codec", (codec) => {
  test("a completed chat with steps: every step started (0, 1, 2, ...) and ended, in order with the chunks", async () => {
    const log: GatewayMessage[] = [];
    const c = client(codec, log);
    const id = rid("steps");
    const seen: Step[] = [];
    const stream = c.chatStream({
      message: "Find flights to Lisbon", requestId: id, steps: true, onStep: (s) => seen.push(s),
      metadata: { tokens: 12, token_delay_ms: 0, plan_ms: 5, tool_ms: 5, agent_ms: 5 },
    });
    let text = "";
    for await (const chunk of stream) text += chunk.text;
    expect(stream.response).toMatchObject({ status: "completed", content: text });
    expect(stream.response).not.toHaveProperty("halt");
    expect(stream.currentStep).toBeUndefined();
    const started = seen.filter((s) => s.state === "started");
    expect(started.map((s) => [s.index, s.kind, s.name])).toEqual([
      [0, "plan", "plan"], [1, "llm_stream", "answer"], [2, "tool", "search"], [3, "agent", "fact-check"],
      [4, "llm_stream", "answer-continued"],
    ]);
    expect(seen.filter((s) => s.state === "ended").map((s) => s.index).sort()).toEqual([0, 1, 2, 3, 4]);
    expect(stream.steps).toEqual(seen);
    // On the wire: the first chunk after the answer step started, before the tool step.
    const wire = wireOf(log, id).map((m) => (m.type === "step" ? `${m.name}:${m.state}` : m.type));
    expect(wire.indexOf("chunk")).toBeGreaterThan(wire.indexOf("answer:started"));
    expect(wire.indexOf("chunk")).toBeLessThan(wire.indexOf("search:started"));
    expect(wire.at(-1)).toBe("response");
  });

  test("cancel during the tool call: halt pending on the tool step, then halted after it; no step after the response", async () => {
    const log: GatewayMessage[] = [];
    const c = client(codec, log);
    const id = rid("tool-cancel");
    const halts: [Halt, Usage][] = [];
    let toolStarted!: (step: Step) => void;
    const tool = new Promise<Step>((resolve) => (toolStarted = resolve));
    const stream = c.chatStream({
      message: "Find flights to Lisbon", requestId: id, steps: true,
      onStep: (s) => { if (s.kind === "tool" && s.state === "started") toolStarted(s); },
      onHalt: (h, u) => halts.push([h, u]),
      // A quick plan and answer, then a tool call long enough to cancel inside it.
      metadata: { tokens: 8, token_delay_ms: 0, plan_ms: 5, tool_ms: 1500 },
    });
    const reading = (async () => { for await (const _ of stream) { /* the first half of the answer */ } })();
    expect(await tool).toMatchObject({ index: 2, kind: "tool", name: "search", state: "started" });
    expect(stream.currentStep).toMatchObject({ index: 2, kind: "tool" });
    const response = await stream.cancel();
    await reading; // the loop ends (cancel() ends the iteration)
    expect(response).toMatchObject({ status: "cancelled", reason: "client", content: "" });
    expect(response!.usage.final).toBe(false);
    const step = { index: 2, kind: "tool", name: "search" };
    expect(response!.halt).toEqual({ state: "pending", step, aborted: false });
    expect(stream.currentStep).toMatchObject(step); // still finishing the tool call
    const final = await c.finalUsage(response!);
    await waitFor(() => halts.length === 2, "the final halt");
    expect(stream.halt).toEqual({ state: "halted", step, aborted: false });
    expect(halts[0]).toEqual([{ state: "pending", step, aborted: false }, response!.usage]);
    expect(halts[1]).toEqual([{ state: "halted", step, aborted: false }, final]);
    expect(final.final).toBe(true);
    expect(final.savedTokens).toBeGreaterThan(0);
    expect(stream.currentStep).toBeUndefined();
    // The wire: the tool step started and never ended (cut by the cancel: the halt says the rest).
    const wire = wireOf(log, id);
    const steps = wire.filter((m) => m.type === "step");
    expect(steps.at(-1)).toMatchObject({ index: 2, state: "started" });
    expect(wire.find((m) => m.type === "usage")).toMatchObject({ halt: { state: "halted", step } });
  });

  test("cancel while the answer streams: the halt waits for no step, and the stream was aborted inside it", async () => {
    const log: GatewayMessage[] = [];
    const c = client(codec, log);
    const id = rid("llm-cancel");
    const stream = c.chatStream({
      message: "Write a long story", requestId: id, steps: true,
      metadata: { tokens: 4000, token_delay_ms: 5, plan_ms: 5 },
    });
    let chunks = 0;
    for await (const _ of stream) if (++chunks === 5) break; // leaving the loop cancels
    await waitFor(() => log.some((m) => m.type === "response" && m.request_id === id), "the cancelled response");
    const wire = wireOf(log, id);
    const response = wire.find((m) => m.type === "response")!;
    expect(response).toMatchObject({ status: "cancelled", reason: "client" });
    const pending = (response as { halt?: Halt }).halt!;
    expect(pending.state === "pending" || pending.state === "halted").toBe(true);
    if (pending.state === "pending") {
      expect(pending).toEqual({ state: "pending", aborted: false });
      await waitFor(() => stream.halt?.state === "halted", "the final halt");
    }
    expect(stream.halt).toEqual({ state: "halted", step: { index: 1, kind: "llm_stream", name: "answer" }, aborted: true });
  });
});

test("a chat without steps gets no step messages and no halt", async () => {
  const log: GatewayMessage[] = [];
  const c = new Muxi({ url: gw.url, WebSocket: recordingWebSocket(log) });
  clients.push(c);
  const id = rid("nosteps");
  const stream = c.chatStream({ message: "x", requestId: id, metadata: { tokens: 4000, token_delay_ms: 5, plan_ms: 5, tool_ms: 5 } });
  let chunks = 0;
  for await (const _ of stream) if (++chunks === 3) break;
  await waitFor(() => log.some((m) => m.type === "usage" && m.request_id === id), "the final usage");
  const wire = wireOf(log, id);
  expect(wire.filter((m) => m.type === "step")).toEqual([]);
  expect(wire.some((m) => "halt" in m)).toBe(false);
  expect(stream.steps).toEqual([]);
  expect(stream.halt).toBeUndefined();
});
