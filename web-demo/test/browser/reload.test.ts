// Real-browser reload tests (SPEC.md §5.8): Debian's chromium against a real gateway serving the
// built pages (gateway/webui). The chat demo keeps each in-flight answer's request id, epoch,
// last seq and text in sessionStorage; a reload mid-answer resumes it: the answer continues
// where it was, with no word lost or repeated (it ends equal to what an uninterrupted run of the
// same prompt gives), and Stop after the reload cancels the resumed request. Synchronisation is
// by awaited conditions only.
import { afterAll, afterEach, beforeAll, beforeEach, expect, test } from "vitest";
import type { Browser, BrowserContext, Page } from "playwright-core";
import WS from "ws";
import { Muxi, type WebSocketConstructor } from "@muxgate/sdk";
import { type Gateway, startGateway, waitFor } from "../support/gateway.js";
import { launch, screenshot, watchErrors } from "../support/browser.js";

let gw: Gateway;
let browser: Browser;
let closeBrowser: () => Promise<void>;
let context: BrowserContext;
let page: Page;
let errors: string[];
/** Every client message the page sent, over all its WebSockets (all its page loads). */
let sent: Record<string, unknown>[];

beforeAll(async () => {
  [gw, { browser, close: closeBrowser }] = await Promise.all([startGateway(), launch()]);
});
afterAll(async () => {
  await closeBrowser?.();
  await gw?.stop();
});
beforeEach(async () => {
  context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  errors = watchErrors(page, { allowBackend404: true });
  sent = [];
  page.on("websocket", (ws) => ws.on("framesent", (f) => {
    if (typeof f.payload === "string") for (const line of f.payload.split("\n")) sent.push(JSON.parse(line) as Record<string, unknown>);
  }));
});
afterEach(async (ctx) => {
  await screenshot(page, ctx.task.name.replace(/[^a-z0-9]+/gi, "-").toLowerCase());
  await context.close();
  expect(errors).toEqual([]);
});

const conv = (i: number) => `[data-testid="conversation-${i}"]`;
const lastTurn = (i: number) => `${conv(i)} [data-testid="turn"]:last-child`;
const answer = (i: number) => page.textContent(`${lastTurn(i)} [data-testid="answer"]`).then((t) => t ?? "");
const chunkCount = (i: number) => page.getAttribute(`${lastTurn(i)} [data-testid="answer"]`, "data-chunks").then(Number);

async function setSpeed(tokens: number, delay: number) {
  await page.fill('[data-testid="speed-tokens"]', String(tokens));
  await page.fill('[data-testid="speed-token_delay_ms"]', String(delay));
}

async function send(i: number, text: string) {
  await page.fill(`${conv(i)} [data-testid="input"]`, text);
  await page.click(`${conv(i)} [data-testid="send"]`);
}

/** Waits until conversation i's last answer has at least n chunks. */
async function waitChunks(i: number, n: number) {
  await page.waitForFunction(
    ([sel, min]) => Number(document.querySelector(`${sel} [data-testid="answer"]`)?.getAttribute("data-chunks") ?? 0) >= min,
    [lastTurn(i), n] as const,
    { timeout: 20_000 },
  );
}

async function waitState(i: number, state: string, timeout = 20_000) {
  await page.waitForSelector(`${lastTurn(i)}[data-state="${state}"]`, { timeout });
}

/** What the page keeps for conversation i's last turn. */
async function saved(i: number): Promise<{ requestId: string; epoch?: string; lastSeq?: number; answer: string; state: string }> {
  const raw = await page.evaluate((key) => sessionStorage.getItem(key), `muxgate-demo:conversation:${i}`);
  const turns = JSON.parse(raw ?? "[]") as { requestId: string; epoch?: string; lastSeq?: number; answer: string; state: string }[];
  return turns.at(-1)!;
}

/** The answer an uninterrupted run of the same prompt gives (the simulated backend's text depends
 * only on the prompt and the token count), asked straight from Node. */
