// A live copy of the manager's resources in the browser: when the event stream
// (/v1/events?replay=true) connects, the manager first sends every object as Added, then
// every change as it happens. Pages read this copy and are told when it changes; nothing
// polls. On a reconnect the copy is rebuilt from the replay.

import * as api from './api.js';

/** The kinds the UI shows, with their plural. */
export const KINDS = {
  Volume: 'volumes',
  Replica: 'replicas',
  Engine: 'engines',
  Node: 'nodes',
  Snapshot: 'snapshots',
  Backup: 'backups',
  BackupTarget: 'backuptargets',
  RecurringJob: 'recurringjobs',
  Setting: 'settings',
};
/** Events in this long after the stream opens are taken as its replay, not as news. */
const REPLAY_MS = 1500;
let openedAt = 0;

const data = new Map(Object.keys(KINDS).map((k) => [k, new Map()]));
const listeners = new Set();
const recent = [];
const RECENT_MAX = 60;
let streamState = 'offline';
let stopStream = null;
let retry = 0;
let scheduled = false;

/** Every object of a kind, sorted by name. */
export function all(kind) {
  const m = data.get(kind);
  return m ? [...m.values()].sort((a, b) => nameOf(a).localeCompare(nameOf(b))) : [];
}

/** One object by kind and name, or undefined. */
export function one(kind, name) {
  return data.get(kind)?.get(name);
}

/** The latest change events seen on the stream, newest first. */
export function recentEvents() {
  return recent;
}

/** Whether the stream has just (re)connected and may still be replaying what exists. */
export function replaying() {
  return streamState === 'live' && Date.now() - openedAt < REPLAY_MS;
}

/** 'offline' | 'connecting' | 'live' | 'error' */
export function state() {
  return streamState;
}

/** The name of a resource object. */
export function nameOf(o) {
  return o?.metadata?.name ?? '';
}

/** Calls fn (batched to one call per animation frame) whenever anything changes. */
export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function changed() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    for (const fn of [...listeners]) {
      try {
        fn();
      } catch (e) {
        console.error(e);
      }
    }
  });
}

function setState(s) {
  streamState = s;
  changed();
}

/** Accepts a list answer as a bare array or wrapped ({items}, {volumes}, ...). */
export function itemsOf(body) {
  if (Array.isArray(body)) return body;
  if (body && Array.isArray(body.items)) return body.items;
  if (body && typeof body === 'object') {
    const arr = Object.values(body).find(Array.isArray);
    if (arr) return arr;
  }
  return [];
}

function version(o) {
  const v = o?.metadata?.resourceVersion;
  const n = Number(v);
  return Number.isFinite(n) ? n : null;
}

/** Puts (or replaces) an object, unless the copy held is newer. */
export function put(kind, obj) {
  const m = data.get(kind);
  if (!m || !obj) return;
  const name = nameOf(obj);
  const old = m.get(name);
  const vo = version(old);
  const vn = version(obj);
  if (old && vo !== null && vn !== null && vn < vo) return;
  m.set(name, obj);
  changed();
}

/** Drops an object. */
export function remove(kind, name) {
  if (data.get(kind)?.delete(name)) changed();
}

const KIND_BY_LOWER = new Map(
  Object.entries(KINDS).flatMap(([k, p]) => [
    [k.toLowerCase(), k],
    [p, k],
  ]),
);

function kindOf(ev, body) {
  const cands = [body?.kind, body?.object?.kind, body?.resource, ev.event?.split(/[.:/]/)[0]];
  for (const c of cands) {
    if (typeof c !== 'string') continue;
    const k = KIND_BY_LOWER.get(c.toLowerCase());
    if (k) return k;
  }
  return null;
}

/** Applies one stream event: {type: ADDED|MODIFIED|DELETED, kind, object} and close shapes. */
export function applyEvent(ev) {
  let body;
  try {
    body = JSON.parse(ev.data);
  } catch {
    return;
  }
  if (!body || typeof body !== 'object') return;
  const kind = kindOf(ev, body);
  const obj = body.object ?? body.resource ?? (body.metadata ? body : null);
  const type = String(body.type ?? body.action ?? ev.event ?? '').toUpperCase();
  if (ev.event === 'Lagged') return; // the stream ends next; the reconnect replays
  if (!kind) return;
  const name = obj ? nameOf(obj) : body.name;
  if (!name) return;
  const deleted = /DELETE/.test(type);
  if (deleted) remove(kind, name);
  else if (obj) put(kind, obj);
  const replay = type === 'ADDED' && Date.now() - openedAt < REPLAY_MS;
  if (!replay) recent.unshift({ at: new Date(), kind, name, type: deleted ? 'deleted' : /ADD|CREATE/.test(type) ? 'added' : 'modified', obj });
  if (recent.length > RECENT_MAX) recent.length = RECENT_MAX;
  changed();
}

/** Connects the event stream (and reconnects with back-off until stop()). */
export function start() {
  stop();
  setState('connecting');
  let stopped = false;
  const stopThis = api.stream('/v1/events?replay=true', {
    onOpen: () => {
      retry = 0;
      openedAt = Date.now();
      for (const m of data.values()) m.clear();
      setState('live');
      setTimeout(changed, REPLAY_MS + 50); // pages that waited for the replay redraw
    },
    onEvent: (ev) => applyEvent(ev),
    onClose: (err) => {
      if (stopped) return;
      setState(err ? 'error' : 'connecting');
      const wait = Math.min(10000, 500 * 2 ** retry++);
      setTimeout(() => {
        if (!stopped && stopStream === stopper) start();
      }, wait);
    },
  });
  const stopper = () => {
    stopped = true;
    stopThis();
  };
  stopStream = stopper;
}

/** Stops the event stream and forgets everything. */
export function stop() {
  if (stopStream) stopStream();
  stopStream = null;
  streamState = 'offline';
}

/** Forgets every object (sign-out). */
export function clear() {
  for (const m of data.values()) m.clear();
  recent.length = 0;
  changed();
}
