// The fleet report (#/report): inference cost per profile (or device) × model from stored
// telemetry beside on-device benchmarks, the page form of `edgefleet report`.

import { api } from "../api.js";
import { lineChart } from "../charts.js";
import { h, num, section, table } from "../util.js";

// Windows offered (the API's `since` durations; "" = everything stored).
const WINDOWS = [
  ["1h", "last hour"],
  ["24h", "last 24 h"],
  ["7d", "last 7 days"],
  ["", "all stored"],
];
// Lines of the fleet charts: one per profile × model, per profile, or per model.
const LINES = [
  ["profile_model", "profile × model"],
  ["profile", "profile"],
  ["model", "model"],
];
// The operator's choices; kept across the 2 s re-renders.
const choice = { by: "profile", since: "24h", lines: "profile_model" };
// The series are re-read at most this often (ms): a bucket is a minute or wider, and the query
// reads every stored row of the window.
const SERIES_MAX_AGE_MS = 15000;
let seriesCache = { key: null, at: 0, data: null };

/** /report/series for the current window and lines, from the cache while it is fresh. */
async function loadSeries() {
  const params = new URLSearchParams({ by: choice.lines, since: choice.since || "all" });
  const key = params.toString();
  if (seriesCache.key === key && Date.now() - seriesCache.at < SERIES_MAX_AGE_MS) return seriesCache.data;
  const data = await api(`/report/series?${params}`);
  seriesCache = { key, at: Date.now(), data };
  return data;
}

function controls(ctx) {
  const select = (testid, label, value, options, key) =>
    h(
      "label",
      {},
      `${label} `,
      h(
        "select",
        {
          "data-testid": testid,
          onchange: (event) => {
            choice[key] = event.target.value;
            ctx.refresh();
          },
        },
        options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
      ),
    );
  return h(
    "form",
    { class: "filters", onsubmit: (event) => event.preventDefault() },
    select("report-by", "Per", choice.by, [["profile", "profile"], ["device", "device"]], "by"),
    select("report-since", "Window", choice.since, WINDOWS, "since"),
    select("report-lines", "Chart lines per", choice.lines, LINES, "lines"),
  );
}

/** Latency p50 (solid) / p95 (dashed), power and energy per inference: one colour per series. */
function fleetCharts(data) {
  const series = data.series || [];
  const gapS = (data.bucket_s || 60) * 1.5;
  const values = (s, key) => s.points.map((p) => [p.ts, p[key]]);
  const width = data.bucket_s >= 3600 ? `${data.bucket_s / 3600} h` : `${data.bucket_s / 60} min`;
  const note = h(
    "p",
    { class: "muted chart-note", "data-testid": "series-note" },
    `${width} buckets; p50 solid, p95 dashed`,
    data.omitted ? `; ${data.omitted} less-served series not drawn` : "",
  );
  return h(
    "div",
    { class: "charts", "data-testid": "fleet-charts" },
    lineChart({
      title: "Latency p50 / p95",
      unit: "ms",
      testid: "fleet-chart-latency",
      gapS,
      note,
      series: series.flatMap((s, i) => [
        { name: s.key, color: i, points: values(s, "p50_ms") },
        { name: `${s.key} p95`, color: i, dashed: true, legend: false, points: values(s, "p95_ms") },
      ]),
    }),
    lineChart({
      title: "Power",
      unit: "W",
      testid: "fleet-chart-power",
      gapS,
      series: series.map((s, i) => ({ name: s.key, color: i, points: values(s, "power_w") })),
    }),
    lineChart({
      title: "Energy per inference",
      unit: "mJ",
      testid: "fleet-chart-energy",
      gapS,
      series: series.map((s, i) => ({ name: s.key, color: i, points: values(s, "energy_mj_per_inference") })),
    }),
  );
}

/** The report page. */
export const view = {
  async load() {
    const params = new URLSearchParams({ by: choice.by });
    if (choice.since) params.set("since", choice.since);
    const [report, series] = await Promise.all([api(`/report?${params}`), loadSeries()]);
    return { rows: report.rows || [], series, by: choice.by, since: choice.since };
  },

  render({ rows, series, by }, ctx) {
    return h(
      "div",
      { "data-testid": "page-report" },
      h("h1", {}, "Fleet report"),
      h("p", { class: "muted" }, "Served inferences from device telemetry, beside the on-device benchmark (`edgefleet report`)."),
      controls(ctx),
      section("Over time", "fleet-series", fleetCharts(series)),
      section("Per profile and model", "report-rows", table(
        null,
        [by === "device" ? "Device" : "Profile", "Model", "Devices", "Inferences", "p50 ms", "p95 ms", "p99 ms", "Power W", "mJ/inference", "Peak RSS MB", "Errors", "Bench p50 ms"],
        rows.map((r) => ({
          attrs: { "data-testid": `report-row-${r[by]}-${r.model}` },
          cells: [
            r[by],
            h("code", {}, r.model),
            r.devices,
            r.inferences ?? "-",
            num(r.p50_ms, 3),
            num(r.p95_ms, 3),
            num(r.p99_ms, 3),
            [num(r.mean_power_w, 2), r.power_estimated ? " (est.)" : ""].join(""),
            num(r.energy_mj_per_inference, 3),
            num(r.peak_rss_mb, 1),
            r.errors ?? 0,
            num(r.bench_p50_ms, 3),
          ],
        })),
        { "data-testid": "report-table" },
      )),
    );
  },
};
