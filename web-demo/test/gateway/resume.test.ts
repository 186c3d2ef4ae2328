// Transparent resume (SPEC.md §5.8) against a real gateway: the SDK's connection goes through a
// TCP proxy that the test severs mid-stream, several times, with several resumable streams in
// flight (no close frame: the client sees 1006, the gateway a dropped connection). Each stream
// must read exactly the text of the final content — the same text an uninterrupted run of the
// same prompt gives — with one end; the wire the client received (recorded apart from the SDK,
// over all its connections) must hold each seq once and one response per request.
import { afterAll, afterEach, beforeAll, describe, expect, test } from "vitest";
import WS from "ws";
import {
  type ChatStream, type CodecName, ConnectionLost, type GatewayMessage, Muxi, type MuxiOptions, ResumeFailed, ResumeNotFound,
  type WebSocketConstructor,
} from "@muxgate/sdk";
import { type Gateway, startGateway, waitFor } from "../support/gateway.js";
import { type Proxy, startProxy } from "../support/proxy.js";
import { checkWire, recordingWebSocket } from "../support/recording.js";

let gw: Gateway;
let proxy: Proxy;
const clients: Muxi[] = [];
const WebSocket = WS as unknown as WebSocketConstructor;

beforeAll(async () => { gw = await startGateway(); });
afterAll(async () => { await gw?.stop(); });
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await proxy?.close();
});

function client(options: MuxiOptions = {}): Muxi {
  const c = new Muxi({ url: proxy.url, WebSocket, ...options });
  clients.push(c);
  return c;
}

let n = 0;
const rid = (prefix: string) => `${prefix}-${Date.now().toString(36)}-${n++}`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** The simulated backend: `tokens` words, `delay` ms apart, no planning or tool pause. */
const speed = (tokens: number, delay: number) => ({ tokens, token_delay_ms: delay, plan_ms: 0, tool_ms: 0 });

/** The answer an uninterrupted run gives (the simulated text depends on the prompt and the
 * token count only), straight to the gateway. */
async function reference(message: string, tokens: number): Promise<string> {
  const direct = new Muxi({ url: gw.url, WebSocket });
  try {
    return (await direct.chat({ message, metadata: speed(tokens, 0) })).content;
  } finally {
    direct.close();
  }
}

interface Read { texts: string[]; seqs: number[]; ends: number; error?: unknown }

function read(stream: ChatStream): Promise<Read> {
  const out: Read = { texts: [], seqs: [], ends: 0 };
  return (async () => {
    try {
      for await (const c of stream) { out.texts.push(c.text); out.seqs.push(c.seq); }
      out.ends++;
    } catch (error) {
      out.error = error;
    }
    return out;
  })();
}

async function getRequest(id: string): Promise<{ status: string; reason?: string }> {
  const res = await fetch(`${gw.http}/v1/requests/${id}`);
  return (await res.json()) as { status: string; reason?: string };
}

describe.each(["json", "msgpack"] as CodecName[])("%s codec", (codec) => {
  test("five resumable streams, the connection cut six times: every text is the final content, one end each", async () => {
    proxy = await startProxy(gw.port);
    const log: GatewayMessage[] = [];
    const c = client({ codec, WebSocket: recordingWebSocket(log) });
    const prompts = Array.from({ length: 5 }, (_, i) => `Tell me story number ${i} about a ${codec} gateway`);
    const tokens = 500; // 3 s at 6 ms a token: long enough for the cuts and the reconnections' backoff
    const ids = prompts.map(() => rid(`cut-${codec}`));
    const streams = prompts.map((message, i) =>
      c.chatStream({ message, requestId: ids[i], resumable: true, metadata: speed(tokens, 6) }));
    const reads = streams.map(read);
    await waitFor(() => streams.every((s) => s.lastSeq !== undefined && s.lastSeq >= 3), "the streams to start", 15_000);
    let cuts = 0;
    for (let i = 0; i < 6; i++) {
      await waitFor(() => c.connected, "the client to reconnect", 15_000);
      await sleep(100 + Math.random() * 150);
      if (streams.every((s) => s.response !== undefined)) break;
      if (proxy.sever() > 0) cuts++;
    }
    const results = await Promise.all(reads);
    const expected = await Promise.all(prompts.map((p) => reference(p, tokens)));
    expect(cuts).toBeGreaterThanOrEqual(4);
    results.forEach((r, i) => {
      const stream = streams[i]!;
      expect(r.error).toBeUndefined();
      expect(r.ends).toBe(1);
      expect(stream.response?.status).toBe("completed");
      expect(r.seqs).toEqual([...r.seqs.keys()]); // each seq once, in order
      expect(r.texts.join("")).toBe(stream.response!.content);
      expect(stream.response!.content).toBe(expected[i]);
      expect(stream.text).toBe(expected[i]);
    });
    // Most streams ran across several connections (one may have finished early).
    expect(streams.filter((s) => s.resumes >= 2).length).toBeGreaterThanOrEqual(3);
    expect(proxy.upgrades).toBeGreaterThanOrEqual(cuts + 1);
    // The wire over all the client's connections: seqs 0..n once, one response per request.
    checkWire(log, ids);
  }, 60_000);
});

test("chat() with resumable: true resolves with the whole answer across two cuts", async () => {
  proxy = await startProxy(gw.port);
  const c = client();
  const message = "A whole answer, please";
  const id = rid("whole");
  const pending = c.chat({ message, requestId: id, resumable: true, metadata: speed(150, 8) });
  await waitFor(async () => (await getRequest(id)).status === "active", "the request to run");
  for (let i = 0; i < 2; i++) {
    await waitFor(() => c.connected, "connected");
    await sleep(200);
    proxy.sever();
  }
  const response = await pending;
  expect(response.status).toBe("completed");
  expect(response.content).toBe(await reference(message, 150));
});

