/**
 * The live dashboard: connections and active streams, requests per second, cancellations by
 * reason, cancel latency (a live chart of the latest samples), tokens used and saved. It updates
 * from the gateway's stats feed over a WebSocket (no page reload).
 */
import { useEffect, useState } from "react";
import { type Stats, pushBounded, statsUrl, subscribeStats } from "./stats";

const MAX_POINTS = 240;

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

/** A small SVG line chart; `series` share the y axis. */
function Chart({ series, height = 120, id }: { series: { points: number[]; color: string; label: string }[]; height?: number; id: string }) {
  const width = 600;
  const max = Math.max(1e-9, ...series.flatMap((s) => s.points));
  return (
    <svg viewBox={`0 0 ${width} ${height}`} width="100%" height={height} data-testid={id} role="img">
      <rect x={0} y={0} width={width} height={height} fill="#f6f8fa" />
      {series.map((s) => {
        const n = s.points.length;
        const d = s.points
          .map((v, i) => `${((i + MAX_POINTS - n) / (MAX_POINTS - 1)) * width},${height - 4 - (v / max) * (height - 16)}`)
          .join(" ");
        return <polyline key={s.label} points={d} fill="none" stroke={s.color} strokeWidth={1.5} data-points={n} />;
      })}
      <text x={6} y={12} fontSize={11} fill="#57606a">
        max {max.toFixed(2)}
      </text>
    </svg>
  );
}

const fmt = (v: number | null, digits = 0) => v === null ? "—" : v.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });

export function Dashboard() {
  const [stats, setStats] = useState<Stats | null>(null);
  const [connected, setConnected] = useState(false);
  const [updates, setUpdates] = useState(0);
  const [latencies, setLatencies] = useState<number[]>([]);
  const [rps, setRps] = useState<number[]>([]);

  useEffect(
    () =>
      subscribeStats(
        statsUrl(),
        (s) => {
          setStats(s);
          setUpdates((n) => n + 1);
          setLatencies((old) => pushBounded(old, s.cancel_latency_ms.recent, MAX_POINTS));
          setRps((old) => pushBounded(old, [s.requests_per_second], MAX_POINTS));
        },
        setConnected,
      ),
    [],
  );

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
            <div className="panel">
              <h2>Requests per second</h2>
              <Chart id="rps-chart" series={[{ points: rps, color: "#1f6feb", label: "rps" }]} />
            </div>
            <div className="panel">
              <h2>
                Cancel latency (ms, gateway side: cancel read → cancelled response written) — p50{" "}
                <span data-testid="p50">{fmt(stats.cancel_latency_ms.p50, 2)}</span>, p99{" "}
                <span data-testid="p99">{fmt(stats.cancel_latency_ms.p99, 2)}</span>, max{" "}
                <span data-testid="max">{fmt(stats.cancel_latency_ms.max, 2)}</span> over{" "}
                <span data-testid="latency-count">{stats.cancel_latency_ms.count}</span> cancels
              </h2>
              <Chart id="latency-chart" series={[{ points: latencies, color: "#cf222e", label: "latency" }]} />
            </div>
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
          </>
        )}
      </main>
    </>
  );
}
