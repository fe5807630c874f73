// End-to-end test of the web UI: a real cluster started like `ironhorn up` (manager, three
// agents, replicas and engines as processes) on free ports, a moto S3 server, and Debian's
// headless Chromium driven by playwright-core. Steps run in order in one browser session;
// each saves a screenshot under target/ui-screenshots/.
//
// Run: cargo build && (cd tests/ui && npm ci && npm test)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { SHOT_DIR, launch, shot } from './lib/browser.mjs';
import { startCluster } from './lib/cluster.mjs';
import { startMoto, pidsMatching, run, sleep, tempDir } from './lib/procs.mjs';

const VOL = 'ui-vol';
const RESTORED = 'ui-restored';
const SNAP = 'ui-snap-1';
const BUCKET = 'ironhorn-ui';
// Enough data that the rebuild takes a few seconds, so that its progress shows.
const VOL_SIZE_MIB = 1024;
const DATA_MIB = 768;

let work;
let moto;
let cluster;
let browser;
let page;
let api;
let dataFile;
const requests = [];
let headFile;

let failed = null;
/** One step; after a failed step the rest are skipped (they build on it). */
const MiB = 1024 * 1024;

/** Whether the first `len` bytes of files a and b are equal (read in 8 MiB pieces). */
function sameBytes(a, b, len) {
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  const ba = Buffer.alloc(8 * MiB);
  const bb = Buffer.alloc(8 * MiB);
  try {
    for (let off = 0; off < len; off += ba.length) {
      const n = Math.min(ba.length, len - off);
      if (fs.readSync(fa, ba, 0, n, off) !== n || fs.readSync(fb, bb, 0, n, off) !== n) return false;
      if (!ba.subarray(0, n).equals(bb.subarray(0, n))) return false;
    }
    return true;
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

/** Whether file f holds only zeros from offset `from` to its end. */
function allZero(f, from) {
  const fd = fs.openSync(f, 'r');
  const buf = Buffer.alloc(8 * MiB);
  try {
    for (let off = from; ; off += buf.length) {
      const n = fs.readSync(fd, buf, 0, buf.length, off);
      if (n === 0) return true;
      if (buf.subarray(0, n).some((x) => x !== 0)) return false;
    }
  } finally {
    fs.closeSync(fd);
  }
}

const step = (name, fn) =>
  test(name, { timeout: 300000 }, async (t) => {
    if (failed) {
      t.skip(`skipped: "${failed}" failed`);
      return;
    }
    try {
      await fn(t);
    } catch (e) {
      failed = name;
      if (page) await shot(page, `failed-${name.replace(/[^a-z0-9]+/gi, '-').slice(0, 40)}`).catch(() => {});
      if (cluster) console.log(cluster.tail());
      throw e;
    }
  });

before(async () => {
  work = tempDir('ironhorn-ui-e2e-');
  fs.rmSync(SHOT_DIR, { recursive: true, force: true });
  moto = await startMoto(work, BUCKET);
  cluster = await startCluster(work, {
    env: { AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test', AWS_REGION: 'us-east-1' },
  });
  api = cluster.api;
  browser = await launch({ width: 1280, height: 900 });
  page = browser.page;
  page.setDefaultTimeout(30000);
  page.on('request', (r) => requests.push({ method: r.method(), url: r.url() }));
});

after(async () => {
  if (browser) {
    if (browser.consoleErrors.length) console.log(`browser console errors:\n${browser.consoleErrors.join('\n')}`);
    await browser.close();
  }
  if (cluster) await cluster.stop();
  if (moto) await moto.proc.stop(3000);
  if (work && !process.env.UI_KEEP_WORKDIR) fs.rmSync(work, { recursive: true, force: true });
});

async function goto(hash) {
  await page.evaluate((h) => {
    location.hash = h;
  }, hash);
  await page.waitForFunction((h) => location.hash === h, hash);
}

/** The volume as the manager has it. */
const volume = (name) => api.get(`/v1/volumes/${name}`);

step('sign in with the API token', async () => {
  await page.goto(cluster.url);
  await page.waitForSelector('#token');
  await shot(page, 'signin');
  // A wrong token is refused with the server's message and nothing is kept.
  await page.fill('#token', 'not-the-token');
  await page.click('form.signin button[type=submit]');
  await page.waitForFunction(() => document.querySelector('form.signin [role=alert]')?.textContent.trim().length > 0);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('ironhorn.token')), null);
  await page.fill('#token', cluster.token);
  await page.click('form.signin button[type=submit]');
  await page.waitForSelector('h1:text("Dashboard")');
  await page.waitForSelector('#live.on');
  // The token lives in sessionStorage only.
  assert.equal(await page.evaluate(() => sessionStorage.getItem('ironhorn.token')), cluster.token);
  assert.equal(await page.evaluate(() => localStorage.length), 0);
  // Mark the document: the later steps check it is the same one (no reload).
  await page.evaluate(() => {
    window.__noReload = 'same-document';
  });
});

step('dashboard shows the nodes and their capacity', async () => {
  await page.waitForFunction(() => document.querySelectorAll('#main .bar').length >= 3, null, { timeout: 60000 });
  for (const n of ['node-1', 'node-2', 'node-3']) await page.waitForSelector(`#main strong:text("${n}")`);
  await shot(page, 'dashboard');
});

step('create a volume', async () => {
  await goto('#/volumes');
  // Keyboard: Tab from the filter reaches the button, Enter opens the dialog, Escape closes it.
  await page.focus('input[type=search]');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'create-volume');
  await page.keyboard.press('Enter');
  const dlg = page.locator('dialog[open]');
  await dlg.waitFor();
  assert.equal(await page.evaluate(() => document.activeElement?.getAttribute('name')), 'name', 'the first field has the focus');
  await page.keyboard.press('Escape');
  await dlg.waitFor({ state: 'detached' });
  await page.click('#create-volume');
  await dlg.locator('input[name=name]').fill('Bad_Name');
  await dlg.locator('button[type=submit]').click();
  // Checked as typed: the dialog stays open with the reason.
  await dlg.locator('.error:has-text("Lower-case")').waitFor();
  await dlg.locator('input[name=name]').fill(VOL);
  await dlg.locator('input[name=size]').fill('1GiB');
  await dlg.locator('input[name=replicas]').fill('3');
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector(`tr[data-key="${VOL}"]`);
  const v = await volume(VOL);
  assert.equal(v.spec.size, VOL_SIZE_MIB * MiB);
  assert.equal(v.spec.numberOfReplicas, 3);
  // Creating it again is refused with the server's message, shown in the dialog.
  await page.click('#create-volume');
  await dlg.locator('input[name=name]').fill(VOL);
  await dlg.locator('input[name=size]').fill('64MiB');
  await dlg.locator('button[type=submit]').click();
  await dlg.locator('.server-error').filter({ hasText: /\S/ }).waitFor();
  await dlg.locator('button:text("Cancel")').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector(`tr[data-key="${VOL}"] .badge.detached`, { timeout: 90000 });
  await shot(page, 'volumes');
});