test("a cut fails a non-resumable stream with ConnectionLost (the gateway cancels it) while a resumable one goes on", async () => {
  proxy = await startProxy(gw.port);
  const c = client();
  const plainId = rid("plain");
  const plain = c.chatStream({ message: "plain", requestId: plainId, metadata: speed(400, 5) });
  const kept = c.chatStream({ message: "kept", resumable: true, metadata: speed(200, 5) });
  const [plainRead, keptRead] = [read(plain), read(kept)];
  await waitFor(() => (plain.lastSeq ?? 0) >= 3 && (kept.lastSeq ?? 0) >= 3, "both streaming");
  proxy.sever();
  const p = await plainRead;
  expect(p.error).toBeInstanceOf(ConnectionLost);
  expect(p.error).not.toBeInstanceOf(ResumeFailed);
  const k = await keptRead;
  expect(k.error).toBeUndefined();
  expect(k.texts.join("")).toBe(kept.response!.content);
  expect(kept.resumes).toBe(1);
  const info = await waitFor(async () => { const i = await getRequest(plainId); return i.status !== "active" && i; }, "plain cancelled");
  expect(info.reason).toBe("disconnect");
});

test("Stop while the client cannot reconnect: the cancel goes out after the resume (reason client)", async () => {
  proxy = await startProxy(gw.port);
  const c = client();
  const id = rid("stop-during");
  const stream = c.chatStream({ message: "stop me", requestId: id, resumable: true, metadata: speed(3000, 5) });
  const reading = read(stream);
  await waitFor(() => (stream.lastSeq ?? 0) >= 5, "streaming");
  proxy.blockUpgrades = true;
  proxy.sever();
  await waitFor(() => proxy.refused >= 2, "reconnection attempts refused");
  const cancelled = stream.cancel();
  await sleep(200);
  expect((await getRequest(id)).status).toBe("active"); // detached, still running: nothing sent yet
  proxy.blockUpgrades = false;
  const response = await cancelled;
  expect(response).toMatchObject({ status: "cancelled", reason: "client", content: "" });
  expect(stream.resumes).toBe(1);
  expect((await reading).error).toBeUndefined();
  const info = await waitFor(async () => { const i = await getRequest(id); return i.status !== "active" && i; }, "cancelled");
  expect(info.reason).toBe("client");
});

test("giving up: ResumeFailed after resumeTimeoutMs, and a Stop asked for meanwhile goes over HTTP (reason api)", async () => {
  proxy = await startProxy(gw.port);
  const c = client({ reconnect: { resumeTimeoutMs: 700 } });
  const id = rid("give-up");
  const stream = c.chatStream({ message: "long", requestId: id, resumable: true, metadata: speed(3000, 5) });
  const reading = read(stream);
  await waitFor(() => (stream.lastSeq ?? 0) >= 3, "streaming");
  proxy.blockUpgrades = true;
  const started = Date.now();
  proxy.sever();
  const stop = stream.cancel();
  await expect(stop).rejects.toBeInstanceOf(ResumeFailed);
  const elapsed = Date.now() - started;
  expect(elapsed).toBeGreaterThanOrEqual(300);
  expect(elapsed).toBeLessThan(5000);
  const r = await reading;
  expect(r.error).toBeInstanceOf(ResumeFailed); // the loop reading it ends with the same error
  expect(proxy.refused).toBeGreaterThanOrEqual(2);
  const info = await waitFor(async () => { const i = await getRequest(id); return i.status !== "active" && i; }, "cancelled over HTTP");
  expect(info.reason).toBe("api");
});

test("away longer than the grace period: the resume finds nothing, the stream ends with ResumeNotFound", async () => {
  proxy = await startProxy(gw.port);
  const c = client();
  const id = rid("grace");
  const stream = c.chatStream({ message: "brief grace", requestId: id, graceMs: 300, metadata: speed(3000, 5) });
  const reading = read(stream);
  await waitFor(() => (stream.lastSeq ?? 0) >= 3, "streaming");
  expect(stream.graceMs).toBe(300);
  proxy.blockUpgrades = true;
  proxy.sever();
  await waitFor(async () => { const i = await getRequest(id); return i.status !== "active" && i; }, "the grace to expire");
  proxy.blockUpgrades = false;
  const r = await reading;
  expect(r.error).toBeInstanceOf(ResumeNotFound);
  expect(r.texts.join("")).toBe(stream.text);
  expect((await getRequest(id)).reason).toBe("disconnect");
});

test("a half-open cut (the gateway still counts the old connection): the resume moves the request; the stream goes on whole", async () => {
  proxy = await startProxy(gw.port);
  const c = client();
  const message = "A story over a vanished link";
  const id = rid("half-open");
  const stream = c.chatStream({ message, requestId: id, resumable: true, metadata: speed(200, 5) });
  const reading = read(stream);
  await waitFor(() => (stream.lastSeq ?? 0) >= 5, "streaming");
  const before = (await (await fetch(`${gw.http}/v1/stats`)).json()) as { connections: number };
  proxy.sever({ halfOpen: true });
  await waitFor(() => stream.resumes === 1, "the resume");
  // The gateway still has the old connection besides the new one: the resume moved the request.
  const after = (await (await fetch(`${gw.http}/v1/stats`)).json()) as { connections: number };
  expect(after.connections).toBe(before.connections + 1);
  const r = await reading;
  expect(r.error).toBeUndefined();
  expect(r.seqs).toEqual([...r.seqs.keys()]);
  expect(r.texts.join("")).toBe(stream.response!.content);
  expect(stream.response!.content).toBe(await reference(message, 200));
  expect(stream.resumes).toBe(1);
});
