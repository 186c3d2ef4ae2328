// The dashboard's time series: a rolling window kept in place, bounded however long it runs.
import { describe, expect, test } from "vitest";
import { RollingSeries, StatsHistory, WINDOW_S } from "../../src/dashboard/stats.js";
import { snapshot } from "../support/stats.js";

describe("RollingSeries", () => {
  test("keeps the points of the last window only, in place", () => {
    const s = new RollingSeries(1, 10);
    const columns = s.data.map((c) => c); // the same arrays throughout (what uPlot holds)
    for (let t = 0; t <= 30; t++) s.push(t, [t * 2]);
    expect(s.data[0]).toEqual([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]);
    expect(s.data[1]).toEqual([40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60]);
    s.data.forEach((c, i) => expect(c).toBe(columns[i]));
  });

  test("is bounded in points too, whatever the interval", () => {
    const s = new RollingSeries(2, 1e9, 100);
    for (let t = 0; t < 10_000; t++) s.push(t / 1000, [t, null]);
    expect(s.length).toBe(100);
    expect(s.data[1]![0]).toBe(9900);
    expect(s.data[2]!.every((v) => v === null)).toBe(true);
  });

  test("starts over when time goes back (another gateway behind the same address)", () => {
    const s = new RollingSeries(1, 10);
    s.push(100, [1]);
    s.push(101, [2]);
    s.push(5, [3]);
    expect(s.data).toEqual([[5], [3]]);
  });

  test("a missing value is a gap", () => {
    const s = new RollingSeries(3);
    s.push(1, [1]);
    expect(s.data).toEqual([[1], [1], [null], [null]]);
  });
});

describe("StatsHistory", () => {
  test("one point per snapshot on the gateway's clock, in seconds", () => {
    const h = new StatsHistory();
    h.push(snapshot(1_000_000));
    h.push(snapshot(1_000_500, { cancel_latency_ms: { count: 3, p50: 0.4, p99: 1.2, max: 1.2, recent: [] } }));
    expect(h.traffic.data).toEqual([[1000, 1000.5], [4.5, 4.5], [2, 2]]);
    expect(h.cancelLatency.data).toEqual([[1000, 1000.5], [0.4, 0.4], [1.2, 1.2], [1.1, null]]);
    expect(h.haltLatency.data).toEqual([[1000, 1000.5], [2, 2], [40, 40], [41, 41], [null, null]]);
  });

  test("hours of snapshots stay within the window", () => {
    const h = new StatsHistory();
    const hours = 3;
    for (let t = 0; t < hours * 3600 * 2; t++) h.push(snapshot(t * 500)); // every 500 ms
    const points = (WINDOW_S * 1000) / 500 + 1;
    expect(h.traffic.length).toBe(points);
    expect(h.cancelLatency.length).toBe(points);
    expect(h.haltLatency.length).toBe(points);
  });

  test("a gateway without the cancel landing keys gives gaps, not errors", () => {
    const h = new StatsHistory();
    const old = snapshot(0);
    delete old.halt_latency_ms;
    h.push(old);
    expect(h.haltLatency.data).toEqual([[0], [null], [null], [null], [null]]);
  });
});
