/**
 * uPlot charts for the dashboard. Each chart creates its uPlot instance once, on mount, and
 * feeds it with `setData` whenever `version` changes (one new snapshot): never a new instance
 * per tick. Charts follow their container's width (ResizeObserver) and are destroyed on unmount.
 */
import { type RefObject, useEffect, useRef } from "react";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { type Columns, WINDOW_S } from "./stats";

const AXIS = { stroke: "#57606a", grid: { stroke: "#eaeef2", width: 1 }, ticks: { stroke: "#d0d7de", width: 1 } };
/** Tick steps for counts: whole numbers only. */
const COUNT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/** Time ticks: the local time of day to the second (the window is minutes long). */
const clock = uPlot.fmtDate("{HH}:{mm}:{ss}");
const timeTicks: uPlot.Axis.Values = (_u, splits) => splits.map((t) => clock(new Date(t * 1000)));

/** The y range: from 0 to a little above the largest value (1 when there is none yet). */
const fromZero: uPlot.Range.Function = (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1];

function usePlot(
  makeOptions: (width: number) => uPlot.Options,
  data: uPlot.AlignedData,
  version: number,
): RefObject<HTMLDivElement | null> {
  const container = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const latest = useRef(data);
  latest.current = data;
  const make = useRef(makeOptions);

  useEffect(() => {
    const el = container.current!;
    const opts = make.current(Math.max(200, el.clientWidth));
    const u = new uPlot(opts, latest.current, el);
    plot.current = u;
    const resized = new ResizeObserver(() => {
      const width = Math.max(200, el.clientWidth);
      if (width !== u.width) u.setSize({ width, height: u.height });
    });
    resized.observe(el);
    return () => {
      resized.disconnect();
      u.destroy();
      plot.current = null;
    };
  }, []);

  useEffect(() => {
    const u = plot.current;
    if (u === null) return;
    u.setData(latest.current);
    // The legend shows the newest values unless the pointer is over the chart.
    const last = latest.current[0].length - 1;
    if (u.legend.show !== false && last >= 0 && (u.cursor.left ?? -1) < 0) u.setLegend({ idx: last });
  }, [version]);

  return container;
}

export interface LineSpec {
  label: string;
  color: string;
  /** Its own y axis on the right (a second unit), instead of the shared one on the left. */
  rightAxis?: string;
  /** Points only, no line (sparse samples such as "worst since the previous frame"). */
  pointsOnly?: boolean;
  dash?: number[];
}

/** A live time series over the rolling window: time on x, labelled value axes. */
export function TimeChart({
  id,
  data,
  version,
  lines,
  yLabel,
  height = 200,
}: {
  id: string;
  data: Columns;
  version: number;
  lines: LineSpec[];
  yLabel: string;
  height?: number;
}) {
  const container = usePlot(
    (width) => {
      const right = lines.find((l) => l.rightAxis !== undefined)?.rightAxis;
      const axes: uPlot.Axis[] = [
        { ...AXIS, label: "time", labelSize: 20, values: timeTicks },
        { ...AXIS, label: yLabel, size: 60, scale: "y" },
      ];
      if (right !== undefined) axes.push({ ...AXIS, label: right, side: 1, size: 60, scale: "y2", grid: { show: false } });
      return {
        width,
        height,
        scales: {
          // The last WINDOW_S seconds up to the newest snapshot: the chart scrolls.
          x: { time: true, range: (_u, _min, max) => (max == null ? [Date.now() / 1000 - WINDOW_S, Date.now() / 1000] : [max - WINDOW_S, max]) },
          y: { range: fromZero },
          ...(right !== undefined && { y2: { range: fromZero } }),
        },
        axes,
        // Room on the right for the last time tick's label when there is no right axis.
        padding: [8, right === undefined ? 28 : 0, 0, 0],
        series: [
          { label: "time", value: (_u, t) => (t == null ? "—" : clock(new Date(t * 1000))) },
          ...lines.map(
            (l): uPlot.Series => ({
              label: l.label,
              stroke: l.color,
              width: 1.5,
              scale: l.rightAxis !== undefined ? "y2" : "y",
              dash: l.dash,
              spanGaps: false,
              ...(l.pointsOnly
                ? { paths: () => null, points: { show: true, size: 5, fill: l.color, stroke: l.color } }
                : {}), // uPlot shows a line's points while they are few and far apart
            }),
          ),
        ],
        cursor: { drag: { x: false, y: false } },
      };
    },
    data,
    version,
  );
  const last = data.map((column) => column[column.length - 1] ?? null).slice(1);
  return (
    <div
      ref={container}
      className="chart"
      data-testid={id}
      data-kind="time"
      data-points={data[0].length}
      data-last={JSON.stringify(last)}
    />
  );
}

/** Counts by category as bars (a histogram): categories on x, count on y. */
export function BarChart({
  id,
  labels,
  values,
  version,
  xLabel,
  yLabel,
  color,
  height = 180,
}: {
  id: string;
  labels: readonly string[];
  values: number[];
  version: number;
  xLabel: string;
  yLabel: string;
  color: string;
  height?: number;
}) {
  const data: uPlot.AlignedData = [labels.map((_, i) => i), values];
  const container = usePlot(
    (width) => ({
      width,
      height,
      scales: {
        x: { time: false, range: [-0.5, labels.length - 0.5] },
        y: { range: fromZero },
      },
      axes: [
        {
          ...AXIS,
          label: xLabel,
          labelSize: 20,
          grid: { show: false },
          splits: () => labels.map((_, i) => i),
          values: (_u, splits) => splits.map((i) => labels[i] ?? ""),
        },
        { ...AXIS, label: yLabel, size: 60, incrs: COUNT_INCRS },
      ],
      series: [
        {},
        {
          label: yLabel,
          stroke: color,
          fill: `${color}99`,
          width: 1,
          paths: uPlot.paths.bars!({ size: [0.6, 90] }),
          points: { show: false },
        },
      ],
      legend: { show: false },
      cursor: { show: false },
    }),
    data,
    version,
  );
  return <div ref={container} className="chart" data-testid={id} data-values={values.join(",")} data-kind="bars" />;
}