async function reference(message: string, tokens: number): Promise<string> {
  const client = new Muxi({ url: gw.url, WebSocket: WS as unknown as WebSocketConstructor });
  try {
    return (await client.chat({ message, metadata: { tokens, token_delay_ms: 0, plan_ms: 0, tool_ms: 0 } })).content;
  } finally {
    client.close();
  }
}

async function getRequest(id: string): Promise<{ status: string; reason?: string }> {
  return (await (await fetch(`${gw.http}/v1/requests/${id}`)).json()) as { status: string; reason?: string };
}

test("two answers reloaded twice mid-stream continue where they were and complete, no word lost or repeated", async () => {
  const prompts = ["Tell me a long story about a lighthouse", "Explain the history of tea in detail"];
  const tokens = 400;
  await page.goto(gw.http + "/");
  await setSpeed(tokens, 15);
  // A finished turn first: it is still shown after the reloads.
  await setSpeed(5, 0);
  await send(1, "A short one");
  await waitState(1, "completed");
  const short = await answer(1);
  await setSpeed(tokens, 15);
  await send(0, prompts[0]!);
  await send(1, prompts[1]!);
  const ids = [await page.getAttribute(lastTurn(0), "data-request-id"), await page.getAttribute(lastTurn(1), "data-request-id")];
  let seen = [0, 0];
  for (let reload = 1; reload <= 2; reload++) {
    await Promise.all([waitChunks(0, seen[0]! + 40), waitChunks(1, seen[1]! + 40)]);
    // The page keeps, per streaming answer, its id, epoch, last seq and the text shown so far.
    for (const i of [0, 1]) {
      const kept = await saved(i);
      expect(kept).toMatchObject({ requestId: ids[i], state: "streaming", epoch: expect.any(String), lastSeq: expect.any(Number) });
      expect(kept.lastSeq!).toBeGreaterThanOrEqual(39);
    }
    const before = [await answer(0), await answer(1)];
    const mark = sent.length;
    await page.reload();
    // Resumed: the saved text is back at once, then it grows from where it was.
    for (const i of [0, 1]) {
      await page.waitForSelector(`${lastTurn(i)}[data-reloads="${reload}"]`, { timeout: 10_000 });
      expect(await page.getAttribute(lastTurn(i), "data-request-id")).toBe(ids[i]);
    }
    const resumes = () => sent.slice(mark).filter((m) => m.type === "resume");
    await waitFor(() => resumes().length === 2, "the resumes");
    for (const i of [0, 1]) {
      const resume = resumes().find((m) => m.request_id === ids[i])!;
      expect(resume).toMatchObject({ epoch: expect.any(String), after_seq: expect.any(Number) });
      expect(resume.after_seq as number).toBeGreaterThanOrEqual(39 * reload); // not replayed from the start
      const now = await answer(i);
      // What the page showed before the reload and shows now are both prefixes of one text.
      const shorter = Math.min(now.length, before[i]!.length);
      expect(now.slice(0, shorter)).toBe(before[i]!.slice(0, shorter));
    }
    seen = [await chunkCount(0), await chunkCount(1)];
  }
  await Promise.all([waitState(0, "completed", 30_000), waitState(1, "completed", 30_000)]);
  const expected = await Promise.all(prompts.map((p) => reference(p, tokens)));
  for (const i of [0, 1]) {
    const text = await answer(i);
    expect(text.split(" ").length).toBe(expected[i]!.split(" ").length);
    expect(text).toBe(expected[i]);
    expect(await page.textContent(`${lastTurn(i)} [data-testid="status"]`)).toMatch(/^completed: \d+ tokens$/);
  }
  // The finished turn from before the reloads is still there, as it was.
  expect(await page.textContent(`${conv(1)} [data-testid="turn"]:first-child [data-testid="answer"]`)).toBe(short);
  expect(await page.isVisible(`${conv(0)} [data-testid="send"]`)).toBe(true);
  // Nothing is left to resume: another reload shows the same page and sends no resume.
  const mark = sent.length;
  await page.reload();
  await page.waitForSelector(`${lastTurn(0)}[data-state="completed"]`);
  expect(await answer(0)).toBe(expected[0]);
  expect(sent.slice(mark).filter((m) => m.type === "resume")).toEqual([]);
}, 90_000);