step('attach the volume to node-1', async () => {
  await page.click(`tr[data-key="${VOL}"] button[aria-label="Attach ${VOL}"]`);
  const dlg = page.locator('dialog[open]');
  await dlg.locator('select[name=node]').selectOption('node-1');
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector(`tr[data-key="${VOL}"] .badge.attached`, { timeout: 90000 });
  await page.waitForSelector(`tr[data-key="${VOL}"] .badge.healthy`, { timeout: 90000 });
  const v = await volume(VOL);
  assert.equal(v.status.currentNode, 'node-1');
  assert.ok(v.status.endpoint, 'an attached volume has an endpoint');
});

step('write data through the volume (nbdcopy)', async () => {
  const v = await volume(VOL);
  dataFile = path.join(work, 'data.bin');
  headFile = path.join(work, 'head.bin');
  run('sh', ['-c', 'head -c "$1" /dev/urandom > "$2" && head -c 1048576 "$2" > "$3"', 'sh', String(DATA_MIB * MiB), dataFile, headFile]);
  run('nbdcopy', [dataFile, v.status.endpoint], { timeout: 300000 });
});

step('a killed replica: degraded → rebuilding (progress moves) → healthy, live', async () => {
  await goto(`#/volumes/${VOL}`);
  await page.waitForSelector('#robustness[data-value=healthy]');
  // Record every state the page shows, as it shows it (a MutationObserver in the page).
  await page.evaluate(() => {
    window.__seen = { robustness: [], progress: [], rebuilding: false };
    const record = () => {
      const r = document.querySelector('#robustness')?.dataset.value;
      const s = window.__seen;
      if (r && s.robustness[s.robustness.length - 1] !== r) s.robustness.push(r);
      if (document.querySelector('#rebuilding')) s.rebuilding = true;
      for (const p of document.querySelectorAll('#replicas td.rebuild progress')) {
        const v = Number(p.value);
        if (s.progress[s.progress.length - 1] !== v) s.progress.push(v);
      }
    };
    new MutationObserver(record).observe(document.getElementById('main'), { subtree: true, childList: true, attributes: true, characterData: true });
    record();
  });
  const replicas = await api.list(`/v1/volumes/${VOL}/replicas`);
  assert.equal(replicas.length, 3);
  const victim = replicas.find((r) => r.spec.nodeId !== 'node-1') ?? replicas[0];
  const pids = pidsMatching('replica', 'serve', victim.spec.dataDir || victim.metadata.name);
  assert.ok(pids.length >= 1, `the process of replica ${victim.metadata.name} is found`);
  for (const pid of pids) process.kill(pid, 'SIGKILL');
  // The engine finds out at the next write (the same bytes again: the data stays as written).
  const v = await volume(VOL);
  run('nbdcopy', [headFile, v.status.endpoint], { timeout: 120000 });

  await page.waitForSelector('#robustness[data-value=degraded]', { timeout: 60000 });
  await shot(page, 'volume-degraded');
  await page.waitForSelector('#replicas td.rebuild progress', { timeout: 120000 });
  await shot(page, 'volume-rebuilding');
  await page.waitForSelector('#robustness[data-value=healthy]', { timeout: 180000 });
  const seen = await page.evaluate(() => window.__seen);
  assert.ok(seen.robustness.indexOf('degraded') >= 0 && seen.robustness.lastIndexOf('healthy') > seen.robustness.indexOf('degraded'), `robustness went degraded then healthy: ${JSON.stringify(seen)}`);
  assert.ok(seen.rebuilding, 'the page showed the rebuild');
  assert.ok(new Set(seen.progress).size >= 2, `the progress bar moved: ${JSON.stringify(seen.progress)}`);
  assert.equal(await page.evaluate(() => window.__noReload), 'same-document', 'no reload happened');
  await page.waitForFunction(() => [...document.querySelectorAll('#replicas tbody tr')].filter((tr) => tr.dataset.mode === 'RW').length === 3);
  const v2 = await volume(VOL);
  assert.equal(v2.status.robustness, 'healthy');
  assert.equal(v2.status.healthyReplicas, 3, 'three RW replicas on the server');
});

