// Pipeline steps and halts (SPEC.md §3.12): the wire form beyond the shared vectors, the
// per-request checks of §5.1, and the SDK's API (chat option `steps`, `onStep`, `onHalt`, and
// `steps`, `currentStep`, `halt` on the stream), against a scripted in-process gateway.
import { afterEach, describe, expect, test } from "vitest";
import {
  InvalidRequest, Muxi, ProtocolError, ProtocolViolation, checkOutgoing, decode, encode,
  type Halt, type Message, type Step, type Usage,
} from "@muxgate/sdk";
import { FakeGateway } from "../support/fake-gateway.js";

const clients: Muxi[] = [];
afterEach(() => { for (const c of clients.splice(0)) c.close(); });

function setup(): { gw: FakeGateway; client: Muxi } {
  const gw = new FakeGateway();
  const client = new Muxi({ url: "ws://fake.invalid", WebSocket: gw.WebSocket, reconnect: { attempts: 1 } });
  clients.push(client);
  return { gw, client };
}

const usage = (final: boolean, extra: Record<string, unknown> = {}) =>
  ({ input_tokens: 10, output_tokens: 5, saved_tokens: 20, final, ...extra });
const step = (request_id: string, index: number, kind: string, name: string, state: "started" | "ended") =>
  ({ type: "step", request_id, index, kind, name, state });

describe("wire", () => {
  test("chat.steps is written only when true; false and null decode to absent", () => {
    const base = { type: "chat", request_id: "r1", message: "hi", stream: true } as const;
    expect(encode(checkOutgoing({ ...base, steps: true }), "json")).toBe('{"type":"chat","request_id":"r1","message":"hi","stream":true,"steps":true}');
    expect(encode(checkOutgoing({ ...base, steps: false }), "json")).toBe('{"type":"chat","request_id":"r1","message":"hi","stream":true}');
    for (const steps of ["false", "null"]) {
      const [m] = decode(`{"type":"chat","request_id":"r1","message":"hi","steps":${steps}}`, "json", "client");
      expect(m).toEqual(base);
    }
  });

  test("halt: aborted defaults to false and is always written, step null is absent", () => {
    const [m] = decode('{"type":"usage","request_id":"r1","usage":{"input_tokens":1,"output_tokens":2,"saved_tokens":3},"halt":{"state":"halted","step":null}}', "json", "gateway");
    expect(encode(m as Message, "json")).toBe('{"type":"usage","request_id":"r1","usage":{"input_tokens":1,"output_tokens":2,"saved_tokens":3,"final":true},"halt":{"state":"halted","aborted":false}}');
  });

  test.each([
    ["a step kind the SDK does not know is accepted", '{"type":"step","request_id":"r1","index":0,"kind":"rerank","name":"r","state":"started"}', null],
    ["a step name of 128 characters (code points) is accepted", `{"type":"step","request_id":"r1","index":0,"kind":"tool","name":"${"😀".repeat(128)}","state":"started"}`, null],
    ["a step name of 129 characters is refused", `{"type":"step","request_id":"r1","index":0,"kind":"tool","name":"${"😀".repeat(129)}","state":"started"}`, "invalid_field"],
    ["halt.step must be an object", '{"type":"usage","request_id":"r1","usage":{"input_tokens":1,"output_tokens":2,"saved_tokens":3},"halt":{"state":"halted","step":1}}', "invalid_field"],
    ["halt.step needs its name", '{"type":"usage","request_id":"r1","usage":{"input_tokens":1,"output_tokens":2,"saved_tokens":3},"halt":{"state":"halted","step":{"index":0,"kind":"tool"}}}', "invalid_field"],
    ["a step needs a request_id", '{"type":"step","index":0,"kind":"tool","name":"t","state":"started"}', "invalid_field"],
  ])("%s", (_, frame, error) => {
    const [m] = decode(frame, "json", "gateway");
    if (error === null) expect(m).not.toBeInstanceOf(ProtocolError);
    else expect((m as ProtocolError).code).toBe(error);
  });
});

