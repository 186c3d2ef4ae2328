/** Debian's chromium driven by playwright-core (no browser download: `npx playwright install`
 * does not work here). Screenshots go to test-results/ as artifacts. */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type Browser, type Page, chromium } from "playwright-core";

export const RESULTS = fileURLToPath(new URL("../../test-results/", import.meta.url));

export async function launch(): Promise<{ browser: Browser; close: () => Promise<void> }> {
  // A fresh profile: playwright's launch() refuses --user-data-dir and creates a new temporary
  // profile itself; TMPDIR points it at our own directory, removed afterwards.
  const userDataDir = mkdtempSync(join(tmpdir(), "muxgate-chromium-"));
  const browser = await chromium.launch({
    env: { ...process.env, TMPDIR: userDataDir },
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  return {
    browser,
    close: async () => {
      await browser.close();
      rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

export async function screenshot(page: Page, name: string): Promise<void> {
  mkdirSync(RESULTS, { recursive: true });
  await page.screenshot({ path: join(RESULTS, `${name}.png`), fullPage: true });
}

/** Collects page errors so a test fails on an uncaught exception in the page. With
 * `allowBackend404`, not Chromium's console line for a 404 of `GET /v1/backend` (a gateway
 * without that endpoint: the chat page then counts the backend as simulated). */
export function watchErrors(page: Page, { allowBackend404 = false } = {}): string[] {
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const backend404 = /status of 404/.test(m.text())
      && new URL(m.location().url || "http://x/").pathname === "/v1/backend";
    if (allowBackend404 && backend404) return;
    errors.push(m.text());
  });
  return errors;
}