step('take a snapshot and see it in the tree', async () => {
  await page.click('#take-snapshot');
  const dlg = page.locator('dialog[open]');
  await dlg.locator('input[name=name]').fill(SNAP);
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector(`#snapshot-tree [data-snapshot="${SNAP}"]`);
  await page.waitForSelector(`#snapshot-tree [data-snapshot="${SNAP}"] .badge.ready`, { timeout: 60000 });
  const snaps = await api.list(`/v1/volumes/${VOL}/snapshots`);
  assert.ok(snaps.some((s) => s.metadata.name === SNAP), `${SNAP} on the server`);
  await shot(page, 'volume');
  await goto('#/');
  await page.waitForSelector('#robustness-cards .card.healthy .n:text("1")');
  await shot(page, 'dashboard-volumes');
});

step('recurring job: a bad schedule refused by the server, a good one added, then deleted', async () => {
  await goto(`#/volumes/${VOL}`);
  await page.click('button:text("Add job")');
  const dlg = page.locator('dialog[open]');
  await dlg.locator('input[name=name]').fill('ui-job');
  await dlg.locator('input[name=cron]').fill('61 * * * *');
  await dlg.locator('button[type=submit]').click();
  await dlg.locator('.server-error').filter({ hasText: /minute/ }).waitFor();
  await assert.rejects(api.get('/v1/recurringjobs/ui-job'), /404/);
  await dlg.locator('input[name=cron]').fill('*/5 * * * *');
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector('li[data-key="ui-job"]');
  const job = await api.get('/v1/recurringjobs/ui-job');
  assert.deepEqual(job.spec.volumes, [VOL]);
  assert.equal(job.spec.cron, '*/5 * * * *');
  await page.click('button[aria-label="Delete job ui-job"]');
  await dlg.locator('button[type=submit]').click();
  await page.waitForSelector('li[data-key="ui-job"]', { state: 'detached' });
  await assert.rejects(api.get('/v1/recurringjobs/ui-job'), /404/);
});

let backupName = null;

