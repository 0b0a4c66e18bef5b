// Rollouts (#/rollouts) and one rollout (#/rollouts/{id}): waves, devices, gates, selection.

import { api, seg } from "../api.js";
import { modelLabels, modelText } from "../labels.js";
import { paretoChart } from "../pareto.js";
import { badge, h, listOf, num, section, short, table, when } from "../util.js";

// Gate metric -> benchmark report field (controller/fleet/rollout/policy.py GATE_METRICS, REGRESSION_METRICS).
const GATE_FIELDS = {
  p50_ms: "p50_ms",
  p90_ms: "p90_ms",
  p95_ms: "p95_ms",
  p99_ms: "p99_ms",
  mean_ms: "mean_ms",
  peak_rss_mb: "peak_rss_mb",
  power_w: "power_w",
  energy_mj: "energy_mj_per_inference",
  p50_regression: "p50_ms",
  p95_regression: "p95_ms",
};

/** "p95_ms<=1000" / "p95_regression<=10%" -> {label, metric, field, limit, relative}. */
function parseGate(label) {
  const match = String(label).match(/^([a-z0-9_]+)<=([-0-9.e+]+)(%?)$/i);
  if (!match) return { label, metric: label, field: null, limit: null, relative: false };
  return {
    label,
    metric: match[1],
    field: GATE_FIELDS[match[1]] || null,
    limit: Number(match[2]),
    relative: match[3] === "%",
  };
}

function summary(counts) {
  return Object.entries(counts || {})
    .sort()
    .map(([s, n]) => `${n} ${s}`)
    .join(", ");
}

/** The rollout's outcome as a badge: the API's `outcome` (controller/fleet/rollout/outcome.py)
 * decides the text and, for a completed rollout, the colour: "completed with 10 failed" is
 * amber, "completed: all 4 failed" red, a clean "completed" green. Nothing is derived here. */
export function outcomeBadge(r, testid) {
  const o = r.outcome;
  if (!o) return badge(r.state, testid);
  const kind = r.state === "completed" ? o.result : r.state;
  return h(
    "span",
    {
      class: `badge state-${String(kind).replace(/[^a-z0-9_-]/gi, "_")}`,
      "data-testid": testid,
      "data-outcome": o.result,
      title: `${o.result}: ${o.done} of ${o.devices} done, ${o.updated} updated, ${o.failed} failed, ${o.skipped} skipped; ${summary(r.counts)}`,
    },
    o.label,
  );
}

/** The list of rollouts, newest first. */
export const listView = {
  async load() {
    return { rollouts: listOf(await api("/rollouts"), "rollouts") };
  },

  render({ rollouts }) {
    return h(
      "div",
      { "data-testid": "page-rollouts" },
      h("h1", {}, "Rollouts"),
      h("p", {}, h("a", { href: "#/rollouts/new", "data-testid": "start-rollout" }, "Start a rollout")),
      table(
        null,
        ["Rollout", "Kind", "Model", "Target", "Outcome", "Wave", "Devices", "Created (UTC)"],
        rollouts.map((r) => ({
          attrs: { "data-testid": `rollout-row-${r.id}` },
          cells: [
            h("a", { href: `#/rollouts/${encodeURIComponent(r.id)}` }, r.id),
            r.kind || "-",
            r.model ? h("a", { href: `#/models/${encodeURIComponent(r.model)}` }, r.model) : "-",
            r.target || "-",
            outcomeBadge(r, `rollout-state-${r.id}`),
            r.wave ?? "-",
            r.outcome ? `${r.outcome.done}/${r.outcome.devices} done: ${summary(r.counts)}` : summary(r.counts),
            when(r.created),
          ],
        })),
        { "data-testid": "rollout-table" },
      ),
    );
  },
};

function actions(r, ctx) {
  const base = `/rollouts/${seg(r.id)}`;
  const active = r.state === "running" || r.state === "paused";
  const button = (action, label, enabled, confirmText) =>
    h(
      "button",
      {
        type: "button",
        "data-testid": `action-${action}`,
        disabled: !enabled,
        class: action === "abort" || action === "rollback" ? "danger" : "",
        onclick: (event) => {
          if (confirmText && !window.confirm(confirmText)) return;
          event.target.disabled = true;
          ctx.act(`${base}/${action}`, `${label} ${r.id}`);
        },
      },
      label,
    );
  return h(
    "div",
    { class: "actions", role: "group", "aria-label": "Rollout actions" },
    button("pause", "Pause", r.state === "running"),
    button("resume", "Resume", r.state === "paused"),
    button("abort", "Abort", active, `Abort rollout ${r.id} and roll its devices back?`),
    button(
      "rollback",
      "Roll back",
      r.state !== "rolled_back",
      `Return every device of rollout ${r.id} to its previous model?`,
    ),
  );
}

function waves(r) {
  return table(
    null,
    ["Wave", "Size", "Devices", "Done", "Succeeded", "Failed", "Progress"],
    listOf(r.waves).map((w) => ({
      attrs: { "data-testid": `wave-row-${w.wave}`, class: w.wave === r.wave ? "current" : "" },
      cells: [
        w.wave,
        w.size,
        w.devices,
        w.done,
        w.succeeded,
        w.failed,
        h("progress", {
          max: w.devices || 1,
          value: w.done,
          "aria-label": `wave ${w.wave}: ${w.done} of ${w.devices} done`,
        }),
      ],
    })),
    { "data-testid": "wave-table" },
  );
}

function gateCell(gate, result) {
  if (!result || !gate.field || result[gate.field] === undefined) return "-";
  const value = Number(result[gate.field]);
  if (gate.relative) return num(value, 3);
  const over = value > gate.limit;
  return h("span", { class: over ? "over" : "within" }, `${num(value, 3)} ${over ? ">" : "≤"} ${gate.limit}`);
}

