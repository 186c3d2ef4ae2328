// The TypeScript blocks of README.md's TypeScript section, extracted and run against a real
// gateway (as a user would paste them), and the seed page's snippets checked to be verbatim
// apart from the import line. The seed page (the product page "Request Cancellation") is not
// part of the repository: its snippets are copied below, and no test reads the page.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
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

async function run(index: number, code = tsBlocks[index]!, name = `block-${index}`): Promise<string[]> {
  const file = join(dir, `${name}.ts`);
  writeFileSync(file, code);
  const log = vi.spyOn(console, "log").mockImplementation(() => {});
  const write = vi.spyOn(process.stdout, "write").mockImplementation(() => true);
  try {
    await import(/* @vite-ignore */ `${file}?t=${name}`);
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

// The seed page's snippets, copied verbatim (trailing spaces included) from its Quick Start,
// "Cancel After Timeout" and "Cancel Streaming Request" TypeScript tabs and its
// "Cancel Button in UI" React tab.
const SEED_QUICK_START = `import { Muxi } from '@muxi/sdk';

const client = new Muxi();

// Start a request
const requestId = 'my-request-123';
const task = client.chat({
  message: 'Write a very long story...',
  requestId,
  userId: 'user123'
});

// Cancel it
await client.cancelRequest(requestId, { userId: 'user123' });
`;

const SEED_TIMEOUT = `import { Muxi } from '@muxi/sdk';

const client = new Muxi();

async function chatWithTimeout(message: string, timeoutMs = 30000) {
  const requestId = \`req_\${Date.now()}\`;
  
  const timeoutPromise = new Promise((_, reject) => {
    setTimeout(async () => {
      await client.cancelRequest(requestId);
      reject(new Error(\`Request timed out after \${timeoutMs}ms\`));
    }, timeoutMs);
  });
  
  return Promise.race([
    client.chat({ message, requestId }),
    timeoutPromise
  ]);
}
`;

const SEED_STREAMING = `import { Muxi } from '@muxi/sdk';

const client = new Muxi();

const requestId = 'streaming-123';
let chunksReceived = 0;

for await (const chunk of client.chatStream({ message: 'Write a long essay...', requestId })) {
  process.stdout.write(chunk.text);
  chunksReceived++;
  
  // Cancel after receiving 10 chunks
  if (chunksReceived >= 10) {
    await client.cancelRequest(requestId);
    console.log('\\n[Cancelled]');
    break;
  }
}
`;

const SEED_REACT = `import { useState } from 'react';
import { Muxi } from '@muxi/sdk';

const client = new Muxi();

function ChatInterface() {
  const [requestId, setRequestId] = useState<string | null>(null);
  const [isProcessing, setIsProcessing] = useState(false);

  const sendMessage = async (message: string) => {
    const id = \`req_\${Date.now()}\`;
    setRequestId(id);
    setIsProcessing(true);
    
    try {
      const response = await client.chat({ message, requestId: id });
      // Handle response...
    } finally {
      setIsProcessing(false);
      setRequestId(null);
    }
  };

  const cancelRequest = async () => {
    if (requestId) {
      await client.cancelRequest(requestId);
      setIsProcessing(false);
      setRequestId(null);
    }
  };

  return (
    <div>
      {/* Chat UI */}
      {isProcessing && (
        <button onClick={cancelRequest}>Cancel</button>
      )}
    </div>
  );
}
`;

const SEED_TYPESCRIPT = [SEED_QUICK_START, SEED_TIMEOUT, SEED_STREAMING];

test("the seed page's TypeScript and React snippets appear verbatim but for the import line", () => {
  const adapt = (code: string) => code.replaceAll("from '@muxi/sdk'", "from '@muxgate/sdk'");
  const ours = blocks(section, ["typescript"]);
  expect(ours).toHaveLength(SEED_TYPESCRIPT.length);
  SEED_TYPESCRIPT.map(adapt).forEach((code, i) => expect(ours[i]!.startsWith(code)).toBe(true));
  expect(blocks(section, ["tsx"])).toEqual([adapt(SEED_REACT)]);
});

// web-demo/README.md's section on pipeline steps and halts (SPEC.md §3.12): its example, run.
const demoReadme = readFileSync(join(REPO_ROOT, "web-demo", "README.md"), "utf8");
const stepsSection = demoReadme.slice(
  demoReadme.indexOf("<!-- section:steps:start -->"),
  demoReadme.indexOf("<!-- section:steps:end -->"),
);

test("web-demo README, steps: Stop during the tool call; the halt is pending on it, then halted after it", async () => {
  const code = blocks(stepsSection, ["ts"]);
  expect(code).toHaveLength(1);
  const lines = await run(0, code[0]!, "steps-block-0");
  expect(lines).toEqual([
    "step 0 plan plan started",
    "step 0 plan plan ended",
    "step 1 llm_stream answer started",
    "step 1 llm_stream answer ended",
    "step 2 tool search started",
    "halt pending after search, final usage: false",
    "cancelled pending search",
    "halt halted after search, final usage: true",
    expect.stringMatching(/^halted after search: [1-9]\d* tokens saved$/),
  ]);
});

// web-demo/README.md's section on resumable requests (SPEC.md §5.8): its example, run.
const resumeSection = demoReadme.slice(
  demoReadme.indexOf("<!-- section:resume:start -->"),
  demoReadme.indexOf("<!-- section:resume:end -->"),
);

test("web-demo README, resume: a new client continues the answer from the kept id, epoch, seq and text", async () => {
  const code = blocks(resumeSection, ["ts"]);
  expect(code).toHaveLength(1);
  expect(await run(0, code[0]!, "resume-block-0")).toEqual(["completed true 1"]);
});
