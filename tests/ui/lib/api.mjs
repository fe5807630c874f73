// A tiny client of the manager's REST API for the tests' own checks (what the UI did must
// be true on the server, not only on screen).

import { sleep } from './procs.mjs';

export class Api {
  constructor(base, token) {
    this.base = base;
    this.token = token;
  }

  async req(method, path, body) {
    const res = await fetch(this.base + path, {
      method,
      headers: { Authorization: `Bearer ${this.token}`, 'Content-Type': 'application/json', Accept: 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed = text;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      /* plain text */
    }
    if (!res.ok) {
      const err = new Error(`${method} ${path}: HTTP ${res.status}: ${text}`);
      err.status = res.status;
      err.body = parsed;
      throw err;
    }
    return parsed;
  }

  get(path) {
    return this.req('GET', path);
  }

  async list(path) {
    const b = await this.get(path);
    return Array.isArray(b) ? b : b?.items ?? [];
  }

  /** Polls fn() until it returns a truthy value; throws with the last value after timeoutMs. */
  async until(what, fn, timeoutMs = 60000, everyMs = 250) {
    const end = Date.now() + timeoutMs;
    let last;
    for (;;) {
      try {
        last = await fn();
        if (last) return last;
      } catch (e) {
        last = e;
      }
      if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
      await sleep(everyMs);
    }
  }
}
