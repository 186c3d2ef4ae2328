// Transparent resume (SPEC.md §5.8, the SDK's side): when the WebSocket drops, the client
// reconnects (at once, then with bounded, jittered backoff) and resumes every unfinished
// resumable request from the last chunk it received; the caller's loop or chat() promise goes
// on with no gap, no repeat and one end. Against the scripted in-process gateway: the backoff
// bounds and schedule (fake timers), the resume bookkeeping (after_seq = last chunk received,
// not last read; the chunks join by seq across connections), cancels during reconnection (sent
// right after the resume, or over HTTP when it gives up), and the errors that end a stream.
import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import {
  type ChatStream, ConnectError, type ConnectionState, ConnectionLost, GatewayShuttingDown, Muxi, type MuxiOptions,
  ProtocolViolation, RECONNECT_DEFAULTS, RequestMoved, RequestRefused, ResumeFailed, ResumeNotFound, Unauthorized,
  reconnectDelay,
} from "@muxgate/sdk";
import { FakeGateway } from "../support/fake-gateway.js";

type Wire = Record<string, unknown>;
const clients: Muxi[] = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
  vi.useRealTimers();
  vi.restoreAllMocks();
});

/** A fake `fetch` for the HTTP API: records each call, answers `status` (200). */
function fakeFetch(calls: { method: string; url: string }[], status = "cancelled"): typeof fetch {
  return (async (url: string, init: RequestInit) => {
    calls.push({ method: String(init.method), url: String(url) });
    return new Response(JSON.stringify({ request_id: "r", status }), { status: 200, headers: { "content-type": "application/json" } });
  }) as unknown as typeof fetch;
}

function setup(options: MuxiOptions = {}) {
  const gw = new FakeGateway();
  const fetches: { method: string; url: string }[] = [];
  const states: ConnectionState[] = [];
  const client = new Muxi({
    url: "ws://fake.invalid", WebSocket: gw.WebSocket, fetch: fakeFetch(fetches),
    onConnectionChange: (s) => states.push(s), ...options,
  });
  clients.push(client);
  return { gw, client, fetches, states };
}

const usage = (final = true) => ({ input_tokens: 10, output_tokens: 5, saved_tokens: final ? 0 : 20, final });
const chunk = (request_id: string, seq: number, text: string) => ({ type: "chunk", request_id, seq, text });
const resumable = (request_id: string, epoch = "ep", grace_ms = 30000) => ({ type: "resumable", request_id, epoch, grace_ms });
const resumed = (request_id: string) => ({ type: "resume_result", request_id, status: "resumed" });
const completed = (request_id: string, content: string) => ({ type: "response", request_id, status: "completed", content, usage: usage() });
const cancelled = (request_id: string) =>
  ({ type: "response", request_id, status: "cancelled", content: "", reason: "client", usage: usage() });
const cancelResult = (request_id: string, status = "cancelled") => ({ type: "cancel_result", request_id, status });

/** Reads the whole stream: the chunks read (text and seq), and how it ended. */
function drain(stream: ChatStream): Promise<{ texts: string[]; seqs: number[]; error?: unknown }> {
  const texts: string[] = [];
  const seqs: number[] = [];
  return (async () => {
    try {
      for await (const c of stream) { texts.push(c.text); seqs.push(c.seq); }
      return { texts, seqs };
    } catch (error) {
      return { texts, seqs, error };
    }
  })();
}

/** A streamed resumable chat `rid` on the wire, its epoch and the chunks `texts` received. */
async function streaming(gw: FakeGateway, client: Muxi, rid = "r", texts: string[] = [], epoch = "ep") {
  const stream = client.chatStream({ message: "m", requestId: rid, resumable: true });
  const outcome = drain(stream);
  await gw.next((m) => m.type === "chat" && m.request_id === rid);
  gw.send(resumable(rid, epoch), ...texts.map((t, i) => chunk(rid, i, t)));
  return { stream, outcome };
}

const nextResume = (gw: FakeGateway, rid = "r", after = 0) =>
  gw.next((m) => m.type === "resume" && m.request_id === rid && gw.received.indexOf(m) >= after);

