// Jobs: the list, live, and (from a scientist up) the submit form: the spec file is validated by
// the controller (POST /v1/job-specs), the model file uploaded (POST /v1/model-files), then the
// job submitted with both (POST /v1/jobs), as `fedctl job submit` does.

import { post } from '../api.js';
import { badge, el, errorText, fmtTime, isAbort, setChildren, syncRows, table } from '../dom.js';
import { follow } from '../live.js';
import { atLeast } from '../session.js';

export const totalRounds = (job) => job && job.spec && job.spec.hyperparameters ? job.spec.hyperparameters.rounds : null;

export function roundsText(job) {
  const total = totalRounds(job);
  return `${job.rounds_done ?? 0}/${total ?? '?'}`;
}

export function mount(root, { signal }) {
  const error = el('p', { class: 'error', role: 'status', 'aria-live': 'polite' });
  const { table: jobsTable, tbody } = table({
    id: 'jobs-table',
    caption: 'Jobs, newest first',
    headers: ['job', 'name', 'owner', 'state', 'rounds', 'created'],
  });
  root.append(el('h1', { tabindex: '-1', text: 'Jobs' }), error);
  if (atLeast('scientist')) root.append(submitForm(signal));
  root.append(el('section', { class: 'panel' }, jobsTable));

  const show = (list) =>
    syncRows(tbody, [...list].sort((a, b) => String(b.created_at).localeCompare(String(a.created_at))), {
      key: (j) => j.id,
      attrs: (j) => ({ 'data-job': j.id }),
      empty: 'No jobs yet.',
      cells: [
        { once: (j) => el('a', { href: `#/jobs/${encodeURIComponent(j.id)}`, text: j.id }) },
        { text: (j) => j.name },
        { text: (j) => j.owner || '—' },
        {
          cls: 'state',
          update: (td, j) => {
            if (td.textContent === j.state) return;
            setChildren(td, badge(j.state));
          },
        },
        { cls: 'num', text: roundsText },
        { text: (j) => fmtTime(j.created_at) },
      ],
    });

  return follow('/v1/events', { jobs: show }, {
    prime: { jobs: '/v1/jobs' },
    onError: (err) => {
      if (!isAbort(err)) error.textContent = errorText(err);
    },
  });
}

function submitForm(signal) {
  const spec = el('input', { id: 'job-spec', type: 'file', accept: '.toml,.yaml,.yml,application/toml,text/plain' });
  const model = el('input', { id: 'job-model', type: 'file' });
  const submit = el('button', { id: 'job-submit', type: 'submit', text: 'Submit job' });
  const error = el('p', { id: 'job-error', class: 'error', role: 'status', 'aria-live': 'polite' });
  const progress = el('p', { id: 'job-submit-status', class: 'status', role: 'status', 'aria-live': 'polite' });
  const form = el('form', { id: 'job-submit-form', class: 'panel stacked-form', 'aria-labelledby': 'job-submit-title' },
    el('h2', { id: 'job-submit-title', text: 'Submit a job' }),
    el('div', { class: 'fields' },
      el('div', { class: 'field' }, el('label', { for: 'job-spec', text: 'Job spec (TOML or YAML)' }), spec),
      el('div', { class: 'field' }, el('label', { for: 'job-model', text: 'Model file' }), model)),
    el('div', { class: 'buttons' }, submit),
    progress,
    error);

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    const specFile = spec.files && spec.files[0];
    const modelFile = model.files && model.files[0];
    if (!specFile || !modelFile) {
      error.textContent = !specFile ? 'Choose the job spec file.' : 'Choose the model file.';
      (!specFile ? spec : model).focus();
      return;
    }
    submit.disabled = true;
    try {
      progress.textContent = `Checking ${specFile.name}…`;
      const yaml = /\.ya?ml$/i.test(specFile.name);
      const checked = await post(`/v1/job-specs${yaml ? '?format=yaml' : ''}`, {
        body: await specFile.text(),
        contentType: yaml ? 'application/yaml' : 'application/toml',
        signal,
      });
      progress.textContent = `Uploading ${modelFile.name}…`;
      const stored = await post('/v1/model-files', {
        body: await modelFile.arrayBuffer(),
        contentType: 'application/octet-stream',
        signal,
      });
      progress.textContent = 'Submitting the job…';
      const job = await post('/v1/jobs', { json: { spec: checked.spec, model_digest: stored.digest }, signal });
      progress.textContent = `Submitted job ${job.id}.`;
      window.location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (isAbort(err)) return;
      progress.textContent = '';
      error.textContent = errorText(err);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
