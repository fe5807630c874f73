// Volume detail: state, replicas (node, disk, mode, rebuild progress), the snapshot tree with
// create / revert / delete / back up, a live I/O chart from the volume's stats, its backups
// and the recurring jobs that apply to it.

import * as store from '../store.js';
import * as model from '../model.js';
import { h, fill, bytes, badge, progress, time, ago, act, confirmDialog, formDialog, keepFocus } from '../ui.js';
import { LineChart } from '../chart.js';
import { attachDialog, detachDialog, expandDialog, deleteDialog, validateName } from './volumes.js';

/** Mounts the detail page of volume `name`. */
export function mount(main, name) {
  const title = h('span', null, name);
  const badges = h('span', { class: 'badges' });
  const actions = h('div', { class: 'toolbar' });
  const details = h('dl', { class: 'kv' });
  const replicas = h('div', { class: 'table-wrap' });
  const tree = h('div', { id: 'snapshot-tree' });
  const backups = h('div');
  const jobs = h('div');
  const conditions = h('div');
  const charts = {
    iops: new LineChart({ title: 'IOPS', series: [{ label: 'read', color: '#2b8a3e' }, { label: 'write', color: '#d9480f' }] }),
    tput: new LineChart({ title: 'Throughput', series: [{ label: 'read', color: '#2b8a3e' }, { label: 'write', color: '#d9480f' }], format: (v) => `${bytes(v)}/s` }),
    lat: new LineChart({ title: 'Latency', series: [{ label: 'read', color: '#2b8a3e' }, { label: 'write', color: '#d9480f' }], format: (v) => `${v.toFixed(0)} µs` }),
  };
  let lastSample = null;
  const statsNote = h('p', { class: 'small muted' });

  fill(main,
    h('p', { class: 'small' }, h('a', { href: '#/volumes' }, '← Volumes')),
    h('h1', null, title, badges),
    actions,
    h('div', { class: 'grid' },
      h('section', { class: 'panel', 'aria-labelledby': 'd-h' }, h('h2', { id: 'd-h' }, 'Details'), details, conditions),
      h('section', { class: 'panel', 'aria-labelledby': 'io-h' }, h('h2', { id: 'io-h' }, 'I/O (live)'),
        h('div', { class: 'charts' }, charts.iops.el, charts.tput.el, charts.lat.el), statsNote)),
    h('section', { class: 'panel', 'aria-labelledby': 'r-h' }, h('h2', { id: 'r-h' }, 'Replicas'), replicas),
    h('section', { class: 'panel', 'aria-labelledby': 's-h' },
      h('div', { class: 'toolbar' }, h('h2', { id: 's-h', style: { margin: 0 } }, 'Snapshots'), h('span', { class: 'grow' }),
        h('button', { id: 'take-snapshot', onclick: () => snapshotDialog(name) }, 'Take snapshot'),
        h('button', { id: 'back-up-now', onclick: (ev) => act(ev.currentTarget, () => model.createBackup(name), { success: `Backup of ${name} started.` }) }, 'Back up now')),
      tree),
    h('div', { class: 'grid' },
      h('section', { class: 'panel', 'aria-labelledby': 'b-h' }, h('h2', { id: 'b-h' }, 'Backups'), backups),
      h('section', { class: 'panel', 'aria-labelledby': 'j-h' },
        h('div', { class: 'toolbar' }, h('h2', { id: 'j-h', style: { margin: 0 } }, 'Recurring jobs'), h('span', { class: 'grow' }),
          h('button', { class: 'small', onclick: () => jobDialog(name) }, 'Add job')),
        jobs)));

  function update() {
    const v = store.one('Volume', name);
    if (!v) {
      fill(badges, badge('unknown'));
      fill(details, h('dt', null, 'Volume'), h('dd', null, store.state() === 'live' && !store.replaying() ? 'not found (deleted?)' : 'loading…'));
      fill(actions);
      return;
    }
    const st = v.status ?? {};
    const attached = !!v.spec?.nodeId;
    const rebuild = model.rebuildOf(name);
    fill(badges, badge(st.state ?? 'creating'), ' ', h('span', { id: 'robustness', dataset: { value: st.robustness ?? 'unknown' } }, badge(st.robustness ?? 'unknown')),
      rebuild !== null && rebuild !== undefined ? [' ', h('span', { id: 'rebuilding' }, badge('rebuilding'))] : null);
    keepFocus(actions, () => fill(actions,
      attached ? h('button', { onclick: () => detachDialog(name) }, 'Detach') : h('button', { id: 'attach', onclick: () => attachDialog(name) }, 'Attach'),
      h('button', { onclick: () => expandDialog(v) }, 'Expand'),
      h('button', { class: 'danger', onclick: async () => {
        if (await deleteDialog(name)) location.hash = '#/volumes';
      } }, 'Delete')));
    const kv = [
      ['Size', `${bytes(v.spec?.size)}${st.currentSize && st.currentSize !== v.spec?.size ? ` (serving ${bytes(st.currentSize)})` : ''}`],
      ['Actual size', bytes(st.actualSize ?? 0)],
      ['Replicas', `${st.healthyReplicas ?? 0} healthy of ${v.spec?.numberOfReplicas}`],
      ['Node', st.currentNode ?? v.spec?.nodeId ?? '–'],
      ['Endpoint', st.endpoint ? h('span', { class: 'mono' }, st.endpoint) : '–'],
      ['Data locality', v.spec?.dataLocality ?? 'disabled'],
      ['Selectors', `nodes: ${(v.spec?.nodeSelector ?? []).join(', ') || 'any'} · disks: ${(v.spec?.diskSelector ?? []).join(', ') || 'any'}`],
      ['From backup', v.spec?.fromBackup ?? '–'],
      ['Restore', st.restoreProgress !== undefined && st.restoreProgress !== null ? progress(st.restoreProgress, 'restore') : '–'],
      ['Last backup', st.lastBackup ? `${st.lastBackup} (${time(st.lastBackupAt)})` : '–'],
      ['Created', time(v.metadata?.creationTimestamp)],
    ];
    fill(details, kv.flatMap(([k, val]) => [h('dt', null, k), h('dd', null, val)]));
    const conds = st.conditions ?? [];
    fill(conditions, conds.length ? h('ul', { class: 'events' }, conds.map((c) => h('li', null, badge(c.status), h('span', null, h('strong', null, c.type), c.reason ? ` ${c.reason}` : '', c.message ? `: ${c.message}` : '')))) : null);

    const rs = model.replicasOf(name);
    keepFocus(replicas, () => fill(replicas, h('table', { class: 'responsive', 'aria-label': 'Replicas', id: 'replicas' },
      h('thead', null, h('tr', null, ['Replica', 'Node', 'Disk', 'Process', 'Mode', 'Rebuild', 'Actual size'].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', null, rs.length ? rs.map((r) => h('tr', { dataset: { key: r.name, mode: r.mode ?? '' } },
        h('td', { 'data-label': 'Replica', class: 'mono' }, r.name),
        h('td', { 'data-label': 'Node' }, r.node || '–'),
        h('td', { 'data-label': 'Disk' }, r.disk || '–'),
        h('td', { 'data-label': 'Process' }, badge(r.state)),
        h('td', { 'data-label': 'Mode' }, r.mode ? badge(r.mode) : '–'),
        h('td', { 'data-label': 'Rebuild', class: 'rebuild' }, r.progress !== null && r.progress !== undefined && r.mode !== 'RW' ? progress(r.progress, `rebuild of ${r.name}`) : r.rebuildError ? h('span', { class: 'error-text' }, r.rebuildError) : '–'),
        h('td', { 'data-label': 'Actual size' }, bytes(r.actualSize))))
        : h('tr', { class: 'empty' }, h('td', { colspan: 7 }, 'No replica scheduled yet.'))))));

    const forest = model.snapshotTree(name);
    keepFocus(tree, () => fill(tree, forest.length ? h('ul', { class: 'tree', role: 'tree', 'aria-label': 'Snapshot tree' }, forest.map((n) => snapNode(n, name, attached)))
      : h('p', { class: 'muted' }, 'No snapshot yet.')));

    const bs = model.backupsOf(name);
    keepFocus(backups, () => fill(backups, bs.length ? h('ul', { class: 'events' }, bs.map((b) => h('li', { dataset: { key: store.nameOf(b) } },
      badge(b.status?.state ?? 'pending'),
      h('span', null, h('span', { class: 'mono' }, store.nameOf(b)), ' ', bytes(b.status?.size ?? 0), ' · ', time(b.status?.completedAt ?? b.metadata?.creationTimestamp)),
      String(b.status?.state).toLowerCase() === 'inprogress' ? progress(b.status?.progress ?? 0, `backup ${store.nameOf(b)}`) : null,
      b.status?.error ? h('span', { class: 'error-text' }, b.status.error) : null)))
      : h('p', { class: 'muted' }, 'No backup of this volume.')));

    const js = store.all('RecurringJob').filter((j) => !(j.spec?.volumes ?? []).length || j.spec.volumes.includes(name));
    keepFocus(jobs, () => fill(jobs, js.length ? h('ul', { class: 'events' }, js.map((j) => h('li', { dataset: { key: store.nameOf(j) } }, h('strong', null, store.nameOf(j)),
      h('span', { class: 'grow' }, `${j.spec?.task} · `, h('span', { class: 'mono' }, j.spec?.cron), ` · keep ${j.spec?.retain}${(j.spec?.volumes ?? []).length ? '' : ' · all volumes'} · next ${time(j.status?.nextRun)} · last ${ago(j.status?.lastRun)}`),
      h('button', { class: 'small danger', 'aria-label': `Delete job ${store.nameOf(j)}`, onclick: () => confirmDialog({
        title: `Delete recurring job ${store.nameOf(j)}?`,
        message: h('p', null, `No more ${j.spec?.task}s on "${j.spec?.cron}". Snapshots and backups it took are kept.`),
        confirmText: `Delete ${store.nameOf(j)}`, action: () => model.deleteJob(store.nameOf(j)),
      }) }, 'Delete'))))
      : h('p', { class: 'muted' }, 'No recurring job applies to this volume.')));

    const stats = st.stats ?? model.engineOf(name)?.status?.stats;
    statsNote.textContent = stats ? `sampled ${time(stats.sampledAt)}` : attached ? 'Waiting for the engine\'s first I/O sample…' : 'I/O statistics appear while the volume is attached.';
    const stamp = stats ? stats.sampledAt ?? JSON.stringify(stats) : null;
    if (stats && stamp !== lastSample) {
      lastSample = stamp;
      charts.iops.push([stats.readIops, stats.writeIops]);
      charts.tput.push([stats.readBytesPerSecond, stats.writeBytesPerSecond]);
      charts.lat.push([stats.readLatencyMicros, stats.writeLatencyMicros]);
    }
  }
  return { update };
}

