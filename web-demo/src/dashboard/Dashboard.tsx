/**
 * The live dashboard: connections and active streams, requests per second, cancellations by
 * reason, cancel latency, where cancels landed (the kind of step the pipeline halted at), the
 * time until the pipeline (the model) stopped after a cancel, tokens generated after cancels,
 * tokens used and saved; in a cluster, every node's figures and their totals. It updates from
 * the gateway's stats feed over a WebSocket (no page reload); the time series are uPlot charts
 * over the last five minutes.
 */
import { useEffect, useState } from "react";
import { BarChart, TimeChart } from "./charts";
import { ClusterPanel } from "./ClusterPanel";
import { fmt } from "./format";
import { LATE_TOKEN_BUCKETS, STEP_KINDS, type Stats, StatsHistory, WINDOW_S, statsUrl, subscribeStats } from "./stats";

function Card({ label, value, id }: { label: string; value: string | number; id: string }) {
  return (
    <div className="card">
      <div className="label">{label}</div>
      <div className="value" data-testid={id}>
        {value}
      </div>
    </div>
  );
}

const BLUE = "#1f6feb";
const RED = "#cf222e";
const ORANGE = "#bc4c00";
const PURPLE = "#8250df";
const GREEN = "#1a7f37";
const WINDOW = `last ${WINDOW_S / 60} minutes`;

/** One figure of a panel's heading: `name value`. */
function Figure({ name, value, id }: { name: string; value: string | number; id: string }) {
  return (
    <span className="figure">
      {name} <span data-testid={id}>{value}</span>
    </span>
  );
}

