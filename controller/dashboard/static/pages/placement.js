// Placement: where the aggregator of a job with these participants and limits would run, as
// `fedctl place` answers it (POST /v1/placement): the Pareto plot of every offer, the choice
// and why, or why nothing is feasible and what comes closest.

import { get, post } from '../api.js';
import { offerLabel, paretoChart } from '../charts.js';
import { el, errorText, fmtMoney, fmtNum, fmtPct, isAbort, setChildren, syncRows, table } from '../dom.js';

// The study's case-study defaults, as `fedctl place` has them.
const DEFAULTS = { model_mb: 26, rounds: 20, max_cost: '85000 KRW/month', max_latency_ms: 250, cost_weight: 0.5 };

// Names the planner gives the limits (placer.py violations, choice.py binding), for people.
const LIMIT_WORDS = {
  max_cost: 'the max cost',
  max_latency: 'the max latency',
  memory: 'the memory the aggregation needs',
  rtt_unknown: 'an unknown RTT to a participant',
  cloud_not_allowed: 'the clouds allowed',
  clouds: 'the clouds allowed',
};
const limitWords = (names) => (names || []).map((n) => LIMIT_WORDS[n] || n).join(' and ');

function field(id, label, input, hint) {
  return el('div', { class: 'field' }, el('label', { for: id, text: label }), input, hint ? el('span', { class: 'hint', id: `${id}-hint`, text: hint }) : null);
}

/** `NAME=cloud:region` lines to the participants object; throws with the bad line. */
export function parseParticipants(text) {
  const out = {};
  text.split('\n').forEach((raw, index) => {
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const at = line.indexOf('=');
    const name = at > 0 ? line.slice(0, at).trim() : '';
    const location = at > 0 ? line.slice(at + 1).trim() : '';
    if (!name || !location) {
      throw new Error(`participants, line ${index + 1}: expected NAME=cloud:region, got ${JSON.stringify(line)}`);
    }
    if (name in out) throw new Error(`participants, line ${index + 1}: ${name} is listed twice`);
    out[name] = location;
  });
  if (Object.keys(out).length === 0) throw new Error('give at least one participant, one NAME=cloud:region per line');
  return out;
}

// Better by less than this is float noise, not a reason to call a limit binding.
const MARGIN = 0.01;

/**
 * Which limits kept a better offer out, for a feasible choice: a limit binds when an offer that
 * breaks that limit alone is cheaper or faster than the choice (by more than MARGIN). For each,
 * the count of such offers and the best of them.
 */
function bindingForChoice(result) {
  const choice = result.choice;
  const out = [];
  for (const name of ['max_cost', 'max_latency', 'memory']) {
    const kept = (result.candidates || []).filter(
      (p) => p.violations && p.violations.length === 1 && p.violations[0] === name && p.round_time_s !== null,
    );
    const cheaper = kept.filter((p) => p.cost < choice.cost * (1 - MARGIN)).sort((a, b) => a.cost - b.cost);
    const faster = kept.filter((p) => p.round_time_s < choice.round_time_s * (1 - MARGIN)).sort((a, b) => a.round_time_s - b.round_time_s);
    if (cheaper.length || faster.length) out.push({ name, cheaper, faster });
  }
  return out;
}

