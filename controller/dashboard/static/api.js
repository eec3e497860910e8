// The one way the pages talk to the controller: JSON over fetch, the session's CSRF token on
// every request that changes something, a 401 sends the user back to the login form, and every
// refusal becomes an ApiError whose message is the server's own `error` text.

const CSRF_KEY = 'fedsky.csrf';
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

export class ApiError extends Error {
  /** `status` 0 when the controller could not be reached; `body` the parsed error JSON. */
  constructor(status, message, body = null) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.body = body;
  }
}

let onUnauthorized = () => {};

/** What to do when the server says the session is gone (app.js shows the login form). */
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

// The CSRF token lives in sessionStorage: this tab only, gone when it closes. The cookie alone
// (sent by the browser to any page of this origin) must never be enough to change something.
export function csrfToken() {
  try {
    return sessionStorage.getItem(CSRF_KEY);
  } catch {
    return null;
  }
}

export function setCsrfToken(token) {
  sessionStorage.setItem(CSRF_KEY, token);
}

export function clearCsrfToken() {
  try {
    sessionStorage.removeItem(CSRF_KEY);
  } catch {
    // storage disabled: nothing was kept
  }
}

/** `?a=1&b=2` from an object, leaving out empty values; '' when nothing is left. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === '') continue;
    for (const v of Array.isArray(value) ? value : [value]) q.append(key, String(v));
  }
  const text = q.toString();
  return text ? `?${text}` : '';
}

async function errorMessage(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const text = body && typeof body.error === 'string' && body.error
    ? body.error
    : `HTTP ${response.status} ${response.statusText}`.trim();
  return { text, body };
}

/**
 * Call the API. Options: `method`, `json` (a value sent as JSON), `body` + `contentType` (raw
 * bytes or text), `headers`, `signal` (the page's AbortSignal), `expect` ('json' | 'text' |
 * 'response'), `on401` ('login': the session ended, back to the login form; 'throw': the caller
 * handles it, as the login form does).
 */
export async function request(path, options = {}) {
  const {
    method = 'GET',
    json,
    body,
    contentType,
    headers = {},
    signal,
    expect = 'json',
    on401 = 'login',
  } = options;
  const h = new Headers(headers);
  if (!h.has('Accept')) h.set('Accept', 'application/json');
  let payload = body;
  if (json !== undefined) {
    payload = JSON.stringify(json);
    h.set('Content-Type', 'application/json');
  } else if (contentType) {
    h.set('Content-Type', contentType);
  }
  if (!SAFE_METHODS.has(method) && !h.has('Authorization')) {
    const token = csrfToken();
    if (!token) {
      // The session cookie is shared by every tab, the CSRF token is not: a tab that did not
      // log in cannot change anything, and the server would refuse it with a less clear reason.
      throw new ApiError(
        403,
        'this tab holds no CSRF token for the session (only the tab that logged in does): ' +
          'log out and log in again here',
      );
    }
    h.set('X-CSRF-Token', token);
  }
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: h,
      body: payload,
      signal,
      credentials: 'same-origin',
      cache: 'no-store',
    });
  } catch (err) {
    if (err && err.name === 'AbortError') throw err;
    throw new ApiError(0, `cannot reach the controller: ${err && err.message ? err.message : err}`);
  }
  if (!response.ok) {
    const { text, body: errBody } = await errorMessage(response);
    if (response.status === 401 && on401 === 'login') onUnauthorized(text);
    throw new ApiError(response.status, text, errBody);
  }
  if (expect === 'response') return response;
  if (expect === 'text') return response.text();
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, options = {}) => request(path, { ...options, method: 'GET' });
export const post = (path, options = {}) => request(path, { ...options, method: 'POST' });
export const del = (path, options = {}) => request(path, { ...options, method: 'DELETE' });

/** A path segment from server data (a job id, a cloud name), encoded for the URL. */
export const seg = (value) => encodeURIComponent(String(value));
