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
  errors = watchErrors(page);
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

test("send a message, tokens stream, Cancel: cancelled status with reason and tokens saved; the text stops growing", async () => {
  await page.goto(gw.http + "/");
  await setSpeed(3000, 20);
  await send(0, "Write a very long story...");
  await waitChunks(0, 5);
  const before = await answerLength(0);
  await waitChunks(0, 10);
  expect(await answerLength(0)).toBeGreaterThan(before); // it streams
  await page.click(`${conv(0)} [data-testid="cancel"]`);
  await waitState(0, "cancelled");
  const last = `${conv(0)} [data-testid="turn"]:last-child`;
  expect(await page.textContent(`${last} [data-testid="reason"]`)).toBe("client");
  await page.waitForFunction((sel) => Number(document.querySelector(sel)?.textContent) > 0, `${last} [data-testid="saved"]`);
  expect(await page.isVisible(`${conv(0)} [data-testid="cancel"]`)).toBe(false);
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
  await page.click(`${conv(0)} [data-testid="cancel"]`);
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
  watchErrors(chat).length;
  await chat.goto(gw.http + "/");
  await chat.fill('[data-testid="speed-tokens"]', "3000");
  await chat.fill('[data-testid="speed-token_delay_ms"]', "20");
  await chat.fill(`${conv(0)} [data-testid="input"]`, "for the dashboard");
  await chat.click(`${conv(0)} [data-testid="send"]`);
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="active"]')?.textContent) >= 1);
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="connections"]')?.textContent) >= 1);
  await chat.click(`${conv(0)} [data-testid="cancel"]`);
  await dash.waitForFunction((n) => Number(document.querySelector('[data-testid="cancel-client"]')?.textContent) > n, cancelledBefore);
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="latency-count"]')?.textContent) >= 1);
  // The latency chart got a point.
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="latency-chart"] polyline')?.getAttribute("data-points")) >= 1);
  expect(await read("requests-total")).toBeGreaterThan(totalBefore);
  expect(await read("tokens-saved")).toBeGreaterThan(0);
  expect(Number(await dash.getAttribute('[data-testid="feed"]', "data-updates"))).toBeGreaterThan(updatesBefore);
  await chat.close();
  await dash.waitForFunction(() => Number(document.querySelector('[data-testid="active"]')?.textContent) === 0);
});
