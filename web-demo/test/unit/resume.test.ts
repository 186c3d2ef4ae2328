// Resumable requests (SPEC.md §3.3, §3.4, §3.13, §5.8): the wire form beyond the shared vectors,
// the client rules at the end of §5.8 (resumable once and first, MOVED, resuming from
// after_seq + 1, GONE, content ending with the text since the resume, steps not checked
// against history), and the SDK's API (chat options `resumable`, `graceMs`, `onResumable`;
// `epoch`, `graceMs`, `lastSeq` on the stream; `RequestMoved`, `resumeStream`,
// `ResumeNotFound`), against a scripted in-process gateway.
import { afterEach, describe, expect, test } from "vitest";
import {
  type ChatStream, InvalidRequest, Muxi, ProtocolError, ProtocolViolation, RequestMoved, RequestRefused,
  type ResumableInfo, ResumeNotFound, checkOutgoing, decode, encode, limits, type Message,
} from "@muxgate/sdk";
import { FakeGateway } from "../support/fake-gateway.js";

const clients: Muxi[] = [];
afterEach(() => { for (const c of clients.splice(0)) c.close(); });

function setup(options: ConstructorParameters<typeof Muxi>[0] = {}): { gw: FakeGateway; client: Muxi } {
  const gw = new FakeGateway();
  const client = new Muxi({ url: "ws://fake.invalid", WebSocket: gw.WebSocket, reconnect: { attempts: 1 }, ...options });
  clients.push(client);
  return { gw, client };
}

type Wire = Record<string, unknown>;
const usage = (final = true) => ({ input_tokens: 10, output_tokens: 5, saved_tokens: final ? 0 : 20, final });
const chunk = (request_id: string, seq: number, text: string) => ({ type: "chunk", request_id, seq, text });
const resumable = (request_id: string, epoch = "e1", grace_ms = 30000) => ({ type: "resumable", request_id, epoch, grace_ms });
const completed = (request_id: string, content: string) => ({ type: "response", request_id, status: "completed", content, usage: usage() });
const cancelled = (request_id: string, final = true) =>
  ({ type: "response", request_id, status: "cancelled", content: "", reason: "client", usage: usage(final) });
const step = (request_id: string, index: number, state: "started" | "ended") =>
  ({ type: "step", request_id, index, kind: "tool", name: `t${index}`, state });

/** Reads the whole stream: the texts read, and how it ended (undefined: normally). */
function drain(stream: ChatStream): Promise<{ texts: string[]; error?: unknown }> {
  const texts: string[] = [];
  return (async () => {
    try {
      for await (const c of stream) texts.push(c.text);
      return { texts };
    } catch (error) {
      return { texts, error };
    }
  })();
}

/** A streamed chat `r` with `resumable: true`, on the wire. */
async function resumableStream(gw: FakeGateway, client: Muxi, extra: Record<string, unknown> = {}) {
  const stream = client.chatStream({ message: "m", requestId: "r", resumable: true, ...extra });
  const outcome = drain(stream);
  await gw.next((m) => m.type === "chat");
  return { stream, outcome };
}

/** A resume of `r` from `afterSeq` (null: none), on the wire. */
async function resumed(gw: FakeGateway, client: Muxi, afterSeq: number | null, extra: Record<string, unknown> = {}) {
  const stream = client.resumeStream({ requestId: "r", epoch: "e1", afterSeq: afterSeq ?? undefined, ...extra });
  const outcome = drain(stream);
  await gw.next((m) => m.type === "resume");
  return { stream, outcome };
}

/** The gateway's messages broke §5.1/§5.8: the SDK closed the connection with 1002. */
function expectViolation(gw: FakeGateway): void {
  expect(gw.socket.closeCode).toBe(1002);
}