const tick = () => new Promise((r) => setTimeout(r, 0));

describe("backoff", () => {
  test("the pause after the n-th failed attempt is min(max, initial * 2^n) times [0.5, 1)", () => {
    const bounds = (n: number) => [reconnectDelay(n, {}, () => 0), reconnectDelay(n, {}, () => 1)];
    expect([0, 1, 2, 3, 4, 5, 6, 7, 20].map(bounds)).toEqual([
      [50, 100], [100, 200], [200, 400], [400, 800], [800, 1600], [1600, 3200], [2500, 5000], [2500, 5000], [2500, 5000],
    ]);
    expect(reconnectDelay(2, { initialDelayMs: 10, maxDelayMs: 30 }, () => 0.5)).toBe(22.5);
    for (let n = 0; n < 12; n++) {
      const base = Math.min(5000, 100 * 2 ** n);
      for (let i = 0; i < 200; i++) {
        const d = reconnectDelay(n);
        expect(d).toBeGreaterThanOrEqual(base / 2);
        expect(d).toBeLessThan(base);
      }
    }
    expect(RECONNECT_DEFAULTS).toMatchObject({ initialDelayMs: 100, maxDelayMs: 5000, resumeTimeoutMs: 30000, attempts: 6 });
  });

  test.each([
    ["the smallest jitter", 0, [0, 50, 150, 350, 750, 1550]], // next: +1600, past 3000
    ["the middle jitter", 0.5, [0, 75, 225, 525, 1125, 2325]], // next: +2400
    ["a large jitter", 0.98, [0, 99, 297, 693, 1485]], // next: +3168
  ])("after a drop, with %s: the first attempt at once, then the backoff, none after resumeTimeoutMs", async (_, random, expected) => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] });
    vi.spyOn(Math, "random").mockReturnValue(random);
    const { gw, client, states } = setup({ reconnect: { resumeTimeoutMs: 3000 } });
    const { stream, outcome } = await streaming(gw, client, "r", ["Once"]);
    await vi.advanceTimersByTimeAsync(5000); // a stable connection
    gw.refuse = true;
    const dropAt = Date.now();
    gw.drop();
    await vi.advanceTimersByTimeAsync(10_000);
    const { texts, error } = await outcome;
    expect(texts).toEqual(["Once"]);
    const offsets = gw.attempts.slice(1).map((t) => t - dropAt);
    expect(offsets).toEqual(expected);
    expect(error).toBeInstanceOf(ResumeFailed);
    expect(error).toBeInstanceOf(ConnectionLost);
    expect(error).toMatchObject({ requestId: "r", closeCode: 1006 });
    expect((error as Error).message).toMatch(/could not be resumed/);
    expect((error as { cause?: unknown }).cause).toBeInstanceOf(ConnectError);
    expect(stream.response).toBeUndefined();
    // Connected, then reconnecting to resume one request, then (given up) disconnected.
    expect(states.map((s) => [s.connected, s.resuming])).toEqual([[true, undefined], [false, 1], [false, undefined]]);
    expect(states[2]!.error).toBeInstanceOf(ConnectError);
    expect(client.resuming).toBe(0);
  });

  test("with real jitter every pause is within its bounds and the last attempt starts before the time limit", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] });
    const { gw, client } = setup({ reconnect: { resumeTimeoutMs: 20_000, initialDelayMs: 200, maxDelayMs: 3000 } });
    const { outcome } = await streaming(gw, client, "r", ["x"]);
    await vi.advanceTimersByTimeAsync(5000);
    gw.refuse = true;
    const dropAt = Date.now();
    gw.drop();
    await vi.advanceTimersByTimeAsync(40_000);
    expect((await outcome).error).toBeInstanceOf(ResumeFailed);
    const times = gw.attempts.slice(1);
    expect(times[0]).toBe(dropAt);
    for (let i = 1; i < times.length; i++) {
      const base = Math.min(3000, 200 * 2 ** (i - 1));
      expect(times[i]! - times[i - 1]!).toBeGreaterThanOrEqual(base / 2);
      expect(times[i]! - times[i - 1]!).toBeLessThanOrEqual(base);
    }
    expect(times.at(-1)!).toBeLessThanOrEqual(dropAt + 20_000);
    expect(times.length).toBeGreaterThanOrEqual(9); // 0, then 100-200, 200-400, ..., 1500-3000 a few times
  });

  test("a flapping link (each connection drops at once) backs off further each time and gives up at the first drop's time limit", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] });
    vi.spyOn(Math, "random").mockReturnValue(0);
    const { gw, client } = setup({ reconnect: { resumeTimeoutMs: 2000 } });
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    await vi.advanceTimersByTimeAsync(5000);
    // The gateway accepts each resume, then the link drops again right away.
    gw.onMessage = (m, g) => {
      if (m.type === "resume") {
        g.send(resumed("r"));
        queueMicrotask(() => g.drop());
      }
    };
    const dropAt = Date.now();
    gw.drop();
    await vi.advanceTimersByTimeAsync(20_000);
    const { error } = await outcome;
    expect(error).toBeInstanceOf(ResumeFailed);
    expect((error as { cause?: Error }).cause?.message).toMatch(/dropped \d+ times in a row/);
    const offsets = gw.attempts.slice(1).map((t) => t - dropAt);
    // At once, then one step further after each unstable connection: 50, 100, 200, 400, 800
    // ms; the next pause (1600 ms) would end past the 2 s limit of the first drop.
    expect(offsets).toEqual([0, 50, 150, 350, 750, 1550]);
    expect(gw.received.filter((m) => m.type === "resume").map((m) => m.after_seq)).toEqual(Array(6).fill(0));
  });

  test("resumeTimeoutMs 0: a single attempt", async () => {
    const { gw, client } = setup({ reconnect: { resumeTimeoutMs: 0 } });
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    gw.refuse = true;
    gw.drop();
    expect((await outcome).error).toBeInstanceOf(ResumeFailed);
    expect(gw.attempts).toHaveLength(2);
  });

  test("invalid options are refused", () => {
    for (const bad of [{ reconnect: { resumeTimeoutMs: -1 } }, { autoResume: "yes" }, { resumable: 1 }]) {
      expect(() => new Muxi({ url: "ws://x.invalid", ...bad } as never)).toThrow(/resumeTimeoutMs|autoResume|resumable/);
    }
  });
});