step('back up a snapshot to S3 (moto)', async (t) => {
  await goto('#/backups');
  await page.click('button:text("Set target")');
  const dlg = page.locator('dialog[open]');
  const url = `s3://${BUCKET}/backups?endpoint=${moto.endpoint}&region=us-east-1`;
  await dlg.locator('input[name=url]').fill(url);
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector('#target-url:text("s3://")');
  assert.equal((await api.get('/v1/backuptarget')).spec.url, url);

  await goto(`#/volumes/${VOL}`);
  await page.click(`button[aria-label="Back up ${SNAP}"]`);
  const started = await api.until('a backup of the volume', async () => (await api.list(`/v1/backups?volume=${VOL}`))[0], 30000);
  // A manager without a backup controller never touches the Backup: its status stays
  // empty. That is a missing feature, reported as a skip, not a pass.
  const moving = await api.until('the backup controller to take the backup up', async () => {
    const b = await api.get(`/v1/backups/${started.metadata.name}`);
    return b.status && b.status.state && b.status.state !== 'pending' ? b : null;
  }, 60000).catch(() => null);
  if (!moving) {
    await goto('#/backups');
    await shot(page, 'backups');
    t.skip(`backup ${started.metadata.name} stayed pending for 60 s: the manager runs no backup controller; backup and restore not tested`);
    return;
  }
  await goto('#/backups');
  await page.waitForSelector(`section[data-key="${VOL}"] .badge.completed, section[data-key="${VOL}"] .badge.error`, { timeout: 240000 });
  const b = await api.get(`/v1/backups/${started.metadata.name}`);
  assert.equal(b.status.state, 'completed', `backup failed: ${b.status.error}`);
  assert.equal(b.status.snapshot ?? b.spec.snapshot, SNAP);
  assert.ok(b.status.size > 0, 'the backup holds data');
  backupName = b.metadata.name;
  const target = (await api.get('/v1/backuptarget')).status;
  if (target && target.available !== undefined) await page.waitForSelector(`.panel .badge.${target.available ? 'available' : 'unavailable'}`);
  await shot(page, 'backups');
});

step('restore the backup into a new volume and read back the data', async (t) => {
  if (!backupName) {
    t.skip('no backup to restore (see the backup step)');
    return;
  }
  await goto('#/backups');
  await page.click(`button[aria-label="Restore ${backupName}"]`);
  const dlg = page.locator('dialog[open]');
  await dlg.locator('input[name=name]').fill(RESTORED);
  assert.equal(await dlg.locator('select[name=fromBackup]').inputValue(), backupName);
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await goto('#/volumes');
  await page.waitForSelector(`tr[data-key="${RESTORED}"]`);
  assert.equal((await volume(RESTORED)).spec.fromBackup, backupName);
  await api.until(`${RESTORED} restored`, async () => {
    const v = await volume(RESTORED);
    const restored = (v.status?.conditions ?? []).some((c) => c.type === 'Restored' && c.status === 'True') || v.status?.restoreProgress === 100;
    return v.status?.state === 'detached' && restored && v;
  }, 240000);
  // The restored data is the data written: attach and read it back.
  await page.click(`tr[data-key="${RESTORED}"] button[aria-label="Attach ${RESTORED}"]`);
  await dlg.locator('select[name=node]').selectOption('node-2');
  await dlg.locator('button[type=submit]').click();
  await page.waitForSelector(`tr[data-key="${RESTORED}"] .badge.attached`, { timeout: 90000 });
  const v = await volume(RESTORED);
  const out = path.join(work, 'restored.bin');
  run('nbdcopy', [v.status.endpoint, out], { timeout: 300000 });
  assert.equal(fs.statSync(out).size, VOL_SIZE_MIB * MiB);
  // What was written, then zeros to the end of the volume.
  assert.ok(sameBytes(out, dataFile, DATA_MIB * MiB), 'the restored volume holds the data written');
  assert.ok(allZero(out, DATA_MIB * MiB), 'the rest of the restored volume reads as zeros');
  fs.rmSync(out);
});

step('delete the backup after a confirmation', async (t) => {
  if (!backupName) {
    t.skip('no backup to delete (see the backup step)');
    return;
  }
  await goto('#/backups');
  await page.click(`button[aria-label="Delete ${backupName}"]`);
  const dlg = page.locator('dialog[open]');
  await dlg.locator(`h2:has-text("${backupName}")`).waitFor();
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector(`tr[data-key="${backupName}"]`, { state: 'detached', timeout: 120000 });
  await assert.rejects(api.get(`/v1/backups/${backupName}`), /404/);
});

