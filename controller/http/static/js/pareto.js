// A selection decision as a Pareto chart: p95 latency (x) against energy per inference (y),
// marker area = artifact size, the front and the chosen candidate marked. The front and the
// verdicts come from the server's decision (controller/fleet/rollout/decide.py); nothing is
// re-judged here.

import { svg } from "./charts.js";
import { bytes, h, listOf, sig } from "./util.js";

const WIDTH = 420;
const HEIGHT = 260;
const PAD = { left: 66, right: 16, top: 14, bottom: 40 };
// Marker radius (px) of the smallest and the largest artifact.
const R_MIN = 5;
const R_MAX = 14;

/** [lo, hi] around the values with 10 % room, never below 0; a flat range gets width. */
function span(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.1 || 1;
  lo = Math.max(0, lo - pad);
  hi += pad;
  return [lo, hi];
}

/**
 * The chart of one decision. `sizes` maps sha256 -> artifact bytes (the model's candidates);
 * a candidate's host numbers are the fallback, and without either every marker is one size.
 */
export function paretoChart(decision, sizes = {}) {
  const explanation = decision.explanation || {};
  const front = new Set(listOf(explanation.front));
  const winner = decision.winner_rank ?? explanation.winner;
  const profile = decision.profile;
  const all = listOf(explanation.candidates);
  const plotted = all
    .filter((c) => c.metrics && Number.isFinite(Number(c.metrics.p95_ms)) && Number.isFinite(Number(c.metrics.energy_mj)))
    .map((c) => ({
      ...c,
      x: Number(c.metrics.p95_ms),
      y: Number(c.metrics.energy_mj),
      size: Number(sizes[c.sha256] ?? c.host?.size_bytes ?? NaN),
      front: front.has(c.rank),
      chosen: c.rank === winner,
    }));
  const left = all.filter((c) => !plotted.some((p) => p.rank === c.rank));
  const figure = h("figure", { class: "chart pareto", "data-testid": `pareto-${profile}` });
  const caption = h("figcaption", {}, `Profile ${profile}: p95 latency vs energy per inference`);
  if (!plotted.length) {
    figure.append(caption, h("p", { class: "muted" }, "no candidate measured on a canary yet"));
    return figure;
  }
  const [x0, x1] = span(plotted.map((p) => p.x));
  const [y0, y1] = span(plotted.map((p) => p.y));
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const x = (v) => PAD.left + ((v - x0) / (x1 - x0)) * plotW;
  const y = (v) => PAD.top + plotH - ((v - y0) / (y1 - y0)) * plotH;
  const sized = plotted.filter((p) => Number.isFinite(p.size) && p.size > 0);
  const biggest = Math.max(1, ...sized.map((p) => p.size));
  const radius = (p) => (Number.isFinite(p.size) && p.size > 0
    ? R_MIN + (R_MAX - R_MIN) * Math.sqrt(p.size / biggest)
    : R_MIN + 2);
  const chosen = plotted.find((p) => p.chosen);
  const text = plotted
    .map((p) => `${p.label} ${p.verdict}${p.front ? " (front)" : ""}: p95 ${sig(p.x)} ms, ${sig(p.y)} mJ`)
    .join("; ");
  const chart = svg(
    "svg",
    { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "chart-svg", "aria-label": text },
    svg("title", {}, `Pareto front of profile ${profile}: ${text}`),
  );
  for (const frac of [0, 0.5, 1]) {
    const vy = y0 + (y1 - y0) * frac;
    const vx = x0 + (x1 - x0) * frac;
    chart.append(
      svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(vy), y2: y(vy), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: y(vy) + 4, "text-anchor": "end", class: "axis" }, sig(vy)),
      svg("text", { x: x(vx), y: HEIGHT - PAD.bottom + 14, "text-anchor": "middle", class: "axis" }, sig(vx)),
    );
  }
  chart.append(
    svg("text", { x: PAD.left + plotW / 2, y: HEIGHT - 6, "text-anchor": "middle", class: "axis" }, "p95 latency (ms), lower is better"),
    svg("text", { x: 12, y: PAD.top + plotH / 2, "text-anchor": "middle", class: "axis", transform: `rotate(-90 12 ${PAD.top + plotH / 2})` }, "energy (mJ/inference)"),
  );
  // The front, joined in latency order (it is over p95, energy, memory and accuracy drop, so
  // a point on it may look dominated in this plane: it wins on memory or accuracy).
  const onFront = plotted.filter((p) => p.front).sort((a, b) => a.x - b.x || a.y - b.y);
  if (onFront.length > 1) {
    const d = onFront.map((p, i) => `${i ? "L" : "M"}${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`).join(" ");
    chart.append(svg("path", { d, class: "pareto-front", "data-testid": `pareto-front-${profile}` }));
  }
  for (const p of [...plotted].sort((a, b) => b.size - a.size)) {
    const tip = `${p.label}: ${p.verdict}${p.front ? ", on the Pareto front" : ""}${p.chosen ? ", chosen" : ""}; ` +
      `p95 ${sig(p.x)} ms, ${sig(p.y)} mJ/inference, peak RSS ${sig(p.metrics.peak_rss_mb)} MB, ` +
      `size ${Number.isFinite(p.size) ? bytes(p.size) : "unknown"}`;
    const circle = svg("circle", {
      cx: x(p.x).toFixed(1),
      cy: y(p.y).toFixed(1),
      r: radius(p).toFixed(1),
      class: `pareto-point ${p.front ? "front" : "off-front"}`,
      "data-testid": `pareto-point-${profile}-${p.rank}`,
      "data-front": String(p.front),
      "data-chosen": String(p.chosen),
      "data-verdict": p.verdict || "",
    });
    circle.appendChild(svg("title", {}, tip));
    chart.append(
      circle,
      svg("text", { x: (x(p.x) + radius(p) + 3).toFixed(1), y: (y(p.y) + 4).toFixed(1), class: "pareto-label" }, `#${p.rank}`),
    );
  }
  if (chosen) {
    chart.append(svg("circle", {
      cx: x(chosen.x).toFixed(1),
      cy: y(chosen.y).toFixed(1),
      r: (radius(chosen) + 4).toFixed(1),
      class: "pareto-chosen",
      "data-testid": `pareto-chosen-${profile}`,
    }));
  }
  const legend = h(
    "p",
    { class: "muted chart-note" },
    `filled blue: on the Pareto front (${onFront.length}); green ring: chosen${chosen ? ` (${chosen.label})` : ": none"}; ` +
      `marker area: artifact size${sized.length ? "" : " (unknown here)"}. ` +
      "The front is over latency, energy, memory and accuracy drop.",
    left.length ? ` Not plotted (no canary numbers): ${left.map((c) => `${c.label || `#${c.rank}`} ${c.verdict || ""}`.trim()).join(", ")}.` : "",
  );
  figure.append(caption, chart, legend);
  return figure;
}
