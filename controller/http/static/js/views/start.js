// Start a rollout (#/rollouts/new): the options of `edgefleet rollout start`, POST /rollouts.

import { api, seg } from "../api.js";
import { h, listOf } from "../util.js";

// What the operator typed, kept across re-renders (the view re-renders when the models change).
const draft = {
  model: "",
  to: "all",
  waves: "10,50,100",
  max_failures: "5%",
  gates: "",
  device_timeout: "10m",
  candidates: 0,
  canaries: 1,
  fallback: false,
};

function field(label, name, input) {
  return h("label", { class: "field" }, h("span", {}, label), input);
}

function text(name, attrs = {}) {
  return h("input", {
    name,
    value: draft[name],
    "data-testid": `start-${name}`,
    oninput: (event) => {
      draft[name] = event.target.value;
    },
    ...attrs,
  });
}

/** The body of POST /rollouts from the draft (gates: one per line or comma-separated). */
function body() {
  return {
    model: draft.model,
    to: draft.to,
    waves: draft.waves,
    max_failures: draft.max_failures,
    gates: String(draft.gates)
      .split(/[\n,]/)
      .map((g) => g.trim())
      .filter(Boolean),
    device_timeout: draft.device_timeout,
    candidates: Number(draft.candidates) || 0,
    canaries: Number(draft.canaries) || 1,
    fallback: Boolean(draft.fallback),
  };
}

export const view = {
  async load() {
    return { models: listOf(await api("/models"), "models") };
  },

  render({ models }, ctx) {
    const refs = models.map((m) => `${m.name}:${m.version}`);
    if (!refs.includes(draft.model)) draft.model = refs[refs.length - 1] || "";
    const select = h(
      "select",
      {
        name: "model",
        "data-testid": "start-model",
        onchange: (event) => {
          draft.model = event.target.value;
        },
      },
      refs.map((ref) => h("option", { value: ref, selected: ref === draft.model }, ref)),
    );
    const form = h(
      "form",
      {
        "data-testid": "start-form",
        onsubmit: async (event) => {
          event.preventDefault();
          const submit = form.querySelector("button[type=submit]");
          submit.disabled = true;
          const started = await ctx.act("/rollouts", `Start ${draft.model}`, body());
          submit.disabled = false;
          if (started && started.id) location.hash = `#/rollouts/${seg(started.id)}`;
        },
      },
      field("Model", "model", select),
      field("Devices (all, profile:P, device:ID, glob)", "to", text("to")),
      field("Waves", "waves", text("waves")),
      field("Max failures", "max_failures", text("max_failures")),
      field(
        "Gates (one per line: p95_ms<=40, p95_regression<=10%)",
        "gates",
        h("textarea", {
          name: "gates",
          rows: 3,
          "data-testid": "start-gates",
          oninput: (event) => {
            draft.gates = event.target.value;
          },
        }, draft.gates),
      ),
      field("Device timeout", "device_timeout", text("device_timeout")),
      field("Candidates per profile (0 = no selection)", "candidates",
        text("candidates", { type: "number", min: 0 })),
      field("Canaries per profile", "canaries", text("canaries", { type: "number", min: 1 })),
      h(
        "label",
        { class: "field inline" },
        h("input", {
          type: "checkbox",
          name: "fallback",
          checked: draft.fallback,
          "data-testid": "start-fallback",
          onchange: (event) => {
            draft.fallback = event.target.checked;
          },
        }),
        " ship a fallback variant (needs candidates)",
      ),
      h("button", { type: "submit", "data-testid": "start-submit", disabled: !refs.length }, "Start"),
    );
    return h(
      "div",
      { "data-testid": "page-start" },
      h("p", {}, h("a", { href: "#/rollouts" }, "Rollouts"), " / new"),
      h("h1", {}, "Start a rollout"),
      refs.length ? null : h("p", { class: "muted" }, "No model registered yet (edgefleet models add)."),
      form,
    );
  },
};
