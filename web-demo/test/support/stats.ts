/** A made-up stats snapshot (the shape of gateway/stats.py's), for the dashboard's tests. */
import type { Cluster, Stats } from "../../src/dashboard/stats.js";

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

/**
 * A made-up `cluster` key of three nodes (the shape of gateway/cluster.py's view): this node,
 * a peer heard just now that has had no cancel yet, and a peer unheard for 4.2 s (stale).
 */
export function clusterView(extra: Partial<Cluster> = {}): Cluster {
  const figures = (connections: number) => ({
    connections,
    active_requests: connections + 2,
    requests_total: 120,
    requests_per_second: 2.5,
    responses: { completed: 100, cancelled: 12, failed: 3 },
    cancellations: { client: 8, api: 2, timeout: 1, disconnect: 1, shutdown: 0 },
    tokens: { input: 1000, output: 2000, saved: 5000 },
    relays: { sending: connections - 2, receiving: 1 },
  });
  return {
    node: "node-1",
    nats: "connected",
    nodes: [
      { node: "node-1", self: true, age_ms: 0, ...figures(3), cancel_latency_ms: { count: 12, p50: 0.4, p99: 1.9 } },
      { node: "node-2", self: false, age_ms: 850, ...figures(4), cancel_latency_ms: { count: 0, p50: null, p99: null } },
      { node: "node-3", self: false, age_ms: 4200, ...figures(2), cancel_latency_ms: { count: 5, p50: 0.5, p99: 2.25 } },
    ],
    totals: {
      nodes: 3,
      connections: 9,
      active_requests: 15,
      requests_total: 360,
      requests_per_second: 7.5,
      responses: { completed: 300, cancelled: 36, failed: 9 },
      cancellations: { client: 24, api: 6, timeout: 3, disconnect: 3, shutdown: 0 },
      tokens: { input: 3000, output: 6000, saved: 15000 },
      relays: { sending: 3, receiving: 3 },
    },
    ...extra,
  };
}
