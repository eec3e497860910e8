// Live updates from `/v1/events`: named server-sent events whose data is the JSON of the matching
// GET, sent once on connect and again on each change. EventSource sends the session cookie and
// reconnects by itself after a dropped connection; when the server refuses the stream outright
// (EventSource gives up), we ask whether the session is still valid and, if it is, reconnect
// with capped exponential backoff and full jitter so that many tabs do not all retry at once.

import { get } from './api.js';

const MAX_DELAY_MS = 30_000;
const BASE_DELAY_MS = 1_000;

let statusListener = () => {};
const states = new Map(); // one entry per open stream: 'connecting' | 'live' | 'reconnecting' | 'offline'

/** `listener(text|null)`: the live status line in the header. */
export function setStatusListener(listener) {
  statusListener = listener;
}

function report() {
  const values = Array.from(states.values());
  if (values.length === 0) statusListener(null);
  else if (values.includes('offline')) statusListener('offline');
  else if (values.includes('reconnecting') || values.includes('connecting')) {
    statusListener('reconnecting');
  } else statusListener('live');
}

/**
 * Follow `url`, calling `handlers[name](data)` for each named event. Returns `close()`, which
 * the page that opened the stream calls when it is left.
 *
 * `prime` maps event names to the GET whose JSON the event carries: those are fetched at once
 * too, so the page fills even while the stream is still connecting (or cannot connect); a GET
 * that answers after its event has arrived is dropped, as older. `onError(err)` hears the
 * failures of those GETs.
 */
export function follow(url, handlers, { prime = {}, onError = () => {} } = {}) {
  const id = Symbol(url);
  let source = null;
  let closed = false;
  let failures = 0;
  let timer = null;
  const heard = new Set();

  const setState = (state) => {
    if (closed) return;
    states.set(id, state);
    report();
  };

  function connect() {
    if (closed) return;
    setState('connecting');
    source = new EventSource(url);
    for (const [name, handler] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => {
        if (closed) return;
        let data;
        try {
          data = JSON.parse(event.data);
        } catch {
          return; // a malformed event is skipped; the next one carries the whole state again
        }
        heard.add(name);
        handler(data);
      });
    }
    source.onopen = () => {
      failures = 0;
      setState('live');
    };
    source.onerror = () => {
      if (closed) return;
      if (source.readyState === EventSource.CLOSED) {
        setState('offline');
        source.close();
        retryIfStillLoggedIn();
      } else {
        setState('reconnecting');
      }
    };
  }

  async function retryIfStillLoggedIn() {
    try {
      // A 401 here sends the user to the login form (api.js); then there is nothing to retry.
      await get('/v1/session');
    } catch (err) {
      if (err && err.status === 401) return;
    }
    if (closed) return;
    const cap = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** failures);
    failures += 1;
    timer = setTimeout(connect, Math.random() * cap);
  }

  connect();
  for (const [name, path] of Object.entries(prime)) {
    get(path)
      .then((data) => {
        if (!closed && !heard.has(name)) handlers[name](data);
      })
      .catch((err) => {
        if (!closed) onError(err, name);
      });
  }
  return function close() {
    closed = true;
    clearTimeout(timer);
    if (source) source.close();
    states.delete(id);
    report();
  };
}
