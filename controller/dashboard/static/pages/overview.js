// Overview: four cards (hospitals online, VMs by state, running jobs, linked clouds), live from
// /v1/events, and the audit log's latest events for an admin.

import { get, query } from '../api.js';
import { el, errorText, fmtTime, isAbort, setChildren, slug, syncRows, table } from '../dom.js';
import { follow } from '../live.js';
import { atLeast } from '../session.js';

// Job states that hold resources (controller/jobs/store.py ACTIVE_STATES).
export const ACTIVE_JOB_STATES = ['created', 'placing', 'launching', 'assigning', 'training'];
const RECENT_AUDIT = 10;

function card(id, title, href) {
  const value = el('p', { class: 'card-value', text: '…' });
  const detail = el('p', { class: 'card-detail' });
  const node = el(
    'section',
    { id, class: 'card', 'aria-labelledby': `${id}-title` },
    el('h2', { id: `${id}-title` }, el('a', { href, text: title })),
    value,
    detail,
  );
  return { node, value, detail };
}

function countBy(items, keyOf) {
  const counts = new Map();
  for (const item of items) {
    const k = keyOf(item);
    counts.set(k, (counts.get(k) || 0) + 1);
  }
  return counts;
}

/** The audit log's last `n` records, newest first (`/v1/audit?last=N` gives them oldest first). */
async function recentAudit(n, signal) {
  const records = await get(`/v1/audit${query({ last: n })}`, { signal });
  return records.reverse();
}

export function mount(root, { signal }) {
  const hospitals = card('card-hospitals', 'Hospitals online', '#/hospitals');
  const vms = card('card-vms', 'VMs', '#/hospitals');
  const jobs = card('card-jobs', 'Running jobs', '#/jobs');
  const clouds = card('card-clouds', 'Linked clouds', '#/clouds');
  const error = el('p', { class: 'error', role: 'status', 'aria-live': 'polite' });
  root.append(
    el('h1', { tabindex: '-1', text: 'Overview' }),
    error,
    el('div', { class: 'cards' }, hospitals.node, vms.node, jobs.node, clouds.node),
  );

  const showAgents = (agents) => {
    const enrolled = agents.filter((a) => a.state !== 'revoked');
    const online = enrolled.filter((a) => a.state === 'online').length;
    hospitals.value.textContent = `${online} / ${enrolled.length}`;
    hospitals.detail.textContent = `online / enrolled${
      agents.length > enrolled.length ? `; ${agents.length - enrolled.length} revoked` : ''
    }`;
  };
  const showVms = (list) => {
    vms.value.textContent = String(list.length);
    const counts = [...countBy(list, (v) => v.state)].sort((a, b) => b[1] - a[1]);
    setChildren(
      vms.detail,
      counts.length
        ? el('span', { class: 'by-state' }, counts.map(([state, n]) => el('span', { class: `badge state-${slug(state)}`, text: `${state}: ${n}` })))
        : 'no VMs reported',
    );
  };
  const showJobs = (list) => {
    const active = list.filter((j) => ACTIVE_JOB_STATES.includes(j.state));
    const training = active.filter((j) => j.state === 'training').length;
    jobs.value.textContent = String(active.length);
    jobs.detail.textContent = `${training} training, ${list.length} jobs in all`;
  };
  const showClouds = (list) => {
    const ok = list.filter((c) => c.status === 'ok').length;
    clouds.value.textContent = String(list.length);
    clouds.detail.textContent = list.length ? `${ok} valid at the last check` : 'none linked';
  };
  const fail = (err) => {
    if (!isAbort(err)) error.textContent = errorText(err);
  };

  const close = follow(
    '/v1/events',
    { agents: showAgents, vms: showVms, jobs: showJobs },
    { prime: { agents: '/v1/agents', vms: '/v1/vms', jobs: '/v1/jobs' }, onError: fail },
  );
  // Linked clouds change only by an admin's hand: read once.
  get('/v1/clouds', { signal }).then(showClouds).catch((err) => {
    if (isAbort(err)) return;
    clouds.value.textContent = '—';
    clouds.detail.textContent = errorText(err);
  });

  if (atLeast('admin')) {
    const { table: auditTable, tbody } = table({
      id: 'audit-table',
      labelledBy: 'audit-title',
      headers: ['#', 'when', 'who', 'action', 'target', 'outcome'],
    });
    const auditError = el('p', { class: 'error', role: 'status', 'aria-live': 'polite' });
    const refresh = el('button', { type: 'button', class: 'secondary', text: 'Refresh' });
    const load = () => {
      auditError.textContent = '';
      recentAudit(RECENT_AUDIT, signal)
        .then((records) =>
          syncRows(tbody, records, {
            key: (r) => r.seq,
            empty: 'No events recorded.',
            cells: [
              { text: (r) => r.seq },
              { text: (r) => fmtTime(r.at) },
              { text: (r) => r.actor },
              { text: (r) => r.action },
              { text: (r) => r.target },
              { cls: 'outcome', text: (r) => r.outcome },
            ],
          }),
        )
        .catch((err) => {
          if (!isAbort(err)) auditError.textContent = errorText(err);
        });
    };
    refresh.addEventListener('click', load);
    root.append(
      el('section', { class: 'panel', 'aria-labelledby': 'audit-title' },
        el('div', { class: 'panel-head' }, el('h2', { id: 'audit-title', text: `Recent audit events (the latest ${RECENT_AUDIT})` }), refresh),
        auditError,
        auditTable),
    );
    load();
  }
  return close;
}
