// Fleet overview (#/): devices by profile with state, model and last seen; counts.

import { api } from "../api.js";
import { modelLabels, modelText } from "../labels.js";
import { ago, badge, clockTick, h, listOf, section, table, when } from "../util.js";

/** The overview's page: devices and model labels. */
export const view = {
  async load() {
    const [devices, labels] = await Promise.all([
      api("/devices").then((d) => listOf(d, "devices")),
      modelLabels(),
    ]);
    return { devices, labels, tick: clockTick() };
  },

  render({ devices, labels }) {
    const profiles = {};
    const states = {};
    for (const d of devices) {
      const p = (profiles[d.profile || "(none)"] ||= { total: 0, online: 0, offline: 0 });
      p.total += 1;
      p[d.online ? "online" : "offline"] += 1;
      states[d.state || "unknown"] = (states[d.state || "unknown"] || 0) + 1;
    }
    const online = devices.filter((d) => d.online).length;
    const summary = h(
      "dl",
      { class: "cards", "data-testid": "fleet-summary" },
      h("div", {}, h("dt", {}, "Devices"), h("dd", { "data-testid": "count-devices" }, devices.length)),
      h("div", {}, h("dt", {}, "Online"), h("dd", { "data-testid": "count-online" }, online)),
      h("div", {}, h("dt", {}, "Offline"), h("dd", { "data-testid": "count-offline" }, devices.length - online)),
    );
    const byProfile = table(
      "Devices per profile",
      ["Profile", "Devices", "Online", "Offline"],
      Object.entries(profiles)
        .sort()
        .map(([name, c]) => ({
          attrs: { "data-testid": `profile-count-${name}` },
          cells: [name, c.total, c.online, c.offline],
        })),
      { class: "compact" },
    );
    const byState = table(
      "Devices per state",
      ["State", "Devices"],
      Object.entries(states)
        .sort()
        .map(([name, n]) => ({
          attrs: { "data-testid": `state-count-${name}` },
          cells: [badge(name), n],
        })),
      { class: "compact" },
    );
    const groups = Object.keys(profiles)
      .sort()
      .map((profile) =>
        table(
          `Profile ${profile}`,
          ["Device", "Online", "State", "Model", "Agent", "Last seen"],
          devices
            .filter((d) => (d.profile || "(none)") === profile)
            .map((d) => ({
              attrs: { "data-testid": `device-row-${d.id}` },
              cells: [
                h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id),
                h(
                  "span",
                  { class: d.online ? "online" : "offline", "data-testid": `device-online-${d.id}` },
                  d.online ? "online" : "offline",
                ),
                badge(d.state, `device-state-${d.id}`),
                h(
                  "code",
                  { "data-testid": `device-model-${d.id}` },
                  modelText(d.model_sha256, labels),
                ),
                d.agent_version || "-",
                h("time", { title: when(d.last_seen) }, ago(d.last_seen)),
              ],
            })),
          { "data-testid": `devices-${profile}`, class: "devices" },
        ),
      );
    return h(
      "div",
      { "data-testid": "page-overview" },
      h("h1", {}, "Fleet"),
      summary,
      h("div", { class: "row" }, byProfile, byState),
      section("Devices", "devices", groups.length ? groups : h("p", {}, "No devices registered.")),
    );
  },
};
