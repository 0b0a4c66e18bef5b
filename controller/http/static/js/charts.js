// Time-series line charts drawn as inline SVG (no chart library, nothing fetched).

import { h, num, when } from "./util.js";

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const HEIGHT = 180;
// Room for the y labels on the left and the time labels below.
const PAD = { left: 52, right: 12, top: 12, bottom: 26 };

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  for (const child of children) {
    if (child === null || child === undefined) continue;
    el.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return el;
}

/**
 * A figure with one SVG line chart: series = [{name, points: [[epochSeconds, value], ...]}].
 * Points with a missing value are skipped; the y axis starts at 0.
 */
export function lineChart({ title, unit, series, testid }) {
  const clean = series.map((s, i) => ({
    ...s,
    index: i,
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
    .map((s) => `${s.name} ${num(s.points[s.points.length - 1][1])} ${unit}`)
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
      svg("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, num(v)),
    );
  }
  chart.append(
    svg("text", { x: PAD.left, y: HEIGHT - 6, class: "axis" }, when(t0).slice(11)),
    svg("text", { x: WIDTH - PAD.right, y: HEIGHT - 6, "text-anchor": "end", class: "axis" },
      when(t1).slice(11) + " UTC"),
  );
  for (const s of clean) {
    if (!s.points.length) continue;
    const d = s.points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`);
    chart.append(svg("path", { d: d.join(" "), class: `line series-${s.index}` }));
    if (s.points.length === 1) {
      const [t, v] = s.points[0];
      chart.append(svg("circle", { cx: x(t), cy: y(v), r: 3, class: `dot series-${s.index}` }));
    }
  }
  const legend = h(
    "ul",
    { class: "legend" },
    clean.map((s) => h("li", { class: `series-${s.index}` }, s.name)),
  );
  figure.append(caption, chart, legend);
  return figure;
}