describe("wire", () => {
  const base = { type: "chat", request_id: "r1", message: "hi", stream: true } as const;

  test("chat.resumable is written only when true, before grace_ms and after steps; false and null decode to absent", () => {
    expect(encode(checkOutgoing({ ...base, grace_ms: 5, resumable: true, steps: true }), "json"))
      .toBe('{"type":"chat","request_id":"r1","message":"hi","stream":true,"steps":true,"resumable":true,"grace_ms":5}');
    expect(encode(checkOutgoing({ ...base, resumable: false }), "json")).toBe('{"type":"chat","request_id":"r1","message":"hi","stream":true}');
    for (const value of ["false", "null"]) {
      const [m] = decode(`{"type":"chat","request_id":"r1","message":"hi","resumable":${value}}`, "json", "client");
      expect(m).toEqual(base);
    }
  });

  test.each([
    ["grace_ms without resumable", { grace_ms: 10 }],
    ["grace_ms with resumable false", { resumable: false, grace_ms: 10 }],
    ["grace_ms 0", { resumable: true, grace_ms: 0 }],
    ["grace_ms above MAX_GRACE_MS", { resumable: true, grace_ms: limits.MAX_GRACE_MS + 1 }],
    ["grace_ms not an integer", { resumable: true, grace_ms: 1.5 }],
    ["resumable not a boolean", { resumable: "true" }],
  ])("chat: %s is invalid_field", (_, extra) => {
    expect(() => checkOutgoing({ ...base, ...extra } as unknown as Message)).toThrow(expect.objectContaining({ code: "invalid_field" }));
  });

  test("grace_ms at MAX_GRACE_MS is fine", () => {
    expect(checkOutgoing({ ...base, resumable: true, grace_ms: limits.MAX_GRACE_MS })).toMatchObject({ grace_ms: 3_600_000 });
  });

  test("resume: canonical order, after_seq 0..2^53-1, epoch of 1-64 characters of the pattern", () => {
    const resume = { user_id: "u", after_seq: Number.MAX_SAFE_INTEGER, epoch: "e".repeat(64), request_id: "r", type: "resume" } as const;
    expect(encode(checkOutgoing(resume), "json"))
      .toBe(`{"type":"resume","request_id":"r","epoch":"${"e".repeat(64)}","after_seq":9007199254740991,"user_id":"u"}`);
    for (const bad of [{ epoch: "e".repeat(65) }, { epoch: "e 1" }, { after_seq: Number.MAX_SAFE_INTEGER + 1 }, { after_seq: -1 }]) {
      expect(() => checkOutgoing({ ...resume, ...bad })).toThrow(expect.objectContaining({ code: "invalid_field" }));
    }
  });

  test.each([
    ['{"type":"resumable","request_id":"r","epoch":"e","grace_ms":0}', "invalid_field"],
    ['{"type":"resumable","request_id":"r","epoch":"e","grace_ms":3600001}', "invalid_field"],
    ['{"type":"resumable","request_id":"r","epoch":"","grace_ms":1}', "invalid_field"],
    ['{"type":"resumable","request_id":"r","epoch":"e","grace_ms":3600000}', null],
    ['{"type":"resume_result","request_id":"r","status":"resumed"}', null],
    ['{"type":"moved","request_id":"r","x":1}', null],
    ['{"type":"moved","request_id":"r r"}', "invalid_field"],
  ])("from the gateway: %s", (frame, error) => {
    const [m] = decode(frame, "json", "gateway");
    if (error === null) expect(m).not.toBeInstanceOf(ProtocolError);
    else expect((m as ProtocolError).code).toBe(error);
  });

  test("resume is a client message, resumable, resume_result and moved are gateway messages", () => {
    const [r] = decode('{"type":"resume","request_id":"r","epoch":"e"}', "json", "gateway");
    expect(r).toMatchObject({ code: "unknown_type", requestId: "r" });
    for (const type of ["resumable", "resume_result", "moved"]) {
      const [m] = decode(`{"type":"${type}","request_id":"r"}`, "json", "client");
      expect(m).toMatchObject({ code: "unknown_type", requestId: "r" });
    }
  });
});

