// The dashboard's cluster view: reading the snapshot's optional `cluster` key (peers' figures
// come as they sent them, so every part is checked), and the panel it renders, as static markup
// (the panel has no effects; the charts, which need a DOM, are not part of it).
import { createElement } from "react";
import { renderToStaticMarkup } from "react-dom/server";
import { afterEach, describe, expect, test, vi } from "vitest";
import { ClusterPanel } from "../../src/dashboard/ClusterPanel.js";
import { type Cluster, STALE_AFTER_MS, type Stats, parseCluster, readSnapshot, subscribeStats } from "../../src/dashboard/stats.js";
import { clusterView, snapshot } from "../support/stats.js";

/** The gateway's JSON, exactly as the stats snapshot carries it. */
const WIRE = {
  node: "node-1",
  nats: "connected",
  nodes: [
    {
      node: "node-1", self: true, age_ms: 0, connections: 3, active_requests: 5,
      requests_total: 120, requests_per_second: 2.5,
      responses: { completed: 100, cancelled: 12, failed: 3 },
      cancellations: { client: 8, api: 2, timeout: 1, disconnect: 1, shutdown: 0 },
      cancel_latency_ms: { count: 12, p50: 0.4, p99: 1.9 },
      tokens: { input: 1000, output: 2000, saved: 5000 },
      relays: { sending: 0, receiving: 1 },
    },
  ],
  totals: {
    nodes: 3, connections: 9, active_requests: 11, requests_total: 300,
    requests_per_second: 6.0,
    responses: { completed: 250, cancelled: 30, failed: 5 },
    cancellations: { client: 20, api: 6, timeout: 2, disconnect: 2, shutdown: 0 },
    tokens: { input: 3000, output: 6000, saved: 15000 },
    relays: { sending: 1, receiving: 1 },
  },
};

/** A deep copy of WIRE with `change` applied to it. */
function wire(change: (w: Record<string, any>) => void): unknown {
  const w = structuredClone(WIRE) as Record<string, any>;
  change(w);
  return w;
}

describe("parseCluster", () => {
  test("the gateway's shape is read as it is", () => {
    expect(parseCluster(WIRE)).toEqual(WIRE);
    expect(parseCluster(clusterView())).toEqual(clusterView());
  });

  test.each([undefined, null, 5, "node-1", [], {}, { node: "" }, { node: 7, nodes: WIRE.nodes }])(
    "no cluster from %j",
    (v) => expect(parseCluster(v)).toBeUndefined(),
  );

  test("malformed node entries and repeats are dropped; a node without `self` is this node by its id", () => {
    const c = parseCluster(wire((w) => {
      w.nodes.push(null, "node-2", 3, {}, { node: "" }, { node: 5 }, { ...w.nodes[0], connections: 99 }, { node: "node-2" });
    }))!;
    expect(c.nodes.map((n) => [n.node, n.self, n.connections])).toEqual([["node-1", true, 3], ["node-2", false, null]]);
    expect(parseCluster({ node: "b", nodes: [{ node: "a" }, { node: "b" }] })!.nodes.map((n) => [n.node, n.self])).toEqual([["b", true], ["a", false]]);
  });

  test("this node comes first whatever the order received; the peers keep theirs", () => {
    const c = parseCluster({ node: "n2", nodes: [{ node: "n3" }, { node: "n1" }, { node: "n2", self: true }, { node: "n0" }] })!;
    expect(c.nodes.map((n) => n.node)).toEqual(["n2", "n3", "n1", "n0"]);
  });

  test("a missing or non-number figure is null, not 0; maps keep their number entries, other statuses included", () => {
    const c = parseCluster(wire((w) => {
      const n = w.nodes[0];
      delete n.connections;
      n.active_requests = "5";
      n.requests_per_second = Infinity; // (not JSON, but not a figure either)
      n.age_ms = null;
      n.responses = { completed: 1, cancelled: "2", rejected: 4, odd: { x: 1 } };
      n.cancellations = [1, 2];
      n.cancel_latency_ms = { count: 2, p50: null };
      n.tokens = "many";
      delete n.relays;
    }))!;
    expect(c.nodes[0]).toEqual({
      node: "node-1", self: true, age_ms: null,
      connections: null, active_requests: null, requests_total: 120, requests_per_second: null,
      responses: { completed: 1, rejected: 4 },
      cancellations: {},
      cancel_latency_ms: { count: 2, p50: null, p99: null },
      tokens: { input: null, output: null, saved: null },
      relays: { sending: null, receiving: null },
    });
  });

  test("missing totals and nodes: all unknown, no rows", () => {
    const c = parseCluster({ node: "node-1", nats: "connected", nodes: "node-1" })!;
    expect(c.nodes).toEqual([]);
    expect(c.totals).toEqual({
      nodes: null, connections: null, active_requests: null, requests_total: null, requests_per_second: null,
      responses: {}, cancellations: {}, tokens: { input: null, output: null, saved: null }, relays: { sending: null, receiving: null },
    });
  });

  test.each([["connected", "connected"], ["disconnected", "disconnected"], ["reconnecting", "disconnected"], [undefined, "disconnected"], [true, "disconnected"]])(
    "NATS %j reads as %s (only a link known to be up is)",
    (nats, state) => expect(parseCluster(wire((w) => { w.nats = nats; }))!.nats).toBe(state),
  );
});

