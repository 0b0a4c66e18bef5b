// The JSON API client: bearer token from the URL fragment or localStorage, 401 -> login.

const TOKEN_KEY = "edgefleet.token";
const BASE = "/api/v1";

/** Raised for a non-2xx answer; `status` is the HTTP status, message the API's `detail`. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Take `#token=...` out of the URL fragment into localStorage (the server never sees it). */
export function captureTokenFromHash() {
  const match = location.hash.match(/(?:^#|[&/?])token=([^&]+)/);
  if (!match) return;
  localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  const rest = location.hash.replace(/[&?]?token=[^&]+/, "").replace(/^#&?$/, "");
  history.replaceState(null, "", location.pathname + location.search + (rest || "#/"));
}

/** The stored token, or null. */
export function token() {
  return localStorage.getItem(TOKEN_KEY);
}

/** Store a token typed into the login form. */
export function setToken(value) {
  localStorage.setItem(TOKEN_KEY, value.trim());
}

/** Forget the token (logout, or after a 401). */
export function clearToken() {
  localStorage.removeItem(TOKEN_KEY);
}

/** Call the API; resolves to the parsed JSON, rejects with ApiError. */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const current = token();
  if (current) headers.Authorization = `Bearer ${current}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(BASE + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text };
  }
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.statusText;
    throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return data;
}

/** Path segment escaping for ids and model refs (name:version keeps its colon). */
export function seg(value) {
  return encodeURIComponent(String(value)).replace(/%3A/gi, ":");
}
