// Building the page without innerHTML: every figure the server sends lands in the DOM as text
// (textContent, setAttribute), so a hostile name or reason can never become markup.

/** A new element: `attrs` sets attributes (`class`, `text`, `dataset`, `on<event>`), children are
 * nodes or strings (strings become text nodes). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') {
      node.addEventListener(key.slice(2), value);
    } else if (value === true) node.setAttribute(key, '');
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

/** Replace `node`'s content with `children` (nodes or strings). */
export function setChildren(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

/** A table with a caption (or `labelledBy`: the id of a heading that names it) and a header
 * row; returns the table and its tbody. */
export function table({ id, caption, labelledBy, headers, className = 'data' }) {
  const tbody = el('tbody');
  const tableEl = el(
    'table',
    { id, class: className, 'aria-labelledby': labelledBy },
    caption ? el('caption', { text: caption }) : null,
    el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col', text: h })))),
    tbody,
  );
  return { table: tableEl, tbody };
}

/**
 * Bring a tbody's rows in line with `items`, reusing the row of each key.
 *
 * Live pages redraw several times a minute; rebuilding the rows would drop keyboard focus from a
 * link or button inside them, so rows are kept by key and only their text changes. `cells[i]`
 * is `{cls, text(item)}` (a text cell, updated in place), `{cls, once(item)}` (built when the row
 * is made: its content depends on the key only) or `{cls, update(td, item)}`. `attrs(item)` gives
 * the row's attributes (e.g. `data-vm`).
 */
export function syncRows(tbody, items, { key, cells, attrs, empty = 'Nothing to show.' }) {
  for (const stale of tbody.querySelectorAll('tr.empty-row')) stale.remove();
  const existing = new Map();
  for (const tr of Array.from(tbody.rows)) existing.set(tr.dataset.key, tr);
  items.forEach((item, index) => {
    const k = String(key(item));
    let tr = existing.get(k);
    if (tr) {
      existing.delete(k);
    } else {
      tr = document.createElement('tr');
      tr.dataset.key = k;
      for (const cell of cells) {
        const td = document.createElement('td');
        if (cell.cls) td.className = cell.cls;
        if (cell.once) append(td, [cell.once(item)]);
        tr.append(td);
      }
    }
    if (attrs) {
      for (const [name, value] of Object.entries(attrs(item))) tr.setAttribute(name, String(value));
    }
    cells.forEach((cell, j) => {
      const td = tr.cells[j];
      if (cell.text) {
        const text = String(cell.text(item) ?? '');
        if (td.textContent !== text) td.textContent = text;
      } else if (cell.update) {
        cell.update(td, item);
      }
    });
    // Move a row only when it is out of place: moving a node takes focus away from it.
    if (tbody.rows[index] !== tr) tbody.insertBefore(tr, tbody.rows[index] || null);
  });
  for (const tr of existing.values()) tr.remove();
  if (items.length === 0) {
    const columns = tbody.closest('table')?.tHead?.rows[0]?.cells.length || 1;
    tbody.append(el('tr', { class: 'empty-row' }, el('td', { colspan: columns, text: empty })));
  }
}

/** A CSS-class-safe slug of a server word (a state), for colouring it. */
export function slug(text) {
  return String(text ?? '').toLowerCase().replace(/[^a-z0-9]+/g, '-');
}

/** A state badge: the word as text, its colour from a class. */
export function badge(state) {
  return el('span', { class: `badge state-${slug(state)}`, text: state ?? '—' });
}

// -- formatting ---------------------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, '0');

/** A time as `YYYY-MM-DD HH:MM:SS` (local): ISO text or Unix seconds; simulated clocks (small
 * numbers, as `fedctl job explain` shows them) as `t=Ns`. */
export function fmtTime(value) {
  if (value === null || value === undefined || value === '') return '—';
  let date;
  if (typeof value === 'number') {
    if (value < 1e9) return `t=${value.toFixed(1)}s`;
    date = new Date(value * 1000);
  } else {
    date = new Date(value);
  }
  if (Number.isNaN(date.getTime())) return String(value);
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
  );
}

/** How long ago, in words a person reads at a glance ("12 s ago"). */
export function fmtAgo(value) {
  if (!value) return 'never';
  const then = typeof value === 'number' ? value * 1000 : Date.parse(value);
  if (Number.isNaN(then)) return String(value);
  const s = Math.max(0, Math.round((Date.now() - then) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** A number with at most `digits` decimals, or an em dash for a missing one. */
export function fmtNum(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return '—';
  return Number(value).toLocaleString('en-US', { maximumFractionDigits: digits });
}

/** Money as `fedctl place` writes it: whole won, cents of a dollar. */
export function fmtMoney(value, currency) {
  if (value === null || value === undefined) return '—';
  const digits = currency === 'KRW' ? 0 : 2;
  return Number(value).toLocaleString('en-US', {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

/** A signed percentage, "+12.3 %". */
export function fmtPct(value) {
  if (value === null || value === undefined) return '—';
  const n = Number(value);
  return `${n > 0 ? '+' : ''}${n.toFixed(1)} %`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let v = Number(n);
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return `${v.toFixed(u ? 1 : 0)} ${units[u]}`;
}

/** The text of an error for people: the server's `error`, or the exception's message. */
export function errorText(err) {
  return err && err.message ? err.message : String(err);
}

/** True for the rejection a fetch gives when its page was left (nothing to show). */
export function isAbort(err) {
  return err && err.name === 'AbortError';
}
