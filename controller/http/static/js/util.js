// DOM building and number/time formatting shared by every view (text only, never innerHTML).

/** Build an element: h("td", {class: "x", "data-testid": "y"}, child, "text", [more]). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children (nodes, strings, numbers, nested arrays; null/undefined skipped). */
export function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
  return el;
}

/** A table with a caption, column headers and rows of cells (a cell may be a node). */
export function table(caption, headers, rows, attrs = {}) {
  const head = h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t))));
  const body = h(
    "tbody",
    {},
    rows.map((row) => {
      const { cells, attrs: rowAttrs } = Array.isArray(row) ? { cells: row, attrs: {} } : row;
      return h("tr", rowAttrs, cells.map((c) => h("td", {}, c)));
    }),
  );
  const t = h("table", attrs, caption ? h("caption", {}, caption) : null, head, body);
  if (!rows.length) {
    body.appendChild(h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "none")));
  }
  return t;
}

/** First 12 hex digits of a sha256, or "-". */
export function short(sha) {
  return sha ? String(sha).slice(0, 12) : "-";
}

/** A number with `digits` decimals, or "-" when missing. */
export function num(value, digits = 2) {
  if (value === null || value === undefined || value === "" || Number.isNaN(Number(value))) {
    return "-";
  }
  return Number(value).toFixed(digits);
}

/** A chart value with 3 significant digits (0.00213, 1.27, 412), "-" when missing. */
export function sig(value) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "-";
  const n = Number(value);
  if (n === 0) return "0";
  if (Math.abs(n) >= 1000) return n.toFixed(0);
  return String(Number(n.toPrecision(3)));
}

/** Bytes as B / KiB / MiB. */
export function bytes(value) {
  if (value === null || value === undefined) return "-";
  const n = Number(value);
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

/** Epoch seconds as a UTC timestamp "YYYY-MM-DD HH:MM:SS". */
export function when(ts) {
  if (!ts) return "-";
  return new Date(Number(ts) * 1000).toISOString().replace("T", " ").slice(0, 19);
}

/** Epoch seconds as "12 s ago" / "5 min ago" / "3 h ago" / "2 d ago". */
export function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - Number(ts));
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 90 * 60) return `${Math.round(s / 60)} min ago`;
  if (s < 36 * 3600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** Changes every 15 s: views with "N s ago" texts return it so they re-render that often. */
export function clockTick() {
  return Math.floor(Date.now() / 15000);
}

/** A small colored label for a state name (class names are the state, sanitized). */
export function badge(state, testid) {
  const text = state === null || state === undefined ? "-" : String(state);
  const cls = `badge state-${text.replace(/[^a-z0-9_-]/gi, "_")}`;
  return h("span", { class: cls, "data-testid": testid }, text);
}

/** The list inside an API answer: the answer itself, or its first array-valued `keys` field. */
export function listOf(data, ...keys) {
  if (Array.isArray(data)) return data;
  for (const key of keys) {
    if (data && Array.isArray(data[key])) return data[key];
  }
  return [];
}

/** A section with a heading (h2) and content. */
export function section(title, testid, ...content) {
  return h("section", { "data-testid": testid, "aria-label": title }, h("h2", {}, title), content);
}

// Generations below this are counters, not epoch milliseconds (2001-09-09 in ms).
const GENERATION_EPOCH_MS = 1e12;

/** A generation (epoch ms of when it was issued) as "2026-12-06 21:03:07 UTC", the raw number
 * in its tooltip; 0 as "none", small counters as they are. */
export function generation(value, testid) {
  if (value === null || value === undefined) return "-";
  const n = Number(value);
  if (!n) return h("span", { "data-testid": testid }, "none");
  if (n < GENERATION_EPOCH_MS) return h("span", { "data-testid": testid }, String(n));
  return h("time", { title: `generation ${n}`, "data-testid": testid }, `${when(n / 1000)} UTC`);
}
