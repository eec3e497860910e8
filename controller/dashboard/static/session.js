// Who is logged in, and what their role lets the pages show. The server decides every request
// (`controller/api/access.py`); the pages only hide what would be refused, so nobody is offered
// a button that cannot work.

export const ROLES = ['viewer', 'scientist', 'operator', 'admin'];

export const session = { user: null, role: null };

export function setSession(user, role) {
  session.user = user;
  session.role = role;
}

export function clearSession() {
  session.user = null;
  session.role = null;
}

/** The session's role is `role` or above (an unknown role counts as none). */
export function atLeast(role) {
  const have = ROLES.indexOf(session.role);
  return have >= 0 && have >= ROLES.indexOf(role);
}

/** May act on a job (cancel it, download its models): an operator on any job, a scientist on
 * their own (the `own_job` rules of access.py). */
export function mayActOnJob(owner) {
  return atLeast('operator') || (atLeast('scientist') && owner != null && owner === session.user);
}