describe("chat options", () => {
  test("resumable and graceMs go on the chat; graceMs or onResumable imply resumable; none by default", async () => {
    const { gw, client } = setup();
    gw.onMessage = (m, g) => {
      if (m.type === "chat") g.send({ type: "response", request_id: m.request_id, status: "completed", content: "", usage: usage() });
    };
    await client.chat({ message: "a", requestId: "a" });
    await client.chat({ message: "b", requestId: "b", resumable: true });
    await client.chat({ message: "c", requestId: "c", resumable: true, graceMs: 60000 });
    await client.chat({ message: "d", requestId: "d", graceMs: 1000.2 });
    await client.chat({ message: "e", requestId: "e", onResumable: () => {} });
    await client.chat({ message: "f", requestId: "f", resumable: false });
    const chats = gw.received.filter((m) => m.type === "chat");
    expect(chats.map((m) => [m.resumable, m.grace_ms])).toEqual([
      [undefined, undefined], [true, undefined], [true, 60000], [true, 1001], [true, undefined], [undefined, undefined],
    ]);
    expect(JSON.stringify(chats[2])).toBe('{"type":"chat","request_id":"c","message":"c","stream":false,"resumable":true,"grace_ms":60000}');
    expect("resumable" in chats[0]!).toBe(false);
    expect("resumable" in chats[5]!).toBe(false);
  });

  test.each([
    ["graceMs with resumable: false", { resumable: false, graceMs: 1000 }],
    ["onResumable with resumable: false", { resumable: false, onResumable: () => {} }],
    ["graceMs 0", { graceMs: 0 }],
    ["graceMs above an hour", { graceMs: limits.MAX_GRACE_MS + 1 }],
    ["graceMs not a number", { graceMs: "10" }],
    ["resumable not a boolean", { resumable: 1 }],
    ["onResumable not a function", { resumable: true, onResumable: 1 }],
  ])("%s is refused with InvalidRequest before anything is sent", (_, extra) => {
    const { gw, client } = setup();
    expect(() => client.chatStream({ message: "m", ...extra } as never)).toThrow(InvalidRequest);
    expect(gw.sockets).toHaveLength(0);
  });

  test("resumeStream validates its parameters before anything is sent", () => {
    const { gw, client } = setup();
    for (const bad of [{ epoch: "" }, { epoch: "a/b" }, { afterSeq: -1 }, { afterSeq: 1.5 }, { requestId: "r r" }, { userId: "" }, { stream: "no" }]) {
      expect(() => client.resumeStream({ requestId: "r", epoch: "e1", ...bad } as never)).toThrow(InvalidRequest);
    }
    expect(gw.sockets).toHaveLength(0);
  });
});

