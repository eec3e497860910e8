// One job, live from /v1/events?job=ID: its state and progress, the metric curves per round,
// each participant's VMs and attempts, why the orchestrator chose them (`fedctl job explain`),
// predicted against measured round times, its log, and Cancel for whoever may cancel it.

import { get, post, query, seg } from '../api.js';
import { metricChart, offerLabel } from '../charts.js';
import { badge, el, errorText, fmtMoney, fmtNum, fmtPct, fmtTime, isAbort, setChildren, slug, syncRows, table } from '../dom.js';
import { follow } from '../live.js';
import { mayActOnJob } from '../session.js';
import { roundsText, totalRounds } from './jobs.js';

// controller/jobs/store.py END_STATES
const END_STATES = ['completed', 'failed', 'cancelled'];
// shared/metrics.py METRICS, in its order; any other metric a round carries comes after.
const METRIC_ORDER = ['accuracy', 'loss', 'f1', 'recall', 'precision'];
// controller/orchestrator: attempts in these states hold their VM.
const ACTIVE_ATTEMPTS = ['assigned', 'running'];
// controller/orchestrator/failures.py, the stored reasons in words.
const FAILURE_TEXT = {
  supernode_error: 'the SuperNode exited with an error',
  vm_left_running: 'the VM left the running state',
  agent_unresponsive: 'the agent stopped answering',
  refused_by_hospital: "the hospital's policy refused it",
};
const MAX_LOG_LINES = 500;
const LOG_PAGE = 1000; // jobs/store.py job_log's limit
const MAX_LOG_PAGES = 20;

function attemptText(a) {
  if (a.state === 'assigned') return `assigned at ${fmtTime(a.assigned_at)}, not yet running`;
  if (a.state === 'running') return `running since ${fmtTime(a.running_at || a.assigned_at)}`;
  const took = a.ended_at !== null && a.ended_at !== undefined && a.assigned_at !== null
    ? ` after ${(a.ended_at - a.assigned_at).toFixed(0)} s`
    : '';
  if (a.state === 'failed') {
    const why = FAILURE_TEXT[a.reason] || a.reason || 'unknown reason';
    return `failed${took}: ${why}${a.detail ? ` (${a.detail})` : ''}`;
  }
  return `${a.state}${took}`;
}

/** The explanation as `render_explain` (controller/orchestrator/explain.py) words it, as lists. */
function explainNodes(data) {
  const participants = Object.entries((data && data.participants) || {});
  if (!participants.length) return [el('p', { text: 'No assignments recorded yet.' })];
  return [el('ul', { class: 'explain' }, participants.map(([name, entry]) => {
    const attempts = entry.attempts || [];
    const decisions = entry.decisions || [];
    const now = [...attempts].reverse().find((a) => ACTIVE_ATTEMPTS.includes(a.state));
    const failovers = attempts.filter((a) => a.state === 'failed').length;
    let head = `${name}: ${attempts.length} attempt${attempts.length === 1 ? '' : 's'}`;
    if (now) head += `, on ${now.vm}`;
    if (failovers) head += ` (${failovers} failover${failovers === 1 ? '' : 's'})`;
    return el('li', { 'data-participant': name },
      el('strong', { text: head }),
      el('ul', {},
        attempts.map((a) => el('li', { class: `attempt attempt-${slug(a.state)}`, text: `attempt ${a.number} on ${a.vm} (${a.agent_id}): ${attemptText(a)}` })),
        decisions.map((d) => el('li', { class: 'decision' },
          `decision for attempt ${d.attempt} at ${fmtTime(d.decided_at)} (${d.trigger}): ${d.summary}`,
          d.considered && d.considered.length
            ? el('ul', { class: 'considered' }, d.considered.map((c) => el('li', { class: `outcome-${slug(c.outcome)}` }, el('code', { text: c.vm }), ` ${c.text}`)))
            : null))));
  }))];
}

function metricNames(rounds) {
  const present = new Set();
  for (const r of rounds) {
    for (const [name, value] of Object.entries(r.metrics || {})) if (value !== null && value !== undefined) present.add(name);
  }
  const known = METRIC_ORDER.filter((m) => present.has(m));
  const others = [...present].filter((m) => !METRIC_ORDER.includes(m)).sort();
  return [...known, ...others];
}

