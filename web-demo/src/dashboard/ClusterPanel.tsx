/**
 * The cluster view: shown only when the snapshot has `cluster` (the gateway runs as one node of
 * several, over NATS). The cluster's totals, then one row per node, this node (the one serving
 * the page) first. A peer's row is its last heartbeat's figures: their age is shown, and a row
 * older than STALE_AFTER_MS is dimmed and labelled stale. No charts: the figures are the nodes'
 * current ones, and a chart per node would grow with the cluster.
 */
import { fmt } from "./format";
import { type Cluster, type ClusterNode, isStale } from "./stats";

function NodeRow({ node }: { node: ClusterNode }) {
  const stale = isStale(node);
  const classes = [node.self && "self", stale && "stale"].filter(Boolean).join(" ");
  return (
    <tr className={classes || undefined} data-testid="cluster-node" data-node={node.node} data-self={node.self} data-stale={stale}>
      <td data-col="node">
        {node.node}
        {node.self && <span className="self-label">serves this page</span>}
      </td>
      <td data-col="connections">{fmt(node.connections)}</td>
      <td data-col="active">{fmt(node.active_requests)}</td>
      <td data-col="rps">{fmt(node.requests_per_second, 1)}</td>
      <td data-col="p50">{fmt(node.cancel_latency_ms.p50, 2)}</td>
      <td data-col="p99">{fmt(node.cancel_latency_ms.p99, 2)}</td>
      <td data-col="completed">{fmt(node.responses.completed)}</td>
      <td data-col="cancelled">{fmt(node.responses.cancelled)}</td>
      <td data-col="failed">{fmt(node.responses.failed)}</td>
      <td data-col="sending">{fmt(node.relays.sending)}</td>
      <td data-col="receiving">{fmt(node.relays.receiving)}</td>
      <td data-col="age">
        {node.age_ms === null ? "—" : `${fmt(node.age_ms)} ms`}
        {stale && <span className="stale-label">stale</span>}
      </td>
    </tr>
  );
}

export function ClusterPanel({ cluster }: { cluster: Cluster | undefined }) {
  if (cluster === undefined) return null; // a single node: no panel at all
  const t = cluster.totals;
  const down = cluster.nats !== "connected";
  return (
    <div className="panel cluster" data-testid="cluster">
      <h2>
        Cluster — this page is served by <span data-testid="cluster-self">{cluster.node}</span>, whose NATS link is{" "}
        <span className={`nats ${cluster.nats}`} data-testid="cluster-nats" data-state={cluster.nats}>
          {cluster.nats}
        </span>
        {/* Heartbeats, and the figures with them, travel over NATS: without it the peers' rows
            age and then leave the view, and the totals count fewer nodes. */}
        {down && <span className="nats-warning"> — the other nodes' figures are not updated until it reconnects</span>}
      </h2>
      <div className="table-scroll">
        <table>
          <caption>totals over the nodes</caption>
          <tbody>
            <tr>
              <th>nodes</th>
              <th>connections</th>
              <th>active streams</th>
              <th>requests / s</th>
              <th>completed</th>
              <th>cancelled</th>
              <th>failed</th>
              <th>tokens saved</th>
              <th>relayed streams (sending / receiving)</th>
            </tr>
            <tr>
              <td data-testid="cluster-total-nodes">{fmt(t.nodes)}</td>
              <td data-testid="cluster-total-connections">{fmt(t.connections)}</td>
              <td data-testid="cluster-total-active">{fmt(t.active_requests)}</td>
              <td data-testid="cluster-total-rps">{fmt(t.requests_per_second, 1)}</td>
              <td data-testid="cluster-total-completed">{fmt(t.responses.completed)}</td>
              <td data-testid="cluster-total-cancelled">{fmt(t.responses.cancelled)}</td>
              <td data-testid="cluster-total-failed">{fmt(t.responses.failed)}</td>
              <td data-testid="cluster-total-saved">{fmt(t.tokens.saved)}</td>
              <td data-testid="cluster-total-relays">
                {fmt(t.relays.sending)} / {fmt(t.relays.receiving)}
              </td>
            </tr>
          </tbody>
        </table>
      </div>
      <div className="table-scroll">
        <table data-testid="cluster-nodes">
          <caption>by node</caption>
          <thead>
            <tr>
              <th>node</th>
              <th>connections</th>
              <th>active streams</th>
              <th>requests / s</th>
              <th>cancel p50 ms</th>
              <th>cancel p99 ms</th>
              <th>completed</th>
              <th>cancelled</th>
              <th>failed</th>
              <th>relays sending</th>
              <th>relays receiving</th>
              <th>figures' age</th>
            </tr>
          </thead>
          <tbody>
            {cluster.nodes.map((node) => (
              <NodeRow key={node.node} node={node} />
            ))}
          </tbody>
        </table>
      </div>
    </div>
  );
}