step('nodes page: a schedulable switch changes the node on the server', async () => {
  await goto('#/nodes');
  await page.waitForSelector('section[data-key="node-3"]');
  await shot(page, 'nodes');
  const sw = page.locator('input[aria-label="Node node-3 schedulable"]');
  await sw.uncheck();
  await api.until('node-3 unschedulable', async () => (await api.get('/v1/nodes/node-3')).spec.allowScheduling === false);
  await sw.check();
  await api.until('node-3 schedulable again', async () => (await api.get('/v1/nodes/node-3')).spec.allowScheduling === true);
});

step('settings: a good value is saved, a bad one is refused with the reason', async () => {
  await goto('#/settings');
  await page.waitForSelector('#settings form.setting');
  await shot(page, 'settings');
  const s = cluster.settingToChange;
  const input = page.locator(`#setting-${s.name}`);
  const form = page.locator(`form.setting[data-key="${s.name}"]`);
  await input.fill(s.good);
  await form.locator('button[type=submit]').click();
  await api.until(`${s.name} = ${s.good}`, async () => (await api.get(`/v1/settings/${s.name}`)).value === s.good);
  // The stream brings the saved value back; the field shows it, not dirty.
  await page.waitForFunction(([n]) => document.querySelector(`form.setting[data-key="${n}"] button[type=submit]`).disabled, [s.name]);
  // Out of bounds: flagged as typed...
  await input.fill(s.outOfBounds);
  await form.locator('.error').filter({ hasText: /At most/ }).waitFor();
  assert.equal(await input.getAttribute('aria-invalid'), 'true');
  // ...and refused by the server when sent anyway, with the server's own message.
  await form.locator('button[type=submit]').click();
  await form.locator('.error').filter({ hasText: s.serverMessage }).waitFor();
  await shot(page, 'settings-refused');
  assert.equal((await api.get(`/v1/settings/${s.name}`)).value, s.good, 'the refused value changed nothing');
});

step('narrow window and dark mode', async () => {
  await page.setViewportSize({ width: 420, height: 860 });
  await page.emulateMedia({ colorScheme: 'dark' });
  await goto(`#/volumes/${VOL}`);
  await page.waitForSelector('#robustness');
  await sleep(300);
  await shot(page, 'volume-narrow-dark');
  await goto('#/');
  await sleep(300);
  await shot(page, 'dashboard-narrow-dark');
  // The menu opens from the keyboard.
  await page.focus('#nav-toggle');
  await page.keyboard.press('Enter');
  await page.waitForSelector('nav.open');
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.emulateMedia({ colorScheme: 'light' });
});

step('detach, then delete a volume after a confirmation that names it', async () => {
  await goto('#/volumes');
  await page.click(`tr[data-key="${VOL}"] button[aria-label="Detach ${VOL}"]`);
  const dlg = page.locator('dialog[open]');
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector(`tr[data-key="${VOL}"] .badge.detached`, { timeout: 90000 });
  await page.click(`tr[data-key="${VOL}"] button[aria-label="Delete ${VOL}"]`);
  await dlg.locator(`h2:has-text("${VOL}")`).waitFor();
  await dlg.locator('input[name=confirm]').fill('wrong');
  await dlg.locator('button[type=submit]').click();
  await dlg.locator('.error').filter({ hasText: VOL }).waitFor();
  assert.ok(await volume(VOL), 'nothing deleted before the name was typed');
  await dlg.locator('input[name=confirm]').fill(VOL);
  await dlg.locator('button[type=submit]').click();
  await dlg.waitFor({ state: 'detached' });
  await page.waitForSelector(`tr[data-key="${VOL}"]`, { state: 'detached', timeout: 120000 });
  await assert.rejects(volume(VOL), /404/);
  // Everything the page loaded or called came from the manager itself.
  const elsewhere = requests.filter((r) => !r.url.startsWith(cluster.url) && !r.url.startsWith('data:'));
  assert.deepEqual(elsewhere, [], 'no request left the manager');
  assert.ok(requests.some((r) => r.url.includes('/v1/events')), 'the page followed the event stream');
  // Live by the stream, not by polling: a handful of reads in the whole run.
  const reads = requests.filter((r) => r.method === 'GET' && r.url.includes('/v1/') && !r.url.includes('/v1/events'));
  assert.ok(reads.length <= 10, `the page polled: ${reads.length} GETs: ${reads.map((r) => r.url).join(' ')}`);
  assert.equal(browser.consoleErrors.filter((e) => !/Failed to load resource/.test(e)).length, 0, browser.consoleErrors.join('\n'));
});
