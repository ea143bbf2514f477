// Calls to the modelyard API with the tab's key as a bearer header; errors as readable text.

const KEY = "modelyard.console.key";

export function storedKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function storeKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

/** An API refusal: the problem+json `detail` is the message. */
export class ApiError extends Error {
  constructor(status, title, detail) {
    super(detail);
    this.status = status;
    this.title = title;
    this.detail = detail;
  }
}

async function problemOf(response) {
  let title = response.statusText || "Error";
  let detail = `The server answered ${response.status}.`;
  try {
    const body = await response.json();
    title = body.title || title;
    detail = body.detail || (body.error && body.error.message) || detail;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, title, detail);
}

/**
 * `call("POST", "/admin/models/x/swap", {body: {to: "2"}})`: the decoded JSON answer, or
 * the `Response` itself with `{raw: true}` (streams, downloads). Throws ApiError.
 */
export async function call(method, path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = storedKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let body = options.body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal: options.signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Network error", "The server could not be reached. Is it running?");
  }
  if (!response.ok) throw await problemOf(response);
  if (options.raw) return response;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, options) => call("GET", path, options);
export const post = (path, body, options = {}) => call("POST", path, { ...options, body });
export const del = (path, options) => call("DELETE", path, options);

/** One line for a person: "Conflict (409): version '3' is not ready". */
export function describe(error) {
  if (error instanceof ApiError) {
    return error.status ? `${error.title} (${error.status}): ${error.detail}` : error.detail;
  }
  return `Something went wrong in the console: ${error && error.message ? error.message : error}`;
}
