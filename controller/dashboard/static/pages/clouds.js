// Linked cloud accounts: the list (what `fedctl clouds list` shows, never a secret), and for an
// admin: link one from its credential file, verify one again with the cloud, remove one.

import { del, get, post, query, seg } from '../api.js';
import { badge, el, errorText, fmtTime, isAbort, setChildren, syncRows, table } from '../dom.js';
import { atLeast } from '../session.js';

// The cloud plugins the controller knows (controller/clouds: aws, gcp), with the file each takes.
const KINDS = [
  { value: 'aws', label: 'AWS (credentials file, access-key CSV or JSON)' },
  { value: 'gcp', label: 'GCP (service-account key JSON)' },
];

function describeRecord(record) {
  const parts = [`${record.name}: ${record.cloud} account ${record.account || '?'}`];
  if (record.identity) parts.push(`as ${record.identity}`);
  if (record.region) parts.push(`region ${record.region}`);
  return `${parts.join(', ')}; status ${record.status}`;
}

/** The server's validation, as a list a person reads: status, message, what is missing, notes. */
function validationList(v) {
  if (!v) return null;
  const items = [];
  if (v.status) items.push(`status: ${v.status}`);
  if (v.account) items.push(`account: ${v.account}`);
  if (v.identity) items.push(`identity: ${v.identity}`);
  if (v.message) items.push(v.message);
  if (Array.isArray(v.missing) && v.missing.length) items.push(`missing permissions: ${v.missing.join(', ')}`);
  for (const note of v.notes || []) items.push(`note: ${note}`);
  return items.length ? el('ul', { class: 'details' }, items.map((t) => el('li', { text: t }))) : null;
}

export function mount(root, { signal }) {
  const admin = atLeast('admin');
  const error = el('p', { class: 'error', role: 'status', 'aria-live': 'polite' });
  const result = el('div', { id: 'cloud-result', class: 'result', role: 'status', 'aria-live': 'polite' });
  const headers = ['name', 'cloud', 'account / identity', 'state', 'last verified'];
  if (admin) headers.push('actions');
  const { table: cloudsTable, tbody } = table({ id: 'clouds-table', caption: 'Linked cloud accounts', headers });

  root.append(el('h1', { tabindex: '-1', text: 'Clouds' }), error, el('section', { class: 'panel' }, cloudsTable));

  const say = (ok, ...content) => {
    result.className = `result ${ok ? 'ok' : 'bad'}`;
    setChildren(result, ...content);
  };
  const sayError = (err) => {
    if (isAbort(err)) return;
    const body = err && err.body;
    // The error text first and whole: it is what the cloud (or the vault) said.
    say(false, el('p', { class: 'error-text', text: errorText(err) }), validationList(body && body.validation));
  };

  const load = () =>
    get('/v1/clouds', { signal })
      .then((list) => {
        error.textContent = '';
        show(list);
      })
      .catch((err) => {
        if (!isAbort(err)) error.textContent = errorText(err);
      });

  async function act(button, work) {
    button.disabled = true;
    try {
      await work();
    } catch (err) {
      sayError(err);
    } finally {
      button.disabled = false;
    }
    await load();
  }

  const cells = [
    { text: (c) => c.name },
    { text: (c) => c.cloud },
    { text: (c) => [c.account, c.identity].filter(Boolean).join(' / ') || '—' },
    {
      cls: 'state',
      update: (td, c) => {
        const detail = [];
        if (c.missing && c.missing.length) detail.push(`missing ${c.missing.join(', ')}`);
        if (c.message && c.status !== 'ok') detail.push(c.message);
        setChildren(td, badge(c.status), detail.length ? el('span', { class: 'detail', text: detail.join('; ') }) : null);
      },
    },
    { text: (c) => fmtTime(c.validated_at) },
  ];
  if (admin) {
    cells.push({
      cls: 'actions',
      once: (c) => {
        const verify = el('button', { type: 'button', class: 'secondary', 'data-action': 'verify', text: 'Verify', 'aria-label': `Verify ${c.name}` });
        const remove = el('button', { type: 'button', class: 'danger', 'data-action': 'remove', text: 'Remove', 'aria-label': `Remove ${c.name}` });
        verify.addEventListener('click', () =>
          act(verify, async () => {
            say(true, `Verifying ${c.name} with the cloud…`);
            const record = await post(`/v1/clouds/${seg(c.name)}/verify`, { signal });
            say(record.status === 'ok', el('p', { text: `Verified ${describeRecord(record)}` }), validationList({ message: record.message, missing: record.missing, notes: record.notes }));
          }),
        );
        remove.addEventListener('click', () =>
          act(remove, async () => {
            const answer = await del(`/v1/clouds/${seg(c.name)}`, { signal });
            say(true, `Removed ${answer && answer.removed ? answer.removed : c.name}: its secret is deleted.`);
          }),
        );
        return [verify, ' ', remove];
      },
    });
  }
  const show = (list) =>
    syncRows(tbody, list, {
      key: (c) => c.name,
      attrs: (c) => ({ 'data-cloud': c.name }),
      empty: 'No cloud account is linked.',
      cells,
    });

  if (admin) root.append(uploadForm(say, sayError, load, signal), result);
  else root.append(result);
  load();
  return () => {};
}

