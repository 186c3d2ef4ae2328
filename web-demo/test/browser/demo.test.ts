// Real-browser tests: Debian's chromium against a real gateway that serves the built pages
// (gateway/webui, from `npm run build`). Synchronisation is by awaited conditions only.
import { afterAll, afterEach, beforeAll, beforeEach, expect, test } from "vitest";
import type { Browser, BrowserContext, Page } from "playwright-core";
import { type Gateway, startGateway } from "../support/gateway.js";
import { launch, screenshot, watchErrors } from "../support/browser.js";

let gw: Gateway;
let browser: Browser;
let closeBrowser: () => Promise<void>;
let context: BrowserContext;
let page: Page;
let errors: string[];

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
});
afterEach(async (ctx) => {
  await screenshot(page, ctx.task.name.replace(/[^a-z0-9]+/gi, "-").toLowerCase());
  await context.close();
  expect(errors).toEqual([]);
});

const conv = (i: number) => `[data-testid="conversation-${i}"]`;
const answerLength = (i: number) =>
  page.$eval(`${conv(i)} [data-testid="turn"]:last-child [data-testid="answer"]`, (e) => e.textContent!.length);
const chunkCount = (i: number) =>
  page.$eval(`${conv(i)} [data-testid="turn"]:last-child [data-testid="answer"]`, (e) => Number(e.getAttribute("data-chunks")));

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
    ([sel, min]) => {
      const turns = document.querySelectorAll(`${sel} [data-testid="turn"]`);
      const last = turns[turns.length - 1];
      return Number(last?.querySelector('[data-testid="answer"]')?.getAttribute("data-chunks") ?? 0) >= min;
    },
    [conv(i), n] as const,
    { timeout: 15_000 },
  );
}

async function waitState(i: number, state: string) {
  await page.waitForSelector(`${conv(i)} [data-testid="turn"]:last-child[data-state="${state}"]`, { timeout: 15_000 });
}

test("send a message, tokens stream, Stop: cancelled status with reason and tokens saved; the text stops growing", async () => {
  await page.goto(gw.http + "/");
  await setSpeed(3000, 20);
  await send(0, "Write a very long story...");
  await waitChunks(0, 5);
  const before = await answerLength(0);
  await waitChunks(0, 10);
  expect(await answerLength(0)).toBeGreaterThan(before); // it streams
  // Stop is in place of Send while the answer streams; the answer shows its step.
  expect(await page.isVisible(`${conv(0)} [data-testid="send"]`)).toBe(false);
  expect(await page.getAttribute(`${conv(0)} [data-testid="turn"]:last-child [data-testid="step"]`, "data-step-kind")).toBe("llm_stream");
  expect(await page.textContent(`${conv(0)} [data-testid="turn"]:last-child [data-testid="step"]`)).toBe("answering…");
  await page.click(`${conv(0)} [data-testid="stop"]`);
  await waitState(0, "cancelled");
  const last = `${conv(0)} [data-testid="turn"]:last-child`;
  expect(await page.textContent(`${last} [data-testid="reason"]`)).toBe("client");
  await page.waitForFunction((sel) => Number(document.querySelector(sel)?.textContent) > 0, `${last} [data-testid="saved"]`);
  // Cut mid-stream: the model was stopped inside the answer step.
  expect(await page.textContent(`${last} [data-testid="halt"]`)).toBe("model stopped during answer");
  expect(await page.isVisible(`${conv(0)} [data-testid="stop"]`)).toBe(false);
  expect(await page.isVisible(`${conv(0)} [data-testid="send"]`)).toBe(true);
  const frozen = await answerLength(0);
  const frozenChunks = await chunkCount(0);
  // The other conversation is the clock: while it streams 20 chunks on the same connection,
  // the cancelled answer must not grow by one character.
  await send(1, "Another story");
  await waitChunks(1, 20);
  expect(await answerLength(0)).toBe(frozen);
  expect(await chunkCount(0)).toBe(frozenChunks);
  expect(await page.textContent('[data-testid="connection"]')).toContain("one WebSocket");
});

test("two conversations on one connection: cancelling one leaves the other streaming to completion", async () => {
  await page.goto(gw.http + "/?codec=msgpack");
  await setSpeed(150, 15);
  await send(0, "First conversation");
  await send(1, "Second conversation");
  await Promise.all([waitChunks(0, 3), waitChunks(1, 3)]);
  await page.click(`${conv(0)} [data-testid="stop"]`);
  await waitState(0, "cancelled");
  const frozen = await answerLength(0);
  // The second keeps streaming to completion on the same WebSocket.
  await waitState(1, "completed");
  expect(await chunkCount(1)).toBeGreaterThan(3);
  expect(await answerLength(0)).toBe(frozen);
  expect(await page.textContent('[data-testid="connection"]')).toContain("msgpack");
  // One connection for both conversations: the gateway saw exactly one WebSocket from the page
  // (the seed panel's own client has not connected, it connects on its first message).
  const stats = (await (await fetch(gw.http + "/v1/stats")).json()) as { connections: number };
  expect(stats.connections).toBe(1);
});

