// The manager's REST API under /v1: the bearer token (kept in sessionStorage only, so it
// ends with the browser session), JSON requests whose errors carry the server's message, and
// the /v1/events stream read with fetch (so it carries the Authorization header like every
// other call; EventSource cannot send headers).

const TOKEN_KEY = 'ironhorn.token';

/** The token of this browser session, or null. */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Keeps the token for this browser session. */
export function setToken(t) {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error answered by the manager, with its HTTP status and its own message. */
export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.body = body;
  }
}

let onUnauthorized = () => {};
/** Called when the manager refuses the token (401). */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

function headers(extra = {}) {
  const h = { Accept: 'application/json', ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

/** Picks the human message out of an error body, whatever its shape. */
export function messageOf(body, fallback) {
  if (body == null) return fallback;
  if (typeof body === 'string') return body.trim() || fallback;
  if (typeof body.message === 'string') return body.message;
  if (typeof body.error === 'string') return body.error;
  if (body.error && typeof body.error.message === 'string') return body.error.message;
  if (typeof body.detail === 'string') return body.detail;
  return fallback;
}

/** One JSON request; resolves to the parsed body (or null), rejects with an ApiError. */
export async function request(method, path, body, { signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, `The manager cannot be reached (${e.message}).`, null);
  }
  const text = await res.text();
  let parsed = null;
  if (text) {
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = text;
    }
  }
  if (!res.ok) {
    if (res.status === 401) onUnauthorized();
    throw new ApiError(res.status, messageOf(parsed, `${method} ${path}: HTTP ${res.status} ${res.statusText}`), parsed);
  }
  return parsed;
}

export const get = (path, opts) => request('GET', path, undefined, opts);
export const post = (path, body) => request('POST', path, body === undefined ? {} : body);
export const put = (path, body) => request('PUT', path, body);
export const patch = (path, body) => request('PATCH', path, body);
export const del = (path) => request('DELETE', path);

/** Reads plain text (the Prometheus /metrics page). */
export async function getText(path) {
  const res = await fetch(path, { headers: headers({ Accept: 'text/plain' }) });
  const text = await res.text();
  if (!res.ok) throw new ApiError(res.status, messageOf(text, `GET ${path}: HTTP ${res.status}`), text);
  return text;
}

/**
 * Follows a Server-Sent Events stream with the bearer token. Calls onOpen() once connected,
 * onEvent({event, data, id}) for every event and onClose(error) when it ends. Returns a
 * function that stops it.
 */
export function stream(path, { onOpen, onEvent, onClose }) {
  const ctl = new AbortController();
  (async () => {
    let err = null;
    try {
      const res = await fetch(path, { headers: headers({ Accept: 'text/event-stream' }), signal: ctl.signal, cache: 'no-store' });
      if (!res.ok) {
        if (res.status === 401) onUnauthorized();
        const text = await res.text();
        throw new ApiError(res.status, messageOf(text, `event stream: HTTP ${res.status}`), text);
      }
      onOpen?.();
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        // Events end with a blank line; lines end with \n, \r\n or \r.
        while ((cut = buf.search(/\r?\n\r?\n|\r\r/)) >= 0) {
          const raw = buf.slice(0, cut);
          buf = buf.slice(cut).replace(/^(\r?\n\r?\n|\r\r)/, '');
          const ev = parseEvent(raw);
          if (ev) onEvent(ev);
        }
      }
    } catch (e) {
      if (e.name !== 'AbortError') err = e;
    }
    if (!ctl.signal.aborted) onClose?.(err);
  })();
  return () => ctl.abort();
}

/** Parses one SSE block (lines "field: value"); null for comments-only blocks. */
export function parseEvent(raw) {
  let event = 'message';
  let id = null;
  const data = [];
  let any = false;
  for (const line of raw.split(/\r?\n|\r/)) {
    if (!line || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id') id = value;
    else continue;
    any = true;
  }
  if (!any) return null;
  return { event, id, data: data.join('\n') };
}
