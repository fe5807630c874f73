// What the pages know about the manager's resources: derived values (a volume's replicas,
// a node's capacity, a snapshot tree) and the API calls behind every action.

import * as api from './api.js';
import * as store from './store.js';

const enc = encodeURIComponent;

/** Replicas of a volume, with their engine mode and rebuild progress merged in. */
export function replicasOf(volumeName) {
  const engine = engineOf(volumeName);
  return store.all('Replica').filter((r) => r.spec?.volumeName === volumeName).map((r) => {
    const name = store.nameOf(r);
    const mode = engine?.status?.replicaModes?.[name] ?? r.status?.mode ?? null;
    const rb = engine?.status?.rebuildStatus?.[name];
    const progress = rb?.inProgress ? rb.progress : r.status?.rebuildProgress ?? null;
    return { obj: r, name, node: r.spec?.nodeId || '', disk: r.spec?.diskName || '', state: r.status?.state ?? 'pending', mode, progress, rebuildError: rb?.error, actualSize: r.status?.actualSize ?? 0 };
  });
}

/** The engine of a volume (the one meant to run, if several). */
export function engineOf(volumeName) {
  const es = store.all('Engine').filter((e) => e.spec?.volumeName === volumeName);
  return es.find((e) => e.spec?.desiredState !== 'stopped') ?? es[0];
}

/** Whether a volume has a replica being rebuilt, and how far (lowest progress). */
export function rebuildOf(volumeName) {
  const v = store.one('Volume', volumeName);
  const rs = replicasOf(volumeName).filter((r) => r.mode === 'WO' || (r.progress !== null && r.progress < 100));
  if (!rs.length) return v?.status?.rebuildProgress ?? null;
  return Math.min(...rs.map((r) => r.progress ?? 0));
}

/** The robustness group a volume counts in on the dashboard. */
export function robustnessGroup(v) {
  const st = v.status?.state;
  if (st === 'detached' || (!v.spec?.nodeId && st !== 'attached')) return 'detached';
  const r = v.status?.robustness;
  return r === 'healthy' || r === 'degraded' || r === 'faulted' ? r : 'unknown';
}

/** Snapshots of a volume as a forest: [{snap, children}], oldest first. */
export function snapshotTree(volumeName) {
  const snaps = store.all('Snapshot').filter((s) => s.spec?.volume === volumeName);
  const byName = new Map(snaps.map((s) => [store.nameOf(s), { snap: s, children: [] }]));
  const roots = [];
  for (const node of byName.values()) {
    const p = node.snap.status?.parent;
    if (p && byName.has(p)) byName.get(p).children.push(node);
    else roots.push(node);
  }
  const created = (n) => n.snap.status?.creationTime ?? n.snap.metadata?.creationTimestamp ?? '';
  const sort = (list) => {
    list.sort((a, b) => String(created(a)).localeCompare(String(created(b))));
    list.forEach((n) => sort(n.children));
    return list;
  };
  return sort(roots);
}

/** Backups of a volume (or all), newest first. */
export function backupsOf(volumeName) {
  return store.all('Backup').filter((b) => !volumeName || b.spec?.volume === volumeName).sort((a, b) =>
    String(b.status?.completedAt ?? b.metadata?.creationTimestamp ?? '').localeCompare(String(a.status?.completedAt ?? a.metadata?.creationTimestamp ?? '')));
}

/** Whether a node's agent is heartbeating (its Ready condition). */
export function nodeReady(n) {
  const c = (n.status?.conditions ?? []).find((c) => c.type === 'Ready');
  return c ? c.status === 'True' : null;
}

/** Capacity of a disk: total, used (not free), reserved, scheduled. */
export function diskCapacity(spec = {}, status = {}) {
  const total = status.storageMaximum ?? 0;
  const free = status.storageAvailable ?? 0;
  return { total, used: Math.max(0, total - free), reserved: spec.storageReserved ?? 0, scheduled: status.storageScheduled ?? 0, free };
}

/** Every disk of every node: [{node, name, spec, status, cap}]. */
export function disks() {
  return store.all('Node').flatMap((n) => {
    const names = new Set([...Object.keys(n.spec?.disks ?? {}), ...Object.keys(n.status?.disks ?? {})]);
    return [...names].sort().map((d) => {
      const spec = n.spec?.disks?.[d] ?? {};
      const status = n.status?.disks?.[d] ?? {};
      return { node: store.nameOf(n), name: d, spec, status, cap: diskCapacity(spec, status) };
    });
  });
}

/** The backup target the manager uses. */
export function backupTarget() {
  return store.one('BackupTarget', 'default') ?? store.all('BackupTarget')[0];
}

// ---- actions: each returns the API promise; errors carry the server's message ----

/** Creates a volume (restored from a backup when fromBackup is set). */
export function createVolume({ name, size, numberOfReplicas, dataLocality, nodeSelector, diskSelector, fromBackup }) {
  const body = { name, size, numberOfReplicas, dataLocality, nodeSelector, diskSelector };
  if (fromBackup) body.fromBackup = fromBackup;
  return api.post('/v1/volumes', body);
}

/** Attaches a volume to a node. */
export const attachVolume = (name, node) => api.post(`/v1/volumes/${enc(name)}/attach`, { node });
/** Detaches a volume. */
export const detachVolume = (name) => api.post(`/v1/volumes/${enc(name)}/detach`, {});
/** Grows a volume to size bytes. */
export const expandVolume = (name, size) => api.post(`/v1/volumes/${enc(name)}/expand`, { size });
/** Deletes a volume and its data. */
export const deleteVolume = (name) => api.del(`/v1/volumes/${enc(name)}`);
/** Takes a snapshot of a volume (named by the server when name is empty). */
export const createSnapshot = (volume, name) => api.post(`/v1/volumes/${enc(volume)}/snapshots`, name ? { name } : {});
/** Removes a snapshot of a volume. */
export const deleteSnapshot = (volume, name) => api.del(`/v1/volumes/${enc(volume)}/snapshots/${enc(name)}`);
/** Reverts a (detached) volume to a snapshot. */
export const revertVolume = (volume, snapshot) => api.post(`/v1/volumes/${enc(volume)}/snapshots/${enc(snapshot)}/revert`, {});
/** Backs up a snapshot of a volume (a new snapshot when none is named). */
export const createBackup = (volume, snapshot) => api.post(`/v1/volumes/${enc(volume)}/backups`, snapshot ? { snapshot } : {});
/** Deletes a backup from the target. */
export const deleteBackup = (name) => api.del(`/v1/backups/${enc(name)}`);
/** Changes a node: {allowScheduling, tags, zone, disks: {NAME: {allowScheduling, tags, storageReserved}}}. */
export const updateNode = (name, change) => api.patch(`/v1/nodes/${enc(name)}`, change);
/** Sets a setting's value; the server validates it. */
export const setSetting = (name, value) => api.put(`/v1/settings/${enc(name)}`, { value });
/** Sets the backup target URL (empty for none). */
export const setBackupTarget = (url, credentialSecret) => api.put('/v1/backuptarget', credentialSecret ? { url, credentialSecret } : { url });

/** Creates a recurring job {name, task, cron, retain, volumes}. */
export const createJob = (job) => api.post('/v1/recurringjobs', job);
/** Deletes a recurring job. */
export const deleteJob = (name) => api.del(`/v1/recurringjobs/${enc(name)}`);

/** Every setting with its definition: [{name, value, default, description, type, min, max}]. */
export async function settingDefinitions() {
  return store.itemsOf(await api.get('/v1/settings'));
}