test("Stop after a reload cancels the resumed request (reason client); the answer stops growing", async () => {
  await page.goto(gw.http + "/");
  await setSpeed(3000, 20);
  await send(0, "Write a very long story...");
  await waitChunks(0, 20);
  const id = (await page.getAttribute(lastTurn(0), "data-request-id"))!;
  await page.reload();
  await page.waitForSelector(`${lastTurn(0)}[data-reloads="1"][data-state="streaming"]`);
  const resumedAt = await chunkCount(0);
  await waitChunks(0, resumedAt + 10); // streaming again, on the new page's connection
  expect(await page.isVisible(`${conv(0)} [data-testid="stop"]`)).toBe(true);
  expect(await page.textContent(`${lastTurn(0)} [data-testid="resumed"]`)).toContain("resumed after a reload");
  await page.click(`${conv(0)} [data-testid="stop"]`);
  await waitState(0, "cancelled");
  expect(await page.textContent(`${lastTurn(0)} [data-testid="reason"]`)).toBe("client");
  await page.waitForFunction((sel) => /\[cancelRequest: cancelled\]/.test(document.querySelector(sel)?.textContent ?? ""), `${lastTurn(0)} [data-testid="status"]`);
  const cancel = sent.find((m) => m.type === "cancel" && m.request_id === id);
  expect(cancel).toBeDefined();
  const info = await waitFor(async () => { const i = await getRequest(id); return i.status !== "active" && i; }, "cancelled");
  expect(info).toMatchObject({ reason: "client" });
  expect(["cancelling", "cancelled"]).toContain(info.status);
  // The answer is frozen: the other conversation streams 20 chunks meanwhile.
  const frozen = await answer(0);
  await setSpeed(300, 10);
  await send(1, "Another story");
  await waitChunks(1, 20);
  expect(await answer(0)).toBe(frozen);
  expect(await page.isVisible(`${conv(0)} [data-testid="send"]`)).toBe(true);
});

test("Stop pressed, its cancel lost in transit, then a reload: the reloaded page sends the cancel again after the resume", async () => {
  // The page's WebSockets go through a route that drops `cancel` messages while `lose` is set:
  // Stop is pressed, the turn is saved as stopping, but the gateway never hears of it.
  let lose = true;
  await page.routeWebSocket(/\/v1\/ws/, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((frame) => {
      if (typeof frame !== "string") return server.send(frame);
      const kept = frame.split("\n").filter((line) => !(lose && (JSON.parse(line) as { type: string }).type === "cancel"));
      if (kept.length) server.send(kept.join("\n"));
    });
  });
  await page.goto(gw.http + "/");
  await setSpeed(3000, 20);
  await send(0, "Stop me then reload");
  await waitChunks(0, 10);
  const id = (await page.getAttribute(lastTurn(0), "data-request-id"))!;
  await page.click(`${conv(0)} [data-testid="stop"]`);
  await page.waitForSelector(`${lastTurn(0)} [data-testid="stopping"]`);
  await page.waitForFunction((key) => /"stopping":true/.test(sessionStorage.getItem(key) ?? ""), "muxgate-demo:conversation:0");
  // The gateway never heard the cancel: the request runs on, its output growing.
  const output = async () => ((await getRequest(id)) as { status: string; usage?: { output_tokens: number } });
  const first = await output();
  expect(first.status).toBe("active");
  await waitFor(async () => { const now = await output(); return now.status === "active" && now.usage!.output_tokens > first.usage!.output_tokens + 5; }, "the request to run on");
  lose = false;
  const mark = sent.length;
  await page.reload();
  await waitState(0, "cancelled");
  expect(await page.textContent(`${lastTurn(0)} [data-testid="reason"]`)).toBe("client");
  expect(sent.slice(mark).filter((m) => m.request_id === id).map((m) => m.type)).toEqual(["resume", "cancel"]);
  const info = await waitFor(async () => { const i = await getRequest(id); return i.status !== "active" && i; }, "cancelled");
  expect(info.reason).toBe("client");
});
