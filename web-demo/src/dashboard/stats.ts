/** The gateway's live stats feed: `ws(s)://host/v1/stats`, one JSON snapshot per interval. */

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
  /** p50/p99/max are null until the first cancel (the gateway sends null then). */
  cancel_latency_ms: { count: number; p50: number | null; p99: number | null; max: number | null; recent: number[] };
  tokens: { input: number; output: number; saved: number };
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

/** Keeps the last `max` points of a series. */
export function pushBounded<T>(series: T[], items: T[], max: number): T[] {
  const out = series.concat(items);
  return out.length > max ? out.slice(out.length - max) : out;
}