describe("client", () => {
  test("steps: true goes on the chat; steps, currentStep and onStep follow the step messages in order with the chunks", async () => {
    const { gw, client } = setup();
    const seen: string[] = [];
    const stream = client.chatStream({ message: "Find flights", requestId: "r1", steps: true, onStep: (s) => seen.push(`${s.index}:${s.state}`) });
    expect(stream.steps).toEqual([]);
    expect(stream.currentStep).toBeUndefined();
    const it = stream[Symbol.asyncIterator]();
    const first = it.next();
    const chat = await gw.next((m) => m.type === "chat");
    expect(chat).toEqual({ type: "chat", request_id: "r1", message: "Find flights", stream: true, steps: true });
    gw.send(step("r1", 0, "plan", "plan", "started"));
    expect(stream.currentStep).toMatchObject({ index: 0, kind: "plan", name: "plan", state: "started", requestId: "r1" });
    gw.send(step("r1", 0, "plan", "plan", "ended"), step("r1", 1, "llm_stream", "answer", "started"), { type: "chunk", request_id: "r1", seq: 0, text: "Hi" });
    expect((await first).value).toMatchObject({ text: "Hi" });
    expect(stream.currentStep).toMatchObject({ index: 1, kind: "llm_stream" });
    // Overlapping steps: the latest started is the current one; when it ends, the older one is.
    gw.send(step("r1", 2, "tool", "search", "started"));
    expect(stream.currentStep?.name).toBe("search");
    gw.send(step("r1", 2, "tool", "search", "ended"));
    expect(stream.currentStep?.name).toBe("answer");
    gw.send(step("r1", 1, "llm_stream", "answer", "ended"));
    expect(stream.currentStep).toBeUndefined();
    gw.send({ type: "response", request_id: "r1", status: "completed", content: "Hi", usage: usage(true, { saved_tokens: 0 }) });
    expect(await it.next()).toEqual({ done: true, value: undefined });
    expect(seen).toEqual(["0:started", "0:ended", "1:started", "2:started", "2:ended", "1:ended"]);
    expect(stream.steps.map((s) => `${s.name}:${s.state}`)).toEqual([
      "plan:started", "plan:ended", "answer:started", "search:started", "search:ended", "answer:ended",
    ]);
    expect(stream.response).not.toHaveProperty("halt");
    expect(stream.halt).toBeUndefined();
  });

  test("steps are taken in stream order: a step behind unread chunks waits for the loop to read them", async () => {
    const { gw, client } = setup();
    const order: string[] = [];
    const stream = client.chatStream({ message: "m", requestId: "r6", onStep: (s) => order.push(`step ${s.name}:${s.state}`) });
    const it = stream[Symbol.asyncIterator]();
    const first = it.next();
    await gw.next((m) => m.type === "chat");
    const chunk = (seq: number) => ({ type: "chunk", request_id: "r6", seq, text: `c${seq}` });
    // One frame: the loop is still waiting, so all of it is queued behind the first chunk.
    gw.send(step("r6", 0, "llm_stream", "answer", "started"), chunk(0), chunk(1), step("r6", 0, "llm_stream", "answer", "ended"),
      step("r6", 1, "tool", "search", "started"), chunk(2));
    order.push(`chunk ${((await first).value as { text: string }).text}`);
    expect(stream.currentStep?.name).toBe("answer"); // the tool step is behind c1, not read yet
    for (;;) {
      const r = await it.next();
      order.push(`chunk ${(r.value as { text: string }).text}`);
      if ((r.value as { seq: number }).seq === 2) break;
    }
    expect(order).toEqual([
      "step answer:started", "chunk c0", "chunk c1", "step answer:ended", "step search:started", "chunk c2",
    ]);
    expect(stream.currentStep?.name).toBe("search");
    // Leaving the loop drops what is unread, and takes in the steps among it.
    gw.send(chunk(3), step("r6", 1, "tool", "search", "ended"));
    expect(stream.steps).toHaveLength(3); // the end of search waits behind c3
    await it.return!();
    expect(stream.steps).toHaveLength(4);
    expect(stream.steps.map((s) => `${s.name}:${s.state}`).at(-1)).toBe("search:ended");
  });

  test("no steps field unless asked; onStep or onHalt ask for steps, and contradict steps: false", async () => {
    const { gw, client } = setup();
    const chats = () => gw.received.filter((m) => m.type === "chat");
    gw.onMessage = (m, g) => {
      if (m.type === "chat") g.send({ type: "response", request_id: m.request_id, status: "completed", content: "", usage: usage(true, { saved_tokens: 0 }) });
    };
    await client.chat({ message: "a", requestId: "a" });
    await client.chat({ message: "b", requestId: "b", onStep: () => {} });
    await client.chat({ message: "c", requestId: "c", onHalt: () => {} });
    await client.chat({ message: "d", requestId: "d", steps: false });
    await expect(client.chat({ message: "e", onStep: () => {}, steps: false })).rejects.toBeInstanceOf(InvalidRequest);
    expect(chats().map((m) => m.steps)).toEqual([undefined, true, true, undefined]);
    expect("steps" in chats()[0]!).toBe(false);
    await expect(client.chat({ message: "x", steps: "yes" as unknown as boolean })).rejects.toBeInstanceOf(InvalidRequest);
    expect(() => client.chatStream({ message: "x", onStep: 1 as unknown as () => void })).toThrow(InvalidRequest);
  });

  test("cancel during a tool call: halt pending with the tool step, then halted from the usage message; onHalt gets both with their usage", async () => {
    const { gw, client } = setup();
    const halts: [Halt, Usage][] = [];
    const stream = client.chatStream({ message: "m", requestId: "r2", steps: true, onHalt: (h, u) => halts.push([h, u]) });
    const it = stream[Symbol.asyncIterator]();
    const first = it.next();
    await gw.next((m) => m.type === "chat");
    const tool = { index: 1, kind: "tool", name: "flight_search" };
    gw.send(step("r2", 0, "plan", "plan", "started"), step("r2", 0, "plan", "plan", "ended"), { type: "chunk", request_id: "r2", seq: 0, text: "x" },
      { ...step("r2", 1, "tool", "flight_search", "started") });
    await first;
    const cancelled = stream.cancel();
    await gw.next((m) => m.type === "cancel");
    gw.send(
      { type: "response", request_id: "r2", status: "cancelled", content: "", reason: "client", usage: usage(false), halt: { state: "pending", step: tool, aborted: false } },
      { type: "cancel_result", request_id: "r2", status: "cancelled" },
    );
    const response = await cancelled;
    expect(response?.halt).toEqual({ state: "pending", step: tool, aborted: false });
    expect(stream.halt).toEqual({ state: "pending", step: tool, aborted: false });
    expect(stream.currentStep).toMatchObject(tool); // the pipeline is still finishing it
    expect(halts).toEqual([[{ state: "pending", step: tool, aborted: false }, expect.objectContaining({ final: false })]]);
    const final = client.finalUsage(response!);
    gw.send({ type: "usage", request_id: "r2", usage: usage(true, { output_tokens: 7 }), halt: { state: "halted", step: tool, aborted: false } });
    expect((await final).outputTokens).toBe(7);
    expect(stream.halt).toEqual({ state: "halted", step: tool, aborted: false });
    expect(stream.currentStep).toBeUndefined();
    expect(halts).toHaveLength(2);
    expect(halts[1]).toEqual([{ state: "halted", step: tool, aborted: false }, expect.objectContaining({ final: true, outputTokens: 7 })]);
    expect(response?.halt?.state).toBe("pending"); // the response itself is what arrived
  });

  test("chat() (not streamed) gets steps too, and the cancelled response's halt", async () => {
    const { gw, client } = setup();
    const steps: Step[] = [];
    gw.onMessage = (m, g) => {
      if (m.type !== "chat") return;
      expect(m).toMatchObject({ stream: false, steps: true });
      g.send(step("r3", 0, "llm_stream", "answer", "started"));
      g.send({ type: "response", request_id: "r3", status: "cancelled", content: "", reason: "timeout", usage: usage(true), halt: { state: "halted", step: { index: 0, kind: "llm_stream", name: "answer" }, aborted: true } });
    };
    const r = await client.chat({ message: "m", requestId: "r3", onStep: (s) => steps.push(s) });
    expect(r.halt).toEqual({ state: "halted", step: { index: 0, kind: "llm_stream", name: "answer" }, aborted: true });
    expect(steps).toHaveLength(1);
  });

  test("an onStep that throws is reported, not taken for a gateway error: the request goes on", async () => {
    const { gw, client } = setup();
    const reported: unknown[] = [];
    const onError = (e: unknown) => reported.push(e);
    process.on("uncaughtException", onError);
    try {
      const pending = client.chat({ message: "m", requestId: "r4", onStep: () => { throw new Error("app bug"); } });
      await gw.next((m) => m.type === "chat");
      gw.send(step("r4", 0, "plan", "plan", "started"));
      gw.send({ type: "response", request_id: "r4", status: "completed", content: "", usage: usage(true, { saved_tokens: 0 }) });
      expect((await pending).status).toBe("completed");
      expect(client.connected).toBe(true);
    } finally {
      // The error surfaces on a later microtask; give it the turn it needs, then check.
      await new Promise((r) => setImmediate(r));
      process.off("uncaughtException", onError);
    }
    expect(reported).toEqual([expect.objectContaining({ message: "app bug" })]);
  });

  describe("steps that break SPEC.md §5.1 close the connection with ProtocolViolation", () => {
    const cases: [string, Record<string, unknown>[]][] = [
      ["a started step skipping an index", [step("r", 0, "plan", "p", "started"), step("r", 2, "tool", "t", "started")]],
      ["the first started step not 0", [step("r", 1, "plan", "p", "started")]],
      ["a step started twice", [step("r", 0, "plan", "p", "started"), step("r", 0, "plan", "p", "started")]],
      ["ended before it started", [step("r", 0, "plan", "p", "ended")]],
      ["ended twice", [step("r", 0, "plan", "p", "started"), step("r", 0, "plan", "p", "ended"), step("r", 0, "plan", "p", "ended")]],
      ["a step after the cancelled response (usage still pending)", [
        { type: "response", request_id: "r", status: "cancelled", content: "", reason: "api", usage: usage(false), halt: { state: "pending", aborted: false } },
        step("r", 0, "plan", "p", "started"),
      ]],
      ["a step after the completed response", [
        { type: "response", request_id: "r", status: "completed", content: "", usage: usage(true, { saved_tokens: 0 }) },
        step("r", 0, "plan", "p", "started"),
      ]],
    ];
    test.each(cases)("%s", async (_, messages) => {
      const { gw, client } = setup();
      const stream = client.chatStream({ message: "m", requestId: "r", steps: true });
      const it = stream[Symbol.asyncIterator]();
      const outcome = (async () => { for (;;) if ((await it.next()).done) return "done"; })().catch((e: unknown) => e);
      await gw.next((m) => m.type === "chat");
      for (const m of messages) gw.send(m);
      const result = await outcome;
      if (result === "done") {
        // The request ended before the violation: the connection is the one that must end.
        expect(gw.socket.closeCode).toBe(1002);
      } else {
        expect(result).toBeInstanceOf(ProtocolViolation);
        expect(gw.socket.closeCode).toBe(1002);
      }
    });
  });

  test("a step after a cancel was sent (written before the gateway read it) is fine", async () => {
    const { gw, client } = setup();
    const stream = client.chatStream({ message: "m", requestId: "r5", steps: true });
    const it = stream[Symbol.asyncIterator]();
    void it.next();
    await gw.next((m) => m.type === "chat");
    const cancelled = stream.cancel();
    await gw.next((m) => m.type === "cancel");
    gw.send(step("r5", 0, "plan", "plan", "started"));
    gw.send({ type: "response", request_id: "r5", status: "cancelled", content: "", reason: "client", usage: usage(true), halt: { state: "halted", step: { index: 0, kind: "plan", name: "plan" }, aborted: false } },
      { type: "cancel_result", request_id: "r5", status: "cancelled" });
    expect((await cancelled)?.halt?.state).toBe("halted");
    expect(stream.steps).toHaveLength(1);
    expect(client.connected).toBe(true);
  });
});
