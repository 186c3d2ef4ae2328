// The SDK against a real gateway process (ephemeral port, real sockets).
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import WS from "ws";
import {
  ConnectionLost, InvalidRequest, Muxi, RequestFailed, RequestRefused,
  type CodecName, type GatewayMessage, type Response, type WebSocketConstructor,
} from "@muxgate/sdk";
import { type Gateway, startGateway, waitFor } from "../support/gateway.js";
import { checkWire, recordingWebSocket } from "../support/recording.js";

let gw: Gateway;
const clients: Muxi[] = [];
const WebSocket = WS as unknown as WebSocketConstructor;
function client(options: ConstructorParameters<typeof Muxi>[0] = {}): Muxi {
  const c = new Muxi({ url: gw.url, WebSocket, ...options });
  clients.push(c);
  return c;
}
const SLOW = { tokens: 4000, token_delay_ms: 5 };
const FAST = { tokens: 30, token_delay_ms: 0 };
let n = 0;
const rid = (prefix: string) => `${prefix}-${Date.now().toString(36)}-${n++}`;

beforeAll(async () => { gw = await startGateway(); });
afterAll(async () => {
  for (const c of clients) c.close();
  await gw?.stop();
});

describe.each(["json", "msgpack"] as CodecName[])("%s codec", (codec) => {
  test("chat() resolves with the completed response", async () => {
    const c = client({ codec });
    const r = await c.chat({ message: "Hello", metadata: FAST });
    expect(r.status).toBe("completed");
    expect(r.content.length).toBeGreaterThan(0);
    expect(r.usage).toMatchObject({ final: true, savedTokens: 0 });
    expect(r.usage.outputTokens).toBeGreaterThan(0);
    expect(c.connected).toBe(true);
  });

  test("chatStream() yields chunks whose texts join to the content", async () => {
    const c = client({ codec });
    const stream = c.chatStream({ message: "Tell me a story", metadata: FAST });
    let text = "";
    let chunks = 0;
    for await (const chunk of stream) { text += chunk.text; chunks++; }
    expect(chunks).toBeGreaterThan(1);
    expect(stream.response?.status).toBe("completed");
    expect(stream.response?.content).toBe(text);
  });

  test("aborting the signal sends cancel: chat rejects with AbortError, the gateway cancels (client)", async () => {
    const c = client({ codec });
    const controller = new AbortController();
    const id = rid("abort");
    const pending = c.chat({ message: "long", requestId: id, metadata: SLOW, signal: controller.signal });
    await waitFor(async () => (await c.getRequest(id)).status === "active", "request active");
    controller.abort();
    await expect(pending).rejects.toMatchObject({ name: "AbortError" });
    const info = await waitFor(async () => { const i = await c.getRequest(id); return i.usage?.final && i; }, "final usage");
    expect(info).toMatchObject({ status: "cancelled", reason: "client" });
    expect(info.usage!.savedTokens).toBeGreaterThan(0);
  });
});

test("a signal aborted before the call sends nothing", async () => {
  const c = client();
  const id = rid("pre");
  await expect(c.chat({ message: "x", requestId: id, signal: AbortSignal.abort() })).rejects.toMatchObject({ name: "AbortError" });
  expect((await c.getRequest(id)).status).toBe("not_found");
});

test("aborting a stream mid-way: next() rejects, no chunk is yielded after, the request is cancelled", async () => {
  const log: GatewayMessage[] = [];
  const c = client({ WebSocket: recordingWebSocket(log) });
  const controller = new AbortController();
  const id = rid("abort-stream");
  let seen = 0;
  await expect((async () => {
    for await (const _ of c.chatStream({ message: "long", requestId: id, metadata: SLOW, signal: controller.signal })) {
      if (++seen === 5) controller.abort();
      if (seen > 5) throw new Error("a chunk after the abort");
    }
  })()).rejects.toMatchObject({ name: "AbortError" });
  await waitFor(() => log.some((m) => m.type === "response" && m.request_id === id), "cancelled response");
  const wire = checkWire(log, [id]).get(id)!;
  expect(wire.find((m) => m.type === "response")).toMatchObject({ status: "cancelled", reason: "client" });
});

test("break out of for await cancels the request", async () => {
  const c = client();
  const id = rid("break");
  let chunks = 0;
  const stream = c.chatStream({ message: "long", requestId: id, metadata: SLOW });
  for await (const _ of stream) if (++chunks === 3) break;
  const info = await waitFor(async () => { const i = await c.getRequest(id); return i.status !== "active" && i; }, "cancel");
  expect(info.status === "cancelling" || info.status === "cancelled").toBe(true);
  expect(info.reason).toBe("client");
});

test("cancelRequest from a second client goes over HTTP (reason api); the first client gets cancelled", async () => {
  const a = client({ codec: "msgpack" });
  const b = client();
  const id = rid("http");
  const pending = a.chat({ message: "long", requestId: id, metadata: SLOW });
  await waitFor(async () => (await b.getRequest(id)).status === "active", "active");
  expect(b.connected).toBe(false); // b never opened its WebSocket: the cancel is HTTP
  expect(await b.cancelRequest(id)).toBe("cancelled");
  const r = await pending;
  expect(r).toMatchObject({ status: "cancelled", reason: "api", content: "" });
  expect(await b.cancelRequest(id)).toBe("already_cancelled");
  const usage = await a.finalUsage(r);
  expect(usage.final).toBe(true);
  expect(usage.outputTokens).toBeGreaterThanOrEqual(r.usage.outputTokens);
});

