// Fleet overview (#/): fleet-wide counts, then one page of devices searched, filtered and paged
// by the server (GET /devices?q=&profile=&state=&online=&limit=&offset=), so 10,000 devices
// cost one page of rows in the browser.

import { api } from "../api.js";
import { modelLabels, modelText } from "../labels.js";
import { ago, badge, clockTick, h, section, table, when } from "../util.js";

// Rows per page: a screenful or two; the server caps a page at 1000.
const PAGE = 50;
// Typing pause (ms) before the search is sent: one request per word, not per key.
const SEARCH_DEBOUNCE_MS = 250;

// The operator's current search, filters and page; kept across the 2 s re-renders.
const query = { q: "", profile: "", state: "", online: "", offset: 0 };
// Whether the search box had focus (and where its caret was) when the view was re-rendered.
let searchFocus = null;
let searchTimer = null;

function params() {
  const p = new URLSearchParams({ limit: String(PAGE), offset: String(query.offset) });
  for (const key of ["q", "profile", "state", "online"]) {
    if (query[key]) p.set(key, query[key]);
  }
  return p.toString();
}

/** Change the query (a filter resets to the first page) and reload the view. */
function update(ctx, changes) {
  Object.assign(query, { offset: 0 }, changes);
  ctx.refresh();
}

function select(testid, label, value, options, onchange) {
  return h(
    "label",
    {},
    `${label} `,
    h(
      "select",
      { "data-testid": testid, onchange },
      options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
    ),
  );
}

function controls(summary, ctx) {
  const search = h("input", {
    type: "search",
    placeholder: "device id contains…",
    "aria-label": "Search devices by id",
    "data-testid": "device-search",
    value: query.q,
    maxlength: 64,
    onfocus: (event) => {
      searchFocus = { start: event.target.selectionStart, end: event.target.selectionEnd };
    },
    oninput: (event) => {
      const input = event.target;
      searchFocus = { start: input.selectionStart, end: input.selectionEnd };
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => update(ctx, { q: input.value.trim() }), SEARCH_DEBOUNCE_MS);
    },
    onblur: () => {
      searchFocus = null;
    },
  });
  if (searchFocus) {
    const caret = searchFocus;
    requestAnimationFrame(() => {
      if (!search.isConnected) return;
      search.focus({ preventScroll: true });
      search.setSelectionRange(caret.start, caret.end);
    });
  }
  const profiles = Object.keys(summary.by_profile || {}).sort();
  const states = Object.keys(summary.by_state || {}).sort();
  return h(
    "form",
    {
      class: "filters",
      role: "search",
      "data-testid": "device-filters",
      onsubmit: (event) => {
        event.preventDefault();
        clearTimeout(searchTimer);
        update(ctx, { q: search.value.trim() });
      },
    },
    search,
    select("filter-profile", "Profile", query.profile, [["", "all"], ...profiles.map((p) => [p, p])], (e) =>
      update(ctx, { profile: e.target.value }),
    ),
    select("filter-state", "State", query.state, [["", "all"], ...states.map((s) => [s, s])], (e) =>
      update(ctx, { state: e.target.value }),
    ),
    select(
      "filter-online",
      "Connection",
      query.online,
      [
        ["", "all"],
        ["true", "online"],
        ["false", "offline"],
      ],
      (e) => update(ctx, { online: e.target.value }),
    ),
  );
}

function pager(page, ctx) {
  const first = page.total ? page.offset + 1 : 0;
  const last = page.offset + page.items.length;
  const fmt = (n) => n.toLocaleString("en-US");
  const text =
    page.items.length === page.total
      ? `showing ${fmt(page.total)} of ${fmt(page.total)}`
      : `showing ${fmt(first)}–${fmt(last)} of ${fmt(page.total)}`;
  return h(
    "div",
    { class: "pager" },
    h(
      "button",
      {
        type: "button",
        "data-testid": "page-prev",
        disabled: page.offset === 0,
        onclick: () => {
          query.offset = Math.max(0, page.offset - PAGE);
          ctx.refresh();
        },
      },
      "‹ Previous",
    ),
    h("span", { "data-testid": "device-paging", "aria-live": "polite" }, text),
    h(
      "button",
      {
        type: "button",
        "data-testid": "page-next",
        disabled: last >= page.total,
        onclick: () => {
          query.offset = page.offset + PAGE;
          ctx.refresh();
        },
      },
      "Next ›",
    ),
  );
}

/** The overview's page: fleet summary, filters and one page of devices. */
export const view = {
  async load() {
    const [page, labels] = await Promise.all([api(`/devices?${params()}`), modelLabels()]);
    if (page.total && page.offset >= page.total) {
      // The fleet shrank under the current page: go to the last page that exists.
      query.offset = Math.max(0, Math.floor((page.total - 1) / PAGE) * PAGE);
      return view.load();
    }
    return { page, labels, tick: clockTick() };
  },

  render({ page, labels }, ctx) {
    const summary = page.summary;
    const summaryCards = h(
      "dl",
      { class: "cards", "data-testid": "fleet-summary" },
      h("div", {}, h("dt", {}, "Devices"), h("dd", { "data-testid": "count-devices" }, summary.devices)),
      h("div", {}, h("dt", {}, "Online"), h("dd", { "data-testid": "count-online" }, summary.online)),
      h(
        "div",
        {},
        h("dt", {}, "Offline"),
        h("dd", { "data-testid": "count-offline" }, summary.devices - summary.online),
      ),
    );
    const byProfile = table(
      "Devices per profile",
      ["Profile", "Devices", "Online", "Offline"],
      Object.entries(summary.by_profile)
        .sort()
        .map(([name, c]) => ({
          attrs: { "data-testid": `profile-count-${name}` },
          cells: [name, c.total, c.online, c.total - c.online],
        })),
      { class: "compact" },
    );
    const byState = table(
      "Devices per state",
      ["State", "Devices"],
      Object.entries(summary.by_state)
        .sort()
        .map(([name, n]) => ({
          attrs: { "data-testid": `state-count-${name}` },
          cells: [badge(name), n],
        })),
      { class: "compact" },
    );
    const rows = table(
      null,
      ["Device", "Profile", "Online", "State", "Model", "Agent", "Last seen"],
      page.items.map((d) => ({
        attrs: { "data-testid": `device-row-${d.id}` },
        cells: [
          h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id),
          d.profile || "(none)",
          h(
            "span",
            { class: d.online ? "online" : "offline", "data-testid": `device-online-${d.id}` },
            d.online ? "online" : "offline",
          ),
          badge(d.state, `device-state-${d.id}`),
          h("code", { "data-testid": `device-model-${d.id}` }, modelText(d.model_sha256, labels)),
          d.agent_version || "-",
          h("time", { title: when(d.last_seen) }, ago(d.last_seen)),
        ],
      })),
      { "data-testid": "device-table", class: "devices" },
    );
    const empty = summary.devices === 0;
    return h(
      "div",
      { "data-testid": "page-overview" },
      h("h1", {}, "Fleet"),
      summaryCards,
      h("div", { class: "row" }, byProfile, byState),
      section(
        "Devices",
        "devices",
        empty ? h("p", {}, "No devices registered.") : [controls(summary, ctx), pager(page, ctx), rows],
      ),
    );
  },
};
