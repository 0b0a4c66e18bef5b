// The fleet report (#/report): inference cost per profile (or device) × model from stored
// telemetry beside on-device benchmarks, the page form of `edgefleet report`.

import { api } from "../api.js";
import { h, num, table } from "../util.js";

// Windows offered (the API's `since` durations; "" = everything stored).
const WINDOWS = [
  ["1h", "last hour"],
  ["24h", "last 24 h"],
  ["7d", "last 7 days"],
  ["", "all stored"],
];
// The operator's choices; kept across the 2 s re-renders.
const choice = { by: "profile", since: "24h" };

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
  );
}

/** The report page. */
export const view = {
  async load() {
    const params = new URLSearchParams({ by: choice.by });
    if (choice.since) params.set("since", choice.since);
    const report = await api(`/report?${params}`);
    return { rows: report.rows || [], by: choice.by, since: choice.since };
  },

  render({ rows, by }, ctx) {
    return h(
      "div",
      { "data-testid": "page-report" },
      h("h1", {}, "Fleet report"),
      h("p", { class: "muted" }, "Served inferences from device telemetry, beside the on-device benchmark (`edgefleet report`)."),
      controls(ctx),
      table(
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
      ),
    );
  },
};
