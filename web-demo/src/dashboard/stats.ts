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
  /** Only when the gateway runs as one node of a cluster (over NATS); see `readSnapshot`. */
  cluster?: Cluster;
}

// The cluster view (gateway/cluster.py). Part of it is other nodes' figures, relayed as they
// sent them (a peer may run another version): every field is read by `parseCluster`, and a
// figure that is missing or not a number is null (shown "—"), not 0, which would be a claim.

/** The figures every node sends, and the cluster sums. */
export interface ClusterFigures {
  connections: number | null;
  active_requests: number | null;
  requests_total: number | null;
  requests_per_second: number | null;
  /** By status: completed, cancelled, failed, and any other status the gateway counts. */
  responses: Record<string, number>;
  /** By reason: client, api, timeout, disconnect, shutdown. */
  cancellations: Record<string, number>;
  tokens: { input: number | null; output: number | null; saved: number | null };
  /** Requests this node runs for clients on other nodes (sending), and the reverse. */
  relays: { sending: number | null; receiving: number | null };
}

export interface ClusterNode extends ClusterFigures {
  node: string;
  /** The node serving this page (the one the stats feed comes from). */
  self: boolean;
  /** How old its figures are: 0 for this node, the time since its last heartbeat for a peer. */
  age_ms: number | null;
  cancel_latency_ms: { count: number | null; p50: number | null; p99: number | null };
}

export interface Cluster {
  /** This node's id. */
  node: string;
  /** This node's link to NATS; anything but "connected" is read as "disconnected". */
  nats: "connected" | "disconnected";
  /** This node first, then the live peers in the gateway's order (by id). */
  nodes: ClusterNode[];
  totals: ClusterFigures & { nodes: number | null };
}

/**
 * A peer's figures older than this are stale. Nodes send theirs with each heartbeat (every
 * second by default) and a node unheard for three intervals counts as gone: a row this old is
 * a node that has missed its last heartbeats, about to leave the view.
 */
export const STALE_AFTER_MS = 3000;

export function isStale(node: ClusterNode): boolean {
  return node.age_ms === null || node.age_ms > STALE_AFTER_MS; // an unknown age vouches for nothing
}

type Json = Record<string, unknown>;

const object = (v: unknown): Json | undefined =>
  typeof v === "object" && v !== null && !Array.isArray(v) ? (v as Json) : undefined;

const number = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);

/** A string -> number map, keeping the entries that are numbers. */
function counts(v: unknown): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [key, n] of Object.entries(object(v) ?? {})) if (number(n) !== null) out[key] = n as number;
  return out;
}

function figures(f: Json): ClusterFigures {
  const tokens = object(f.tokens) ?? {};
  const relays = object(f.relays) ?? {};
  return {
    connections: number(f.connections),
    active_requests: number(f.active_requests),
    requests_total: number(f.requests_total),
    requests_per_second: number(f.requests_per_second),
    responses: counts(f.responses),
    cancellations: counts(f.cancellations),
    tokens: { input: number(tokens.input), output: number(tokens.output), saved: number(tokens.saved) },
    relays: { sending: number(relays.sending), receiving: number(relays.receiving) },
  };
}

function clusterNode(v: unknown, self: string): ClusterNode | undefined {
  const n = object(v);
  if (n === undefined || typeof n.node !== "string" || !n.node) return undefined; // a row needs its id
  const latency = object(n.cancel_latency_ms) ?? {};
  return {
    node: n.node,
    self: typeof n.self === "boolean" ? n.self : n.node === self,
    age_ms: number(n.age_ms),
    ...figures(n),
    cancel_latency_ms: { count: number(latency.count), p50: number(latency.p50), p99: number(latency.p99) },
  };
}

/**
 * Reads the snapshot's `cluster` key: undefined when it is absent (a single node) or is not
 * an object naming this node; otherwise every part is checked, malformed node entries (and
 * repeats of a node) are dropped, and this node is put first whatever the order received.
 */
export function parseCluster(v: unknown): Cluster | undefined {
  const c = object(v);
  if (c === undefined || typeof c.node !== "string" || !c.node) return undefined;
  const self = c.node;
  const nodes: ClusterNode[] = [];
  for (const entry of Array.isArray(c.nodes) ? c.nodes : []) {
    const n = clusterNode(entry, self);
    if (n !== undefined && !nodes.some((m) => m.node === n.node)) nodes.push(n);
  }
  nodes.sort((a, b) => Number(b.self) - Number(a.self)); // stable: the peers keep their order
  const totals = object(c.totals) ?? {};
  return {
    node: self,
    nats: c.nats === "connected" ? "connected" : "disconnected",
    nodes,
    totals: { nodes: number(totals.nodes), ...figures(totals) },
  };
}

/**
 * One frame of the feed, or undefined if it is not a snapshot. The single-node figures are
 * used as they come, as before; the `cluster` key is replaced by what `parseCluster` reads
 * (or dropped), so the page never meets a malformed one.
 */
export function readSnapshot(data: unknown): Stats | undefined {
  const s = object(data);
  if (s === undefined || s.type !== "stats") return undefined;
  const { cluster, ...rest } = s;
  const parsed = parseCluster(cluster);
  return (parsed === undefined ? rest : { ...rest, cluster: parsed }) as unknown as Stats;
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
        const data = readSnapshot(JSON.parse(ev.data));
        if (data !== undefined) onStats(data);
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
