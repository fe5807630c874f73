// A local cluster started the way `ironhorn up` starts one (manager + three agents, nodes
// node-1..3) on free ports on 127.0.0.1, with its own data directory, and the API token the
// manager wrote there.

import fs from 'node:fs';
import path from 'node:path';
import { Api } from './api.mjs';
import { Proc, freePort, freePortRange, ironhornBin, pidsMatching, waitPort } from './procs.mjs';

/** Kills whatever still runs from this cluster's data directory (agents, engines, replicas). */
function killLeftovers(dataDir) {
  for (const pid of pidsMatching(dataDir)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

/** Finds the API token the manager keeps in its data directory (or printed). */
function findToken(dataDir, log) {
  for (const rel of ['token', 'api-token', 'manager/token', 'manager/api-token']) {
    const p = path.join(dataDir, rel);
    if (fs.existsSync(p)) return fs.readFileSync(p, 'utf8').trim();
  }
  const m = /token[^A-Za-z0-9]{1,5}([A-Za-z0-9_\-.]{16,})/i.exec(log);
  return m ? m[1] : null;
}

/** Starts the cluster and waits until its API answers and three nodes are ready. */
export async function startCluster(work, { env = {} } = {}) {
  const dataDir = path.join(work, 'cluster');
  fs.mkdirSync(dataDir, { recursive: true });
  const apiPort = await freePort();
  const agentPort = await freePort();
  const portsPerNode = 60;
  const portBase = await freePortRange(3 * portsPerNode);
  const args = ['up', '--data-dir', dataDir, '--api-listen', `127.0.0.1:${apiPort}`, '--agent-listen', `127.0.0.1:${agentPort}`,
    '--port-base', String(portBase), '--ports-per-node', String(portsPerNode)];
  const proc = new Proc('ironhorn-up', ironhornBin(), args, { env: { RUST_LOG: 'info', ...env }, cwd: work, logDir: work });
  const fail = (msg) => new Error(`${msg}\n--- ironhorn up log ---\n${proc.tail(60)}`);
  try {
    await Promise.race([
      waitPort(apiPort, 120000, 'the manager API'),
      proc.exited.then((r) => {
        throw fail(`ironhorn up exited early (${JSON.stringify(r)})`);
      }),
    ]);
  } catch (e) {
    await proc.stop(2000);
    killLeftovers(dataDir);
    throw e.message.includes('--- ironhorn up log') ? e : fail(e.message);
  }
  let token = null;
  for (let i = 0; i < 100 && !token; i++) {
    token = findToken(dataDir, proc.log());
    if (!token) await new Promise((r) => setTimeout(r, 100));
  }
  if (!token) {
    await proc.stop(2000);
    killLeftovers(dataDir);
    throw fail('no API token found in the data directory or the log');
  }
  const url = `http://127.0.0.1:${apiPort}/`;
  const api = new Api(`http://127.0.0.1:${apiPort}`, token);
  await api.until('three ready nodes', async () => {
    const nodes = await api.list('/v1/nodes');
    return nodes.filter((n) => (n.status?.conditions ?? []).some((c) => c.type === 'Ready' && c.status === 'True')).length >= 3;
  }, 120000).catch(async (e) => {
    await proc.stop(2000);
    killLeftovers(dataDir);
    throw fail(e.message);
  });
  // The build machine's disk may be nearly full; scheduling must not depend on it here.
  await api.req('PUT', '/v1/settings/storage-minimal-available-percentage', { value: '0' });
  return {
    url,
    token,
    api,
    dataDir,
    proc,
    settingToChange: await pickSetting(api),
    tail: () => `--- ironhorn up log (last lines) ---\n${proc.tail(40)}`,
    stop: async () => {
      await proc.stop(30000);
      killLeftovers(dataDir);
    },
  };
}

/**
 * A numeric setting with bounds from the manager's catalog (GET /v1/settings): a good value
 * other than its current one, and one out of its bounds, which the browser flags as typed
 * and the server refuses with its own message.
 */
async function pickSetting(api) {
  const defs = await api.list('/v1/settings');
  const d = defs.find((x) => x.name === 'node-down-timeout') ?? defs.find((x) => x.type === 'int' && x.max !== undefined);
  if (!d) throw new Error(`no int setting with bounds in ${JSON.stringify(defs)}`);
  const good = String(Number(d.value) === Number(d.max) ? Number(d.max) - 1 : Number(d.max));
  return { name: d.name, good, outOfBounds: String(Number(d.max) + 1), serverMessage: 'is outside' };
}
