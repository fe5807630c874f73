// Nodes and disks: agent heartbeat, schedulable switches, tags, and capacity bars (used,
// reserved, scheduled) per disk.

import * as store from '../store.js';
import * as model from '../model.js';
import { h, fill, bytes, badge, bar, ago, act, formDialog, keepFocus, toast } from '../ui.js';

function tagList(tags) {
  return (tags ?? []).length ? h('span', { class: 'tags' }, tags.map((t) => h('span', { class: 'tag' }, t))) : h('span', { class: 'muted' }, 'no tags');
}

const TAG_RE = /^[A-Za-z0-9]([-_.A-Za-z0-9]{0,61}[A-Za-z0-9])?$/;
const parseTags = (s) => String(s).split(',').map((t) => t.trim()).filter(Boolean);
const checkTags = (s) => {
  const bad = parseTags(s).find((t) => !TAG_RE.test(t));
  return bad ? `"${bad}" is not a tag: letters, digits, "-", "_", "." (1 to 63).` : '';
};

/** Saves a change of a node (PATCH body), showing progress on button. */
function saveNode(name, change, button) {
  return act(button, () => model.updateNode(name, change));
}

/** Mounts the nodes page. */
export function mount(main) {
  const list = h('div');
  fill(main, h('h1', null, 'Nodes and disks'), list);

  function switchFor(label, checked, onchange) {
    const input = h('input', { type: 'checkbox', role: 'switch', checked, 'aria-label': label });
    input.addEventListener('change', async () => {
      const ok = await onchange(input.checked, input);
      if (ok === undefined) input.checked = !input.checked;
    });
    return h('label', { class: 'switch' }, input, h('span', null, 'Schedulable'));
  }

  function update() {
    const nodes = store.all('Node');
    if (!nodes.length) {
      fill(list, h('p', { class: 'muted panel' }, 'No node has registered yet.'));
      return;
    }
    const disks = model.disks();
    keepFocus(list, () => fill(list, nodes.map((n) => {
      const name = store.nameOf(n);
      const ready = model.nodeReady(n);
      const hb = n.status?.lastHeartbeat;
      return h('section', { class: 'panel', dataset: { key: name }, 'aria-label': `Node ${name}` },
        h('div', { class: 'toolbar' },
          h('h2', { style: { margin: 0 } }, name),
          badge(ready === null ? 'unknown' : ready ? 'up' : 'down', 'agent heartbeat'),
          h('span', { class: 'small muted' }, `heartbeat ${ago(hb)}`),
          h('span', { class: 'grow' }),
          switchFor(`Node ${name} schedulable`, n.spec?.allowScheduling !== false, (on, input) => saveNode(name, { allowScheduling: on }, input)),
          h('button', { class: 'small', 'aria-label': `Edit tags of ${name}`, onclick: () => formDialog({
            title: `Tags of node ${name}`,
            submitText: 'Save',
            fields: [{ name: 'tags', label: 'Tags (comma separated)', value: (n.spec?.tags ?? []).join(', '), validate: checkTags }],
            submit: (v) => model.updateNode(name, { tags: parseTags(v.tags) }),
          }).then((r) => r && toast(`Tags of ${name} saved.`, 'ok')) }, 'Tags')),
        h('dl', { class: 'kv small' },
          h('dt', null, 'Address'), h('dd', { class: 'mono' }, n.status?.address || '–'),
          h('dt', null, 'Zone'), h('dd', null, n.spec?.zone || '–'),
          h('dt', null, 'Tags'), h('dd', null, tagList(n.spec?.tags)),
          n.spec?.evictionRequested ? [h('dt', null, 'Eviction'), h('dd', null, badge('requested'))] : null),
        h('div', { class: 'table-wrap' }, h('table', { class: 'responsive', 'aria-label': `Disks of ${name}` },
          h('thead', null, h('tr', null, ['Disk', 'Path', 'Health', 'Capacity', 'Scheduled', 'Tags', ''].map((c) => h('th', { scope: 'col' }, c)))),
          h('tbody', null, disks.filter((d) => d.node === name).map((d) => h('tr', { dataset: { key: `${name}/${d.name}` } },
            h('td', { 'data-label': 'Disk' }, h('strong', null, d.name)),
            h('td', { 'data-label': 'Path', class: 'mono' }, d.spec.path ?? '–'),
            h('td', { 'data-label': 'Health' }, badge(d.status.healthy ? 'ok' : d.status.storageMaximum ? 'bad' : 'unknown'), ' ', d.status.schedulable ? badge('schedulable') : badge('unschedulable')),
            h('td', { 'data-label': 'Capacity', style: { minWidth: '180px' } },
              bar(d.cap.total, [{ value: d.cap.used, cls: 'used', label: `used ${bytes(d.cap.used)}` }, { value: d.cap.reserved, cls: 'reserved', label: `reserved ${bytes(d.cap.reserved)}` }], `disk ${d.name} used and reserved`),
              h('div', { class: 'small muted' }, `${bytes(d.cap.used)} used · ${bytes(d.cap.reserved)} reserved · ${bytes(d.cap.total)} total`)),
            h('td', { 'data-label': 'Scheduled', style: { minWidth: '160px' } },
              bar(d.cap.total, [{ value: d.cap.scheduled, cls: 'scheduled', label: `scheduled ${bytes(d.cap.scheduled)}` }], `disk ${d.name} scheduled`),
              h('div', { class: 'small muted' }, `${bytes(d.cap.scheduled)} for ${Object.keys(d.status.scheduledReplicas ?? {}).length} replicas`)),
            h('td', { 'data-label': 'Tags' }, tagList(d.spec.tags)),
            h('td', { class: 'actions' },
              switchFor(`Disk ${d.name} of ${name} schedulable`, d.spec.allowScheduling !== false, (on, input) => saveNode(name, { disks: { [d.name]: { allowScheduling: on } } }, input)),
              h('button', { class: 'small', 'aria-label': `Edit disk ${d.name} of ${name}`, onclick: () => formDialog({
                title: `Disk ${d.name} of ${name}`,
                submitText: 'Save',
                fields: [
                  { name: 'tags', label: 'Tags (comma separated)', value: (d.spec.tags ?? []).join(', '), validate: checkTags },
                  { name: 'reserved', label: 'Reserved bytes', type: 'number', min: 0, value: d.spec.storageReserved ?? 0, validate: (v) => (/^\d+$/.test(v) ? '' : 'A whole number of bytes.') },
                ],
                submit: (v) => model.updateNode(name, { disks: { [d.name]: { tags: parseTags(v.tags), storageReserved: Number(v.reserved) } } }),
              }) }, 'Edit'))))))));
    })));
  }
  return { update };
}
