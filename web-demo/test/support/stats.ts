/** A made-up stats snapshot (the shape of gateway/stats.py's), for the dashboard's tests. */
import type { Stats } from "../../src/dashboard/stats.js";

export function snapshot(timeMs: number, extra: Partial<Stats> = {}): Stats {
  return {
    type: "stats",
    time_ms: timeMs,
    uptime_s: 1,
    connections: 1,
    active_requests: 2,
    requests_total: 10,
    requests_per_second: 4.5,
    responses: { completed: 5, cancelled: 3, failed: 0 },
    cancellations: { client: 3, api: 0, timeout: 0, disconnect: 0, shutdown: 0 },
    cancel_latency_ms: { count: 3, p50: 0.4, p99: 1.2, max: 1.2, recent: [0.3, 1.1] },
    tokens: { input: 100, output: 200, saved: 50 },
    cancels_by_step: { none: 1, plan: 0, llm: 0, tool: 1, agent: 0, llm_stream: 1, other: 0 },
    halt_latency_ms: { count: 3, p50: 2, p90: 40, p99: 41, max: 41, recent: [] },
    tokens_after_cancel: { total: 1, histogram: { "0": 2, "1": 1, "2": 0, "3+": 0 }, count: 3, p99: 1, max: 1 },
    ...extra,
  };
}
