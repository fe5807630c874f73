// Small building blocks shared by the pages: a DOM builder, formatting, toasts, dialogs
// (confirmations and forms that show the server's error), buttons that show progress, bars
// and a sortable, filterable table.

/** Builds an element: h('a', {href, onclick}, 'text', child...). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k in el && typeof v !== 'string') el[k] = v;
      else el.setAttribute(k, v === true ? '' : v);
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the children of el. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
/** 1073741824 → "1 GiB". */
export function bytes(n) {
  if (n === undefined || n === null || Number.isNaN(Number(n))) return '–';
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  const s = i === 0 ? String(Math.round(v)) : v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  return `${s.replace(/\.0+$|(\.\d*?)0+$/, '$1')} ${UNITS[i]}`;
}

const SIZE_RE = /^\s*(\d+(?:\.\d+)?)\s*(b|k|ki|kib|kb|m|mi|mib|mb|g|gi|gib|gb|t|ti|tib|tb)?\s*$/i;
/** "10GiB" / "512 MiB" / "4096" → bytes, or null if it is not a size. */
export function parseSize(s) {
  const m = SIZE_RE.exec(String(s));
  if (!m) return null;
  const unit = (m[2] || 'b').toLowerCase()[0];
  const mult = { b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[unit];
  const v = Math.round(Number(m[1]) * mult);
  return Number.isSafeInteger(v) ? v : null;
}

/** A date (string or Date) as "2026-11-22 07:01:02". */
export function time(t) {
  if (!t) return '–';
  const d = t instanceof Date ? t : new Date(t);
  if (Number.isNaN(d.getTime())) return String(t);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** "12 s ago", "3 min ago"... */
export function ago(t) {
  if (!t) return 'never';
  const d = t instanceof Date ? t : new Date(t);
  const s = Math.round((Date.now() - d.getTime()) / 1000);
  if (Number.isNaN(s)) return String(t);
  if (s < 2) return 'just now';
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** A coloured state badge; the class is the lower-cased value. */
export function badge(value, title) {
  const v = value === undefined || value === null || value === '' ? 'unknown' : String(value);
  return h('span', { class: `badge ${v.toLowerCase().replace(/[^a-z]/g, '')}`, title }, v);
}

/** Shows a message in the corner; errors stay until dismissed. */
export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  const close = h('button', { class: 'link', 'aria-label': 'Dismiss' }, '✕');
  const t = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, h('p', null, message), close);
  close.addEventListener('click', () => t.remove());
  box.append(t);
  if (kind !== 'error') setTimeout(() => t.remove(), 4000);
  return t;
}

/**
 * Runs an action from a button: disables it and shows a spinner while it runs, shows the
 * server's error when it fails (a toast, or into errorEl), and resolves to the result or
 * undefined on failure.
 */
export async function act(button, fn, { success, errorEl } = {}) {
  if (button) {
    button.disabled = true;
    button.classList.add('busy');
    button.setAttribute('aria-busy', 'true');
  }
  if (errorEl) errorEl.textContent = '';
  try {
    const r = await fn();
    if (success) toast(success, 'ok');
    return r ?? true;
  } catch (e) {
    const msg = e?.message || String(e);
    if (errorEl) errorEl.textContent = msg;
    else toast(msg, 'error');
    return undefined;
  } finally {
    if (button) {
      button.disabled = false;
      button.classList.remove('busy');
      button.removeAttribute('aria-busy');
    }
  }
}

/**
 * A modal form. fields: [{name, label, type, value, options, hint, required, validate}].
 * submit(values) may throw; its message is shown in the dialog, which stays open.
 * Resolves to submit's result, or undefined if cancelled.
 */
export function formDialog({ title, fields, submitText = 'OK', danger = false, intro, submit }) {
  return new Promise((resolve) => {
    const errorEl = h('div', { class: 'server-error', role: 'alert' });
    const inputs = {};
    const fieldEls = fields.map((f) => {
      const id = `f-${f.name}-${Math.random().toString(36).slice(2, 7)}`;
      let input;
      if (f.type === 'select') {
        input = h('select', { id, name: f.name }, f.options.map((o) => {
          const [v, l] = Array.isArray(o) ? o : [o, o];
          return h('option', { value: v, selected: String(f.value ?? '') === String(v) }, l);
        }));
      } else if (f.type === 'checkbox') {
        input = h('input', { id, name: f.name, type: 'checkbox', checked: !!f.value });
      } else {
        input = h('input', {
          id, name: f.name, type: f.type || 'text', value: f.value ?? '', placeholder: f.placeholder,
          autocomplete: 'off', spellcheck: 'false', required: f.required, min: f.min, max: f.max,
        });
      }
      const err = h('div', { class: 'error', id: `${id}-err` });
      input.setAttribute('aria-describedby', `${id}-err`);
      inputs[f.name] = { input, err, f };
      if (f.validate) input.addEventListener('input', () => check(f.name));
      return h('div', { class: 'field' }, h('label', { for: id }, f.label), input, f.hint ? h('div', { class: 'hint' }, f.hint) : null, err);
    });
    const value = (name) => {
      const { input, f } = inputs[name];
      return f.type === 'checkbox' ? input.checked : input.value;
    };
    const check = (name) => {
      const { input, err, f } = inputs[name];
      const msg = f.validate ? f.validate(value(name), values()) : '';
      err.textContent = msg || '';
      input.setAttribute('aria-invalid', msg ? 'true' : 'false');
      return !msg;
    };
    const values = () => Object.fromEntries(Object.keys(inputs).map((n) => [n, value(n)]));
    const ok = h('button', { type: 'submit', class: danger ? 'danger solid' : 'primary' }, submitText);
    const cancel = h('button', { type: 'button' }, 'Cancel');
    const form = h('form', { method: 'dialog', novalidate: true },
      h('h2', null, title), intro ? h('div', { class: 'field' }, intro) : null, fieldEls, errorEl,
      h('div', { class: 'buttons' }, cancel, ok));
    const dlg = h('dialog', { 'aria-label': title }, form);
    let result;
    cancel.addEventListener('click', () => dlg.close());
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const good = Object.keys(inputs).map(check).every(Boolean);
      if (!good) return;
      const r = await act(ok, () => submit(values()), { errorEl });
      if (r !== undefined) {
        result = r;
        dlg.close();
      }
    });
    dlg.addEventListener('close', () => {
      dlg.remove();
      resolve(result);
    });
    document.body.append(dlg);
    dlg.showModal();
    const first = fields.length ? inputs[fields[0].name].input : ok;
    first.focus();
  });
}