test("Stop during the tool call: the answer shows the step, 'stopping after the tool call search…' while it finishes, then 'halted after search'", async () => {
  await page.goto(gw.http + "/");
  // A short first half of the answer, then a long tool call.
  await setSpeed(6, 0);
  await page.fill('[data-testid="speed-tool_ms"]', "2000");
  await send(0, "Find flights to Lisbon");
  const last = `${conv(0)} [data-testid="turn"]:last-child`;
  await page.waitForSelector(`${last} [data-testid="step"][data-step-kind="tool"]`, { timeout: 15_000 });
  expect(await page.textContent(`${last} [data-testid="step"]`)).toBe("calling tool search…");
  await page.click(`${conv(0)} [data-testid="stop"]`);
  await waitState(0, "cancelled");
  // The tool call is not abortable: the pipeline finishes it, then halts.
  await page.waitForSelector(`${last} [data-testid="halt"][data-halt-state="pending"]`, { timeout: 5_000 });
  expect(await page.textContent(`${last} [data-testid="halt"]`)).toBe("stopping after the tool call search…");
  await page.waitForSelector(`${last} [data-testid="halt"][data-halt-state="halted"]`, { timeout: 15_000 });
  expect(await page.textContent(`${last} [data-testid="halt"]`)).toBe("halted after search");
  expect(Number(await page.textContent(`${last} [data-testid="saved"]`))).toBeGreaterThan(0);
  expect(await page.textContent(`${last} [data-testid="status"]`)).toMatch(/halted after search — \d+ tokens saved/);
});

test("a model backend (GET /v1/backend): the page shows the model and its settings, and sends them as the chat's metadata", async () => {
  // The gateway runs the simulated backend; the page is told it runs a model (the contract of
  // GET /v1/backend), so only what the page renders and sends is under test here.
  await page.route("**/v1/backend", (route) => route.fulfill({
    json: {
      backend: "llama", model: "gemma-3-270m-q4_k_m",
      settings: [
        { name: "max_tokens", type: "integer", min: 1, max: 512, default: 256 },
        { name: "temperature", type: "number", min: 0, max: 2, default: 0.7 },
      ],
    },
  }));
  const sent: Record<string, unknown>[] = [];
  page.on("websocket", (ws) => ws.on("framesent", (f) => {
    if (typeof f.payload === "string") for (const line of f.payload.split("\n")) sent.push(JSON.parse(line) as Record<string, unknown>);
  }));
  await page.goto(gw.http + "/");
  await page.waitForSelector('[data-testid="settings"][data-backend="llama"]');
  expect(await page.textContent('[data-testid="backend-model"]')).toContain("gemma-3-270m-q4_k_m");
  expect(await page.isVisible('[data-testid="speed-tokens"]')).toBe(false);
  const maxTokens = '[data-testid="setting-max_tokens"]';
  const temperature = '[data-testid="setting-temperature"]';
  expect(await page.$eval(maxTokens, (e: HTMLInputElement) => [e.min, e.max, e.step, e.value])).toEqual(["1", "512", "1", "256"]);
  expect(await page.$eval(temperature, (e: HTMLInputElement) => [e.min, e.max, e.step, e.value])).toEqual(["0", "2", "0.1", "0.7"]);
  await page.fill(maxTokens, "9999");
  await page.fill(temperature, "0.35");
  await page.locator(maxTokens).blur();
  expect(await page.inputValue(maxTokens)).toBe("512"); // clamped to the backend's bound
  await send(0, "Hello model");
  await waitState(0, "completed");
  const chat = sent.find((m) => m.type === "chat")!;
  expect(chat).toMatchObject({ message: "Hello model", steps: true, metadata: { max_tokens: 512, temperature: 0.35 } });
});

test("the seed page's ChatInterface: Send, then Cancel ends the request as cancelled", async () => {
  await page.goto(gw.http + "/");
  await page.click('[data-testid="seed-send"]');
  const cancel = page.locator('[data-testid="seed-example"] button', { hasText: "Cancel" });
  await cancel.waitFor({ state: "visible" });
  await cancel.click();
  await cancel.waitFor({ state: "hidden" });
  await page.waitForFunction(() => document.querySelector('[data-testid="seed-result"]')?.textContent === "cancelled (client)");
});

test("the dashboard updates live as requests run and are cancelled", async () => {
  const dash = page;
  await dash.goto(gw.http + "/dashboard");
  await dash.waitForSelector('[data-testid="requests-total"]');
  const read = async (id: string) => Number((await dash.textContent(`[data-testid="${id}"]`))!.replace(/[^0-9.]/g, ""));
  const totalBefore = await read("requests-total");
  const cancelledBefore = await read("cancel-client");
  const updatesBefore = Number(await dash.getAttribute('[data-testid="feed"]', "data-updates"));
  // Drive traffic from a second page (the chat), while the dashboard stays open.
  const chat = await context.newPage();
  watchErrors(chat, { allowBackend404: true }).length;
  await chat.goto(gw.http + "/");
  await chat.fill('[data-testid="speed-tokens"]', "3000");
  await chat.fill('[data-testid="speed-token_delay_ms"]', "20");
  await chat.fill(`${conv(0)} [data-testid="input"]`, "for the dashboard");
  await chat.click(`${conv(0)} [data-testid="send"]`);
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="active"]')?.textContent) >= 1);
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="connections"]')?.textContent) >= 1);
  await chat.click(`${conv(0)} [data-testid="stop"]`);
  await dash.waitForFunction((n) => Number(document.querySelector('[data-testid="cancel-client"]')?.textContent) > n, cancelledBefore);
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="latency-count"]')?.textContent) >= 1);
  // The latency chart (uPlot) got a point: the newest p50 of the cancel latency.
  await dash.waitForFunction(() => JSON.parse(document.querySelector('[data-testid="latency-chart"]')?.getAttribute("data-last") ?? "[null]")[0] !== null);
  expect(await dash.$$eval('[data-testid="latency-chart"] .uplot canvas', (canvases) => canvases.length)).toBe(1);
  expect(await read("requests-total")).toBeGreaterThan(totalBefore);
  expect(await read("tokens-saved")).toBeGreaterThan(0);
  expect(Number(await dash.getAttribute('[data-testid="feed"]', "data-updates"))).toBeGreaterThan(updatesBefore);
  await chat.close();
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="active"]')?.textContent) === 0);
});
