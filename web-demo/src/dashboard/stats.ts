/** The gateway's live stats feed: `ws(s)://host/v1/stats`, one JSON snapshot per interval. */

/** Percentiles over the gateway's window of the last 1,000 samples (null before the first);
 * `recent`: the samples since the previous frame. Milliseconds. */
export interface LatencySummary {
  count: number;
  p50: number | null;
  p99: number | null;
  max: number | null;
  recent: number[];
}

/** Where cancelled pipelines stopped: counts by the kind of the last step started. */
export const STEP_KINDS = ["none", "plan", "llm", "tool", "agent", "llm_stream", "other"] as const;
/** Buckets of the tokens-after-cancel histogram. */
export const LATE_TOKEN_BUCKETS = ["0", "1", "2", "3+"] as const;

export interface TokensAfterCancel {
  /** Since the gateway started. */
  total: number;
  /** Cancelled requests by tokens produced after their cancel, since the gateway started. */
  histogram: Record<string, number>;
  /** Over the last 1,000 cancelled requests (null before the first). */
  count: number;
  p99: number | null;
  max: number | null;
}

export interface Stats {
  type: "stats";
  time_ms: number;
  uptime_s: number;
  connections: number;
  active_requests: number;
  requests_total: number;
  requests_per_second: number;
  responses: { completed: number; cancelled: number; failed: number };
  cancellations: { client: number; api: number; timeout: number; disconnect: number; shutdown: number };
  /** Cancel read -> cancelled response written. p50/p99/max are null until the first cancel. */
  cancel_latency_ms: LatencySummary;
  tokens: { input: number; output: number; saved: number };
  // The three below are about cancelled pipelines, taken when each halts (gateway/stats.py);
  // optional so that the page still works against a gateway without them.
  /** Cancelled requests by the kind of the last step their pipeline had started. */
  cancels_by_step?: Record<string, number>;
  /** Cancel read -> pipeline halted (the model stopped). */
  halt_latency_ms?: LatencySummary & { p90: number | null };
  tokens_after_cancel?: TokensAfterCancel;
}

export function statsUrl(loc: { protocol: string; host: string } = location): string {
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/v1/stats`;
}

/**
 * Subscribes to the feed; reconnects with backoff (250 ms doubling to 5 s) when it drops.
 * Returns the unsubscribe function.
 */
export function subscribeStats(
  url: string,
  onStats: (stats: Stats) => void,
  onState: (connected: boolean) => void,
): () => void {
  let ws: WebSocket | undefined;
  let stopped = false;
  let delay = 250;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const open = () => {
    ws = new WebSocket(url);
    ws.onopen = () => { delay = 250; onState(true); };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") return;
      try {
        const data = JSON.parse(ev.data) as Stats;
        if (data.type === "stats") onStats(data);
      } catch {
        /* not a snapshot: ignore */
      }
    };
    ws.onclose = () => {
      onState(false);
      if (stopped) return;
      timer = setTimeout(open, delay);
      delay = Math.min(delay * 2, 5000);
    };
  };
  open();
  return () => {
    stopped = true;
    clearTimeout(timer);
    ws?.close();
  };
}

/** The charts' rolling window, in seconds of the gateway's clock. */
export const WINDOW_S = 300;
/** At most this many points per chart, whatever the feed's interval (memory stays bounded). */
export const MAX_POINTS = 3000;

/** uPlot's column layout: x (seconds), then one column per series (null: no value). */
export type Columns = [number[], ...(number | null)[][]];

/**
 * A time series over a rolling window, kept as uPlot columns that are updated in place: each
 * push appends one point and drops those older than `windowS` before it (and any beyond
 * `maxPoints`), so memory stays bounded however long the page stays open.
 */
export class RollingSeries {
  readonly data: Columns;

  constructor(
    series: number,
    readonly windowS = WINDOW_S,
    readonly maxPoints = MAX_POINTS,
  ) {
    this.data = [[], ...Array.from({ length: series }, () => [] as (number | null)[])];
  }

  get length(): number {
    return this.data[0].length;
  }

  push(t: number, values: (number | null)[]): void {
    const [xs, ...columns] = this.data;
    const last = xs[xs.length - 1];
    if (last !== undefined && t < last) this.clear(); // another gateway, or its clock went back
    xs.push(t);
    columns.forEach((column, i) => column.push(values[i] ?? null));
    let drop = Math.max(0, xs.length - this.maxPoints);
    while (drop < xs.length && xs[drop]! < t - this.windowS) drop++;
    if (drop > 0) for (const column of this.data) column.splice(0, drop);
  }

  clear(): void {
    for (const column of this.data) column.length = 0;
  }
}

const worst = (samples: number[]): number | null => (samples.length ? Math.max(...samples) : null);

/** The dashboard's time series, fed one snapshot at a time. */
export class StatsHistory {
  /** requests per second, active streams */
  readonly traffic = new RollingSeries(2);
  /** cancel latency: p50, p99 (over the gateway's window), worst since the previous frame */
  readonly cancelLatency = new RollingSeries(3);
  /** cancel -> pipeline halted: p50, p90, p99, worst since the previous frame */
  readonly haltLatency = new RollingSeries(4);

  push(s: Stats): void {
    const t = s.time_ms / 1000;
    this.traffic.push(t, [s.requests_per_second, s.active_requests]);
    const c = s.cancel_latency_ms;
    this.cancelLatency.push(t, [c.p50, c.p99, worst(c.recent)]);
    const h = s.halt_latency_ms;
    this.haltLatency.push(t, h ? [h.p50, h.p90, h.p99, worst(h.recent)] : []);
  }
}