describe("resumable message", () => {
  test("epoch and grace on the stream and to onResumable; then the request streams as usual", async () => {
    const { gw, client } = setup();
    const infos: ResumableInfo[] = [];
    const { stream, outcome } = await resumableStream(gw, client, { graceMs: 90000, onResumable: (i: ResumableInfo) => infos.push(i) });
    expect(gw.received[0]).toEqual({ type: "chat", request_id: "r", message: "m", stream: true, resumable: true, grace_ms: 90000 });
    expect(stream.epoch).toBeUndefined();
    gw.send(resumable("r", "g7f3a.12", 60000));
    expect(stream.epoch).toBe("g7f3a.12");
    expect(stream.graceMs).toBe(60000);
    expect(infos).toEqual([{ requestId: "r", epoch: "g7f3a.12", graceMs: 60000 }]);
    expect(stream.lastSeq).toBeUndefined();
    gw.send(chunk("r", 0, "Once"), chunk("r", 1, " upon"));
    expect(stream.lastSeq).toBe(1);
    gw.send(completed("r", "Once upon"));
    expect(await outcome).toEqual({ texts: ["Once", " upon"] });
    expect(stream.response?.status).toBe("completed");
    expect(client.connected).toBe(true);
  });

  test("a gateway older than §5.8 sends no resumable: the request works, epoch stays undefined", async () => {
    const { gw, client } = setup();
    const { stream, outcome } = await resumableStream(gw, client);
    gw.send(chunk("r", 0, "Hi"), completed("r", "Hi"));
    expect(await outcome).toEqual({ texts: ["Hi"] });
    expect(stream.epoch).toBeUndefined();
    expect(stream.graceMs).toBeUndefined();
  });

  test("chat() learns the epoch through onResumable", async () => {
    const { gw, client } = setup();
    gw.onMessage = (m, g) => {
      if (m.type === "chat") g.send(resumable("q", "ep"), completed("q", "done"));
    };
    let info: ResumableInfo | undefined;
    const r = await client.chat({ message: "m", requestId: "q", onResumable: (i) => (info = i) });
    expect(r.content).toBe("done");
    expect(info).toEqual({ requestId: "q", epoch: "ep", graceMs: 30000 });
  });

  const violations: [string, Record<string, unknown>, Wire[]][] = [
    ["for a chat that did not ask for it", { resumable: false }, [resumable("r")]],
    ["twice", {}, [resumable("r"), resumable("r")]],
    ["after a chunk", {}, [chunk("r", 0, "x"), resumable("r")]],
    ["after a step", { steps: true }, [step("r", 0, "started"), resumable("r")]],
    ["after the cancelled response (usage pending)", {}, [cancelled("r", false), resumable("r")]],
  ];
  test.each(violations)("a resumable %s is a ProtocolViolation", async (_, extra, messages) => {
    const { gw, client } = setup();
    const { outcome } = await resumableStream(gw, client, extra);
    for (const m of messages) gw.send(m);
    expectViolation(gw);
    const { error } = await outcome;
    // After the response the loop may have ended normally; the connection is what must end.
    if (error !== undefined) expect(error).toBeInstanceOf(ProtocolViolation);
  });
});