function devices(r, gates, labels) {
  return table(
    null,
    ["Device", "Wave", "State", "Stage", "Attempts", "Model", "Threads", ...gates.map((g) => g.label), "Detail"],
    listOf(r.devices).map((d) => ({
      attrs: { "data-testid": `rollout-device-${d.device_id}` },
      cells: [
        h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id),
        d.wave,
        badge(d.state, `rollout-device-state-${d.device_id}`),
        d.stage || "-",
        d.attempts ?? "-",
        h("code", {}, modelText(d.artifact_sha256, labels)),
        d.threads ?? "-",
        ...gates.map((g) => gateCell(g, d.result)),
        [d.detail || "", d.outlier ? ` (outlier: ${d.outlier})` : "", d.fell_back ? ` (fell back: ${d.fell_back})` : ""].join(""),
      ],
    })),
    { "data-testid": "rollout-devices" },
  );
}

function trials(r) {
  if (!listOf(r.trials).length) return null;
  return section(
    "Candidate trials",
    "trials",
    table(
      null,
      ["Profile", "Device", "Rank", "Artifact", "Threads", "State", "p95 ms", "Peak RSS MB", "mJ/inference", "Detail"],
      r.trials.map((t) => [
        t.profile,
        t.device_id,
        t.rank,
        h("code", {}, short(t.sha256)),
        t.threads ?? "-",
        badge(t.state),
        num(t.result?.p95_ms, 3),
        num(t.result?.peak_rss_mb, 1),
        num(t.result?.energy_mj_per_inference, 3),
        [t.detail || "", t.outlier ? ` (outlier: ${t.outlier})` : ""].join(""),
      ]),
    ),
  );
}

/** One decision: its Pareto chart beside the candidates with verdicts (shared with the model
 * page, which passes `sizes`, sha256 -> artifact bytes, for the markers). */
export function decisionTable(decision, sizes = {}) {
  const explanation = decision.explanation || {};
  return h(
    "div",
    { class: "decision", "data-testid": `decision-${decision.profile}` },
    h(
      "h3",
      {},
      `Profile ${decision.profile}: `,
      decision.winner_rank ? `rank ${decision.winner_rank} won` : "no winner",
      decision.fallback_rank ? `, rank ${decision.fallback_rank} is the fallback` : "",
    ),
    paretoChart(decision, sizes),
    table(
      null,
      ["Rank", "Candidate", "Verdict", "p95 ms", "Peak RSS MB", "mJ/inference", "Accuracy drop", "Why"],
      listOf(explanation.candidates).map((c) => ({
        attrs: { class: c.verdict === "won" ? "winner" : "" },
        cells: [
          c.rank,
          c.label || c.recipe || "-",
          badge(c.verdict),
          num(c.metrics?.p95_ms, 3),
          num(c.metrics?.peak_rss_mb, 1),
          num(c.metrics?.energy_mj, 3),
          num(c.metrics?.accuracy_drop, 2),
          c.why || "",
        ],
      })),
    ),
    listOf(explanation.notes).length
      ? h("ul", { class: "notes" }, explanation.notes.map((n) => h("li", {}, n)))
      : null,
  );
}

/** One rollout with its controls. */
export const detailView = {
  async load(id) {
    const [rollout, labels] = await Promise.all([api(`/rollouts/${seg(id)}`), modelLabels()]);
    return { rollout, labels };
  },

  render({ rollout: r, labels }, ctx) {
    const policy = r.policy || {};
    const gates = listOf(policy.gates).map(parseGate);
    const decisions = listOf(r.decisions);
    return h(
      "div",
      { "data-testid": "page-rollout" },
      h("p", { class: "crumbs" }, h("a", { href: "#/rollouts" }, "Rollouts"), " / ", r.id),
      h("h1", {}, `Rollout ${r.id} `, outcomeBadge(r, "rollout-state")),
      h(
        "dl",
        { class: "facts" },
        [
          ["Model", r.model ? h("a", { href: `#/models/${encodeURIComponent(r.model)}` }, r.model) : "-"],
          ["Target", r.target || "-"],
          ["Kind", r.kind || "-"],
          ["Phase", h("span", { "data-testid": "rollout-phase" }, r.phase || "-")],
          ["Current wave", r.wave ?? "-"],
          ["Devices", h("span", { "data-testid": "rollout-counts" }, summary(r.counts) || "-")],
          ["Reason", h("span", { "data-testid": "rollout-reason" }, r.reason || "-")],
          ["Created", `${when(r.created)} UTC`],
          ["Updated", `${when(r.updated)} UTC`],
        ].map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))),
      ),
      actions(r, ctx),
      section("Waves", "waves", waves(r)),
      section(
        "Policy",
        "policy",
        h(
          "ul",
          { class: "policy" },
          h("li", {}, `Waves: ${listOf(policy.waves).join(", ") || "-"}`),
          h("li", {}, `Max failures: ${policy.max_failures ?? "-"}`),
          h("li", {}, `Gates: ${gates.map((g) => g.label).join(", ") || "none"}`),
          h("li", {}, `Device timeout: ${policy.device_timeout_s ?? "-"} s, retries ${policy.retries ?? "-"}`),
          policy.candidates
            ? h("li", {}, `Candidates: top ${policy.candidates} on ${policy.canaries} canary(ies), objective ${policy.objective}${policy.fallback ? ", with fallback" : ""}`)
            : null,
        ),
      ),
      section("Devices and gates", "rollout-devices-section", devices(r, gates, labels)),
      trials(r),
      decisions.length ? section("Decisions", "decisions", decisions.map((d) => decisionTable(d))) : null,
    );
  },
};
