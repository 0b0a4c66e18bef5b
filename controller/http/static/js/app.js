// Hash router, 2 s polling of the current view, token handling and the status line.

import { ApiError, api, captureTokenFromHash, clearToken, setToken, token } from "./api.js";
import * as device from "./views/device.js";
import * as models from "./views/models.js";
import * as overview from "./views/overview.js";
import * as report from "./views/report.js";
import * as rollouts from "./views/rollouts.js";
import * as startForm from "./views/start.js";
import { h } from "./util.js";

// Two seconds: fresh enough to watch a rollout move, light enough for a small controller.
const POLL_MS = 2000;
// A broken change stream is retried this long after it fails (polling goes on meanwhile).
const STREAM_RETRY_MS = 10000;
// ...and this long when the controller has no stream at all (404).
const STREAM_ABSENT_RETRY_MS = 300000;

const ROUTES = [
  [/^#?\/?$/, overview.view, "overview"],
  [/^#\/devices\/([^/]+)$/, device.view, "overview"],
  [/^#\/rollouts\/?$/, rollouts.listView, "rollouts"],
  [/^#\/rollouts\/new$/, startForm.view, "rollouts"],
  [/^#\/rollouts\/([^/]+)$/, rollouts.detailView, "rollouts"],
  [/^#\/models\/?$/, models.listView, "models"],
  [/^#\/models\/([^/]+)$/, models.detailView, "models"],
  [/^#\/report\/?$/, report.view, "report"],
];

const state = { generation: 0, lastJson: null, timer: null, busy: false, route: null };

function $(id) {
  return document.getElementById(id);
}

/** Show a message in the aria-live status area (kind: info | error). */
export function notify(message, kind = "info") {
  const status = $("status");
  status.textContent = message || "";
  status.className = `status ${message ? kind : ""}`;
}

function route() {
  const hash = location.hash || "#/";
  for (const [pattern, view, nav] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      try {
        return { view, nav, params: match.slice(1).map(decodeURIComponent) };
      } catch {
        return null; // a malformed escape (#/devices/%E0): the not-found view
      }
    }
  }
  return null;
}

function showLogin(message) {
  clearTimeout(state.timer);
  state.lastJson = null;
  $("logout").hidden = true;
  const view = $("view");
  view.replaceChildren(document.getElementById("login-template").content.cloneNode(true));
  notify(message || "", message ? "error" : "info");
  const form = $("login-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value;
    if (!value.trim()) return;
    setToken(value);
    notify("");
    start();
  });
  $("token-input").focus();
}

/** Load the current route's data and re-render only when it changed. */
async function poll() {
  const generation = state.generation;
  const current = state.route;
  if (!current || state.busy) return;
  state.busy = true;
  try {
    const data = await current.view.load(...current.params);
    if (generation !== state.generation) return;
    const json = JSON.stringify(data);
    if (json !== state.lastJson) {
      state.lastJson = json;
      const ctx = { refresh, act, notify, params: current.params };
      $("view").replaceChildren(current.view.render(data, ctx));
    }
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if ($("status").classList.contains("error")) notify("");
  } catch (error) {
    if (generation !== state.generation) return;
    if (error instanceof ApiError && error.status === 401) {
      clearToken();
      showLogin(`Token refused: ${error.message}`);
      return;
    }
    notify(`Could not load: ${error.message}`, "error");
    if (error instanceof ApiError && error.status === 404 && state.lastJson === null) {
      $("view").replaceChildren(h("p", { "data-testid": "not-found" }, error.message));
    }
  } finally {
    state.busy = false;
    if (generation === state.generation) {
      clearTimeout(state.timer);
      state.timer = setTimeout(poll, POLL_MS);
    }
  }
}

/** Poll now (after an action, or when the change stream says something changed). */
function refresh() {
  clearTimeout(state.timer);
  if (state.busy) {
    state.timer = setTimeout(poll, 100);
  } else {
    poll();
  }
}

/** POST an operator action (with an optional JSON body), report it in the status area, then
 * refresh the view; resolves to the answer, or null when it failed. */
async function act(path, label, body) {
  let answer = null;
  try {
    answer = await api(path, { method: "POST", body });
    notify(`${label}: done`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      clearToken();
      showLogin(`Token refused: ${error.message}`);
      return null;
    }
    notify(`${label} failed: ${error.message}`, "error");
  }
  refresh();
  return answer;
}

function start() {
  state.generation += 1;
  state.lastJson = null;
  clearTimeout(state.timer);
  if (!token()) {
    showLogin();
    return;
  }
  $("logout").hidden = false;
  if (state.route !== null) notify("");
  state.route = route();
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (state.route && link.dataset.nav === state.route.nav) {
      link.setAttribute("aria-current", "page");
    } else {
      link.removeAttribute("aria-current");
    }
  }
  if (!state.route) {
    $("view").replaceChildren(h("p", { "data-testid": "not-found" }, `No page at ${location.hash}`));
    return;
  }
  $("view").replaceChildren(h("p", { class: "muted" }, "Loading…"));
  state.busy = false;
  poll();
}

/**
 * Read `change` events from /api/v1/events/stream with fetch (EventSource cannot send the
 * Authorization header) and refresh on each; polling stays the baseline when it is missing.
 */
async function followChanges() {
  if (!token()) {
    setTimeout(followChanges, STREAM_RETRY_MS);
    return;
  }
  try {
    const response = await fetch("/api/v1/events/stream", {
      headers: { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" },
      cache: "no-store",
    });
    if (response.status === 404) {
      // This controller has no change stream: polling alone, check again much later.
      setTimeout(followChanges, STREAM_ABSENT_RETRY_MS);
      return;
    }
    if (!response.ok || !response.body) throw new Error(`stream: HTTP ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const messages = buffer.split("\n\n");
      buffer = messages.pop();
      if (messages.some((m) => /^event: ?change$/m.test(m) || /^data:/m.test(m))) refresh();
    }
  } catch {
    // Polling covers it; try the stream again later.
  }
  setTimeout(followChanges, STREAM_RETRY_MS);
}

window.addEventListener("hashchange", () => {
  captureTokenFromHash();
  start();
  $("view").focus({ preventScroll: true });
});
document.addEventListener("DOMContentLoaded", () => {
  captureTokenFromHash();
  $("logout").addEventListener("click", () => {
    clearToken();
    showLogin("Token forgotten.");
  });
  start();
  followChanges();
});