describe("moved", () => {
  test("the stream yields the chunks received before moved, then throws RequestMoved; no cancel is sent", async () => {
    const { gw, client } = setup();
    const { stream, outcome } = await resumableStream(gw, client);
    gw.send(resumable("r"), chunk("r", 0, "Once"), { type: "moved", request_id: "r" });
    const { texts, error } = await outcome;
    expect(texts).toEqual(["Once"]);
    expect(error).toBeInstanceOf(RequestMoved);
    expect((error as RequestMoved).requestId).toBe("r");
    expect(stream.response).toBeUndefined();
    expect(stream.text).toBe("Once");
    expect(client.connected).toBe(true);
    await new Promise((r) => setTimeout(r, 0));
    expect(gw.received.filter((m) => m.type === "cancel")).toEqual([]);
  });

  test("chat() rejects with RequestMoved", async () => {
    const { gw, client } = setup();
    gw.onMessage = (m, g) => {
      if (m.type === "chat") g.send(resumable("q"), { type: "moved", request_id: "q" });
    };
    await expect(client.chat({ message: "m", requestId: "q", resumable: true })).rejects.toBeInstanceOf(RequestMoved);
    expect(client.connected).toBe(true);
  });

  test("a moved request frees its id and slot on this connection", async () => {
    const { gw, client } = setup();
    const first = await resumableStream(gw, client);
    gw.send(resumable("r"), { type: "moved", request_id: "r" });
    expect((await first.outcome).error).toBeInstanceOf(RequestMoved);
    // Still registered, the id would be refused locally as duplicate_request_id.
    const again = client.chatStream({ message: "again", requestId: "r" });
    const outcome = drain(again);
    await gw.next((m) => m.type === "chat" && m.message === "again");
    gw.send(completed("r", ""));
    expect(await outcome).toEqual({ texts: [] });
  });

  test.each(["cancelled", "already_cancelled", "already_completed", "not_found"])(
    "a cancel_result %s after moved is accepted (the response went to the other connection)",
    async (status) => {
      const { gw, client } = setup();
      const { outcome } = await resumableStream(gw, client);
      gw.send(resumable("r"));
      const result = client.cancelRequest("r");
      await gw.next((m) => m.type === "cancel");
      gw.send({ type: "moved", request_id: "r" }, { type: "cancel_result", request_id: "r", status });
      expect(await result).toBe(status);
      expect((await outcome).error).toBeInstanceOf(RequestMoved);
      expect(client.connected).toBe(true);
    },
  );

  const after: [string, Wire][] = [
    ["a chunk", chunk("r", 1, "x")],
    ["a step", step("r", 0, "started")],
    ["a response", cancelled("r")],
    ["a second moved", { type: "moved", request_id: "r" }],
  ];
  test.each(after)("%s after moved is a ProtocolViolation", async (_, message) => {
    const { gw, client } = setup();
    await resumableStream(gw, client, { steps: true });
    gw.send(resumable("r"), chunk("r", 0, "x"));
    // A cancel not answered yet keeps the request registered here after moved.
    const result = client.cancelRequest("r");
    await gw.next((m) => m.type === "cancel");
    gw.send({ type: "moved", request_id: "r" });
    expect(client.connected).toBe(true);
    gw.send(message);
    expectViolation(gw);
    await expect(result).rejects.toThrow(/after it moved/);
  });

  const early: [string, Record<string, unknown>, Wire[]][] = [
    ["for a chat that did not ask to be resumable", { resumable: false }, []],
    ["before the resumable message", {}, []],
    ["after the cancelled response (usage pending)", {}, [resumable("r"), cancelled("r", false)]],
  ];
  test.each(early)("moved %s is a ProtocolViolation", async (_, extra, before) => {
    const { gw, client } = setup();
    const { outcome } = await resumableStream(gw, client, extra);
    for (const m of before) gw.send(m);
    expect(client.connected).toBe(true);
    gw.send({ type: "moved", request_id: "r" });
    expectViolation(gw);
    const { error } = await outcome;
    if (error !== undefined) expect(error).toBeInstanceOf(ProtocolViolation);
  });
});

