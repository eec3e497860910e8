// Models: a job's rounds as the Model Manager keeps them, its recommendation by any criteria
// (`fedctl models best`), and "Download and verify" (`fedctl models download`): the weights and
// their signed metadata are fetched, checked here against the controller's signing key, and
// only then offered to save.

import { get, query, request, seg } from '../api.js';
import { el, errorText, fmtBytes, fmtNum, fmtTime, isAbort, setChildren, syncRows, table } from '../dom.js';
import { atLeast, mayActOnJob } from '../session.js';
import { VerificationError, plain, verifyDownload } from '../verify.js';

const METRIC_ORDER = ['accuracy', 'loss', 'f1', 'recall', 'precision'];

/** The `/v1/models/best` query for what the user typed (models.py `best_query`): a metric name
 * (`f1`) or a weighted score (`f1:0.7,accuracy:0.3`), and thresholds `NAME=VALUE, ...`. */
export function bestQuery(job, criteria, mins, maxs) {
  const split = (text) => text.split(',').map((t) => t.trim()).filter(Boolean);
  const params = { job, runners_up: 3, min: split(mins), max: split(maxs) };
  const c = criteria.trim();
  if (c.includes(':')) params.score = c;
  else if (c) params.metric = c;
  return query(params);
}

export function mount(root, { params, signal }) {
  const mayDownloadAtAll = atLeast('scientist');
  const error = el('p', { class: 'error', role: 'status', 'aria-live': 'polite' });
  const jobSelect = el('select', { id: 'models-job' });
  const jobInfo = el('p', { class: 'hint', id: 'models-job-info' });
  const rounds = el('table', { id: 'models-rounds', class: 'data' });
  const recommended = el('p', { id: 'models-recommended', class: 'lead', 'aria-live': 'polite' });
  const criteria = el('input', { id: 'models-criteria', type: 'text', placeholder: "the job's selection metric", 'aria-describedby': 'models-criteria-hint' });
  const mins = el('input', { id: 'models-min', type: 'text', placeholder: 'e.g. accuracy=0.9' });
  const maxs = el('input', { id: 'models-max', type: 'text', placeholder: 'e.g. loss=0.3' });
  const bestButton = el('button', { id: 'models-best', type: 'submit', text: 'Recommend' });
  const bestDetail = el('div', { id: 'models-best-detail', class: 'explanation' });
  const roundSelect = el('select', { id: 'models-round' });
  const download = el('button', { id: 'models-download', type: 'button', text: 'Download and verify' });
  const verifyStatus = el('p', { id: 'models-verify', class: 'status', role: 'status', 'aria-live': 'polite' });
  const files = el('div', { id: 'models-files', class: 'files' });
  const downloadPanel = el('section', { class: 'panel', 'aria-labelledby': 'download-title', hidden: true },
    el('h2', { id: 'download-title', text: 'Download and verify' }),
    el('p', { class: 'hint', text: "The weights' SHA-256 and the metadata's Ed25519 signature are checked here, against the controller's signing key, before the file is offered." }),
    el('div', { class: 'fields' },
      el('div', { class: 'field' }, el('label', { for: 'models-round', text: 'Round' }), roundSelect),
      el('div', { class: 'field buttons' }, download)),
    verifyStatus,
    files);

  const bestForm = el('form', { id: 'models-best-form', class: 'stacked-form', 'aria-labelledby': 'best-title' },
    el('h2', { id: 'best-title', text: 'Recommendation' }),
    recommended,
    el('div', { class: 'fields' },
      el('div', { class: 'field' }, el('label', { for: 'models-criteria', text: 'Criteria' }), criteria,
        el('span', { class: 'hint', id: 'models-criteria-hint', text: `a metric (${METRIC_ORDER.join(', ')}) or a weighted score, e.g. f1:0.7,accuracy:0.3` })),
      el('div', { class: 'field' }, el('label', { for: 'models-min', text: 'At least' }), mins),
      el('div', { class: 'field' }, el('label', { for: 'models-max', text: 'At most' }), maxs),
      el('div', { class: 'field buttons' }, bestButton)),
    bestDetail);

  root.append(
    el('h1', { tabindex: '-1', text: 'Models' }),
    error,
    el('div', { class: 'panel' },
      el('div', { class: 'field' }, el('label', { for: 'models-job', text: 'Job' }), jobSelect), jobInfo),
    el('section', { class: 'panel' }, rounds),
    el('section', { class: 'panel' }, bestForm),
  );
  // A viewer may not download at all (the server answers 403): the panel is never made. A
  // scientist sees it on their own jobs only (shown per job below).
  if (mayDownloadAtAll) root.append(downloadPanel);

  const owners = new Map(); // job id -> owner, for a scientist's own-job downloads
  let current = null; // {job, rounds, recommended}
  let blobUrls = [];
  const dropFiles = () => {
    for (const url of blobUrls) URL.revokeObjectURL(url);
    blobUrls = [];
    files.replaceChildren();
  };

  const fail = (err) => {
    if (!isAbort(err)) error.textContent = errorText(err);
  };

  // -- the rounds -----------------------------------------------------------------------------------

  function showRoundsTable(data) {
    const list = [...data.rounds].sort((a, b) => a.round - b.round);
    const present = new Set();
    for (const r of list) for (const [k, v] of Object.entries(r.metrics || {})) if (v !== null && v !== undefined) present.add(k);
    const metrics = [...METRIC_ORDER.filter((m) => present.has(m)), ...[...present].filter((m) => !METRIC_ORDER.includes(m)).sort()];
    const headers = ['round', ...metrics, 'pinned', 'kept', 'recorded'];
    const tbody = el('tbody');
    rounds.replaceChildren(
      el('caption', { text: `Rounds of ${data.job.job}${data.job.retention ? ` (retention: ${data.job.retention})` : ''}` }),
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col', text: h })))),
      tbody,
    );
    syncRows(tbody, list, {
      key: (r) => r.round,
      attrs: (r) => ({ 'data-round': r.round, class: r.round === data.recommended ? 'recommended' : '' }),
      empty: 'No round recorded yet.',
      cells: [
        { cls: 'num', text: (r) => r.round },
        ...metrics.map((m) => ({ cls: 'num', text: (r) => fmtNum(r.metrics ? r.metrics[m] : null, 4) })),
        { text: (r) => (r.pinned ? 'pinned' : '') },
        { text: (r) => (r.checkpoint ? `yes (${fmtBytes(r.checkpoint.size)})` : r.pruned_at ? `pruned ${fmtTime(r.pruned_at)}` : 'no') },
        { text: (r) => fmtTime(r.recorded_at) },
      ],
    });
    // Only rounds that kept their weights can be downloaded.
    const kept = list.filter((r) => r.checkpoint);
    setChildren(roundSelect, kept.map((r) => el('option', { value: r.round, text: `round ${r.round}${r.round === data.recommended ? ' (recommended)' : ''}` })));
    if (data.recommended !== null && kept.some((r) => r.round === data.recommended)) roundSelect.value = String(data.recommended);
    const mayDownload = mayDownloadAtAll && mayActOnJob(owners.get(data.job.job));
    downloadPanel.hidden = !mayDownload;
    download.disabled = kept.length === 0;
    if (!kept.length) verifyStatus.textContent = 'No round of this job kept its weights.';
  }

  function showDefaultRecommendation(data) {
    const metric = data.job.selection_metric || 'accuracy';
    recommended.textContent = data.recommended !== null && data.recommended !== undefined
      ? `Recommended: round ${data.recommended} (best ${metric}, the job's selection metric).`
      : `No round recommended yet (by ${metric}).`;
    bestDetail.replaceChildren();
  }

  async function loadJob(jobId) {
    error.textContent = '';
    verifyStatus.textContent = '';
    dropFiles();
    current = null;
    rounds.replaceChildren();
    recommended.textContent = '';
    if (!jobId) return;
    try {
      const data = await get(`/v1/jobs/${seg(jobId)}/models`, { signal });
      if (jobSelect.value !== jobId) return; // another job was chosen meanwhile
      current = data;
      const j = data.job;
      jobInfo.textContent = `${j.name || j.job}: status ${j.status || '—'}, selection metric ${j.selection_metric || '—'}, participants ${(j.participants || []).join(', ') || '—'}`;
      showRoundsTable(data);
      showDefaultRecommendation(data);
    } catch (err) {
      fail(err);
    }
  }

  // -- the recommendation -------------------------------------------------------------------------

  bestForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!current) return;
    if (!criteria.value.trim() && !mins.value.trim() && !maxs.value.trim()) {
      showDefaultRecommendation(current);
      return;
    }
    bestButton.disabled = true;
    try {
      const rec = await get(`/v1/models/best${bestQuery(current.job.job, criteria.value, mins.value, maxs.value)}`, { signal });
      const by = rec.criteria && rec.criteria.metric ? rec.criteria.metric : criteria.value.trim() || "the job's selection metric";
      if (rec.feasible && rec.best) {
        recommended.textContent = `Recommended by ${by}: round ${rec.best.round} (score ${fmtNum(rec.best.score, 4)}).`;
        if ([...roundSelect.options].some((o) => o.value === String(rec.best.round))) roundSelect.value = String(rec.best.round);
      } else {
        recommended.textContent = `Nothing meets the criteria: ${rec.reason}`;
      }
      const detail = [];
      if (rec.feasible && rec.reason) detail.push(el('p', { text: rec.reason }));
      if (rec.runners_up && rec.runners_up.length) {
        detail.push(el('p', { text: `Runners-up: ${rec.runners_up.map((r) => `round ${r.round} (${fmtNum(r.score, 4)})`).join(', ')}` }));
      }
      for (const gap of rec.gaps || []) {
        detail.push(el('p', { text: `${gap.describe}: closest round ${gap.round ?? '—'} at ${fmtNum(gap.value, 4)}${gap.shortfall !== null ? `, short by ${fmtNum(gap.shortfall, 4)}` : ''}` }));
      }
      for (const note of rec.notes || []) detail.push(el('p', { class: 'hint', text: note }));
      setChildren(bestDetail, detail);
    } catch (err) {
      if (isAbort(err)) return;
      recommended.textContent = `No recommendation: ${errorText(err)}`;
      bestDetail.replaceChildren();
    } finally {
      bestButton.disabled = false;
    }
  });

  // -- download and verify -----------------------------------------------------------------------

  download.addEventListener('click', async () => {
    if (!current || !roundSelect.value) return;
    const jobId = current.job.job;
    const round = roundSelect.value;
    const path = `/v1/jobs/${seg(jobId)}/models/${seg(round)}`;
    const fileName = `${jobId}-round${round}.safetensors`;
    dropFiles();
    download.disabled = true;
    verifyStatus.className = 'status';
    verifyStatus.textContent = `Downloading round ${round}…`;
    try {
      const [weightsResponse, metadataResponse, signingKey] = await Promise.all([
        request(`${path}/weights`, { expect: 'response', signal, headers: { Accept: 'application/octet-stream' } }),
        request(`${path}/metadata`, { expect: 'response', signal }),
        get('/v1/models/signing-key', { signal }),
      ]);
      const weights = await weightsResponse.arrayBuffer();
      const metadataBytes = await metadataResponse.arrayBuffer();
      verifyStatus.textContent = 'Checking the signature and the SHA-256…';
      const verified = await verifyDownload({ weights, metadataBytes, signingKey });
      const announced = weightsResponse.headers.get('X-Fedsky-Weights-Sha256');
      if (announced && announced !== verified.sha256) {
        throw new VerificationError(`the controller announced SHA-256 ${announced.slice(0, 16)}… but the weights have ${verified.sha256.slice(0, 16)}…`);
      }
      // What was signed must be what was asked for: a validly signed file of another round or
      // job is not this one.
      const signedJob = plain(verified.metadata.job && verified.metadata.job.id);
      const signedRound = plain(verified.metadata.round);
      if (signedJob !== jobId || Number(signedRound) !== Number(round)) {
        throw new VerificationError(`the signed metadata is for job ${signedJob} round ${signedRound}, not job ${jobId} round ${round}`);
      }
      verifyStatus.className = 'status ok';
      verifyStatus.textContent = `verified: job ${signedJob} round ${signedRound}, ${verified.size} bytes, SHA-256 ${verified.sha256}, signed by the controller's key ${verified.keyId}`;
      offerFiles(weights, metadataBytes, fileName, path);
    } catch (err) {
      if (isAbort(err)) return;
      verifyStatus.className = 'status bad';
      verifyStatus.textContent = err instanceof VerificationError
        ? `NOT verified: ${err.message}`
        : `NOT verified: the download failed: ${errorText(err)}`;
    } finally {
      download.disabled = false;
    }
  });

  function offerFiles(weights, metadataBytes, fileName, path) {
    const weightsUrl = URL.createObjectURL(new Blob([weights], { type: 'application/octet-stream' }));
    const metaUrl = URL.createObjectURL(new Blob([metadataBytes], { type: 'application/json' }));
    blobUrls.push(weightsUrl, metaUrl);
    setChildren(files,
      el('ul', {},
        el('li', {}, el('a', { id: 'models-file', href: weightsUrl, download: fileName, text: `Save ${fileName} (verified)` })),
        el('li', {}, el('a', { id: 'models-meta-file', href: metaUrl, download: `${fileName}.meta.json`, text: `Save ${fileName}.meta.json (its signed metadata; keep it beside the file for \`fedctl models verify\`)` })),
        el('li', {}, el('a', { id: 'models-plain-link', href: `${path}/weights`, text: 'The same weights straight from the controller (not checked by this page)' }))));
  }

  // -- the job list ---------------------------------------------------------------------------------

  jobSelect.addEventListener('change', () => loadJob(jobSelect.value));
  Promise.all([get('/v1/models', { signal }), get('/v1/jobs', { signal }).catch(() => [])])
    .then(([registry, jobs]) => {
      for (const j of jobs) owners.set(j.id, j.owner);
      const list = [...registry.jobs].sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
      if (!list.length) {
        setChildren(jobSelect, el('option', { value: '', text: 'no job has recorded rounds' }));
        return;
      }
      setChildren(jobSelect, list.map((j) => el('option', { value: j.job, text: `${j.job}${j.name ? ` (${j.name})` : ''}${j.status ? `: ${j.status}` : ''}` })));
      const wanted = params.job && list.some((j) => j.job === params.job) ? params.job : list[0].job;
      jobSelect.value = wanted;
      loadJob(wanted);
    })
    .catch(fail);

  return dropFiles;
}
