// The charts, drawn with uPlot (loaded by index.html as the global `uPlot`). Two kinds: a line
// per metric over a job's rounds, and placement's cost against round time. Each chart follows
// its container's width, and is destroyed by the page that made it.

import { el, fmtMoney } from './dom.js';

export function haveUPlot() {
  return typeof window.uPlot === 'function';
}

// A scale over one value (a job's first round) would have no width: pad it.
function padded(_u, min, max) {
  if (min === null || max === null) return [0, 1];
  if (min === max) return [min - 1, max + 1];
  return [min, max];
}

// Point-only series: uPlot draws no path when `paths` returns null.
const noPath = () => null;

function widthOf(container, fallback = 600) {
  return Math.max(280, Math.floor(container.clientWidth || fallback));
}

/** Keep a chart as wide as its container. Returns a function that stops it. */
function followWidth(container, chart, height) {
  if (typeof ResizeObserver !== 'function') return () => {};
  let last = widthOf(container);
  const observer = new ResizeObserver(() => {
    const width = widthOf(container);
    if (width !== last) {
      last = width;
      chart.setSize({ width, height });
    }
  });
  observer.observe(container);
  return () => observer.disconnect();
}

const METRIC_COLOURS = {
  accuracy: '#1f77b4',
  loss: '#d62728',
  f1: '#2ca02c',
  recall: '#9467bd',
  precision: '#ff7f0e',
};

/**
 * One metric over rounds, in `holder` (an element the caller placed). Returns
 * `{update(rounds, values), destroy()}`; without uPlot the figures are listed as text instead.
 */
export function metricChart(holder, metric) {
  const height = 220;
  if (!haveUPlot()) {
    const list = el('p', { class: 'chart-fallback' });
    return {
      update(rounds, values) {
        list.textContent = rounds.map((r, i) => `round ${r}: ${values[i] ?? '—'}`).join('; ');
        if (!list.isConnected) holder.append(list);
      },
      destroy() {
        list.remove();
      },
    };
  }
  const colour = METRIC_COLOURS[metric] || '#444';
  const opts = {
    width: widthOf(holder, 480),
    height,
    title: metric,
    scales: { x: { time: false, range: padded } },
    axes: [
      {
        label: 'round',
        // Rounds are whole numbers: no tick between two of them.
        incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
        values: (_u, splits) => splits.map((v) => String(v)),
      },
      { label: metric, size: 60 },
    ],
    series: [
      { label: 'round' },
      {
        label: metric,
        stroke: colour,
        width: 2,
        spanGaps: true,
        points: { show: true, size: 6, fill: colour },
      },
    ],
  };
  let chart = null;
  let stopFollowing = () => {};
  return {
    update(rounds, values) {
      const data = [rounds, values];
      if (chart === null) {
        chart = new window.uPlot(opts, data, holder);
        stopFollowing = followWidth(holder, chart, height);
      } else {
        chart.setData(data);
      }
    },
    destroy() {
      stopFollowing();
      if (chart) chart.destroy();
      chart = null;
    },
  };
}

/** The points of placement's plot: each series' points, one column each (uPlot's aligned data
 * wants one x array; a column per point lets two offers share a round time). */
function columns(seriesPoints) {
  const cols = [];
  seriesPoints.forEach((points, s) => {
    for (const p of points) {
      if (p.x === null || p.x === undefined || p.y === null || p.y === undefined) continue;
      if (!Number.isFinite(p.x) || !Number.isFinite(p.y)) continue;
      cols.push({ s, x: p.x, y: p.y, label: p.label });
    }
  });
  cols.sort((a, b) => a.x - b.x || a.s - b.s);
  const xs = cols.map((c) => c.x);
  const ys = seriesPoints.map((_, s) => cols.map((c) => (c.s === s ? c.y : null)));
  return { cols, data: [xs, ...ys] };
}

export const offerLabel = (p) => `${p.cloud}:${p.region} ${p.instance_type}`;

/**
 * Placement's cost against round time: infeasible offers faded, feasible offers, the Pareto
 * front as a line, the choice and the baseline as big markers, the cost limit as a dashed line.
 * `info` is an element that names the offer under the cursor. Returns `destroy()`.
 */
