// The single-page app: sign-in, the hash router (#/volumes/NAME...), the live indicator and
// the page lifecycle (mount once, update on every store change, unmount on navigation).

import * as api from './api.js';
import * as store from './store.js';
import { h, fill, act } from './ui.js';
import * as dashboard from './pages/dashboard.js';
import * as volumes from './pages/volumes.js';
import * as volume from './pages/volume.js';
import * as nodes from './pages/nodes.js';
import * as backups from './pages/backups.js';
import * as settings from './pages/settings.js';

const ROUTES = [
  [/^\/?$/, dashboard, 'dashboard', 'Dashboard'],
  [/^\/volumes\/?$/, volumes, 'volumes', 'Volumes'],
  [/^\/volumes\/([^/]+)$/, volume, 'volumes', 'Volume'],
  [/^\/nodes\/?$/, nodes, 'nodes', 'Nodes'],
  [/^\/backups\/?$/, backups, 'backups', 'Backups'],
  [/^\/settings\/?$/, settings, 'settings', 'Settings'],
];

const main = document.getElementById('main');
let current = null;

function route() {
  const path = decodeURIComponent(location.hash.replace(/^#/, '').split('?')[0] || '/');
  for (const [re, mod, nav, title] of ROUTES) {
    const m = re.exec(path);
    if (m) return { mod, nav, title, params: m.slice(1) };
  }
  return null;
}

function show() {
  if (current?.page?.unmount) current.page.unmount();
  current = null;
  if (!api.token()) {
    signIn();
    return;
  }
  document.getElementById('sign-out').hidden = false;
  const r = route();
  for (const a of document.querySelectorAll('nav a')) {
    if (r && a.dataset.page === r.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.getElementById('nav').classList.remove('open');
  fill(main);
  if (!r) {
    document.title = 'Not found · ironhorn';
    fill(main, h('h1', null, 'Not found'), h('p', null, h('a', { href: '#/' }, 'Back to the dashboard')));
    return;
  }
  document.title = `${r.title}${r.params[0] ? ` ${r.params[0]}` : ''} · ironhorn`;
  const page = r.mod.mount(main, ...r.params);
  current = { page };
  page.update?.();
}

function signIn(message) {
  document.getElementById('sign-out').hidden = true;
  for (const a of document.querySelectorAll('nav a')) a.removeAttribute('aria-current');
  document.title = 'Sign in · ironhorn';
  const input = h('input', { id: 'token', type: 'password', name: 'token', autocomplete: 'current-password', required: true, spellcheck: 'false' });
  const err = h('div', { class: 'error-text', role: 'alert' }, message || '');
  const button = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'panel signin', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to ironhorn'),
    h('div', { class: 'field' },
      h('label', { for: 'token' }, 'API token'), input,
      h('div', { class: 'hint' }, 'The manager prints its token at start (and keeps it in its data directory). It is kept only for this browser session.')),
    err, button);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const t = input.value.trim();
    if (!t) {
      err.textContent = 'Enter the token.';
      return;
    }
    api.setToken(t);
    const ok = await act(button, () => api.get('/v1/volumes'), { errorEl: err });
    if (ok === undefined) {
      api.setToken(null);
      return;
    }
    store.start();
    show();
  });
  fill(main, form);
  input.focus();
}

function signOut(message) {
  api.setToken(null);
  store.stop();
  store.clear();
  if (current?.page?.unmount) current.page.unmount();
  current = null;
  signIn(message);
}

function liveIndicator() {
  const el = document.getElementById('live');
  const s = store.state();
  const text = { live: 'live', connecting: 'connecting…', error: 'reconnecting…', offline: 'offline' }[s];
  if (el.textContent !== text) el.textContent = text;
  el.className = `live ${s === 'live' ? 'on' : s === 'error' ? 'err' : ''}`;
}

api.setUnauthorizedHandler(() => {
  if (api.token()) signOut('The manager refused the token; sign in again.');
});

store.subscribe(() => {
  liveIndicator();
  current?.page?.update?.();
});

document.getElementById('sign-out').addEventListener('click', () => signOut());
document.getElementById('nav-toggle').addEventListener('click', (ev) => {
  const nav = document.getElementById('nav');
  const open = nav.classList.toggle('open');
  ev.currentTarget.setAttribute('aria-expanded', String(open));
});
window.addEventListener('hashchange', () => {
  show();
  main.focus({ preventScroll: true });
});

if (api.token()) store.start();
show();
