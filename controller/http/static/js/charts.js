// Time-series line charts drawn as inline SVG (no chart library, nothing fetched).

import { h, sig, when } from "./util.js";

const NS = "http://www.w3.org/2000/svg";
// Line colours defined in app.css (.series-0 ... .series-7); more series reuse them.
export const PALETTE = 8;
const WIDTH = 560;
const HEIGHT = 180;
// Room for the y labels on the left and the time labels below.
const PAD = { left: 52, right: 12, top: 12, bottom: 26 };

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  for (const child of children) {
    if (child === null || child === undefined) continue;
    el.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return el;
}

/**
 * A figure with one SVG line chart: series = [{name, points: [[epochSeconds, value], ...]}],
 * each optionally with `color` (palette index, default its position), `dashed` and
 * `legend: false`. Points with a missing value are skipped; the y axis starts at 0. With
 * `gapS`, two points further apart than that are not joined (no line across idle time).
 */
export function lineChart({ title, unit, series, testid, gapS = null, note = null }) {
  const clean = series.map((s, i) => ({
    ...s,
    index: (s.color ?? i) % PALETTE,
    points: s.points
      .filter(([t, v]) => t && v !== null && v !== undefined && !Number.isNaN(Number(v)))
      .map(([t, v]) => [Number(t), Number(v)])
      .sort((a, b) => a[0] - b[0]),
  }));
  const all = clean.flatMap((s) => s.points);
  const figure = h("figure", { class: "chart", "data-testid": testid });
  const caption = h("figcaption", {}, `${title} (${unit})`);
  if (!all.length) {
    figure.append(caption, h("p", { class: "muted" }, "no data yet"));
    if (note) figure.append(note);
    return figure;
  }
  let t0 = Math.min(...all.map((p) => p[0]));
  let t1 = Math.max(...all.map((p) => p[0]));
  if (t1 === t0) {
    t0 -= 30;
    t1 += 30;
  }
  const vmax = Math.max(...all.map((p) => p[1])) * 1.1 || 1;
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + ((t - t0) / (t1 - t0)) * plotW;
  const y = (v) => PAD.top + plotH - (v / vmax) * plotH;
  const latest = clean
    .filter((s) => s.points.length)
    .map((s) => `${s.name} ${sig(s.points[s.points.length - 1][1])} ${unit}`)
    .join(", ");
  const chart = svg(
    "svg",
    {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-label": `${title}: latest ${latest}`,
      class: "chart-svg",
    },
    svg("title", {}, `${title}: latest ${latest}`),
  );
  for (const frac of [0, 0.5, 1]) {
    const v = vmax * frac;
    chart.append(
      svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, sig(v)),
    );
  }
  // Over a day: month-day and minutes; within one: the time of day.
  const stamp = (t) => (t1 - t0 > 86400 ? when(t).slice(5, 16) : when(t).slice(11));
  chart.append(
    svg("text", { x: PAD.left, y: HEIGHT - 6, class: "axis" }, stamp(t0)),
    svg("text", { x: WIDTH - PAD.right, y: HEIGHT - 6, "text-anchor": "end", class: "axis" },
      stamp(t1) + " UTC"),
  );
  for (const s of clean) {
    if (!s.points.length) continue;
    const d = s.points.map(([t, v], i) => {
      const jump = i === 0 || (gapS !== null && t - s.points[i - 1][0] > gapS);
      return `${jump ? "M" : "L"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
    });
    const cls = `line series-${s.index}${s.dashed ? " dashed" : ""}`;
    chart.append(svg("path", { d: d.join(" "), class: cls, "data-series": s.name }));
    if (s.points.length === 1) {
      const [t, v] = s.points[0];
      chart.append(svg("circle", { cx: x(t), cy: y(v), r: 3, class: `dot series-${s.index}` }));
    }
  }
  const legend = h(
    "ul",
    { class: "legend" },
    clean.filter((s) => s.legend !== false).map((s) => h("li", { class: `series-${s.index}` }, s.name)),
  );
  figure.append(caption, chart, legend);
  if (note) figure.append(note);
  return figure;
}