export function Dashboard() {
  const [stats, setStats] = useState<Stats | null>(null);
  const [connected, setConnected] = useState(false);
  const [updates, setUpdates] = useState(0);
  // Mutable, bounded columns the charts read; `updates` tells them when to redraw.
  const [history] = useState(() => new StatsHistory());

  useEffect(
    () =>
      subscribeStats(
        statsUrl(),
        (s) => {
          history.push(s);
          setStats(s);
          setUpdates((n) => n + 1);
        },
        setConnected,
      ),
    [history],
  );

  const steps = stats?.cancels_by_step;
  const halt = stats?.halt_latency_ms;
  const late = stats?.tokens_after_cancel;
  return (
    <>
      <header>
        <h1>muxgate dashboard</h1>
        <nav>
          <a href="/">Chat</a>
          <a href="/dashboard">Dashboard</a>
        </nav>
        <span className={`conn ${connected ? "up" : "down"}`} data-testid="feed" data-updates={updates}>
          {connected ? `live (${updates} updates)` : "connecting to /v1/stats…"}
        </span>
      </header>
      <main>
        {stats === null ? (
          <p>Waiting for the first snapshot…</p>
        ) : (
          <>
            <div className="cards">
              <Card label="connections" value={stats.connections} id="connections" />
              <Card label="active streams" value={stats.active_requests} id="active" />
              <Card label="requests / s" value={fmt(stats.requests_per_second, 1)} id="rps" />
              <Card label="requests total" value={stats.requests_total} id="requests-total" />
              <Card label="tokens in" value={fmt(stats.tokens.input)} id="tokens-input" />
              <Card label="tokens out" value={fmt(stats.tokens.output)} id="tokens-output" />
              <Card label="tokens saved" value={fmt(stats.tokens.saved)} id="tokens-saved" />
              <Card label="uptime s" value={fmt(stats.uptime_s)} id="uptime" />
            </div>
            <ClusterPanel cluster={stats.cluster} />
            <div className="grid">
              <div className="panel">
                <h2>Traffic ({WINDOW})</h2>
                <TimeChart
                  id="rps-chart"
                  data={history.traffic.data}
                  version={updates}
                  yLabel="requests / s"
                  lines={[
                    { label: "requests / s", color: BLUE },
                    { label: "active streams", color: GREEN, rightAxis: "active streams" },
                  ]}
                />
              </div>
              <div className="panel">
                <h2>
                  Cancel latency, ms (gateway side: cancel read → cancelled response written) —{" "}
                  <Figure name="p50" value={fmt(stats.cancel_latency_ms.p50, 2)} id="p50" />,{" "}
                  <Figure name="p99" value={fmt(stats.cancel_latency_ms.p99, 2)} id="p99" />,{" "}
                  <Figure name="max" value={fmt(stats.cancel_latency_ms.max, 2)} id="max" /> over{" "}
                  <span data-testid="latency-count">{stats.cancel_latency_ms.count}</span> cancels
                </h2>
                <TimeChart
                  id="latency-chart"
                  data={history.cancelLatency.data}
                  version={updates}
                  yLabel="ms"
                  lines={[
                    { label: "p50", color: BLUE },
                    { label: "p99", color: RED, dash: [6, 4] },
                    { label: "worst since last update", color: RED, pointsOnly: true },
                  ]}
                />
              </div>
              {halt && (
                <div className="panel">
                  <h2>
                    Time until the pipeline stopped after a cancel, ms (cancel read → model stopped; a
                    tool or agent call runs to its end first) —{" "}
                    <Figure name="p50" value={fmt(halt.p50, 2)} id="halt-p50" />,{" "}
                    <Figure name="p90" value={fmt(halt.p90, 2)} id="halt-p90" />,{" "}
                    <Figure name="p99" value={fmt(halt.p99, 2)} id="halt-p99" />,{" "}
                    <Figure name="max" value={fmt(halt.max, 2)} id="halt-max" /> over{" "}
                    <span data-testid="halt-count">{halt.count}</span> cancels
                  </h2>
                  <TimeChart
                    id="halt-chart"
                    data={history.haltLatency.data}
                    version={updates}
                    yLabel="ms"
                    lines={[
                      { label: "p50", color: BLUE },
                      { label: "p90", color: ORANGE },
                      { label: "p99", color: RED, dash: [6, 4] },
                      { label: "worst since last update", color: RED, pointsOnly: true },
                    ]}
                  />
                </div>
              )}
              {steps && (
                <div className="panel">
                  <h2>Where cancels landed: the step the pipeline halted at</h2>
                  <BarChart
                    id="steps-chart"
                    labels={STEP_KINDS}
                    values={STEP_KINDS.map((kind) => steps[kind] ?? 0)}
                    version={updates}
                    xLabel="last step started"
                    yLabel="cancels"
                    color={PURPLE}
                  />
                  <table>
                    <tbody>
                      <tr>
                        {STEP_KINDS.map((kind) => (
                          <th key={kind}>{kind}</th>
                        ))}
                      </tr>
                      <tr>
                        {STEP_KINDS.map((kind) => (
                          <td key={kind} data-testid={`step-${kind}`}>
                            {steps[kind] ?? 0}
                          </td>
                        ))}
                      </tr>
                    </tbody>
                  </table>
                </div>
              )}
              {late && (
                <div className="panel">
                  <h2>
                    Tokens generated after cancels —{" "}
                    <Figure name="total" value={fmt(late.total)} id="late-total" />; over the last{" "}
                    <span data-testid="late-count">{late.count}</span> cancels:{" "}
                    <Figure name="p99" value={fmt(late.p99)} id="late-p99" />,{" "}
                    <Figure name="max" value={fmt(late.max)} id="late-max" />
                  </h2>
                  <BarChart
                    id="late-chart"
                    labels={LATE_TOKEN_BUCKETS}
                    values={LATE_TOKEN_BUCKETS.map((bucket) => late.histogram[bucket] ?? 0)}
                    version={updates}
                    xLabel="tokens after the cancel"
                    yLabel="cancels"
                    color={ORANGE}
                  />
                  <table>
                    <tbody>
                      <tr>
                        {LATE_TOKEN_BUCKETS.map((bucket) => (
                          <th key={bucket}>{bucket} tokens</th>
                        ))}
                      </tr>
                      <tr>
                        {LATE_TOKEN_BUCKETS.map((bucket) => (
                          <td key={bucket} data-testid={`late-${bucket}`}>
                            {late.histogram[bucket] ?? 0}
                          </td>
                        ))}
                      </tr>
                    </tbody>
                  </table>
                </div>
              )}
              <div className="panel">
                <h2>Responses and cancellations</h2>
                <table>
                  <tbody>
                    <tr><th>completed</th><td data-testid="completed">{stats.responses.completed}</td></tr>
                    <tr><th>cancelled</th><td data-testid="cancelled">{stats.responses.cancelled}</td></tr>
                    <tr><th>failed</th><td data-testid="failed">{stats.responses.failed}</td></tr>
                    {Object.entries(stats.cancellations).map(([reason, n]) => (
                      <tr key={reason}>
                        <th>cancelled: {reason}</th>
                        <td data-testid={`cancel-${reason}`}>{n}</td>
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            </div>
          </>
        )}
      </main>
    </>
  );
}