/**
 * A confirmation that names what it acts on. With typeToConfirm, the user must type that
 * name before the button is enabled. Runs action() and shows its error in the dialog.
 */
export function confirmDialog({ title, message, confirmText = 'Delete', typeToConfirm, action, danger = true }) {
  const fields = typeToConfirm
    ? [{ name: 'confirm', label: `Type ${typeToConfirm} to confirm`, validate: (v) => (v === typeToConfirm ? '' : `Type the name exactly: ${typeToConfirm}`) }]
    : [];
  return formDialog({ title, intro: message, fields, submitText: confirmText, danger, submit: () => action() });
}

/** A bar of segments: [{value, cls, label}] out of total. */
export function bar(total, segments, label) {
  const t = Math.max(Number(total) || 0, 1);
  return h('div', { class: 'bar', role: 'img', 'aria-label': label },
    segments.map((s) => h('span', { class: s.cls, title: s.label, style: { width: `${Math.min(100, (100 * Math.max(0, s.value)) / t)}%` } })));
}

/** A progress bar 0..100 with its number. */
export function progress(value, label) {
  const v = Math.max(0, Math.min(100, Number(value) || 0));
  return h('span', { class: 'progress-wrap' },
    h('progress', { max: 100, value: v, 'aria-label': label }), ' ', h('span', { class: 'pct' }, `${v}%`));
}

