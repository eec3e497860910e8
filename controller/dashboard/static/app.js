// The dashboard's entry point: the session (log in with a token, log out, back to the login form
// whenever the server answers 401), the header, and hash routing to one page module at a time.
// A page is `mount(root, {params, signal}) -> leave()`: `signal` aborts its requests and
// `leave` closes its event stream and charts when another page is shown.

import { clearCsrfToken, del, get, post, setCsrfToken, setUnauthorizedHandler } from './api.js';
import { el, errorText } from './dom.js';
import { setStatusListener } from './live.js';
import { clearSession, session, setSession } from './session.js';
import * as clouds from './pages/clouds.js';
import * as hospitals from './pages/hospitals.js';
import * as job from './pages/job.js';
import * as jobs from './pages/jobs.js';
import * as models from './pages/models.js';
import * as overview from './pages/overview.js';
import * as placement from './pages/placement.js';

const PAGES = { overview, hospitals, clouds, placement, jobs, job, models };
const TITLES = {
  overview: 'Overview',
  hospitals: 'Hospitals and VMs',
  clouds: 'Clouds',
  placement: 'Placement',
  jobs: 'Jobs',
  job: 'Job',
  models: 'Models',
};

const $ = (id) => document.getElementById(id);
const view = {
  boot: $('boot'),
  login: $('login-view'),
  app: $('app-view'),
  form: $('login-form'),
  token: $('login-token'),
  submit: $('login-submit'),
  loginError: $('login-error'),
  whoami: $('whoami'),
  logout: $('logout'),
  live: $('live-status'),
  main: $('main'),
  skip: $('skip'),
};

// -- routing --------------------------------------------------------------------------------------

/** `#/jobs/ID` -> {page: 'job', nav: 'jobs', params: {id}}; anything unknown is the overview. */
function parseRoute(hash) {
  let parts = [];
  try {
    parts = hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  } catch {
    parts = []; // a malformed escape: the default page
  }
  const [name = 'overview', rest] = parts;
  if (name === 'jobs' && rest) return { page: 'job', nav: 'jobs', params: { id: rest } };
  if (name === 'models' && rest) return { page: 'models', nav: 'models', params: { job: rest } };
  if (Object.hasOwn(PAGES, name) && name !== 'job') return { page: name, nav: name, params: {} };
  return { page: 'overview', nav: 'overview', params: {} };
}

let leave = null;
let aborter = null;

function leavePage() {
  if (aborter) aborter.abort();
  aborter = null;
  if (leave) {
    try {
      leave();
    } catch (err) {
      console.error('leaving the page failed', err);
    }
  }
  leave = null;
}

function render({ focus }) {
  if (!session.user) return;
  leavePage();
  const route = parseRoute(window.location.hash);
  for (const link of document.querySelectorAll('nav a[data-page]')) {
    if (link.dataset.page === route.nav) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const root = el('section', { id: `page-${route.page}`, class: 'page' });
  view.main.replaceChildren(root);
  document.title = `${TITLES[route.page]}${route.params.id ? ` ${route.params.id}` : ''} · fedsky`;
  aborter = new AbortController();
  try {
    leave = PAGES[route.page].mount(root, { params: route.params, signal: aborter.signal }) || null;
  } catch (err) {
    console.error(err);
    root.append(el('p', { class: 'error', role: 'alert', text: `This page failed to load: ${errorText(err)}` }));
  }
  // Keyboard and screen-reader users land on the new page's heading, not back at the nav.
  if (focus) {
    const heading = root.querySelector('h1');
    if (heading) heading.focus({ preventScroll: false });
  }
}

// -- session ----------------------------------------------------------------------------------------

function showLogin(message = '') {
  leavePage();
  clearSession();
  clearCsrfToken();
  view.main.replaceChildren();
  view.boot.hidden = true;
  view.app.hidden = true;
  view.login.hidden = false;
  view.loginError.textContent = message;
  view.submit.disabled = false;
  document.title = 'Log in · fedsky';
  view.token.focus();
}

function showApp(user, role) {
  setSession(user, role);
  view.whoami.textContent = `${user} (${role})`;
  view.boot.hidden = true;
  view.login.hidden = true;
  view.app.hidden = false;
  render({ focus: false });
}

setUnauthorizedHandler(() => {
  if (session.user) showLogin('Your session has ended: log in again.');
});

setStatusListener((state) => {
  const words = { live: 'Live', reconnecting: 'Reconnecting…', offline: 'Live updates offline' };
  view.live.textContent = state ? words[state] : '';
  view.live.className = state ? `live-${state}` : '';
});

view.form.addEventListener('submit', async (event) => {
  event.preventDefault();
  const token = view.token.value.trim();
  if (!token) {
    view.loginError.textContent = 'Paste your access token.';
    view.token.focus();
    return;
  }
  view.submit.disabled = true;
  view.loginError.textContent = 'Logging in…';
  try {
    const answer = await post('/v1/session', { headers: { Authorization: `Bearer ${token}` }, on401: 'throw' });
    setCsrfToken(answer.csrf_token);
    view.token.value = ''; // the token stays nowhere on the page once traded for the session
    view.loginError.textContent = '';
    showApp(answer.user, answer.role);
  } catch (err) {
    view.loginError.textContent = errorText(err);
    view.token.focus();
  } finally {
    view.submit.disabled = false;
  }
});

view.logout.addEventListener('click', async () => {
  view.logout.disabled = true;
  try {
    await del('/v1/session', { on401: 'throw' });
  } catch {
    // Ended already, or this tab lacks the CSRF token: the page forgets the session either way.
  } finally {
    view.logout.disabled = false;
  }
  showLogin('Logged out.');
});

view.skip.addEventListener('click', () => {
  const heading = view.main.querySelector('h1');
  (heading || view.main).focus();
});

window.addEventListener('hashchange', () => render({ focus: true }));

async function boot() {
  try {
    const who = await get('/v1/session', { on401: 'throw' });
    showApp(who.user, who.role);
  } catch (err) {
    showLogin(err && err.status === 401 ? '' : `Could not check the session: ${errorText(err)}`);
  }
}

boot();