export function mount(root, { params, signal }) {
  const jobId = params.id;
  const base = `/v1/jobs/${seg(jobId)}`;
  let job = null;

  const error = el('p', { id: 'job-page-error', class: 'error', role: 'status', 'aria-live': 'polite' });
  const title = el('h1', { tabindex: '-1', text: `Job ${jobId}` });
  const state = el('span', { id: 'job-state', class: 'badge' });
  const jobError = el('p', { id: 'job-failure', class: 'error' });
  const progress = el('progress', { id: 'job-progress', max: '1', value: '0', 'aria-labelledby': 'job-rounds-label' });
  const roundsShown = el('span', { id: 'job-rounds', text: '…' });
  const facts = el('dl', { class: 'facts' });
  const actions = el('div', { class: 'actions' },
    el('a', { id: 'job-models-link', href: `#/models/${encodeURIComponent(jobId)}`, text: 'Models of this job' }));
  const status = el('p', { class: 'status', role: 'status', 'aria-live': 'polite' });
  const curves = el('div', { id: 'job-curves', class: 'curves' });
  const curvesNote = el('p', { class: 'hint', text: 'No round has reported metrics yet.' });
  const tasks = table({ id: 'job-tasks', caption: "Each participant's VM and attempts", headers: ['participant', 'attempt', 'VM', 'state', 'reason', 'since'] });
  const times = table({ id: 'job-round-times', caption: 'Predicted against measured round time', headers: ['round', 'predicted s', 'measured s', 'error', 'forecast s', 'phases s'] });
  const explain = el('div', { id: 'job-explain', class: 'explanation' }, el('p', { class: 'hint', text: 'Loading…' }));
  const logs = el('ol', { id: 'job-logs', class: 'log' });

  root.append(
    title,
    error,
    el('section', { class: 'panel summary', 'aria-label': 'State and progress' },
      el('div', { class: 'state-line' },
        el('span', { class: 'label', text: 'State ' }), state,
        el('span', { id: 'job-rounds-label', class: 'label', text: 'Rounds ' }), roundsShown, progress),
      jobError, facts, actions, status),
    el('section', { class: 'panel', 'aria-labelledby': 'curves-title' }, el('h2', { id: 'curves-title', text: 'Metrics per round' }), curvesNote, curves),
    el('section', { class: 'panel' }, tasks.table),
    el('section', { class: 'panel', 'aria-labelledby': 'explain-title' }, el('h2', { id: 'explain-title', text: 'Why these VMs: attempts, failovers and decisions' }), explain),
    el('section', { class: 'panel' }, times.table),
    el('section', { class: 'panel', 'aria-labelledby': 'logs-title' }, el('h2', { id: 'logs-title', text: 'Log' }), logs),
  );

  // -- the job ----------------------------------------------------------------------------------

  let cancelButton = null;
  function showCancel(visible) {
    if (visible && !cancelButton) {
      cancelButton = el('button', { id: 'job-cancel', type: 'button', class: 'danger', text: 'Cancel job' });
      cancelButton.addEventListener('click', cancel);
      actions.prepend(cancelButton);
    } else if (!visible && cancelButton) {
      // Removed, not disabled: the role or the job's end means there is nothing to do.
      cancelButton.remove();
      cancelButton = null;
    }
  }

  async function cancel() {
    cancelButton.disabled = true;
    status.textContent = `Cancelling ${jobId}…`;
    try {
      showJob(await post(`${base}/cancel`, { signal }));
      status.textContent = 'Cancel requested.';
    } catch (err) {
      if (isAbort(err)) return;
      status.textContent = '';
      error.textContent = errorText(err);
      if (cancelButton) cancelButton.disabled = false;
    }
  }

  function fact(term, ...value) {
    return [el('dt', { text: term }), el('dd', {}, ...value)];
  }

  function showJob(data) {
    job = data;
    title.textContent = `Job ${data.id}${data.name ? `: ${data.name}` : ''}`;
    state.textContent = data.state;
    state.className = `badge state-${slug(data.state)}`;
    jobError.textContent = data.error ? `Error: ${data.error}` : '';
    const total = totalRounds(data);
    roundsShown.textContent = roundsText(data);
    progress.max = total || 1;
    progress.value = Math.min(data.rounds_done || 0, total || 1);
    const placement = data.placement || null;
    const choice = placement && placement.choice;
    setChildren(facts,
      fact('owner', data.owner || '—'),
      fact('created', fmtTime(data.created_at)),
      fact(data.ended_at ? 'ended' : 'updated', fmtTime(data.ended_at || data.updated_at)),
      fact('participants', ((data.spec && data.spec.participants) || []).join(', ') || '—'),
      fact('aggregator', choice
        ? `${offerLabel(choice)}: ${fmtMoney(choice.cost, choice.currency)} ${choice.currency}/${placement.basis || ''}, predicted ${fmtNum(choice.round_time_s, 2)} s per round` + (data.provider ? ` (via ${data.provider})` : '')
        : placement && placement.reason ? `not placed: ${placement.reason}` : 'not placed yet'),
    );
    showCancel(!END_STATES.includes(data.state) && mayActOnJob(data.owner));
    syncRows(tasks.tbody, data.tasks || [], {
      key: (t) => t.id || `${t.participant}#${t.attempt}`,
      attrs: (t) => ({ 'data-participant': t.participant, 'data-attempt': t.attempt }),
      empty: 'No task assigned yet.',
      cells: [
        { text: (t) => t.participant },
        { cls: 'num', text: (t) => t.attempt },
        { text: (t) => t.vm },
        { cls: 'state', update: (td, t) => { if (td.textContent !== t.state) setChildren(td, badge(t.state)); } },
        { text: (t) => (t.reason ? FAILURE_TEXT[t.reason] || t.reason : '') },
        { text: (t) => fmtTime(t.updated_at || t.created_at) },
      ],
    });
    syncRows(times.tbody, data.round_times || [], {
      key: (r) => r.round,
      empty: 'No round measured yet.',
      cells: [
        { cls: 'num', text: (r) => r.round },
        { cls: 'num', text: (r) => fmtNum(r.predicted_s, 2) },
        { cls: 'num', text: (r) => fmtNum(r.measured_s, 2) },
        { cls: 'num', text: (r) => (r.error === null || r.error === undefined ? '—' : fmtPct(r.error * 100).replace('+', '')) },
        { cls: 'num', text: (r) => fmtNum(r.forecast_s, 2) },
        { text: (r) => (r.phases_s ? Object.entries(r.phases_s).map(([k, v]) => `${k} ${fmtNum(v, 2)}`).join(', ') : '—') },
      ],
    });
    loadLogs();
  }

  // -- metric curves ------------------------------------------------------------------------------

  const charts = new Map(); // metric -> {holder, chart}
  function showRounds(data) {
    const rounds = [...((data && data.rounds) || [])].sort((a, b) => a.round - b.round);
    const names = metricNames(rounds);
    curvesNote.hidden = names.length > 0;
    for (const [name, entry] of charts) {
      if (!names.includes(name)) {
        entry.chart.destroy();
        entry.holder.remove();
        charts.delete(name);
      }
    }
    for (const name of names) {
      let entry = charts.get(name);
      if (!entry) {
        const holder = el('figure', { class: 'chart', 'data-metric': name, 'aria-label': `${name} per round` });
        curves.append(holder);
        entry = { holder, chart: metricChart(holder, name) };
        charts.set(name, entry);
      }
      const drawn = rounds.filter((r) => r.metrics && r.metrics[name] !== null && r.metrics[name] !== undefined);
      entry.chart.update(drawn.map((r) => r.round), drawn.map((r) => Number(r.metrics[name])));
      entry.holder.dataset.points = String(drawn.length);
    }
  }

  // -- the log --------------------------------------------------------------------------------------

  let lastLogId = 0;
  let logsBusy = false;
  let logsAgain = false; // a change arrived while reading: read once more after
  async function loadLogs() {
    if (logsBusy) {
      logsAgain = true;
      return;
    }
    logsBusy = true;
    logsAgain = false;
    try {
      // The route answers at most LOG_PAGE lines after `after`: read on to the newest, within
      // a bound (only the last MAX_LOG_LINES are kept on the page anyway).
      for (let page = 0; page < MAX_LOG_PAGES; page += 1) {
        const lines = await get(`${base}/logs${query({ after: lastLogId })}`, { signal });
        // Follow the newest line unless the reader scrolled up to read an older one.
        const atBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 8;
        for (const line of lines) {
          lastLogId = Math.max(lastLogId, line.id);
          logs.append(el('li', { class: `level-${slug(line.level)}` }, el('time', { text: fmtTime(line.at) }), ` ${line.level}: ${line.message}`));
        }
        while (logs.children.length > MAX_LOG_LINES) logs.firstElementChild.remove();
        if (atBottom) logs.scrollTop = logs.scrollHeight;
        if (lines.length < LOG_PAGE) break;
      }
    } catch (err) {
      if (!isAbort(err) && err.status !== 404) status.textContent = `Log: ${errorText(err)}`;
    } finally {
      logsBusy = false;
    }
    if (logsAgain && !signal.aborted) loadLogs();
  }

  const showExplain = (data) => setChildren(explain, explainNodes(data));

  const close = follow(`/v1/events${query({ job: jobId })}`, {
    job: showJob,
    rounds: showRounds,
    explain: showExplain,
  }, {
    prime: { job: base, rounds: `${base}/models`, explain: `${base}/explain` },
    onError: (err, name) => {
      if (isAbort(err)) return;
      // A job the Model Manager has not recorded yet has no rounds: not an error to show.
      if (name === 'rounds' && err.status === 404) return;
      if (name === 'explain') setChildren(explain, el('p', { class: 'error', text: errorText(err) }));
      else error.textContent = errorText(err);
    },
  });

  return () => {
    close();
    for (const entry of charts.values()) entry.chart.destroy();
    charts.clear();
  };
}