function explainChoice(result) {
  const cur = result.currency;
  const basis = result.basis;
  const money = (v) => `${fmtMoney(v, cur)} ${cur}/${basis}`;
  const c = result.choice;
  const items = [];
  const rtt = c.max_rtt_ms === null ? 'unknown' : `${fmtNum(c.max_rtt_ms, 0)} ms`;
  items.push(el('p', { class: 'lead' },
    'Choice: ', el('strong', { text: offerLabel(c) }),
    ` (${c.vcpus} vCPU, ${fmtNum(c.memory_gib, 1)} GiB): ${money(c.cost)}, round time ${fmtNum(c.round_time_s, 2)} s, ` +
      `max RTT ${rtt}${c.farthest_participant ? ` (to ${c.farthest_participant})` : ''}.`));
  const b = result.baseline;
  if (b) {
    const change = c.cost_change_pct !== undefined
      ? `cost ${fmtPct(c.cost_change_pct)}, round time ${fmtPct(c.round_time_change_pct)}`
      : 'no comparison (the baseline has no cost or round time)';
    items.push(el('p', { text: `Against the baseline ${offerLabel(b)} (${money(b.cost)}, ${fmtNum(b.round_time_s, 2)} s per round${b.feasible ? '' : `, itself beyond ${limitWords(b.violations)}`}): ${change}.` }));
  } else {
    items.push(el('p', { text: 'The baseline offer is not in this catalog: no comparison.' }));
  }
  const binding = bindingForChoice(result);
  const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
  if (binding.length) {
    items.push(el('p', {}, 'Limits that bind:'), el('ul', {}, binding.map((bnd) => {
      const parts = [];
      if (bnd.cheaper.length) {
        const best = bnd.cheaper[0];
        parts.push(`${plural(bnd.cheaper.length, 'cheaper offer')} (the cheapest: ${offerLabel(best)} at ${money(best.cost)})`);
      }
      if (bnd.faster.length) {
        const best = bnd.faster[0];
        parts.push(`${plural(bnd.faster.length, 'faster offer')} (the fastest: ${offerLabel(best)} at ${fmtNum(best.round_time_s, 2)} s per round)`);
      }
      return el('li', { text: `${limitWords([bnd.name])} keeps out ${parts.join(' and ')}` });
    })));
  } else {
    items.push(el('p', { text: 'No limit binds: no offer that breaks a single limit is cheaper or faster than the choice.' }));
  }
  const front = result.front || [];
  const weight = result.limits ? result.limits.cost_weight : '';
  items.push(el('p', { class: 'hint', text: `Chosen from ${front.length} offers on the Pareto front with cost weight ${weight} (1 = cost only, 0 = round time only).` }));
  return items;
}

function explainInfeasible(result) {
  const cur = result.currency;
  const basis = result.basis;
  const items = [
    el('p', { class: 'lead bad' }, el('strong', { text: 'No feasible placement. ' }), result.reason || ''),
  ];
  if (result.binding && result.binding.length) {
    items.push(el('p', { text: `Binding: ${limitWords(result.binding)}.` }));
  }
  const closest = result.closest || [];
  if (closest.length) {
    items.push(el('p', { text: 'The closest offers:' }), el('ul', {}, closest.map((p) => el('li', {
      text: `${offerLabel(p)}: ${fmtMoney(p.cost, cur)} ${cur}/${basis}, round time ${fmtNum(p.round_time_s, 2)} s, ` +
        `max RTT ${p.max_rtt_ms === null ? 'unknown' : `${fmtNum(p.max_rtt_ms, 0)} ms`}` +
        (p.violations && p.violations.length ? `; beyond ${limitWords(p.violations)}` : ''),
    }))));
  }
  return items;
}

