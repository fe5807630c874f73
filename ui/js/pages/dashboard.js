// Dashboard: volumes by robustness, capacity per node and disk, rebuilds and backups in
// progress, and the latest change events from the stream.

import * as store from '../store.js';
import * as model from '../model.js';
import { h, fill, bytes, bar, progress, badge, time } from '../ui.js';

const GROUPS = [
  ['healthy', 'Healthy'],
  ['degraded', 'Degraded'],
  ['faulted', 'Faulted'],
  ['detached', 'Detached'],
];

/** Mounts the dashboard into main. */
export function mount(main) {
  const cards = h('div', { class: 'cards', id: 'robustness-cards' });
  const capacity = h('div');
  const work = h('div');
  const events = h('ul', { class: 'events', 'aria-label': 'Recent events' });
  fill(main,
    h('h1', null, 'Dashboard'),
    cards,
    h('div', { class: 'grid' },
      h('section', { class: 'panel', 'aria-labelledby': 'cap-h' }, h('h2', { id: 'cap-h' }, 'Capacity'), capacity),
      h('section', { class: 'panel', 'aria-labelledby': 'work-h' }, h('h2', { id: 'work-h' }, 'In progress'), work),
      h('section', { class: 'panel', 'aria-labelledby': 'ev-h' }, h('h2', { id: 'ev-h' }, 'Recent events'), events)));

  function update() {
    const vols = store.all('Volume');
    const counts = { healthy: 0, degraded: 0, faulted: 0, detached: 0, unknown: 0 };
    for (const v of vols) counts[model.robustnessGroup(v)]++;
    fill(cards,
      GROUPS.map(([k, label]) => h('a', { class: `card ${k}`, href: `#/volumes?robustness=${k}`, dataset: { group: k } },
        h('div', { class: 'n' }, String(counts[k])), h('div', { class: 'muted' }, label))),
      h('a', { class: 'card', href: '#/volumes' }, h('div', { class: 'n' }, String(vols.length)), h('div', { class: 'muted' }, 'Volumes')));

    const nodes = store.all('Node');
    if (!nodes.length) fill(capacity, h('p', { class: 'muted' }, 'No node has reported yet.'));
    else {
      const disks = model.disks();
      fill(capacity, nodes.map((n) => {
        const name = store.nameOf(n);
        const nd = disks.filter((d) => d.node === name);
        const sum = (k) => nd.reduce((a, d) => a + d.cap[k], 0);
        const total = sum('total');
        return h('div', { class: 'field' },
          h('div', { class: 'row small' }, h('strong', null, name), h('span', { class: 'muted', style: { textAlign: 'right' } }, `${bytes(sum('used'))} used of ${bytes(total)} · ${bytes(sum('scheduled'))} scheduled`)),
          bar(total, [{ value: sum('used'), cls: 'used', label: 'used' }, { value: sum('reserved'), cls: 'reserved', label: 'reserved' }], `${name} capacity`),
          nd.map((d) => h('div', { class: 'small muted', style: { marginLeft: '12px', marginTop: '4px' } },
            `${d.name}: ${bytes(d.cap.used)} / ${bytes(d.cap.total)}`,
            bar(d.cap.total, [{ value: d.cap.used, cls: 'used', label: 'used' }, { value: d.cap.reserved, cls: 'reserved', label: 'reserved' }], `${name} ${d.name} capacity`))));
      }), legend());
    }

    const rebuilds = vols.map((v) => [v, model.rebuildOf(store.nameOf(v))]).filter(([, p]) => p !== null && p !== undefined);
    const restores = vols.filter((v) => v.status?.restoreProgress !== undefined && v.status?.restoreProgress !== null && v.status.restoreProgress < 100);
    const running = store.all('Backup').filter((b) => ['pending', 'inprogress'].includes(String(b.status?.state ?? 'pending').toLowerCase()));
    const items = [
      ...rebuilds.map(([v, p]) => h('li', null, 'Rebuild ', h('a', { href: `#/volumes/${encodeURIComponent(store.nameOf(v))}` }, store.nameOf(v)), ' ', progress(p, `rebuild of ${store.nameOf(v)}`))),
      ...restores.map((v) => h('li', null, 'Restore ', h('a', { href: `#/volumes/${encodeURIComponent(store.nameOf(v))}` }, store.nameOf(v)), ' ', progress(v.status.restoreProgress, `restore of ${store.nameOf(v)}`))),
      ...running.map((b) => h('li', null, 'Backup of ', h('a', { href: `#/volumes/${encodeURIComponent(b.spec?.volume ?? '')}` }, b.spec?.volume ?? '?'), ' ', progress(b.status?.progress ?? 0, `backup ${store.nameOf(b)}`))),
    ];
    fill(work, items.length ? h('ul', { class: 'events' }, items) : h('p', { class: 'muted' }, 'No rebuild, restore or backup is running.'));

    const evs = store.recentEvents().slice(0, 30);
    fill(events, evs.length ? evs.map((e) => h('li', null, h('time', { datetime: e.at.toISOString() }, time(e.at).slice(11)),
      h('span', null, `${e.kind} `, h('strong', null, e.name), ` ${e.type}`, e.obj?.status?.state ? ' ' : '', e.obj?.status?.state ? badge(e.obj.status.state) : null)))
      : h('li', { class: 'muted' }, 'Changes appear here as they happen.'));
  }
  return { update };
}

function legend() {
  return h('div', { class: 'legend' },
    h('span', null, h('i', { style: { background: 'var(--used)' } }), 'used'),
    h('span', null, h('i', { style: { background: 'var(--reserved)' } }), 'reserved'));
}