describe("resume bookkeeping", () => {
  test("a drop mid-stream: resume from the last chunk received (not read), the loop goes on without a gap or a repeat", async () => {
    const { gw, client, states } = setup();
    const stream = client.chatStream({ message: "m", requestId: "r", resumable: true });
    const it = stream[Symbol.asyncIterator]();
    const first = it.next();
    await gw.next((m) => m.type === "chat");
    gw.send(resumable("r", "ep.7"), chunk("r", 0, "a"), chunk("r", 1, "b"), chunk("r", 2, "c"));
    expect((await first).value).toEqual({ requestId: "r", seq: 0, text: "a" }); // b and c unread
    gw.drop();
    expect(await nextResume(gw)).toEqual({ type: "resume", request_id: "r", epoch: "ep.7", after_seq: 2 });
    expect(gw.sockets).toHaveLength(2);
    expect(gw.receivedOn(1).map((m) => m.type)).toEqual(["resume"]);
    gw.send(resumed("r"), chunk("r", 3, "d"), chunk("r", 4, "e"), completed("r", "abcde"));
    const rest = await drain(stream);
    expect(rest).toEqual({ texts: ["b", "c", "d", "e"], seqs: [1, 2, 3, 4] });
    expect(stream.response?.content).toBe("abcde");
    expect(stream.text).toBe("abcde");
    expect([stream.resumes, stream.lastSeq, stream.epoch]).toEqual([1, 4, "ep.7"]);
    expect(states.map((s) => [s.connected, s.resuming])).toEqual([[true, undefined], [false, 1], [true, undefined]]);
    expect(states[1]!.error).toBeInstanceOf(ConnectionLost);
  });

  test("several requests at one drop: each resumable one resumes from its own point; the others fail as before", async () => {
    const { gw, client } = setup();
    const a = await streaming(gw, client, "a", ["1", "2"]);
    const b = await streaming(gw, client, "b", []); // epoch known, no chunk yet: no after_seq
    const plain = client.chatStream({ message: "m", requestId: "p" }); // not resumable
    const plainOut = drain(plain);
    await gw.next((m) => m.request_id === "p");
    gw.send(chunk("p", 0, "x"));
    const early = client.chatStream({ message: "m", requestId: "e", resumable: true }); // no epoch yet
    const earlyOut = drain(early);
    await gw.next((m) => m.request_id === "e");
    let info: unknown;
    const whole = client.chat({ message: "m", requestId: "c", resumable: true, onResumable: (i) => (info = i) }); // stream: false
    await gw.next((m) => m.request_id === "c");
    gw.send(resumable("c", "ep-c"));
    expect(info).toEqual({ requestId: "c", epoch: "ep-c", graceMs: 30000 });
    gw.drop();
    await nextResume(gw, "c");
    await tick();
    const resumes = gw.receivedOn(1);
    expect(resumes).toEqual([
      { type: "resume", request_id: "a", epoch: "ep", after_seq: 1 },
      { type: "resume", request_id: "b", epoch: "ep" },
      { type: "resume", request_id: "c", epoch: "ep-c" },
    ]);
    expect(await plainOut).toMatchObject({ texts: ["x"], error: expect.any(ConnectionLost) });
    expect((await plainOut).error).not.toBeInstanceOf(ResumeFailed);
    expect(await earlyOut).toMatchObject({ texts: [], error: expect.any(ConnectionLost) });
    gw.send(resumed("a"), resumed("b"), resumed("c"), chunk("a", 2, "3"), chunk("b", 0, "B"), completed("c", "whole"));
    gw.send(completed("a", "123"), completed("b", "B"));
    expect(await a.outcome).toEqual({ texts: ["1", "2", "3"], seqs: [0, 1, 2] });
    expect(await b.outcome).toEqual({ texts: ["B"], seqs: [0] });
    expect((await whole).content).toBe("whole");
    expect(client.connected).toBe(true);
  });

  test("three drops while the consumer reads slowly: each seq is yielded once, in order; the content must equal the whole text", async () => {
    const { gw, client } = setup();
    const stream = client.chatStream({ message: "m", requestId: "r", resumable: true });
    const seen: number[] = [];
    let text = "";
    const reading = (async () => {
      for await (const c of stream) {
        seen.push(c.seq);
        text += c.text;
        await new Promise((r) => setTimeout(r, 2)); // slower than the gateway
      }
    })();
    await gw.next((m) => m.type === "chat");
    gw.send(resumable("r"));
    let seq = 0;
    let all = "";
    const send = (n: number) => {
      for (let i = 0; i < n; i++, seq++) { gw.send(chunk("r", seq, `w${seq} `)); all += `w${seq} `; }
    };
    send(5);
    for (let drop = 0; drop < 3; drop++) {
      const mark = gw.received.length;
      gw.drop();
      const resume = await nextResume(gw, "r", mark);
      expect(resume.after_seq).toBe(seq - 1); // everything received, read or not
      gw.send(resumed("r"));
      send(4);
      await new Promise((r) => setTimeout(r, 1100)); // a stable connection: reconnect at once
    }
    gw.send(completed("r", all));
    await reading;
    expect(seen).toEqual([...Array(seq).keys()]);
    expect(text).toBe(all);
    expect(stream.response?.content).toBe(all);
    expect(stream.resumes).toBe(3);
  }, 15_000);

  test("after a resume, a chunk at or below after_seq (a repeat) is a ProtocolViolation, never yielded twice", async () => {
    const { gw, client } = setup();
    const { outcome } = await streaming(gw, client, "r", ["a", "b"]);
    gw.drop();
    await nextResume(gw);
    gw.send(resumed("r"), chunk("r", 1, "b"));
    const { texts, error } = await outcome;
    expect(texts).toEqual(["a", "b"]);
    expect(error).toBeInstanceOf(ProtocolViolation);
    expect(gw.socket.closeCode).toBe(1002);
  });

  test("a completed content that differs from the text over both connections is a ProtocolViolation", async () => {
    const { gw, client } = setup();
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    gw.drop();
    await nextResume(gw);
    gw.send(resumed("r"), chunk("r", 1, "b"), completed("r", "xab"));
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test("a drop before the resume_result: resumed again from the same point", async () => {
    const { gw, client } = setup();
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    gw.drop();
    await nextResume(gw);
    const mark = gw.received.length;
    gw.drop(); // the new connection drops too, before answering
    expect(await nextResume(gw, "r", mark)).toEqual({ type: "resume", request_id: "r", epoch: "ep", after_seq: 0 });
    expect(gw.sockets).toHaveLength(3);
    gw.send(resumed("r"), chunk("r", 1, "b"), completed("r", "ab"));
    expect(await outcome).toEqual({ texts: ["a", "b"], seqs: [0, 1] });
  });

  test("a stream of resumeStream is resumed again after a drop, from the chunk after its last", async () => {
    const { gw, client } = setup();
    const stream = client.resumeStream({ requestId: "r", epoch: "ep", afterSeq: 4 });
    const outcome = drain(stream);
    await nextResume(gw);
    gw.send(resumed("r"), chunk("r", 5, "f"));
    await tick();
    const mark = gw.received.length;
    gw.drop();
    expect(await nextResume(gw, "r", mark)).toEqual({ type: "resume", request_id: "r", epoch: "ep", after_seq: 5 });
    gw.send(resumed("r"), chunk("r", 6, "g"), completed("r", "abcdefg"));
    expect(await outcome).toEqual({ texts: ["f", "g"], seqs: [5, 6] });
    expect(stream.resumes).toBe(2);
  });

  test("steps: one open before the drop may end after it, one started while detached is skipped", async () => {
    const { gw, client } = setup();
    const stream = client.chatStream({ message: "m", requestId: "r", resumable: true, steps: true });
    const outcome = drain(stream);
    await gw.next((m) => m.type === "chat");
    const step = (index: number, state: string) => ({ type: "step", request_id: "r", index, kind: "tool", name: `t${index}`, state });
    gw.send(resumable("r"), step(0, "started"), step(0, "ended"), step(1, "started"));
    gw.drop();
    await nextResume(gw);
    gw.send(resumed("r"), step(1, "ended"), step(2, "ended"), step(3, "started"), step(3, "ended"), completed("r", ""));
    expect((await outcome).error).toBeUndefined();
    expect(stream.steps.map((s) => `${s.index}:${s.state}`)).toEqual(["0:started", "0:ended", "1:started", "1:ended", "2:ended", "3:started", "3:ended"]);
  });

  test("a step that had ended before the drop ending again after the resume is a ProtocolViolation", async () => {
    const { gw, client } = setup();
    const stream = client.chatStream({ message: "m", requestId: "r", resumable: true, steps: true });
    const outcome = drain(stream);
    await gw.next((m) => m.type === "chat");
    const step = (index: number, state: string) => ({ type: "step", request_id: "r", index, kind: "tool", name: "t", state });
    gw.send(resumable("r"), step(0, "started"), step(0, "ended"));
    gw.drop();
    await nextResume(gw);
    gw.send(resumed("r"), step(0, "ended"));
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test.each([
    [4001, Unauthorized],
    [1001, GatewayShuttingDown],
  ])("a close with %i is not resumed", async (code, kind) => {
    const { gw, client } = setup({ reconnect: { attempts: 1 } });
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    gw.drop(code);
    expect((await outcome).error).toBeInstanceOf(kind);
    await tick();
    expect(gw.attempts).toHaveLength(1);
  });

  test("a close by the client, or a protocol violation, is not resumed", async () => {
    const { gw, client } = setup();
    const first = await streaming(gw, client, "r", ["a"]);
    gw.send(chunk("r", 5, "gap"));
    expect((await first.outcome).error).toBeInstanceOf(ProtocolViolation);
    const second = await streaming(gw, client, "s", ["a"]);
    client.close();
    expect((await second.outcome).error).toMatchObject({ name: "ConnectionLost", closeCode: 1000 });
    await tick();
    expect(gw.attempts).toHaveLength(2);
    expect(gw.received.filter((m) => m.type === "resume")).toEqual([]);
  });

  test("autoResume: false: a drop fails the resumable stream with ConnectionLost and nothing reconnects", async () => {
    const { gw, client } = setup({ autoResume: false });
    const { stream, outcome } = await streaming(gw, client, "r", ["a"]);
    gw.drop();
    const { error } = await outcome;
    expect(error).toBeInstanceOf(ConnectionLost);
    expect(error).not.toBeInstanceOf(ResumeFailed);
    await tick();
    expect(gw.attempts).toHaveLength(1);
    expect([stream.epoch, stream.lastSeq]).toEqual(["ep", 0]);
  });

  test("the client option resumable makes every chat resumable; resumable: false on a call overrides it", async () => {
    const { gw, client } = setup({ resumable: true });
    gw.onMessage = (m, g) => { if (m.type === "chat") g.send(completed(String(m.request_id), "")); };
    await client.chat({ message: "m", requestId: "a" });
    await client.chat({ message: "m", requestId: "b", resumable: false });
    expect(gw.received.map((m) => m.resumable)).toEqual([true, undefined]);
  });

  test("not_found on the client's resume ends the stream with ResumeNotFound after the chunks received", async () => {
    const { gw, client } = setup();
    const { outcome } = await streaming(gw, client, "r", ["a", "b"]);
    gw.drop();
    await nextResume(gw);
    gw.send({ type: "resume_result", request_id: "r", status: "not_found" });
    const { texts, error } = await outcome;
    expect(texts).toEqual(["a", "b"]);
    expect(error).toBeInstanceOf(ResumeNotFound);
    expect(client.connected).toBe(true);
  });

  test("moved after the client's resume ends the stream with RequestMoved; chat() rejects with it", async () => {
    const { gw, client } = setup();
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    const whole = client.chat({ message: "m", requestId: "c", resumable: true });
    await gw.next((m) => m.request_id === "c");
    gw.send(resumable("c"));
    gw.drop();
    await nextResume(gw, "c");
    gw.send(resumed("r"), resumed("c"), chunk("r", 1, "b"), { type: "moved", request_id: "r" }, { type: "moved", request_id: "c" });
    expect(await outcome).toMatchObject({ texts: ["a", "b"], error: expect.any(RequestMoved) });
    await expect(whole).rejects.toBeInstanceOf(RequestMoved);
  });

  test("a chat reusing the id of a request waiting to be resumed is refused locally", async () => {
    const { gw, client } = setup();
    await streaming(gw, client, "r", ["a"]);
    gw.refuse = true;
    gw.drop();
    await tick();
    expect(client.resuming).toBe(1);
    await expect(client.chat({ message: "m", requestId: "r" })).rejects.toMatchObject({ code: "duplicate_request_id" });
    expect(() => client.chatStream({ message: "m", requestId: "r" })).not.toThrow(); // refused when it starts
  });

  test("a new chat during the reconnection waits for it and goes out on the new connection", async () => {
    const { gw, client } = setup();
    const first = await streaming(gw, client, "r", ["a"]);
    gw.refuse = true;
    gw.drop();
    await tick();
    const other = client.chat({ message: "m", requestId: "n" });
    await new Promise((r) => setTimeout(r, 20));
    gw.refuse = false;
    await gw.next((m) => m.request_id === "n");
    gw.send(resumed("r"), completed("n", "new"), completed("r", "a"));
    expect((await other).content).toBe("new");
    expect(await first.outcome).toEqual({ texts: ["a"], seqs: [0] });
  });

  test("a resume refused by the gateway ends the stream with its RequestRefused", async () => {
    const { gw, client } = setup();
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    gw.drop();
    await nextResume(gw);
    gw.send({ type: "error", code: "forbidden", message: "not your request", request_id: "r" });
    const { error } = await outcome;
    expect(error).toBeInstanceOf(RequestRefused);
    expect((error as RequestRefused).code).toBe("forbidden");
  });

  test("client.close() while reconnecting fails the waiting requests with ConnectionLost and stops reconnecting", async () => {
    const { gw, client } = setup();
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    gw.refuse = true;
    gw.drop();
    await tick();
    client.close();
    const { error } = await outcome;
    expect(error).toMatchObject({ name: "ConnectionLost", closeCode: 1000 });
    const attempts = gw.attempts.length;
    await new Promise((r) => setTimeout(r, 300));
    expect(gw.attempts).toHaveLength(attempts);
  });
});

describe("cancel during the reconnection", () => {
  /** A resumable stream `r` with a chunk, then the link drops and stays down. */
  async function detached(options: MuxiOptions = {}) {
    const env = setup(options);
    const { gw, client } = env;
    const s = await streaming(gw, client, "r", ["a"]);
    gw.refuse = true;
    gw.drop();
    await tick();
    expect(client.resuming).toBe(1);
    return { ...env, ...s };
  }

  /** The link comes back: the resume and then (in the same frame) what else was queued. */
  async function reconnected(gw: FakeGateway): Promise<Wire[]> {
    gw.refuse = false;
    await gw.next((m) => m.type === "cancel" && gw.receivedOn(gw.sockets.length - 1).includes(m));
    return gw.receivedOn(gw.sockets.length - 1);
  }

  test("stream.cancel(): the cancel goes out right after the resume; it resolves with the cancelled response", async () => {
    const { gw, stream, outcome } = await detached();
    const result = stream.cancel();
    await new Promise((r) => setTimeout(r, 20));
    expect(gw.received.filter((m) => m.type === "cancel")).toEqual([]); // nowhere to send it yet
    expect(await reconnected(gw)).toEqual([
      { type: "resume", request_id: "r", epoch: "ep", after_seq: 0 },
      { type: "cancel", request_id: "r" },
    ]);
    gw.send(resumed("r"), chunk("r", 1, "b"), cancelled("r"), cancelResult("r"));
    expect(await result).toMatchObject({ status: "cancelled", reason: "client" });
    expect((await outcome).texts).toEqual(["a"]); // nothing read after the cancel
  });

  test("aborting the signal: the loop rejects at once; the cancel goes out after the resume", async () => {
    const controller = new AbortController();
    const { gw, client } = setup();
    const stream = client.chatStream({ message: "m", requestId: "r", resumable: true, signal: controller.signal });
    const outcome = drain(stream);
    await gw.next((m) => m.type === "chat");
    gw.send(resumable("r"), chunk("r", 0, "a"));
    gw.refuse = true;
    gw.drop();
    await tick();
    controller.abort();
    expect(await outcome).toMatchObject({ texts: ["a"], error: expect.objectContaining({ name: "AbortError" }) });
    expect(await reconnected(gw)).toEqual([
      { type: "resume", request_id: "r", epoch: "ep", after_seq: 0 },
      { type: "cancel", request_id: "r" },
    ]);
  });

  test("leaving the loop: the cancel goes out after the resume", async () => {
    const { gw, client } = setup();
    const stream = client.chatStream({ message: "m", requestId: "r", resumable: true });
    const it = stream[Symbol.asyncIterator]();
    const first = it.next();
    await gw.next((m) => m.type === "chat");
    gw.send(resumable("r"), chunk("r", 0, "a"));
    await first;
    gw.refuse = true;
    gw.drop();
    await tick();
    await it.return!();
    expect((await reconnected(gw)).map((m) => m.type)).toEqual(["resume", "cancel"]);
  });

  test("cancelRequest(id): answered by the cancel_result after the resume", async () => {
    const { gw, client } = await detached();
    const status = client.cancelRequest("r");
    await new Promise((r) => setTimeout(r, 20));
    expect((await reconnected(gw)).map((m) => m.type)).toEqual(["resume", "cancel"]);
    gw.send(resumed("r"), cancelled("r"), cancelResult("r"));
    expect(await status).toBe("cancelled");
  });

  test("a cancel sent on the dropped connection and not answered is sent again after the resume", async () => {
    const { gw, client } = setup();
    const { stream } = await streaming(gw, client, "r", ["a"]);
    const result = stream.cancel();
    await gw.next((m) => m.type === "cancel");
    expect(gw.receivedOn(0).map((m) => m.type)).toEqual(["chat", "cancel"]);
    gw.drop(); // before the gateway answered
    await gw.next((m) => m.type === "cancel" && gw.receivedOn(1).includes(m));
    expect(gw.receivedOn(1)).toEqual([
      { type: "resume", request_id: "r", epoch: "ep", after_seq: 0 },
      { type: "cancel", request_id: "r" },
    ]);
    // The gateway had read the first cancel: the kept cancelled response, then already_cancelled.
    gw.send(resumed("r"), cancelled("r"), cancelResult("r", "already_cancelled"));
    expect(await result).toMatchObject({ status: "cancelled" });
  });

  test("giving up with a Stop pending: the stream fails with ResumeFailed and the cancel goes over HTTP", async () => {
    const { gw, stream, outcome, fetches } = await detached({ reconnect: { resumeTimeoutMs: 200 } });
    const result = stream.cancel();
    await expect(result).rejects.toBeInstanceOf(ResumeFailed);
    expect((await outcome).error).toBeInstanceOf(ResumeFailed);
    await tick();
    expect(fetches).toEqual([{ method: "DELETE", url: "http://fake.invalid/v1/requests/r" }]);
    expect(gw.received.filter((m) => m.type === "cancel")).toEqual([]);
  });

  test("giving up with a cancelRequest waiting: it falls back to HTTP and resolves with its answer (one DELETE)", async () => {
    const { client, outcome, fetches } = await detached({ reconnect: { resumeTimeoutMs: 200 } });
    expect(await client.cancelRequest("r")).toBe("cancelled");
    expect((await outcome).error).toBeInstanceOf(ResumeFailed);
    await tick();
    expect(fetches).toEqual([{ method: "DELETE", url: "http://fake.invalid/v1/requests/r" }]);
  });

  test("client.close() with a Stop pending: the cancel goes over HTTP", async () => {
    const { client, stream, fetches } = await detached();
    const result = stream.cancel();
    client.close();
    await expect(result).rejects.toBeInstanceOf(ConnectionLost);
    await tick();
    expect(fetches.map((f) => f.method)).toEqual(["DELETE"]);
  });

  test("giving up without a Stop sends nothing over HTTP", async () => {
    const { outcome, fetches } = await detached({ reconnect: { resumeTimeoutMs: 100 } });
    expect((await outcome).error).toBeInstanceOf(ResumeFailed);
    await tick();
    expect(fetches).toEqual([]);
  });
});

describe("flapping after a stable connection", () => {
  beforeEach(() => vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] }));

  test("a connection that lived long enough resets the backoff and the time limit", async () => {
    vi.spyOn(Math, "random").mockReturnValue(0);
    const { gw, client } = setup({ reconnect: { resumeTimeoutMs: 1000 } });
    const { outcome } = await streaming(gw, client, "r", ["a"]);
    await vi.advanceTimersByTimeAsync(5000);
    gw.onMessage = (m, g) => { if (m.type === "resume") g.send(resumed("r")); };
    for (let i = 0; i < 4; i++) {
      const before = gw.attempts.length;
      const dropAt = Date.now();
      gw.drop();
      await vi.advanceTimersByTimeAsync(1);
      expect(gw.attempts.length).toBe(before + 1);
      expect(gw.attempts.at(-1)).toBe(dropAt); // at once, every time: the last connection was stable
      await vi.advanceTimersByTimeAsync(2000); // longer than the time limit: it restarts each time
    }
    gw.send(completed("r", "a"));
    expect(await outcome).toEqual({ texts: ["a"], seqs: [0] });
  });
});