export function paretoChart(holder, result, info) {
  const currency = result.currency || (result.limits && result.limits.currency) || '';
  const basis = result.basis || (result.limits && result.limits.basis) || '';
  const point = (p) => ({ x: p.round_time_s, y: p.cost, label: offerLabel(p) });
  const candidates = result.candidates || [];
  const infeasible = candidates.filter((p) => !p.feasible).map(point);
  const feasible = candidates.filter((p) => p.feasible).map(point);
  const front = (result.front || []).map(point);
  const choice = result.choice ? [point(result.choice)] : [];
  const baseline = result.baseline ? [point(result.baseline)] : [];
  const closest = (result.closest || []).map(point);
  const all = [...infeasible, ...feasible, ...front, ...choice, ...baseline, ...closest].filter(
    (p) => Number.isFinite(p.x) && Number.isFinite(p.y),
  );
  const maxCost = result.limits ? Number(result.limits.max_cost) : NaN;
  const limitLine = [];
  if (all.length && Number.isFinite(maxCost)) {
    const xs = all.map((p) => p.x);
    const label = `max cost ${fmtMoney(maxCost, currency)} ${currency}/${basis}`;
    limitLine.push({ x: Math.min(...xs), y: maxCost, label }, { x: Math.max(...xs), y: maxCost, label });
  }

  const finite = (points) => points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
  // Each layer of the plot: its points and its uPlot series. Empty layers are left out, so the
  // legend names only what is drawn.
  const layers = [
    {
      points: infeasible,
      series: {
        label: 'infeasible offers',
        stroke: '#c8c8c8',
        fill: '#dcdcdc',
        paths: noPath,
        points: { show: true, size: 5, width: 1, stroke: '#c8c8c8', fill: '#e4e4e4' },
      },
    },
    {
      points: feasible,
      series: {
        label: 'feasible offers',
        stroke: '#6d9bd6',
        fill: '#a9c6ea',
        paths: noPath,
        points: { show: true, size: 7, width: 1, stroke: '#4f7fc0', fill: '#a9c6ea' },
      },
    },
    {
      points: front,
      series: {
        label: 'Pareto front',
        stroke: '#1f4e9c',
        width: 2,
        spanGaps: true,
        points: { show: true, size: 7, fill: '#1f4e9c' },
      },
    },
    {
      points: closest,
      series: {
        label: 'closest offers',
        stroke: '#b8860b',
        fill: '#f2d16b',
        paths: noPath,
        points: { show: true, size: 10, width: 2, stroke: '#b8860b', fill: '#f2d16b' },
      },
    },
    {
      points: choice,
      series: {
        label: 'choice',
        stroke: '#b2161b',
        fill: '#e0393e',
        paths: noPath,
        points: { show: true, size: 20, width: 3, stroke: '#6b0b0e', fill: '#e0393e' },
      },
    },
    {
      points: baseline,
      series: {
        label: 'baseline',
        stroke: '#111111',
        fill: '#ffffff',
        paths: noPath,
        points: { show: true, size: 15, width: 3, stroke: '#111111', fill: '#ffffff' },
      },
    },
    {
      points: limitLine,
      series: {
        label: 'max cost',
        stroke: '#d62728',
        width: 1,
        dash: [6, 4],
        spanGaps: true,
        points: { show: false },
      },
    },
  ].filter((layer) => finite(layer.points).length > 0);

  const { cols, data } = columns(layers.map((layer) => layer.points));
  if (!haveUPlot()) {
    holder.append(el('p', { class: 'chart-fallback', text: 'The plot needs uPlot (vendor/uPlot.iife.min.js), which did not load.' }));
    return () => {};
  }
  if (cols.length === 0) {
    holder.append(el('p', { class: 'chart-fallback', text: 'No offer has a known round time: nothing to plot.' }));
    return () => {};
  }

  // Costs span orders of magnitude (a small VM against a large one): a log scale shows both, as
  // `fedctl place --plot` does. Only when every cost is positive.
  const costs = cols.map((c) => c.y);
  const lo = Math.min(...costs);
  const hi = Math.max(...costs);
  const logScale = lo > 0 && hi / lo > 20;

  const height = 400;
  const opts = {
    width: widthOf(holder, 900),
    height,
    title: 'Cost against round time',
    scales: {
      x: { time: false, range: padded },
      y: logScale ? { distr: 3, log: 10 } : {},
    },
    axes: [
      { label: 'round time (s)' },
      {
        label: `cost (${currency}/${basis})`,
        size: 80,
        values: (_u, splits) => splits.map((v) => (v === null ? '' : fmtMoney(v, currency))),
      },
    ],
    series: [{ label: 'round time (s)' }, ...layers.map((layer) => layer.series)],
    legend: { live: false },
    hooks: {
      // Name the offer under the cursor: the legend alone cannot, since each point is its own column.
      setCursor: [
        (u) => {
          const i = u.cursor.idx;
          if (!info) return;
          info.textContent = i === null || i === undefined || !cols[i]
            ? 'Point at a marker to name its offer.'
            : `${cols[i].label}: ${fmtMoney(cols[i].y, currency)} ${currency}/${basis}, ${cols[i].x.toFixed(2)} s per round`;
        },
      ],
    },
  };
  const chart = new window.uPlot(opts, data, holder);
  const stop = followWidth(holder, chart, height);
  return () => {
    stop();
    chart.destroy();
  };
}
