// One device (#/devices/{id}): facts, telemetry charts, benchmark and update history.

import { api, seg } from "../api.js";
import { lineChart } from "../charts.js";
import { modelLabels, modelText } from "../labels.js";
import { ago, badge, clockTick, generation, h, listOf, num, section, table, when } from "../util.js";

// Telemetry window choices (the API's `since` durations); the chosen one survives re-renders.
const WINDOWS = ["15m", "1h", "6h", "24h"];
let windowChoice = "1h";
// Enough points for a smooth chart, few enough to poll every 2 s (the API caps at 10,000).
const TELEMETRY_LIMIT = 1000;

function factList(d) {
  const facts = d.facts || {};
  const rows = [
    ["Profile", d.profile || "-"],
    ["Online", d.online ? "online" : "offline"],
    ["State", badge(d.state, "device-state")],
    ["Detail", d.status_detail || "-"],
    ["Agent", d.agent_version || "-"],
    ["Runtime", [d.runtime, d.runtime_version].filter(Boolean).join(" ") || "-"],
    [
      "Generation",
      [
        generation(d.reported_generation, "generation-reported"),
        " reported / ",
        generation(d.desired_generation, "generation-desired"),
        " desired",
      ],
    ],
    ["Last seen", `${ago(d.last_seen)} (${when(d.last_seen)} UTC)`],
  ];
  for (const key of ["machine", "cpu_count", "memory_mb", "os"]) {
    if (facts[key] !== undefined) rows.push([key, String(facts[key])]);
  }
  return h(
    "dl",
    { class: "facts", "data-testid": "device-facts" },
    rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))),
  );
}

function charts(records) {
  const series = (key) => records.map((r) => [r.ts, r[key]]);
  return h(
    "div",
    { class: "charts" },
    lineChart({
      title: "Latency",
      unit: "ms",
      series: [
        { name: "p50", points: series("p50_ms") },
        { name: "p95", points: series("p95_ms") },
      ],
      testid: "chart-latency",
    }),
    lineChart({
      title: "Memory (RSS)",
      unit: "MB",
      series: [{ name: "rss", points: series("rss_mb") }],
      testid: "chart-memory",
    }),
    lineChart({
      title: "Power",
      unit: "W",
      series: [{ name: "power", points: series("power_w") }],
      testid: "chart-power",
    }),
  );
}

/** The device page. */
export const view = {
  async load(id) {
    const [detail, telemetry, labels] = await Promise.all([
      api(`/devices/${seg(id)}`),
      api(`/devices/${seg(id)}/telemetry?since=${windowChoice}&limit=${TELEMETRY_LIMIT}`).catch((e) => ({ error: e.message })),
      modelLabels(),
    ]);
    return { detail, telemetry, labels, windowChoice, tick: clockTick() };
  },

  render({ detail, telemetry, labels }, ctx) {
    const d = detail.device || detail;
    const records = listOf(telemetry, "records");
    const benchmarks = listOf(detail, "benchmarks");
    const events = listOf(detail, "events");
    const updates = detail.updates ? listOf(detail.updates, "updates") : events.filter((e) => e.kind === "update");
    const picker = h(
      "label",
      { class: "window" },
      "Window ",
      h(
        "select",
        {
          "data-testid": "telemetry-window",
          onchange: (event) => {
            windowChoice = event.target.value;
            ctx.refresh();
          },
        },
        WINDOWS.map((w) => h("option", { value: w, selected: w === windowChoice }, `last ${w}`)),
      ),
    );
    return h(
      "div",
      { "data-testid": "page-device" },
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Fleet"), " / ", d.id),
      h("h1", {}, `Device ${d.id}`),
      h("p", {}, "Model ", h("code", { "data-testid": "device-model" }, modelText(d.model_sha256, labels))),
      factList(d),
      section(
        "Telemetry",
        "telemetry",
        picker,
        telemetry.error ? h("p", { class: "muted" }, `telemetry unavailable: ${telemetry.error}`) : null,
        h("p", { class: "muted" }, `${records.length} record(s)`),
        charts(records),
      ),
      section(
        "Benchmarks",
        "benchmarks",
        table(
          null,
          ["Time (UTC)", "Model", "Threads", "p50 ms", "p95 ms", "Peak RSS MB", "mJ/inference", "Power source", "Rollout"],
          benchmarks.map((b) => [
            when(b.ts),
            h("code", {}, modelText(b.model_sha256, labels)),
            b.threads ?? "-",
            num(b.p50_ms, 3),
            num(b.p95_ms, 3),
            num(b.peak_rss_mb, 1),
            num(b.energy_mj_per_inference, 3),
            b.power_source || "-",
            b.deployment_id ? h("a", { href: `#/rollouts/${encodeURIComponent(b.deployment_id)}` }, b.deployment_id) : "-",
          ]),
          { "data-testid": "benchmark-table" },
        ),
      ),
      section(
        "Update history",
        "updates",
        table(
          null,
          ["Time (UTC)", "Rollout", "Generation", "State", "Message"],
          updates.map((e) => [
            when(e.ts),
            e.deployment_id ? h("a", { href: `#/rollouts/${encodeURIComponent(e.deployment_id)}` }, e.deployment_id) : "-",
            generation(e.generation),
            badge(e.state),
            e.message || "",
          ]),
          { "data-testid": "update-table" },
        ),
      ),
      section(
        "Other events",
        "events",
        table(
          null,
          ["Time (UTC)", "Kind", "State", "Message"],
          events
            .filter((e) => e.kind !== "update")
            .map((e) => [when(e.ts), e.kind, badge(e.state), e.message || ""]),
        ),
      ),
    );
  },
};