test("cancelRequest on the same client is in-band (reason client) and idempotent", async () => {
  const c = client();
  const id = rid("inband");
  const task = c.chat({ message: "Write a very long story...", requestId: id, metadata: SLOW });
  expect(await c.cancelRequest(id)).toBe("cancelled"); // right away: it waits for the chat to go out
  expect(await task).toMatchObject({ status: "cancelled", reason: "client" });
  expect(await c.cancelRequest(id)).toBe("already_cancelled");
  const done = await c.chat({ message: "short", metadata: FAST });
  expect(await c.cancelRequest(done.requestId)).toBe("already_completed");
  expect(await c.cancelRequest(rid("nobody"))).toBe("not_found");
});

test("cancel racing completion: each request has one outcome, consistent with its cancel status", async () => {
  const log: GatewayMessage[] = [];
  const c = client({ WebSocket: recordingWebSocket(log) });
  const ids = Array.from({ length: 60 }, () => rid("race"));
  const results = await Promise.all(ids.map(async (id, i) => {
    const task = c.chat({ message: "race", requestId: id, metadata: { tokens: 3 + (i % 7), token_delay_ms: i % 3 } });
    if (i % 2) await new Promise((r) => setTimeout(r, i % 5)); // spread the cancels around the finish
    const status = await c.cancelRequest(id);
    return { status, response: await task };
  }));
  const outcomes = new Set<string>();
  for (const { status, response } of results) {
    outcomes.add(`${status}/${response.status}`);
    if (status === "cancelled") expect(response.status).toBe("cancelled");
    else expect(status === "already_completed" && response.status === "completed").toBe(true);
  }
  checkWire(log, ids);
});

test("many concurrent streams with random cancels: exactly one terminal per request, no chunk after it", async () => {
  const log: GatewayMessage[] = [];
  const c = client({ WebSocket: recordingWebSocket(log), codec: "msgpack" });
  const ids = Array.from({ length: 60 }, () => rid("many"));
  let seed = 42;
  const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const outcomes = await Promise.all(ids.map(async (id) => {
    const stream = c.chatStream({ message: "many", requestId: id, metadata: { tokens: 20 + Math.floor(random() * 80), token_delay_ms: 1 } });
    const stopAt = random() < 0.5 ? Math.floor(random() * 30) : Infinity;
    let chunks = 0;
    for await (const _ of stream) if (++chunks >= stopAt) break;
    return stream.response?.status ?? "left";
  }));
  expect(outcomes).toContain("completed");
  expect(outcomes).toContain("left");
  await waitFor(() => ids.every((id) => log.some((m) => m.type === "response" && m.request_id === id)), "every response");
  checkWire(log, ids);
  // The connection stayed usable and every slot was freed.
  expect((await c.chat({ message: "after", metadata: FAST })).status).toBe("completed");
});

test("a failed request rejects with RequestFailed", async () => {
  const c = client();
  await expect(c.chat({ message: "x", metadata: { tokens: 50, fail_at_token: 3 } })).rejects.toBeInstanceOf(RequestFailed);
});

test("a duplicate request id is refused locally; bad input is InvalidRequest before anything is sent", async () => {
  const c = client();
  const id = rid("dup");
  const first = c.chatStream({ message: "x", requestId: id, metadata: SLOW });
  const iterator = first[Symbol.asyncIterator]();
  await iterator.next();
  await expect(c.chat({ message: "y", requestId: id })).rejects.toBeInstanceOf(RequestRefused);
  await iterator.return!();
  await expect(c.chat({ message: "y", requestId: "bad id!" })).rejects.toBeInstanceOf(InvalidRequest);
  expect(() => c.chatStream({ message: "y", metadata: { n: Number.NaN } })).toThrow(InvalidRequest);
});

test("timeoutMs: the gateway cancels with reason timeout; chat resolves cancelled", async () => {
  const c = client();
  const r: Response = await c.chat({ message: "x", metadata: SLOW, timeoutMs: 100 });
  expect(r).toMatchObject({ status: "cancelled", reason: "timeout" });
});

test("reconnect: after a gateway crash in-flight requests fail with ConnectionLost; the next call reconnects with backoff", async () => {
  const own = await startGateway();
  const port = own.port;
  const c = new Muxi({ url: own.url, WebSocket, reconnect: { attempts: 40, initialDelayMs: 50, maxDelayMs: 200 } });
  clients.push(c);
  const states: boolean[] = [];
  const c2 = new Muxi({ url: own.url, WebSocket, onConnectionChange: (s) => states.push(s.connected) });
  clients.push(c2);
  const firstId = (await c.chat({ message: "hi", metadata: FAST })).requestId;
  expect(firstId).toMatch(/^req_/);
  const inflight = c.chat({ message: "long", metadata: SLOW });
  await c2.chat({ message: "hi", metadata: FAST });
  await waitFor(() => c.connected, "connected");
  const lost = expect(inflight).rejects.toBeInstanceOf(ConnectionLost); // handled before it happens
  await own.crash();
  await lost;
  await waitFor(() => states.at(-1) === false, "disconnect event");
  // The gateway is down: this call retries with backoff until a new gateway listens on the port.
  const again = c.chat({ message: "again", metadata: FAST });
  const second = await startGatewayOn(port);
  try {
    expect((await again).status).toBe("completed");
  } finally {
    await second.stop();
  }
});

async function startGatewayOn(port: number): Promise<Gateway> {
  // `--port` given twice: the last wins (argparse), so the harness's `--port 0` is overridden.
  return startGateway(["--port", String(port)]);
}
