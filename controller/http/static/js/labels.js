// sha256 -> "name:version" of registered model artifacts, for showing what a device runs.

import { api, seg } from "./api.js";
import { listOf, short } from "./util.js";

// Registered models change rarely; re-read them at most this often (ms) unless the list changes.
const MAX_AGE_MS = 30000;

let cache = { key: null, at: 0, labels: {} };

/** {sha256: "name:version"} over every artifact and candidate of every registered model. */
export async function modelLabels() {
  const list = listOf(await api("/models"), "models");
  const key = JSON.stringify(list.map((m) => [m.name, m.version]));
  if (key === cache.key && Date.now() - cache.at < MAX_AGE_MS) return cache.labels;
  const labels = {};
  const details = await Promise.all(
    list.map((m) => api(`/models/${seg(`${m.name}:${m.version}`)}`).catch(() => null)),
  );
  for (const detail of details) {
    if (!detail) continue;
    const ref = `${detail.name}:${detail.version}`;
    for (const a of [...(detail.artifacts || []), ...(detail.candidates || [])]) {
      if (a.sha256 && !labels[a.sha256]) labels[a.sha256] = ref;
    }
  }
  cache = { key, at: Date.now(), labels };
  return labels;
}

/** "0123456789ab digits:2" (or just the short sha when unknown, "-" when none). */
export function modelText(sha, labels) {
  if (!sha) return "-";
  const name = labels[sha];
  return name ? `${short(sha)} ${name}` : short(sha);
}
