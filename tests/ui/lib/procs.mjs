// Processes the UI tests start: a local S3 server (moto) and an `ironhorn up` cluster on
// free ports on 127.0.0.1. Each runs in its own process group so that a stop takes its
// children with it, and every one is stopped when the test ends (or the node process exits).

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

const started = new Set();
function killAll() {
  for (const p of started) {
    try {
      process.kill(-p.pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    killAll();
    process.exit(130);
  });
}

/** A TCP port on 127.0.0.1 that nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A run of consecutive free ports (the cluster hands out ports from a base). */
export async function freePortRange(count) {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * 30000);
    const ok = await Promise.all(Array.from({ length: count }, (_, i) => isFree(base + i)));
    if (ok.every(Boolean)) return base;
  }
  throw new Error(`no ${count} consecutive free ports found`);
}

function isFree(port) {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/** Resolves when a TCP connect to 127.0.0.1:port succeeds; rejects after timeoutMs. */
export async function waitPort(port, timeoutMs, what = `port ${port}`) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const c = net.connect(port, '127.0.0.1');
      c.once('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > end) throw new Error(`${what} is not listening after ${timeoutMs} ms`);
    await sleep(100);
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A child process with its output in a log file. */
export class Proc {
  constructor(name, cmd, args, { env, cwd, logDir }) {
    this.name = name;
    this.logPath = path.join(logDir, `${name}.log`);
    const out = fs.openSync(this.logPath, 'a');
    this.child = spawn(cmd, args, { cwd, env: { ...process.env, ...env }, stdio: ['ignore', out, out], detached: true });
    fs.closeSync(out);
    this.pid = this.child.pid;
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve({ code, signal })));
    this.exitCode = undefined;
    this.exited.then((r) => {
      this.exitCode = r;
      started.delete(this);
    });
    started.add(this);
  }

  log() {
    try {
      return fs.readFileSync(this.logPath, 'utf8');
    } catch {
      return '';
    }
  }

  /** The last lines of its log, for failure messages. */
  tail(n = 40) {
    return this.log().split('\n').slice(-n).join('\n');
  }

  /** SIGINT (a clean stop), then SIGKILL of the whole group after graceMs. */
  async stop(graceMs = 15000) {
    if (this.exitCode === undefined) {
      try {
        process.kill(this.pid, 'SIGINT');
      } catch {
        /* gone */
      }
      const t = setTimeout(() => {
        try {
          process.kill(-this.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }, graceMs);
      await this.exited;
      clearTimeout(t);
    }
    // Children left behind in the group (replicas, engines) go too.
    try {
      process.kill(-this.pid, 'SIGKILL');
    } catch {
      /* none left */
    }
  }
}

/** The ironhorn binary the tests run: $IRONHORN_BIN, else target/debug/ironhorn. */
export function ironhornBin() {
  const bin = process.env.IRONHORN_BIN || path.join(REPO, 'target/debug/ironhorn');
  if (!fs.existsSync(bin)) throw new Error(`${bin} does not exist: run \`cargo build\` first (or set IRONHORN_BIN)`);
  return bin;
}

/** A moto S3 server on a free port, with one bucket. */
export async function startMoto(workDir, bucket) {
  const port = await freePort();
  const moto = new Proc('moto', process.env.MOTO_SERVER || 'moto_server', ['-H', '127.0.0.1', '-p', String(port)], { logDir: workDir, cwd: workDir });
  await waitPort(port, 30000, 'moto_server');
  const endpoint = `http://127.0.0.1:${port}`;
  const res = await fetch(`${endpoint}/${bucket}`, { method: 'PUT' });
  if (!res.ok) throw new Error(`creating bucket ${bucket} in moto: HTTP ${res.status} ${await res.text()}`);
  return { proc: moto, endpoint, port };
}

/** Lists the pids whose command line contains every one of `needles`. */
export function pidsMatching(...needles) {
  const out = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    let cmd;
    try {
      cmd = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0').join(' ');
    } catch {
      continue;
    }
    if (needles.every((n) => cmd.includes(n))) out.push(Number(d));
  }
  return out;
}

/** A fresh temporary directory. */
export function tempDir(prefix) {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Runs a command to completion, returning its stdout; throws with its stderr. */
export function run(cmd, args, opts = {}) {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 120000, ...opts });
}