function uploadForm(say, sayError, reload, signal) {
  const kind = el('select', { id: 'cloud-kind', name: 'cloud' }, KINDS.map((k) => el('option', { value: k.value, text: k.label })));
  const name = el('input', { id: 'cloud-name', type: 'text', autocomplete: 'off', placeholder: 'default: made from the account' });
  const region = el('input', { id: 'cloud-region', type: 'text', autocomplete: 'off', placeholder: 'optional, e.g. ap-northeast-2' });
  const profile = el('input', { id: 'cloud-profile', type: 'text', autocomplete: 'off', placeholder: 'optional, AWS credentials files only' });
  const file = el('input', { id: 'cloud-file', type: 'file' });
  const submit = el('button', { id: 'cloud-upload', type: 'submit', text: 'Upload' });
  const form = el('form', { id: 'cloud-form', class: 'panel stacked-form', 'aria-labelledby': 'cloud-form-title' },
    el('h2', { id: 'cloud-form-title', text: 'Link a cloud account' }),
    el('p', { class: 'hint', text: 'The file is checked with real calls to the cloud; nothing is stored unless the cloud accepts it.' }),
    el('div', { class: 'fields' },
      el('div', { class: 'field' }, el('label', { for: 'cloud-kind', text: 'Cloud' }), kind),
      el('div', { class: 'field' }, el('label', { for: 'cloud-name', text: 'Name' }), name),
      el('div', { class: 'field' }, el('label', { for: 'cloud-region', text: 'Region' }), region),
      el('div', { class: 'field' }, el('label', { for: 'cloud-profile', text: 'Profile' }), profile),
      el('div', { class: 'field' }, el('label', { for: 'cloud-file', text: 'Credential file' }), file)),
    el('div', { class: 'buttons' }, submit));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const chosen = file.files && file.files[0];
    if (!chosen) {
      say(false, 'Choose the credential file first.');
      file.focus();
      return;
    }
    submit.disabled = true;
    say(true, `Uploading ${chosen.name} and checking it with ${kind.value}…`);
    try {
      const bytes = await chosen.arrayBuffer();
      const params = { name: name.value.trim(), region: region.value.trim() };
      if (kind.value === 'aws') params.profile = profile.value.trim();
      const record = await post(`/v1/clouds/${seg(kind.value)}${query(params)}`, {
        body: bytes,
        contentType: 'application/octet-stream',
        signal,
      });
      say(true, el('p', { text: `Linked ${describeRecord(record)}` }), validationList({ message: record.message, missing: record.missing, notes: record.notes }));
      form.reset();
    } catch (err) {
      sayError(err);
    } finally {
      submit.disabled = false;
    }
    reload();
  });
  return form;
}
