// The TypeScript blocks of README.md's TypeScript section, extracted and run against a real
// gateway (as a user would paste them), and the seed page's snippets checked to be verbatim
// apart from the import line.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, expect, test, vi } from "vitest";
import { type Gateway, REPO_ROOT, startGateway, waitFor } from "../support/gateway.js";
import { RESULTS } from "../support/browser.js";

const readme = readFileSync(join(REPO_ROOT, "README.md"), "utf8");
const start = readme.indexOf("<!-- section:typescript:start -->");
const end = readme.indexOf("<!-- section:typescript:end -->");
const section = readme.slice(start, end);

function blocks(markdown: string, langs: string[]): string[] {
  const out: string[] = [];
  const fence = /^```([\w-]*)[^\n]*\n([\s\S]*?)^```\s*$/gm;
  for (const m of markdown.matchAll(fence)) if (langs.includes(m[1]!)) out.push(m[2]!);
  return out;
}

const tsBlocks = blocks(section, ["ts", "typescript"]);
let gw: Gateway;
const dir = join(RESULTS, "readme");

beforeAll(async () => {
  gw = await startGateway();
  process.env.MUXGATE_URL = gw.url; // what `new Muxi()` reads in Node
  mkdirSync(dir, { recursive: true });
});
afterAll(async () => {
  delete process.env.MUXGATE_URL;
  await gw?.stop();
});

async function run(index: number): Promise<string[]> {
  const file = join(dir, `block-${index}.ts`);
  writeFileSync(file, tsBlocks[index]!);
  const log = vi.spyOn(console, "log").mockImplementation(() => {});
  const write = vi.spyOn(process.stdout, "write").mockImplementation(() => true);
  try {
    await import(/* @vite-ignore */ `${file}?t=${index}`);
    return log.mock.calls.map((args) => args.map(String).join(" "));
  } finally {
    log.mockRestore();
    write.mockRestore();
  }
}

async function getRequest(id: string, user?: string): Promise<{ status: string; reason?: string }> {
  const res = await fetch(`${gw.http}/v1/requests/${id}`, { headers: user ? { "X-Muxi-User-Id": user } : {} });
  return (await res.json()) as { status: string; reason?: string };
}

test("the section has the expected TypeScript blocks", () => {
  expect(start).toBeGreaterThan(0);
  expect(tsBlocks).toHaveLength(5);
});

test("README block 1: chat and chatStream", async () => {
  expect(await run(0)).toEqual([expect.stringMatching(/^completed /)]);
});

test("README block 2: AbortSignal, two requests on one connection, break cancels", async () => {
  const lines = await run(1);
  expect(lines[0]).toBe("rejected AbortError");
  expect(lines[1]).toBe("fulfilled");
  expect(lines[2]).toMatch(/^(cancelling|cancelled) client$/);
});

test("seed quick start: chat, then cancelRequest with a userId", async () => {
  await run(2);
  const info = await waitFor(async () => { const i = await getRequest("my-request-123", "user123"); return i.status !== "active" && i; }, "cancel");
  expect(info.status === "cancelling" || info.status === "cancelled").toBe(true);
  expect(info.reason).toBe("client");
});

test("seed chatWithTimeout: the timeout cancels the request; chat settles first, cancelled", async () => {
  // The cancelled response wins the race (it arrives before the cancel_result, SPEC.md §5.3).
  expect(await run(3)).toEqual(["cancelled"]);
});

test("seed streaming: cancel after 10 chunks", async () => {
  expect(await run(4)).toEqual(["\n[Cancelled]"]);
  const info = await getRequest("streaming-123");
  expect(info.status === "cancelling" || info.status === "cancelled").toBe(true);
  expect(info.reason).toBe("client");
});

test("the seed page's TypeScript and React snippets appear verbatim but for the import line", () => {
  const seedPath = join(REPO_ROOT, "..", "shared", "seed-request-cancellation.md");
  expect(existsSync(seedPath), `${seedPath} (shared/ beside the repository)`).toBe(true);
  const seed = readFileSync(seedPath, "utf8");
  const adapt = (code: string) => code.replaceAll("from '@muxi/sdk'", "from '@muxgate/sdk'");
  const seedTs = blocks(seed, ["typescript"]).map(adapt);
  const ours = blocks(section, ["typescript"]);
  expect(seedTs).toHaveLength(3);
  seedTs.forEach((code, i) => expect(ours[i]!.startsWith(code)).toBe(true));
  const [seedReact] = blocks(seed, ["tsx"]).map(adapt);
  expect(blocks(section, ["tsx"])).toEqual([seedReact]);
});