export function mount(root, { signal }) {
  const participants = el('textarea', { id: 'pl-participants', rows: '5', spellcheck: 'false', 'aria-describedby': 'pl-participants-hint' });
  const modelMb = el('input', { id: 'pl-model-mb', type: 'number', min: '0', step: 'any', value: DEFAULTS.model_mb });
  const rounds = el('input', { id: 'pl-rounds', type: 'number', min: '1', step: '1', value: DEFAULTS.rounds });
  const maxCost = el('input', { id: 'pl-max-cost', type: 'text', value: DEFAULTS.max_cost, 'aria-describedby': 'pl-max-cost-hint' });
  const maxLatency = el('input', { id: 'pl-max-latency', type: 'number', min: '0', step: 'any', value: DEFAULTS.max_latency_ms });
  const weight = el('input', { id: 'pl-weight', type: 'range', min: '0', max: '1', step: '0.05', value: DEFAULTS.cost_weight, 'aria-describedby': 'pl-weight-hint' });
  const weightShown = el('output', { id: 'pl-weight-value', for: 'pl-weight', text: String(DEFAULTS.cost_weight) });
  weight.addEventListener('input', () => {
    weightShown.textContent = Number(weight.value).toFixed(2);
  });
  const submit = el('button', { id: 'pl-submit', type: 'submit', text: 'Plan' });
  const error = el('p', { id: 'pl-error', class: 'error', role: 'status', 'aria-live': 'polite' });
  const plot = el('div', { id: 'pl-plot', class: 'plot' });
  const hover = el('p', { id: 'pl-hover', class: 'hint' });
  const choice = el('div', { id: 'pl-choice', class: 'explanation', 'aria-live': 'polite' });
  const front = table({
    id: 'pl-front',
    caption: 'The Pareto front (feasible offers no other beats on both cost and round time)',
    headers: ['offer', 'vCPU', 'GiB', 'cost', 'round time s', 'max RTT ms', ''],
  });
  const frontPanel = el('section', { class: 'panel', hidden: true }, front.table);

  const form = el('form', { id: 'pl-form', class: 'panel stacked-form', 'aria-labelledby': 'pl-form-title' },
    el('h2', { id: 'pl-form-title', text: 'Participants and limits' }),
    el('div', { class: 'fields' },
      el('div', { class: 'field wide' },
        el('label', { for: 'pl-participants', text: 'Participants' }), participants,
        el('span', { class: 'hint', id: 'pl-participants-hint', text: 'One per line: NAME=cloud:region (prefilled from the enrolled agents).' })),
      field('pl-model-mb', 'Model size (MB)', modelMb),
      field('pl-rounds', 'Rounds', rounds),
      field('pl-max-cost', 'Max cost', maxCost, 'AMOUNT USD|KRW/month|job'),
      field('pl-max-latency', 'Max latency (ms)', maxLatency),
      el('div', { class: 'field' },
        el('label', { for: 'pl-weight', text: 'Cost weight' }),
        el('div', { class: 'range' }, weight, weightShown),
        el('span', { class: 'hint', id: 'pl-weight-hint', text: '1 = cost only, 0 = round time only' }))),
    el('div', { class: 'buttons' }, submit),
    error);

  root.append(
    el('h1', { tabindex: '-1', text: 'Placement' }),
    form,
    el('section', { class: 'panel', 'aria-labelledby': 'pl-result-title' },
      el('h2', { id: 'pl-result-title', text: 'Where the aggregator would run' }),
      plot, hover, choice),
    frontPanel,
  );

  // Prefill the participants from where the agents say they are.
  get('/v1/agents', { signal })
    .then((agents) => {
      if (participants.value.trim()) return; // the user typed already
      participants.value = agents
        .filter((a) => a.state !== 'revoked' && a.location)
        .map((a) => `${a.id}=${a.location}`)
        .join('\n');
    })
    .catch((err) => {
      if (!isAbort(err)) error.textContent = `Could not prefill the participants: ${errorText(err)}`;
    });

  let destroyPlot = () => {};
  function show(result) {
    destroyPlot();
    plot.replaceChildren();
    destroyPlot = paretoChart(plot, result, hover);
    setChildren(choice, result.choice ? explainChoice(result) : explainInfeasible(result));
    const cur = result.currency;
    frontPanel.hidden = !(result.front && result.front.length);
    syncRows(front.tbody, result.front || [], {
      key: (p) => `${p.cloud}:${p.region}:${p.instance_type}`,
      cells: [
        { text: offerLabel },
        { cls: 'num', text: (p) => p.vcpus },
        { cls: 'num', text: (p) => fmtNum(p.memory_gib, 1) },
        { cls: 'num', text: (p) => `${fmtMoney(p.cost, cur)} ${cur}` },
        { cls: 'num', text: (p) => fmtNum(p.round_time_s, 2) },
        { cls: 'num', text: (p) => fmtNum(p.max_rtt_ms, 0) },
        {
          text: (p) => {
            const key = (q) => q && `${q.cloud}:${q.region}:${q.instance_type}`;
            const marks = [];
            if (key(p) === key(result.choice)) marks.push('choice');
            if (key(p) === key(result.baseline)) marks.push('baseline');
            return marks.join(', ');
          },
        },
      ],
    });
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    let body;
    try {
      body = {
        participants: parseParticipants(participants.value),
        model_mb: Number(modelMb.value),
        rounds: Number.parseInt(rounds.value, 10),
        max_cost: maxCost.value.trim(),
        max_latency_ms: Number(maxLatency.value),
        cost_weight: Number(weight.value),
      };
    } catch (err) {
      error.textContent = errorText(err);
      participants.focus();
      return;
    }
    submit.disabled = true;
    setChildren(choice, el('p', { class: 'hint', text: 'Planning…' }));
    try {
      show(await post('/v1/placement', { json: body, signal }));
    } catch (err) {
      if (isAbort(err)) return;
      error.textContent = errorText(err);
      // An answer that still carries a result (nothing feasible) is shown as one.
      if (err.body && (err.body.closest || err.body.front)) show(err.body);
      else choice.replaceChildren();
    } finally {
      submit.disabled = false;
    }
  });

  return () => destroyPlot();
}