describe("resume", () => {
  test("sends resume, tracks from after_seq + 1, and a completed content ends with the text since the resume", async () => {
    const { gw, client } = setup();
    const { stream, outcome } = await resumed(gw, client, 0, { userId: "user123" });
    expect(gw.received.at(-1)).toEqual({ type: "resume", request_id: "r", epoch: "e1", after_seq: 0, user_id: "user123" });
    expect(JSON.stringify(gw.received.at(-1))).toBe('{"type":"resume","request_id":"r","epoch":"e1","after_seq":0,"user_id":"user123"}');
    expect(stream.epoch).toBe("e1");
    expect(stream.lastSeq).toBe(0);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, chunk("r", 1, " upon"), chunk("r", 2, " a time."));
    expect(stream.lastSeq).toBe(2);
    gw.send(completed("r", "Once upon a time."));
    expect(await outcome).toEqual({ texts: [" upon", " a time."] });
    expect(stream.text).toBe(" upon a time.");
    expect(stream.response?.content).toBe("Once upon a time.");
    expect(client.connected).toBe(true);
  });

  test("without afterSeq: no after_seq on the wire, replay from seq 0, the content must equal the chunks", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, null);
    expect(gw.received.at(-1)).toEqual({ type: "resume", request_id: "r", epoch: "e1" });
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, chunk("r", 0, "ab"), completed("r", "ab"));
    expect(await outcome).toEqual({ texts: ["ab"] });
  });

  test("without afterSeq a content that only ends with the chunks is a ProtocolViolation", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, null);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, chunk("r", 0, "ab"), completed("r", "xab"));
    expectViolation(gw);
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test("a completed content that does not end with the text since the resume is a ProtocolViolation", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, 0);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, chunk("r", 1, " upon"), completed("r", "Once upon!"));
    expectViolation(gw);
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test("a chunk with a seq other than after_seq + 1 is a ProtocolViolation", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, 3);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, chunk("r", 0, "again"));
    expectViolation(gw);
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  const beforeResult: [string, Wire][] = [
    ["a chunk", chunk("r", 2, "x")],
    ["a step", step("r", 0, "started")],
    ["a response", completed("r", "")],
    ["a resumable", resumable("r")],
    ["a moved", { type: "moved", request_id: "r" }],
  ];
  test.each(beforeResult)("%s before the resume_result is a ProtocolViolation", async (_, message) => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, 1);
    gw.send(message);
    expectViolation(gw);
    const { error } = await outcome;
    expect(error).toBeInstanceOf(ProtocolViolation);
    expect((error as Error).message).toMatch(/before its resume_result/);
  });

  test("a cancel_result before the resume_result is a ProtocolViolation", async () => {
    const { gw, client } = setup();
    await resumed(gw, client, 1);
    const result = client.cancelRequest("r");
    await gw.next((m) => m.type === "cancel");
    gw.send({ type: "cancel_result", request_id: "r", status: "not_found" });
    expectViolation(gw);
    await expect(result).rejects.toThrow(/before its resume_result/);
  });

  test("a resume_result for a chat (no resume sent) is a ProtocolViolation", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumableStream(gw, client);
    gw.send(resumable("r"), { type: "resume_result", request_id: "r", status: "resumed" });
    expectViolation(gw);
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test("a resumable after the resume_result is a ProtocolViolation (a resumed request gets none)", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, 1);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" });
    expect(client.connected).toBe(true);
    gw.send(resumable("r"));
    expectViolation(gw);
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test("a second resume_result is a ProtocolViolation", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, 1);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" });
    expect(client.connected).toBe(true);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" });
    expectViolation(gw);
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test("not_found ends the stream with ResumeNotFound; the connection stays open", async () => {
    const { gw, client } = setup();
    const { stream, outcome } = await resumed(gw, client, 1);
    gw.send({ type: "resume_result", request_id: "r", status: "not_found" });
    const { texts, error } = await outcome;
    expect(texts).toEqual([]);
    expect(error).toBeInstanceOf(ResumeNotFound);
    expect(stream.response).toBeUndefined();
    expect(client.connected).toBe(true);
  });

  test("after not_found (GONE) a chunk is a ProtocolViolation, a cancel_result of any status is not", async () => {
    const { gw, client } = setup();
    await resumed(gw, client, 1);
    const first = client.cancelRequest("r");
    const second = client.cancelRequest("r");
    await gw.next((m) => m.type === "cancel");
    gw.send({ type: "resume_result", request_id: "r", status: "not_found" }, { type: "cancel_result", request_id: "r", status: "already_completed" });
    expect(await first).toBe("already_completed");
    expect(client.connected).toBe(true);
    gw.send(chunk("r", 2, "x"));
    expectViolation(gw);
    await expect(second).rejects.toThrow(/after resume_result not_found/);
  });

  test("a refused resume (an error before the resume_result) is RequestRefused; the connection stays open", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, 99);
    gw.send({ type: "error", code: "invalid_field", message: "after_seq is beyond the last chunk", request_id: "r" });
    const { error } = await outcome;
    expect(error).toBeInstanceOf(RequestRefused);
    expect((error as RequestRefused).code).toBe("invalid_field");
    expect(client.connected).toBe(true);
  });

  test("resuming a request that runs on this connection is refused locally (duplicate_request_id)", async () => {
    const { gw, client } = setup();
    await resumableStream(gw, client);
    const { error } = await drain(client.resumeStream({ requestId: "r", epoch: "e1" }));
    expect(error).toBeInstanceOf(RequestRefused);
    expect((error as RequestRefused).code).toBe("duplicate_request_id");
    expect(gw.received.filter((m) => m.type === "resume")).toEqual([]);
  });

  test("steps after a resume: the first started step may have any index, then they follow on; a step started before ends once", async () => {
    const { gw, client } = setup();
    const { stream, outcome } = await resumed(gw, client, 1, { onStep: () => {} });
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, step("r", 3, "ended"), step("r", 5, "started"),
      step("r", 6, "started"), step("r", 2, "ended"), step("r", 5, "ended"), step("r", 7, "started"));
    expect(client.connected).toBe(true);
    expect(stream.steps.map((s) => `${s.index}:${s.state}`)).toEqual(["3:ended", "5:started", "6:started", "2:ended", "5:ended", "7:started"]);
    expect(stream.currentStep?.index).toBe(7);
    gw.send(step("r", 3, "ended")); // ended twice
    expectViolation(gw);
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test.each([
    ["a started step skipping an index", [step("r", 5, "started"), step("r", 7, "started")]],
    ["a started step below one that ended here", [step("r", 4, "ended"), step("r", 3, "started")]],
    ["an ended step at or above the first live one that is not running", [step("r", 5, "started"), step("r", 6, "ended")]],
  ])("after a resume, %s is a ProtocolViolation", async (_, steps) => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, 1);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" });
    for (const s of steps) gw.send(s);
    expectViolation(gw);
    expect((await outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test("a resumed request that moves again ends with RequestMoved", async () => {
    const { gw, client } = setup();
    const { outcome } = await resumed(gw, client, 1);
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, chunk("r", 2, "x"), { type: "moved", request_id: "r" });
    const { texts, error } = await outcome;
    expect(texts).toEqual(["x"]);
    expect(error).toBeInstanceOf(RequestMoved);
  });

  test("stream: false (a chat() being resumed): no chunk may come, the whole content arrives", async () => {
    const { gw, client } = setup();
    const ok = await resumed(gw, client, null, { stream: false });
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, completed("r", "whole answer"));
    expect(await ok.outcome).toEqual({ texts: [] });
    expect(ok.stream.response?.content).toBe("whole answer");
    const { gw: gw2, client: client2 } = setup();
    const bad = await resumed(gw2, client2, null, { stream: false });
    gw2.send({ type: "resume_result", request_id: "r", status: "resumed" }, chunk("r", 0, "x"));
    expectViolation(gw2);
    expect((await bad.outcome).error).toBeInstanceOf(ProtocolViolation);
  });

  test("autoResume: false: a connection drop fails the stream; resumeStream on the next connection picks up after lastSeq", async () => {
    // (With the default autoResume the client resumes by itself: test/unit/reconnect.test.ts.)
    const { gw, client } = setup({ autoResume: false });
    const first = await resumableStream(gw, client);
    gw.send(resumable("r", "ep.1"), chunk("r", 0, "Once"));
    gw.socket.close(1006);
    const { texts, error } = await first.outcome;
    expect(texts).toEqual(["Once"]);
    expect(error).toMatchObject({ name: "ConnectionLost" });
    const { epoch, lastSeq } = first.stream;
    expect([epoch, lastSeq]).toEqual(["ep.1", 0]);
    const again = client.resumeStream({ requestId: "r", epoch: epoch!, afterSeq: lastSeq });
    const outcome = drain(again);
    await gw.next((m) => m.type === "resume");
    expect(gw.sockets).toHaveLength(2);
    expect(gw.received.at(-1)).toEqual({ type: "resume", request_id: "r", epoch: "ep.1", after_seq: 0 });
    gw.send({ type: "resume_result", request_id: "r", status: "resumed" }, chunk("r", 1, " upon"), completed("r", "Once upon"));
    expect(await outcome).toEqual({ texts: [" upon"] });
  });
});