describe("readSnapshot", () => {
  test("a single node's snapshot: as it comes, without a cluster key", () => {
    const s = snapshot(1000);
    const read = readSnapshot(JSON.parse(JSON.stringify(s)))!;
    expect(read).toEqual(s);
    expect("cluster" in read).toBe(false);
  });

  test("a cluster node's snapshot: the cluster as parsed", () => {
    expect(readSnapshot({ ...snapshot(1000), cluster: WIRE })!.cluster).toEqual(WIRE);
    const read = readSnapshot({ ...snapshot(1000), cluster: wire((w) => { w.nodes = [{ node: "node-1", connections: "x" }]; }) })!;
    expect(read.cluster!.nodes[0]!.connections).toBeNull();
  });

  test.each([null, 3, { cluster: "x" }, { node: "" }])("a malformed cluster %j is no cluster; the rest still shows", (cluster) => {
    const read = readSnapshot({ ...snapshot(1000), cluster })!;
    expect("cluster" in read).toBe(false);
    expect(read.connections).toBe(1);
  });

  test.each([null, "stats", [], { type: "hello" }, {}])("%j is not a snapshot", (data) => expect(readSnapshot(data)).toBeUndefined());
});

describe("subscribeStats", () => {
  afterEach(() => vi.unstubAllGlobals());

  test("each frame goes through readSnapshot: malformed clusters and non-snapshots never reach the page", () => {
    let socket!: { onmessage: (ev: { data: unknown }) => void; close: () => void };
    vi.stubGlobal("WebSocket", function (this: typeof socket) {
      socket = this;
      this.close = () => {};
    });
    const received: Stats[] = [];
    const stop = subscribeStats("ws://gateway/v1/stats", (s) => received.push(s), () => {});
    for (const frame of [
      { ...snapshot(1), cluster: WIRE },
      { ...snapshot(2), cluster: { nodes: [] } },
      null,
      { type: "other" },
    ]) socket.onmessage({ data: JSON.stringify(frame) });
    socket.onmessage({ data: "{not json" });
    stop();
    expect(received.map((s) => [s.time_ms, s.cluster?.node])).toEqual([[1, "node-1"], [2, undefined]]);
    expect("cluster" in received[1]!).toBe(false);
  });
});

