import { launch } from './lib/browser.mjs';
import fs from 'node:fs';
const base='http://127.0.0.1:19600/'; const token=fs.readFileSync('/tmp/uic/d/manager/token','utf8').trim();
const b = await launch({}); const p = b.page; p.setDefaultTimeout(10000);
await p.goto(base); await p.fill('#token', token); await p.click('form.signin button[type=submit]');
await p.waitForSelector('#live.on');
for (const [n,h] of (process.argv[2]||'dashboard:#/,volume:#/volumes/v2,nodes:#/nodes,backups:#/backups,settings:#/settings,volumes:#/volumes').split(',').map(x=>x.split(':'))) {
  await p.evaluate((h)=>location.hash=h, h); await p.waitForTimeout(1500);
  await p.screenshot({ path: `/tmp/uidev/real-${n}.png`, fullPage: true });
}
console.log(b.consoleErrors.join('\n')); await b.close();