/**
 * A sortable, filterable table that keeps its sort and filter across redraws.
 * columns: [{key, label, value(row) (sort value), render(row) (cell), cls}]
 */
export class Table {
  constructor({ columns, rowKey, empty = 'Nothing here yet.', label, rowAttrs }) {
    this.columns = columns;
    this.rowKey = rowKey;
    this.empty = empty;
    this.rowAttrs = rowAttrs;
    this.sortKey = columns[0].key;
    this.sortDir = 1;
    this.filter = '';
    this.rows = [];
    this.thead = h('thead');
    this.tbody = h('tbody');
    this.el = h('div', { class: 'table-wrap' }, h('table', { class: 'responsive', 'aria-label': label }, this.thead, this.tbody));
    this.drawHead();
  }

  drawHead() {
    fill(this.thead, h('tr', null, this.columns.map((c) => {
      const th = h('th', { scope: 'col', class: c.cls });
      if (c.value) {
        th.setAttribute('aria-sort', this.sortKey === c.key ? (this.sortDir > 0 ? 'ascending' : 'descending') : 'none');
        th.append(h('button', { class: 'sort', onclick: () => this.sortBy(c.key) }, c.label));
      } else th.append(c.label);
      return th;
    })));
  }

  sortBy(key) {
    if (this.sortKey === key) this.sortDir = -this.sortDir;
    else {
      this.sortKey = key;
      this.sortDir = 1;
    }
    this.drawHead();
    this.draw();
  }

  setFilter(text) {
    this.filter = text.trim().toLowerCase();
    this.draw();
  }

  update(rows) {
    this.rows = rows;
    this.draw();
  }

  draw() {
    const col = this.columns.find((c) => c.key === this.sortKey);
    let rows = this.rows;
    if (this.filter) {
      rows = rows.filter((r) => this.columns.some((c) => c.value && String(c.value(r) ?? '').toLowerCase().includes(this.filter)));
    }
    if (col?.value) {
      rows = [...rows].sort((a, b) => {
        const x = col.value(a);
        const y = col.value(b);
        const c = typeof x === 'number' && typeof y === 'number' ? x - y : String(x ?? '').localeCompare(String(y ?? ''), undefined, { numeric: true });
        return c * this.sortDir;
      });
    }
    if (!rows.length) {
      fill(this.tbody, h('tr', { class: 'empty' }, h('td', { colspan: this.columns.length }, this.rows.length ? 'No match.' : this.empty)));
      return;
    }
    fill(this.tbody, rows.map((r) => h('tr', { dataset: { key: this.rowKey(r) }, ...(this.rowAttrs?.(r) ?? {}) },
      this.columns.map((c) => h('td', { 'data-label': c.label, class: c.cls }, c.render ? c.render(r) : String(c.value(r) ?? ''))))));
  }
}

/**
 * Redraws part of a page without losing the keyboard focus: the focused control inside
 * container is found again after draw() by its row key and label.
 */
export function keepFocus(container, draw) {
  const a = document.activeElement;
  let sig = null;
  if (a && a !== document.body && container.contains(a)) {
    const row = a.closest('[data-key]');
    sig = { key: row?.dataset.key, label: a.getAttribute('aria-label') ?? a.textContent, tag: a.tagName };
  }
  draw();
  if (!sig) return;
  const rows = sig.key !== undefined ? [...container.querySelectorAll('[data-key]')].filter((r) => r.dataset.key === sig.key) : [container];
  for (const r of rows) {
    for (const el of r.querySelectorAll(sig.tag)) {
      if ((el.getAttribute('aria-label') ?? el.textContent) === sig.label) {
        el.focus({ preventScroll: true });
        return;
      }
    }
  }
}
