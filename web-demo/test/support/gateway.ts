/**
 * Starts a real muxgate gateway process on an ephemeral port for tests:
 * `python3 -m gateway.cli serve --port 0 --log-format json` from the repository root. The
 * started URL comes from the `gateway.started` JSON log line on stderr, which is drained for the
 * process's whole life (a full pipe would stall the gateway).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { fileURLToPath } from "node:url";

export const REPO_ROOT = fileURLToPath(new URL("../../../", import.meta.url));

export interface Gateway {
  url: string; // ws://127.0.0.1:PORT/v1/ws
  http: string; // http://127.0.0.1:PORT
  port: number;
  process: ChildProcess;
  /** Log lines seen so far (parsed JSON). */
  logs: Record<string, unknown>[];
  stop(): Promise<void>;
  /** Kills the process at once (SIGKILL): connections drop without a close frame. */
  crash(): Promise<void>;
}

export async function startGateway(args: string[] = [], timeoutMs = 20_000): Promise<Gateway> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("MUXGATE_") && v !== undefined) env[k] = v;
  const python = process.env.PYTHON ?? "python3";
  const child = spawn(python, ["-m", "gateway.cli", "serve", "--port", "0", "--log-format", "json", ...args], {
    cwd: REPO_ROOT,
    env,
    stdio: ["ignore", "ignore", "pipe"],
  });
  const logs: Record<string, unknown>[] = [];
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  const started = new Promise<Record<string, unknown>>((resolve, reject) => {
    let buffer = "";
    const timer = setTimeout(() => reject(new Error(`gateway did not start within ${timeoutMs} ms: ${buffer}`)), timeoutMs);
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (data: string) => {
      buffer += data;
      let nl: number;
      while ((nl = buffer.indexOf("\n")) !== -1) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        try {
          const entry = JSON.parse(line) as Record<string, unknown>;
          logs.push(entry);
          if (entry.event === "gateway.started") { clearTimeout(timer); resolve(entry); }
        } catch {
          logs.push({ raw: line });
        }
      }
    });
    void exited.then((code) => { clearTimeout(timer); reject(new Error(`gateway exited with ${code} before starting: ${buffer}`)); });
  });
  const info = await started;
  const url = String(info.url);
  return {
    url,
    http: String(info.http),
    port: Number(new URL(url).port),
    process: child,
    logs,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        const killer = setTimeout(() => child.kill("SIGKILL"), 5000);
        await exited;
        clearTimeout(killer);
      }
    },
    async crash() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGKILL");
        await exited;
      }
    },
  };
}

/** Polls `check` until it returns a truthy value (a condition, never a fixed sleep as sync). */
export async function waitFor<T>(
  check: () => T | Promise<T>,
  what: string,
  timeoutMs = 10_000,
): Promise<Exclude<T, false | null | undefined | 0 | "">> {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 5; ; delay = Math.min(delay * 2, 100)) {
    const value = await check();
    if (value) return value as Exclude<T, false | null | undefined | 0 | "">;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, delay));
  }
}