const render = (cluster: Cluster | undefined) => renderToStaticMarkup(createElement(ClusterPanel, { cluster }));
const ENTITIES: Record<string, string> = { "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#x27;": "'" };
/** What a markup fragment reads as: no tags, entities decoded. */
const text = (markup: string) => markup.replace(/<[^>]*>/g, "").replace(/&[#\w]+;/g, (e) => ENTITIES[e] ?? e);
const attr = (attrs: string, name: string) => new RegExp(` ${name}="([^"]*)"`).exec(attrs)?.[1];

/** The node table's rows, in order: their attributes, and their cells' text by column. */
function rows(markup: string) {
  return [...markup.matchAll(/<tr([^>]*data-testid="cluster-node"[^>]*)>(.*?)<\/tr>/g)].map(([, attrs = "", cells = ""]) => ({
    node: attr(attrs, "data-node"),
    self: attr(attrs, "data-self"),
    stale: attr(attrs, "data-stale"),
    className: attr(attrs, "class"),
    cells: Object.fromEntries([...cells.matchAll(/<td data-col="(\w+)">(.*?)<\/td>/g)].map(([, col, v = ""]) => [col, text(v)])),
  }));
}

/** The text of the element with this test id. */
function byTestId(markup: string, id: string): string | undefined {
  const m = new RegExp(`<(\\w+)[^>]*data-testid="${id}"[^>]*>(.*?)</\\1>`).exec(markup);
  return m ? text(m[2]!) : undefined;
}

describe("ClusterPanel", () => {
  test("a single node (no cluster key): nothing at all, not an empty box", () => {
    expect(render(undefined)).toBe("");
    expect(render(readSnapshot(snapshot(1000))!.cluster)).toBe("");
  });

  test("the panel: its heading and the cluster's totals", () => {
    const markup = render(clusterView());
    expect(byTestId(markup, "cluster")).toMatch(/^Cluster — this page is served by node-1, whose NATS link is connected/);
    expect(byTestId(markup, "cluster-self")).toBe("node-1");
    const totals = Object.fromEntries(
      ["nodes", "connections", "active", "rps", "completed", "cancelled", "failed", "saved", "relays"].map((k) => [k, byTestId(markup, `cluster-total-${k}`)]),
    );
    expect(totals).toEqual({
      nodes: "3", connections: "9", active: "15", rps: "7.5",
      completed: "300", cancelled: "36", failed: "9", saved: "15,000", relays: "3 / 3",
    });
  });

  test("one row per node, this node first and marked as the one serving the page", () => {
    const r = rows(render(clusterView()));
    expect(r.map((row) => [row.node, row.self])).toEqual([["node-1", "true"], ["node-2", "false"], ["node-3", "false"]]);
    expect(r[0]!.cells.node).toBe("node-1serves this page");
    expect(r.slice(1).map((row) => row.cells.node)).toEqual(["node-2", "node-3"]);
    expect(r[0]!.className).toBe("self");
    expect(r[0]!.cells).toEqual({
      node: "node-1serves this page", connections: "3", active: "5", rps: "2.5", p50: "0.40", p99: "1.90",
      completed: "100", cancelled: "12", failed: "3", sending: "1", receiving: "1", age: "0 ms",
    });
  });

  test("a peer without cancels yet: — for its latencies", () => {
    const [, peer] = rows(render(clusterView()));
    expect([peer!.cells.p50, peer!.cells.p99, peer!.cells.sending, peer!.cells.receiving]).toEqual(["—", "—", "2", "1"]);
  });

  test(`a row older than ${STALE_AFTER_MS} ms is stale: dimmed and labelled`, () => {
    const cluster = clusterView();
    cluster.nodes[1]!.age_ms = STALE_AFTER_MS; // exactly the limit: still fresh
    const r = rows(render(cluster));
    expect(r.map((row) => [row.node, row.stale, row.className])).toEqual([
      ["node-1", "false", "self"], ["node-2", "false", undefined], ["node-3", "true", "stale"],
    ]);
    expect(r.map((row) => row.cells.age)).toEqual(["0 ms", "3,000 ms", "4,200 msstale"]);
  });

  test("a row whose age or figures are unknown: stale, and — in place of each", () => {
    const cluster = parseCluster({ node: "node-1", nats: "connected", nodes: [{ node: "node-1" }] })!;
    const [row] = rows(render(cluster));
    expect(row!.stale).toBe("true");
    expect(new Set(Object.values(row!.cells).slice(1))).toEqual(new Set(["—", "—stale"]));
  });

  test("NATS disconnected is flagged; connected is not", () => {
    const down = render(clusterView({ nats: "disconnected" }));
    expect(down).toContain('class="nats disconnected"');
    expect(byTestId(down, "cluster-nats")).toBe("disconnected");
    expect(text(down)).toContain("the other nodes' figures are not updated until it reconnects");
    const up = render(clusterView());
    expect(up).toContain('class="nats connected"');
    expect(text(up)).not.toContain("not updated");
  });
});