function snapNode(node, volume, attached) {
  const s = node.snap;
  const sname = store.nameOf(s);
  const st = s.status ?? {};
  const label = h('span', { class: 'snap', role: 'treeitem', 'aria-label': `snapshot ${sname}`, dataset: { snapshot: sname } },
    h('strong', { class: 'mono' }, sname),
    h('span', { class: 'small muted' }, time(st.creationTime ?? s.metadata?.creationTimestamp)),
    st.readyToUse ? badge('ready') : badge('pending'),
    st.error ? h('span', { class: 'error-text' }, st.error) : null,
    h('button', { class: 'small', 'aria-label': `Back up ${sname}`, onclick: (ev) => act(ev.currentTarget, () => model.createBackup(volume, sname), { success: `Backup of ${sname} started.` }) }, 'Back up'),
    h('button', { class: 'small', 'aria-label': `Revert to ${sname}`, onclick: () => confirmDialog({
      title: `Revert ${volume} to ${sname}?`,
      message: h('p', null, `Everything written to ${volume} after ${sname} is discarded (later snapshots stay as a branch).`, attached ? h('strong', null, ' The volume must be detached first.') : ''),
      confirmText: 'Revert', action: () => model.revertVolume(volume, sname),
    }) }, 'Revert'),
    h('button', { class: 'small danger', 'aria-label': `Delete ${sname}`, onclick: () => confirmDialog({
      title: `Delete snapshot ${sname}?`,
      message: h('p', null, `Snapshot ${sname} of ${volume} is merged into its child; its point in time is gone.`),
      confirmText: `Delete ${sname}`, action: () => model.deleteSnapshot(volume, sname),
    }) }, 'Delete'));
  return h('li', { dataset: { key: sname } }, label, node.children.length ? h('ul', { role: 'group' }, node.children.map((c) => snapNode(c, volume, attached))) : null);
}

