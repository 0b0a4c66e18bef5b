// Models (#/models) and one version (#/models/{ref}): variants, candidates, the selection.

import { api, seg } from "../api.js";
import { badge, bytes, h, listOf, num, section, short, table, when } from "../util.js";
import { decisionTable } from "./rollouts.js";

/** Every registered model version. */
export const listView = {
  async load() {
    return { models: listOf(await api("/models"), "models") };
  },

  render({ models }) {
    return h(
      "div",
      { "data-testid": "page-models" },
      h("h1", {}, "Models"),
      table(
        null,
        ["Model", "Version", "Profiles", "Source", "Registered (UTC)"],
        models.map((m) => {
          const ref = `${m.name}:${m.version}`;
          return {
            attrs: { "data-testid": `model-row-${ref}` },
            cells: [
              h("a", { href: `#/models/${encodeURIComponent(ref)}` }, m.name),
              m.version,
              listOf(m.profiles).join(", ") || "-",
              m.source || "-",
              when(m.created),
            ],
          };
        }),
        { "data-testid": "model-table" },
      ),
    );
  },
};

function hostCells(c) {
  const host = c.host || {};
  return [
    num(host.latency_ms, 3) + (host.latency_source ? ` (${host.latency_source})` : ""),
    num(host.accuracy_drop_points, 2),
    num(host.top1_agreement, 3),
    num(host.snr_db, 1),
  ];
}

/** Every output of every candidate, as the host measured it (the worst one decided). */
function outputsTable(profile, own) {
  const rows = own.flatMap((c) =>
    listOf(c.host?.outputs).map((o) => ({
      attrs: { "data-testid": `output-${profile}-${c.rank}-${o.index}` },
      cells: [
        `#${c.rank} ${c.recipe}`,
        `${o.index} ${o.name}`,
        listOf(o.shape).join("×") || "scalar",
        o.kind,
        num(o.snr_db, 1),
        num(o.cosine, 6),
        num(o.max_abs_error, 4),
        o.top1_agreement == null ? "-" : num(100 * o.top1_agreement, 1),
        o.flat ? "flat fp32 reference: not judged" : "",
      ],
    })),
  );
  if (!rows.length) return null;
  return table(
    `Outputs, profile ${profile}`,
    ["Candidate", "Output", "Shape", "Kind", "SNR dB", "Cosine", "Max abs error", "Top-1 %", "Note"],
    rows,
    { "data-testid": `outputs-${profile}` },
  );
}

function variants(model, candidates) {
  const profiles = [
    ...new Set([...listOf(model.artifacts).map((a) => a.profile || "*"), ...candidates.map((c) => c.profile)]),
  ].sort();
  return profiles.map((profile) => {
    const own = candidates.filter((c) => c.profile === profile);
    const artifact = listOf(model.artifacts).find((a) => (a.profile || "*") === profile);
    const rows = own.length
      ? own.map((c) => ({
          attrs: { class: c.rank === 1 ? "winner" : "" },
          cells: [
            c.rank,
            c.recipe,
            c.threads ?? "NPU",
            h("code", {}, short(c.sha256)),
            bytes(c.size ?? c.host?.size_bytes),
            ...hostCells(c),
            c.host?.reason || (c.rank === 1 ? "the converter's selection" : ""),
          ],
        }))
      : [
          {
            cells: [
              "1",
              artifact?.recipe || "-",
              "-",
              h("code", {}, short(artifact?.sha256)),
              bytes(artifact?.size),
              "-",
              "-",
              "-",
              "-",
              "the only variant registered for this profile",
            ],
          },
        ];
    return [
      table(
        `Profile ${profile}`,
        ["Rank", "Recipe", "Threads", "Artifact", "Size", "Host latency ms", "Accuracy drop (points)", "Top-1 agreement", "Min SNR dB", "Why"],
        rows,
        { "data-testid": `variants-${profile}` },
      ),
      outputsTable(profile, own),
    ];
  }).flat().filter(Boolean);
}

/** One model version with its candidates and the newest selection's explanation. */
export const detailView = {
  async load(ref) {
    const [model, explain] = await Promise.all([
      api(`/models/${seg(ref)}`),
      api(`/models/${seg(ref)}/explain`).catch((e) => ({ error: e.message })),
    ]);
    return { model, explain };
  },

  render({ model, explain }) {
    const ref = `${model.name}:${model.version}`;
    const candidates = listOf(model.candidates).length ? listOf(model.candidates) : listOf(explain.candidates);
    const decisions = listOf(explain.decisions);
    const sizes = Object.fromEntries(candidates.map((c) => [c.sha256, c.size ?? c.host?.size_bytes]));
    return h(
      "div",
      { "data-testid": "page-model" },
      h("p", { class: "crumbs" }, h("a", { href: "#/models" }, "Models"), " / ", ref),
      h("h1", {}, `Model ${ref}`),
      h("p", { class: "muted" }, `registered ${when(model.created)} UTC`, model.source ? ` from ${model.source}` : ""),
      section("Variants per profile", "variants", variants(model, candidates)),
      section(
        "Selection on the fleet",
        "explain",
        explain.error ? h("p", { class: "muted" }, `no explanation: ${explain.error}`) : null,
        explain.rollout
          ? h(
              "p",
              {},
              "Measured in rollout ",
              h("a", { href: `#/rollouts/${encodeURIComponent(explain.rollout.id)}` }, explain.rollout.id),
              " ",
              badge(explain.rollout.state),
            )
          : h("p", { class: "muted" }, "No rollout has measured candidates of this version yet."),
        decisions.map((d) => decisionTable(d, sizes)),
        listOf(explain.fell_back).length
          ? table(
              "Devices that fell back",
              ["Device", "Message"],
              explain.fell_back.map((f) => [f.device_id, f.message]),
            )
          : null,
        listOf(explain.outliers).length
          ? table(
              "Outliers",
              ["Device", "State", "Reason"],
              explain.outliers.map((o) => [o.device_id, badge(o.state), o.reason]),
            )
          : null,
      ),
    );
  },
};
