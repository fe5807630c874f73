// Debian's headless Chromium driven by playwright-core: no browser download, a fresh
// profile directory per run, and the flags that keep it off the network.

import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { REPO, tempDir } from './procs.mjs';

/** Where screenshots go (a CI artifact): $UI_SCREENSHOT_DIR or target/ui-screenshots. */
export const SHOT_DIR = process.env.UI_SCREENSHOT_DIR || path.join(REPO, 'target/ui-screenshots');

function chromiumPath() {
  const cands = [process.env.CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser'].filter(Boolean);
  const found = cands.find((p) => fs.existsSync(p));
  if (!found) throw new Error(`no Chromium found (tried ${cands.join(', ')}); install Debian's chromium package (.ci/run does)`);
  return found;
}

/** Starts Chromium with a fresh profile; returns {context, page, close()}. */
export async function launch({ width = 1280, height = 900, colorScheme = 'light' } = {}) {
  const profile = tempDir('ironhorn-ui-chromium-');
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath(),
    headless: true,
    viewport: { width, height },
    colorScheme,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--disable-dev-shm-usage',
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const consoleErrors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  return {
    context,
    page,
    consoleErrors,
    async close() {
      await context.close().catch(() => {});
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Saves a full-page screenshot as SHOT_DIR/name.png and returns its path. */
export async function shot(page, name) {
  fs.mkdirSync(SHOT_DIR, { recursive: true });
  const file = path.join(SHOT_DIR, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}