function jobDialog(volume) {
  return formDialog({
    title: `Recurring job for ${volume}`,
    submitText: 'Add job',
    fields: [
      { name: 'name', label: 'Name', value: `${volume}-nightly`, validate: validateName },
      { name: 'task', label: 'Task', type: 'select', value: 'snapshot', options: [['snapshot', 'snapshot'], ['backup', 'backup (snapshot, then back it up)']] },
      { name: 'cron', label: 'Schedule (cron, UTC)', value: '0 2 * * *', hint: 'minute hour day-of-month month day-of-week',
        validate: (v) => (v.trim().split(/\s+/).length === 5 ? '' : 'Five fields: minute hour day-of-month month day-of-week.') },
      { name: 'retain', label: 'Keep', type: 'number', value: 7, min: 1, max: 100, validate: (v) => (/^\d+$/.test(v) && +v >= 1 && +v <= 100 ? '' : 'A whole number from 1 to 100.') },
    ],
    submit: (v) => model.createJob({ name: v.name, task: v.task, cron: v.cron.trim(), retain: Number(v.retain), volumes: [volume] }),
  });
}

function snapshotDialog(volume) {
  return formDialog({
    title: `Take a snapshot of ${volume}`,
    submitText: 'Take snapshot',
    fields: [{ name: 'name', label: 'Name (optional)', value: '', validate: (v) => (v ? validateName(v) : '') }],
    submit: (v) => model.createSnapshot(volume, v.name || undefined),
  });
}
