// Volumes: a sortable, filterable table with create, attach, detach, expand and delete.

import * as store from '../store.js';
import * as model from '../model.js';
import { h, fill, bytes, badge, Table, formDialog, confirmDialog, parseSize, time, progress, keepFocus } from '../ui.js';

const NAME_RE = /^[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$/;

/** Checks a resource name as the manager does (DNS-1123 subdomain). */
export function validateName(v) {
  if (!v) return 'A name is required.';
  if (!NAME_RE.test(v)) return 'Lower-case letters, digits, "-" and ".", 1 to 253 characters, starting and ending with a letter or digit.';
  return '';
}

/** Checks a size: a number with an optional unit, a multiple of 4 KiB. */
export function validateSize(v, min = 0) {
  const n = parseSize(v);
  if (n === null) return 'A size like 1GiB, 512MiB or 4096.';
  if (n <= 0) return 'The size must be more than 0.';
  if (n % 4096) return 'The size must be a multiple of 4 KiB.';
  if (min && n <= min) return `The size must be more than the current ${bytes(min)}.`;
  return '';
}

const list = (s) => String(s || '').split(',').map((x) => x.trim()).filter(Boolean);

/** Opens the create-volume dialog (optionally restoring from a backup). */
export function createVolumeDialog({ fromBackup } = {}) {
  const backups = model.backupsOf().filter((b) => String(b.status?.state).toLowerCase() === 'completed');
  const fromB = fromBackup ? store.one('Backup', fromBackup) : null;
  return formDialog({
    title: fromBackup ? `Restore backup ${fromBackup} into a new volume` : 'Create volume',
    submitText: fromBackup ? 'Restore' : 'Create',
    fields: [
      { name: 'name', label: 'Name', validate: validateName, value: fromB ? `${fromB.spec?.volume ?? 'restored'}-restore` : '' },
      { name: 'size', label: 'Size', value: fromB?.status?.volumeSize ? bytes(fromB.status.volumeSize).replace(' ', '') : '1GiB', hint: 'e.g. 1GiB, 512MiB; a multiple of 4 KiB', validate: (v) => validateSize(v) },
      { name: 'replicas', label: 'Replicas', type: 'number', value: 3, min: 1, max: 20, validate: (v) => (/^\d+$/.test(v) && +v >= 1 && +v <= 20 ? '' : 'A whole number from 1 to 20.') },
      { name: 'dataLocality', label: 'Data locality', type: 'select', value: 'disabled', options: [['disabled', 'disabled'], ['best-effort', 'best-effort (a replica on the attached node)']] },
      { name: 'nodeSelector', label: 'Node selector (tags, comma separated)', value: '' },
      { name: 'diskSelector', label: 'Disk selector (tags, comma separated)', value: '' },
      { name: 'fromBackup', label: 'From backup', type: 'select', value: fromBackup ?? '', options: [['', '(blank volume)'], ...backups.map((b) => [store.nameOf(b), `${store.nameOf(b)} (${b.spec?.volume}, ${time(b.status?.completedAt)})`])] },
    ],
    submit: (v) => model.createVolume({
      name: v.name,
      size: parseSize(v.size),
      numberOfReplicas: Number(v.replicas),
      dataLocality: v.dataLocality,
      nodeSelector: list(v.nodeSelector),
      diskSelector: list(v.diskSelector),
      fromBackup: v.fromBackup || undefined,
    }),
  });
}

/** Opens the attach dialog for a volume. */
export function attachDialog(name) {
  const nodes = store.all('Node').map(store.nameOf);
  return formDialog({
    title: `Attach ${name}`,
    submitText: 'Attach',
    fields: [{ name: 'node', label: 'Node', type: 'select', options: nodes, value: nodes[0] }],
    submit: (v) => model.attachVolume(name, v.node),
  });
}

/** Opens the detach confirmation for a volume. */
export function detachDialog(name) {
  return confirmDialog({ title: `Detach ${name}?`, message: `The engine of ${name} stops; anything using its block device loses it.`, confirmText: 'Detach', action: () => model.detachVolume(name) });
}

/** Opens the expand dialog for a volume. */
export function expandDialog(v) {
  const name = store.nameOf(v);
  const cur = v.spec?.size ?? 0;
  return formDialog({
    title: `Expand ${name}`,
    submitText: 'Expand',
    intro: h('p', { class: 'muted' }, `Now ${bytes(cur)}. Volumes only grow.`),
    fields: [{ name: 'size', label: 'New size', value: bytes(cur * 2).replace(' ', ''), validate: (s) => validateSize(s, cur) }],
    submit: (f) => model.expandVolume(name, parseSize(f.size)),
  });
}

/** Opens the delete confirmation for a volume: the user types its name. */
export function deleteDialog(name) {
  return confirmDialog({
    title: `Delete volume ${name}?`,
    message: h('p', null, 'This deletes ', h('strong', null, name), ', its replicas and its snapshots. Backups are kept.'),
    typeToConfirm: name,
    confirmText: `Delete ${name}`,
    action: () => model.deleteVolume(name),
  });
}

/** Mounts the volumes page. */
export function mount(main) {
  const params = new URLSearchParams(location.hash.split('?')[1] ?? '');
  const filter = h('input', { type: 'search', placeholder: 'Filter volumes…', 'aria-label': 'Filter volumes', value: params.get('robustness') ?? '' });
  const table = new Table({
    label: 'Volumes',
    rowKey: store.nameOf,
    empty: 'No volume yet. Create one.',
    columns: [
      { key: 'name', label: 'Name', value: store.nameOf, render: (v) => h('a', { href: `#/volumes/${encodeURIComponent(store.nameOf(v))}` }, store.nameOf(v)) },
      { key: 'size', label: 'Size', value: (v) => v.spec?.size ?? 0, render: (v) => bytes(v.spec?.size) },
      { key: 'actual', label: 'Actual size', value: (v) => v.status?.actualSize ?? 0, render: (v) => bytes(v.status?.actualSize ?? 0) },
      { key: 'replicas', label: 'Replicas', value: (v) => v.spec?.numberOfReplicas ?? 0, render: (v) => `${v.status?.healthyReplicas ?? 0} / ${v.spec?.numberOfReplicas ?? '?'}` },
      { key: 'state', label: 'State', value: (v) => v.status?.state ?? 'creating', render: (v) => {
        const stuck = (v.status?.conditions ?? []).find((c) => c.status === 'False' && ['Scheduled', 'Restored', 'Attached'].includes(c.type) && c.message);
        return h('span', null, badge(v.status?.state ?? 'creating'), stuck ? h('div', { class: 'error-text small', title: stuck.reason }, stuck.message) : null);
      } },
      { key: 'robustness', label: 'Robustness', value: (v) => model.robustnessGroup(v), render: (v) => {
        const p = model.rebuildOf(store.nameOf(v));
        return h('span', null, badge(v.status?.robustness ?? 'unknown'), p !== null && p !== undefined ? [' ', progress(p, 'rebuild')] : null);
      } },
      { key: 'node', label: 'Node', value: (v) => v.status?.currentNode ?? v.spec?.nodeId ?? '', render: (v) => v.status?.currentNode ?? (v.spec?.nodeId ? `→ ${v.spec.nodeId}` : '–') },
      { key: 'backup', label: 'Last backup', value: (v) => v.status?.lastBackupAt ?? '', render: (v) => (v.status?.lastBackup ? h('span', { title: v.status.lastBackup }, time(v.status.lastBackupAt)) : '–') },
      { key: 'actions', label: 'Actions', cls: 'actions', render: (v) => {
        const name = store.nameOf(v);
        const attached = !!v.spec?.nodeId;
        return [
          attached ? h('button', { class: 'small', onclick: () => detachDialog(name), 'aria-label': `Detach ${name}` }, 'Detach')
            : h('button', { class: 'small', onclick: () => attachDialog(name), 'aria-label': `Attach ${name}` }, 'Attach'),
          h('button', { class: 'small', onclick: () => expandDialog(v), 'aria-label': `Expand ${name}` }, 'Expand'),
          h('button', { class: 'small danger', onclick: () => deleteDialog(name), 'aria-label': `Delete ${name}` }, 'Delete'),
        ];
      } },
    ],
  });
  filter.addEventListener('input', () => table.setFilter(filter.value));
  table.setFilter(filter.value);
  fill(main,
    h('h1', null, 'Volumes'),
    h('div', { class: 'toolbar' }, filter, h('span', { class: 'grow' }), h('button', { class: 'primary', id: 'create-volume', onclick: () => createVolumeDialog() }, 'Create volume')),
    h('section', { class: 'panel' }, table.el));
  return { update: () => keepFocus(table.el, () => table.update(store.all('Volume'))) };
}
