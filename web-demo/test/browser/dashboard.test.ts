// The dashboard in Debian's chromium: uPlot charts fed by the stats feed, first from made-up
// snapshots (the page's feed is routed to the test), then from a real gateway while requests are
// cancelled over a real socket. Synchronisation is by awaited conditions only.
import { afterAll, afterEach, beforeAll, beforeEach, expect, test } from "vitest";
import type { Browser, BrowserContext, Page, WebSocketRoute } from "playwright-core";
import WS from "ws";
import { Muxi, type WebSocketConstructor } from "@muxgate/sdk";
import { type Gateway, startGateway } from "../support/gateway.js";
import { launch, screenshot, watchErrors } from "../support/browser.js";
import { snapshot } from "../support/stats.js";

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

const CHARTS = ["rps-chart", "latency-chart", "halt-chart", "steps-chart", "late-chart"];
const attr = (id: string, name: string) => page.getAttribute(`[data-testid="${id}"]`, name);
const text = (id: string) => page.textContent(`[data-testid="${id}"]`);
const updates = async () => Number(await attr("feed", "data-updates"));
const waitUpdates = (n: number) =>
  page.waitForFunction((min) => Number(document.querySelector('[data-testid="feed"]')?.getAttribute("data-updates")) >= min, n);

/** Opens the dashboard with its stats feed answered by the test instead of the gateway. */
async function dashboardWithFakeFeed(): Promise<WebSocketRoute> {
  let opened!: (ws: WebSocketRoute) => void;
  const feed = new Promise<WebSocketRoute>((resolve) => { opened = resolve; });
  await page.routeWebSocket(/\/v1\/stats$/, (ws) => opened(ws));
  await page.goto(gw.http + "/dashboard");
  return feed;
}

test("the charts are uPlot charts drawn from the snapshots, one instance each, over a rolling window", async () => {
  const feed = await dashboardWithFakeFeed();
  const t0 = 1_764_120_000_000;
  feed.send(JSON.stringify(snapshot(t0)));
  for (const id of CHARTS) await page.waitForSelector(`[data-testid="${id}"] .uplot canvas`);
  expect(await page.$$eval(".uplot", (plots) => plots.length)).toBe(CHARTS.length);
  // Marked now: the same elements (the same uPlot instances) must still be there later.
  await page.$$eval(".uplot", (plots) => plots.forEach((p) => p.setAttribute("data-mark", "first")));

  for (let i = 1; i < 10; i++) {
    feed.send(JSON.stringify(snapshot(t0 + i * 500, { requests_per_second: i })));
  }
  await waitUpdates(10);
  expect(await page.$$eval(".uplot[data-mark=first]", (plots) => plots.length)).toBe(CHARTS.length);
  expect(await page.$$eval(".uplot", (plots) => plots.length)).toBe(CHARTS.length);
  for (const id of ["rps-chart", "latency-chart", "halt-chart"]) expect(await attr(id, "data-points")).toBe("10");
  expect(JSON.parse((await attr("rps-chart", "data-last"))!)).toEqual([9, 2]);
  expect(JSON.parse((await attr("latency-chart", "data-last"))!)).toEqual([0.4, 1.2, 1.1]);
  expect(JSON.parse((await attr("halt-chart", "data-last"))!)).toEqual([2, 40, 41, null]);
  // Labelled series in the legends.
  const legend = await page.textContent('[data-testid="halt-chart"] .u-legend');
  for (const label of ["p50", "p90", "p99"]) expect(legend).toContain(label);

  // The bar panels: where cancels landed, tokens after cancels.
  expect(await attr("steps-chart", "data-values")).toBe("1,0,0,1,0,1,0");
  expect(await text("step-llm_stream")).toBe("1");
  expect(await text("step-tool")).toBe("1");
  expect(await attr("late-chart", "data-values")).toBe("2,1,0,0");
  expect(await text("late-1")).toBe("1");
  expect(await text("late-total")).toBe("1");
  expect(await text("halt-p90")).toBe("40.00");
  expect(await text("halt-count")).toBe("3");

  // Ten minutes later: the points older than the window are gone.
  feed.send(JSON.stringify(snapshot(t0 + 600_000, { cancels_by_step: { none: 1, plan: 2, llm: 0, tool: 1, agent: 3, llm_stream: 1, other: 0 } })));
  await waitUpdates(11);
  for (const id of ["rps-chart", "latency-chart", "halt-chart"]) expect(await attr(id, "data-points")).toBe("1");
  expect(await attr("steps-chart", "data-values")).toBe("1,2,0,1,3,1,0");
  expect(await page.$$eval(".uplot[data-mark=first]", (plots) => plots.length)).toBe(CHARTS.length);
});

test("the charts follow the width of their panel", async () => {
  const feed = await dashboardWithFakeFeed();
  feed.send(JSON.stringify(snapshot(1_764_120_000_000)));
  await page.waitForSelector('[data-testid="halt-chart"] .uplot canvas');
  const widths = () =>
    page.$$eval(".chart", (charts) =>
      charts.map((c) => ({ chart: c.getBoundingClientRect().width, plot: c.querySelector("canvas")!.getBoundingClientRect().width })),
    );
  const wide = await widths();
  for (const w of wide) expect(w.plot).toBeLessThanOrEqual(w.chart + 1);
  await page.setViewportSize({ width: 640, height: 900 });
  await page.waitForFunction(() =>
    [...document.querySelectorAll(".chart")].every((c) => {
      const plot = c.querySelector("canvas")!.getBoundingClientRect().width;
      return plot <= c.getBoundingClientRect().width + 1 && plot < 620;
    }),
  );
  const narrow = await widths();
  expect(narrow[0]!.plot).toBeLessThan(wide[0]!.plot);
});

test("cancels over a real socket show where they landed, how long the pipeline took to stop, and tokens after them", async () => {
  await page.goto(gw.http + "/dashboard");
  await page.waitForSelector('[data-testid="halt-chart"] .uplot canvas');
  const count = async (id: string) => Number(await text(id));
  const landedMidStream = await count("step-llm_stream");
  const halted = await count("halt-count");
  const lateCount = await count("late-count");

  const client = new Muxi({ url: gw.url, WebSocket: WS as unknown as WebSocketConstructor });
  try {
    // Chunks come from the streaming LLM step only: a cancel after some lands mid-stream.
    let chunks = 0;
    for await (const _ of client.chatStream({ message: "a long story", metadata: { tokens: 100_000, token_delay_ms: 5 } })) {
      if (++chunks === 3) break; // break cancels the request
    }
    await page.waitForFunction(
      (n) => Number(document.querySelector('[data-testid="step-llm_stream"]')?.textContent) > n,
      landedMidStream,
      { timeout: 15_000 },
    );
  } finally {
    client.close();
  }
  expect(await count("halt-count")).toBe(halted + 1);
  expect(await count("late-count")).toBe(lateCount + 1);
  await page.waitForFunction(() => JSON.parse(document.querySelector('[data-testid="halt-chart"]')!.getAttribute("data-last")!)[0] !== null);
  expect(await updates()).toBeGreaterThan(1);
});
