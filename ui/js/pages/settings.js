// Settings: every setting with its description, default and bounds (GET /v1/settings),
// checked as you type against its definition, saved one by one; the server's message is
// shown when it refuses. Values stay live through the Setting resources of the stream.

import * as store from '../store.js';
import * as model from '../model.js';
import { h, fill, act, badge, parseSize } from '../ui.js';

/** Checks a value against a definition; returns '' or what is wrong. */
export function validate(def, value) {
  const v = String(value).trim();
  const type = String(def?.type ?? 'string').toLowerCase();
  if (v === '' && !def?.optional) return 'A value is required.';
  if (type === 'bool' || type === 'boolean') return /^(true|false)$/.test(v) ? '' : 'true or false.';
  if (type.startsWith('int') || type === 'integer' || type === 'number' || type === 'uint' || type.startsWith('u')) {
    if (!/^-?\d+$/.test(v)) return 'A whole number.';
    const n = Number(v);
    if (def.min !== undefined && def.min !== null && n < Number(def.min)) return `At least ${def.min}.`;
    if (def.max !== undefined && def.max !== null && n > Number(def.max)) return `At most ${def.max}.`;
    return '';
  }
  if (type === 'size' || type === 'bytes') {
    const n = parseSize(v);
    if (n === null) return 'A size like 10GiB.';
    if (def.min !== undefined && def.min !== null && n < Number(def.min)) return `At least ${def.min}.`;
    if (def.max !== undefined && def.max !== null && n > Number(def.max)) return `At most ${def.max}.`;
    return '';
  }
  const options = def?.options ?? def?.choices ?? def?.values;
  if (Array.isArray(options) && options.length && !options.map(String).includes(v)) return `One of: ${options.join(', ')}.`;
  return '';
}

function boundsText(def) {
  const parts = [];
  if (def.default !== undefined && def.default !== null) parts.push(`default ${def.default}`);
  const hasMin = def.min !== undefined && def.min !== null;
  const hasMax = def.max !== undefined && def.max !== null;
  if (hasMin && hasMax) parts.push(`${def.min} to ${def.max}`);
  else if (hasMin) parts.push(`at least ${def.min}`);
  else if (hasMax) parts.push(`at most ${def.max}`);
  const options = def.options ?? def.choices ?? def.values;
  if (Array.isArray(options) && options.length) parts.push(`one of ${options.join(', ')}`);
  if (def.unit) parts.push(def.unit);
  return parts.join(' · ');
}

/** Mounts the settings page. */
export function mount(main) {
  const list = h('div', { class: 'panel', id: 'settings' }, h('p', { class: 'muted' }, 'Loading…'));
  const rows = new Map();
  let defs = null;
  let defsError = null;
  fill(main, h('h1', null, 'Settings'), list);

  model.settingDefinitions().then((d) => {
    defs = d;
    update();
  }, (e) => {
    defsError = e.message;
    defs = [];
    update();
  });

  function row(def) {
    const name = def.name;
    const id = `setting-${name}`;
    const type = String(def.type ?? 'string').toLowerCase();
    const options = def.options ?? def.choices ?? def.values;
    let input;
    if (type === 'bool' || type === 'boolean') input = h('select', { id, name }, ['true', 'false'].map((o) => h('option', { value: o }, o)));
    else if (Array.isArray(options) && options.length) input = h('select', { id, name }, options.map((o) => h('option', { value: String(o) }, String(o))));
    else input = h('input', { id, name, type: 'text', inputmode: /^(int|integer|number|u\d+|i\d+)/.test(type) ? 'numeric' : undefined, autocomplete: 'off', spellcheck: 'false' });
    const err = h('div', { class: 'error', id: `${id}-err`, role: 'alert' });
    input.setAttribute('aria-describedby', `${id}-desc ${id}-err`);
    const save = h('button', { class: 'small primary', type: 'submit', disabled: true, 'aria-label': `Save ${name}` }, 'Save');
    const reset = h('button', { class: 'small', type: 'button', 'aria-label': `Reset ${name} to default`, title: `Set to the default (${def.default})` }, 'Default');
    const applied = h('span', { class: 'small' });
    const form = h('form', { class: 'setting', dataset: { key: name } },
      h('div', null, h('label', { for: id, class: 'name' }, name), h('div', { class: 'desc', id: `${id}-desc` }, def.description ?? '', h('br'), h('span', { class: 'mono' }, boundsText(def)))),
      h('div', null, input, err),
      h('div', { class: 'toolbar', style: { margin: 0 } }, save, reset, applied));
    const r = { def, input, err, save, applied, dirty: false, form };
    const check = () => {
      const msg = validate(def, input.value);
      err.textContent = msg;
      input.setAttribute('aria-invalid', msg ? 'true' : 'false');
      // The server has the last word: a value the browser doubts can still be sent, and
      // the server's own message then replaces the browser's.
      save.disabled = !r.dirty;
      return !msg;
    };
    input.addEventListener('input', () => {
      r.dirty = input.value !== current(name, def);
      check();
    });
    input.addEventListener('change', () => {
      r.dirty = input.value !== current(name, def);
      check();
    });
    reset.addEventListener('click', () => {
      input.value = String(def.default ?? '');
      r.dirty = input.value !== current(name, def);
      check();
      input.focus();
    });
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      check();
      const ok = await act(save, () => model.setSetting(name, input.value.trim()), { errorEl: err, success: `${name} = ${input.value.trim()}` });
      if (ok !== undefined) {
        r.dirty = false;
        err.textContent = '';
        save.disabled = true;
      } else {
        input.setAttribute('aria-invalid', 'true');
        save.disabled = false;
      }
    });
    r.check = check;
    return r;
  }

  function update() {
    if (!defs) return;
    if (!rows.size) {
      const all = [...defs];
      for (const s of store.all('Setting')) if (!all.some((d) => d.name === store.nameOf(s))) all.push({ name: store.nameOf(s), description: '', type: 'string' });
      if (!all.length) {
        fill(list, h('p', { class: defsError ? 'error-text' : 'muted' }, defsError ?? 'No settings.'));
        return;
      }
      fill(list, all.map((d) => {
        const r = row(d);
        rows.set(d.name, r);
        return r.form;
      }));
    }
    for (const [name, r] of rows) {
      const cur = current(name, r.def);
      if (!r.dirty && document.activeElement !== r.input && r.input.value !== cur) r.input.value = cur;
      const s = store.one('Setting', name);
      fill(r.applied, s?.status?.applied ? badge('applied') : null);
      if (!r.dirty) r.save.disabled = true;
    }
  }
  return { update };
}

function current(name, def) {
  const s = store.one('Setting', name);
  return String(s?.spec?.value ?? def?.value ?? def?.default ?? '');
}
