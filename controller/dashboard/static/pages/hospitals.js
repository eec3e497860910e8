// Hospitals and VMs, live: the agents, their VMs, and, when a job's minimums are set, whether
// each VM could take a training task and why not (`GET /v1/vms?min_...`, the orchestrator's
// own eligibility check).

import { get, post, query, seg } from '../api.js';
import { badge, el, errorText, fmtAgo, fmtNum, fmtTime, isAbort, setChildren, slug, syncRows, table } from '../dom.js';
import { follow } from '../live.js';
import { atLeast } from '../session.js';

const hostCpu = (host) => (host && typeof host.cpu_percent === 'number' ? `${host.cpu_percent.toFixed(0)} %` : '—');

function numberField(id, label, step) {
  return el('div', { class: 'field' },
    el('label', { for: id, text: label }),
    el('input', { id, type: 'number', min: '0', step, inputmode: 'decimal' }));
}

export function mount(root, { signal }) {
  const error = el('p', { class: 'error', role: 'status', 'aria-live': 'polite' });
  // Revoking is an admin's (access.py); the column is absent for everyone else.
  const admin = atLeast('admin');
  const agents = table({
    id: 'agents-table',
    caption: 'Enrolled hospitals (agents)',
    headers: ['agent', 'location', 'state', 'VMs', 'host CPU', 'last report', ...(admin ? ['actions'] : [])],
  });
  const revoked = el('p', { id: 'revoke-result', class: 'status', role: 'status', 'aria-live': 'polite' });
  const vms = table({
    id: 'vms-table',
    caption: 'Their VMs',
    headers: ['agent', 'VM', 'state', 'vCPUs', 'memory GiB', 'disk GiB', 'host CPU', 'eligible'],
  });

  const form = el('form', { id: 'minimums-form', class: 'inline-form', 'aria-labelledby': 'minimums-title' },
    el('h2', { id: 'minimums-title', text: "A job's minimums" }),
    el('p', { class: 'hint', text: 'Set any of these to see which VMs could take a training task, and why the others could not.' }),
    el('div', { class: 'fields' },
      numberField('min-vcpus', 'vCPUs', '1'),
      numberField('min-memory', 'memory GiB', 'any'),
      numberField('min-disk', 'disk GiB', 'any'),
      el('div', { class: 'field buttons' },
        el('button', { id: 'min-apply', type: 'submit', text: 'Apply' }),
        el('button', { id: 'min-clear', type: 'button', class: 'secondary', text: 'Clear' }))),
    el('p', { id: 'min-status', class: 'status', role: 'status', 'aria-live': 'polite' }));

  root.append(
    el('h1', { tabindex: '-1', text: 'Hospitals and VMs' }),
    error,
    el('section', { class: 'panel' }, agents.table, revoked),
    el('section', { class: 'panel' }, form),
    el('section', { class: 'panel' }, vms.table),
  );

  const minimums = { min_vcpus: '', min_memory_gib: '', min_disk_gib: '' };
  const anySet = () => Object.values(minimums).some((v) => v !== '');
  const status = form.querySelector('#min-status');

  const showAgents = (list) => syncRows(agents.tbody, list, {
    key: (a) => a.id,
    attrs: (a) => ({ 'data-agent': a.id }),
    empty: 'No agents enrolled yet (fedctl agents enroll NAME ...).',
    cells: [
      { text: (a) => a.id },
      { text: (a) => a.location },
      { cls: 'state', update: (td, a) => setBadge(td, a.state) },
      { text: (a) => a.vms },
      { text: (a) => hostCpu(a.host) },
      { text: (a) => (a.last_report_at ? `${fmtTime(a.last_report_at)} (${fmtAgo(a.last_report_at)})` : 'never') },
      ...(admin ? [{ cls: 'actions', update: (td, a) => revokeCell(td, a) }] : []),
    ],
  });

  // Revoking cuts the hospital off for good (its certificate is on the CRL, its session ended):
  // the first press asks, a second within 5 s does it.
  function revokeCell(td, agent) {
    if (agent.state === 'revoked') {
      if (td.textContent !== '—') td.textContent = '—';
      return;
    }
    if (td.querySelector('button')) return;
    const button = el('button', {
      type: 'button', class: 'danger', 'data-action': 'revoke', 'data-agent': agent.id,
      text: 'Revoke', 'aria-label': `Revoke ${agent.id}`,
    });
    let armed = null;
    button.addEventListener('click', async () => {
      if (armed === null) {
        button.textContent = `Confirm: revoke ${agent.id}`;
        armed = setTimeout(() => {
          armed = null;
          button.textContent = 'Revoke';
        }, 5000);
        return;
      }
      clearTimeout(armed);
      armed = null;
      button.disabled = true;
      try {
        await post(`/v1/agents/${seg(agent.id)}/revoke`, { signal });
        revoked.textContent = `Revoked ${agent.id}: its certificate no longer connects.`;
      } catch (err) {
        if (!isAbort(err)) revoked.textContent = errorText(err);
        button.disabled = false;
        button.textContent = 'Revoke';
      }
    });
    setChildren(td, button);
  }

  const showVms = (list) => syncRows(vms.tbody, list, {
    key: (v) => `${v.agent_id}/${v.name}`,
    attrs: (v) => ({ 'data-vm': `${v.agent_id}/${v.name}` }),
    empty: 'No VMs reported.',
    cells: [
      { text: (v) => v.agent_id },
      { text: (v) => v.name },
      // The libvirt state word alone, so that it reads (and tests) as the agent reported it.
      {
        cls: 'state',
        update: (td, v) => {
          if (td.textContent !== v.state) td.textContent = v.state;
          td.className = `state state-${slug(v.state)}`;
        },
      },
      { cls: 'num', text: (v) => v.vcpus },
      { cls: 'num', text: (v) => fmtNum(v.memory_mib / 1024, 1) },
      { cls: 'num', text: (v) => fmtNum(v.disk_gib, 1) },
      { cls: 'num', text: (v) => hostCpu(v.host) },
      { cls: 'eligibility', update: (td, v) => showEligibility(td, v) },
    ],
  });

  function showEligibility(td, vm) {
    let text;
    let cls;
    if (!('eligible' in vm)) {
      text = anySet() ? '…' : '—';
      cls = '';
    } else if (vm.eligible) {
      text = 'eligible';
      cls = 'ok';
    } else {
      const reasons = Array.isArray(vm.reasons) && vm.reasons.length ? vm.reasons.join('; ') : 'not eligible';
      text = `no: ${reasons}`;
      cls = 'bad';
    }
    if (td.textContent !== text) td.textContent = text;
    td.className = `eligibility ${cls}`.trim();
  }

  // Several `vms` events may arrive while a filtered GET is out: only the newest answer is shown.
  let asked = 0;
  let lastEvent = [];
  function refreshVms() {
    if (!anySet()) {
      showVms(lastEvent);
      return;
    }
    const n = ++asked;
    get(`/v1/vms${query(minimums)}`, { signal })
      .then((list) => {
        if (n === asked) {
          showVms(list);
          status.textContent = describeMinimums(list);
        }
      })
      .catch((err) => {
        if (!isAbort(err) && n === asked) status.textContent = errorText(err);
      });
  }

  function describeMinimums(list) {
    const parts = [];
    if (minimums.min_vcpus !== '') parts.push(`${minimums.min_vcpus} vCPUs`);
    if (minimums.min_memory_gib !== '') parts.push(`${minimums.min_memory_gib} GiB memory`);
    if (minimums.min_disk_gib !== '') parts.push(`${minimums.min_disk_gib} GiB disk`);
    const ok = list.filter((v) => v.eligible).length;
    return `At least ${parts.join(', ')}: ${ok} of ${list.length} VMs eligible.`;
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    minimums.min_vcpus = form.querySelector('#min-vcpus').value.trim();
    minimums.min_memory_gib = form.querySelector('#min-memory').value.trim();
    minimums.min_disk_gib = form.querySelector('#min-disk').value.trim();
    if (!anySet()) status.textContent = 'No minimums set: eligibility is not shown.';
    refreshVms();
  });
  form.querySelector('#min-clear').addEventListener('click', () => {
    for (const id of ['min-vcpus', 'min-memory', 'min-disk']) form.querySelector(`#${id}`).value = '';
    minimums.min_vcpus = minimums.min_memory_gib = minimums.min_disk_gib = '';
    asked += 1; // drop any answer still on its way
    status.textContent = 'Minimums cleared.';
    showVms(lastEvent.map(({ eligible, reasons, ...rest }) => rest));
  });

  const fail = (err) => {
    if (!isAbort(err)) error.textContent = errorText(err);
  };
  return follow(
    '/v1/events',
    {
      agents: showAgents,
      vms: (list) => {
        lastEvent = list;
        refreshVms();
      },
    },
    { prime: { agents: '/v1/agents', vms: '/v1/vms' }, onError: fail },
  );
}

function setBadge(td, state) {
  const current = td.firstElementChild;
  if (current && current.textContent === state) return;
  setChildren(td, badge(state));
}
