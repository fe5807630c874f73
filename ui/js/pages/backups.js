// Backups: the backup target's status (and its URL), backups per volume with size and time,
// restore into a new volume, delete.

import * as store from '../store.js';
import * as model from '../model.js';
import { h, fill, bytes, badge, time, ago, progress, formDialog, confirmDialog, keepFocus } from '../ui.js';
import { createVolumeDialog } from './volumes.js';

/** Mounts the backups page. */
export function mount(main) {
  const target = h('div');
  const list = h('div');
  fill(main, h('h1', null, 'Backups'),
    h('section', { class: 'panel', 'aria-labelledby': 't-h' }, h('h2', { id: 't-h' }, 'Backup target'), target),
    list);

  function update() {
    const t = model.backupTarget();
    const url = t?.spec?.url ?? '';
    const avail = t?.status?.available;
    const cond = (t?.status?.conditions ?? []).find((c) => c.status === 'False' && c.message);
    keepFocus(target, () => fill(target,
      h('div', { class: 'toolbar' },
        badge(!url ? 'unknown' : avail ? 'available' : 'unavailable'),
        h('span', { class: 'mono', id: 'target-url' }, url || 'no target set'),
        h('span', { class: 'small muted' }, t?.status?.lastSyncedAt ? `listed ${ago(t.status.lastSyncedAt)}` : ''),
        h('span', { class: 'grow' }),
        h('button', { onclick: () => formDialog({
          title: 'Backup target',
          submitText: 'Save',
          fields: [
            { name: 'url', label: 'URL', value: url, hint: 's3://BUCKET/PREFIX?endpoint=http://HOST:PORT&region=R or file:///PATH; empty for none',
              validate: (v) => (!v || /^(s3|file):\/\/\S+$/.test(v) ? '' : 'Use s3://… or file:///….') },
            { name: 'secret', label: 'Credentials (secret or file name, optional)', value: t?.spec?.credentialSecret ?? '' },
          ],
          submit: (v) => model.setBackupTarget(v.url.trim(), v.secret.trim()),
        }) }, 'Set target')),
      cond ? h('p', { class: 'error-text' }, `${cond.type}: ${cond.message}`) : null));

    const all = model.backupsOf();
    const byVol = new Map();
    for (const b of all) {
      const v = b.spec?.volume ?? '?';
      if (!byVol.has(v)) byVol.set(v, []);
      byVol.get(v).push(b);
    }
    keepFocus(list, () => fill(list, byVol.size ? [...byVol.keys()].sort().map((vol) => h('section', { class: 'panel', dataset: { key: vol }, 'aria-label': `Backups of ${vol}` },
      h('h2', null, 'Volume ', store.one('Volume', vol) ? h('a', { href: `#/volumes/${encodeURIComponent(vol)}` }, vol) : h('span', null, vol, h('span', { class: 'muted small' }, ' (deleted)'))),
      h('div', { class: 'table-wrap' }, h('table', { class: 'responsive', 'aria-label': `Backups of ${vol}` },
        h('thead', null, h('tr', null, ['Backup', 'State', 'Snapshot', 'Size', 'Uploaded', 'Volume size', 'Completed', ''].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', null, byVol.get(vol).map((b) => {
          const name = store.nameOf(b);
          const s = b.status ?? {};
          const state = String(s.state ?? 'pending');
          return h('tr', { dataset: { key: name } },
            h('td', { 'data-label': 'Backup', class: 'mono' }, name),
            h('td', { 'data-label': 'State' }, badge(state), state.toLowerCase() === 'inprogress' ? [' ', progress(s.progress ?? 0, `backup ${name}`)] : null,
              s.error ? h('div', { class: 'error-text' }, s.error) : null),
            h('td', { 'data-label': 'Snapshot', class: 'mono' }, s.snapshot ?? b.spec?.snapshot ?? '–'),
            h('td', { 'data-label': 'Size' }, bytes(s.size ?? 0)),
            h('td', { 'data-label': 'Uploaded' }, bytes(s.uploadedBytes ?? 0)),
            h('td', { 'data-label': 'Volume size' }, bytes(s.volumeSize ?? 0)),
            h('td', { 'data-label': 'Completed' }, time(s.completedAt)),
            h('td', { class: 'actions' },
              h('button', { class: 'small', 'aria-label': `Restore ${name}`, disabled: state.toLowerCase() !== 'completed', onclick: () => createVolumeDialog({ fromBackup: name }) }, 'Restore'),
              h('button', { class: 'small danger', 'aria-label': `Delete ${name}`, onclick: () => confirmDialog({
                title: `Delete backup ${name}?`,
                message: h('p', null, `Backup ${name} of ${vol} is removed from the target; blocks no other backup uses are deleted.`),
                confirmText: `Delete ${name}`, action: () => model.deleteBackup(name),
              }) }, 'Delete')));
        }))))))
      : h('p', { class: 'panel muted' }, 'No backup yet. Back up a volume from its page.')));
  }
  return { update };
}
