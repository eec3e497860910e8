"""Who is calling the operator API, what they may do, and the audit record of what they did.

Two ways in:
- the unix socket: its mode and group already limit it to the host's operators, so its caller
  is the local admin, named in the audit log by the peer's uid;
- the TLS listener (`[api] listen`): every request carries `Authorization: Bearer TOKEN` of a
  user (`fedctl users add`); none answers without it, not even the health route. A browser
  trades the token for a session once (`POST /v1/session`): its HttpOnly cookie then stands for
  the token, and a request that changes something must also carry the session's CSRF token
  (`X-CSRF-Token`), which only the page that logged in holds.

Every route has a rule in `RULES` (a route without one is refused: adding a route without
deciding who may call it fails closed, and a test checks the table covers the app). A rule names
the least role that may call the route, whether a scientist may act only on jobs they own, and
the action to record in the audit log.
"""

from __future__ import annotations

import hmac
import json
import logging
import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_urldispatcher import SystemRoute
from fedsky.controller.api.dashboard import PUBLIC_ROUTES
from fedsky.controller.api.responses import SERVICES, json_error
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.security import users
from fedsky.controller.security.users import Role
from fedsky.shared import exitcodes

log = logging.getLogger(__name__)

# A view sets what its action acted on when the path does not say (a new job's id).
AUDIT_TARGET = web.RequestKey("audit_target", str)


@dataclass(frozen=True)
class Caller:
    """`name` is what the audit log and a job's owner say: a user's name, or `uid:N(login)`."""

    name: str
    role: Role


CALLER = web.RequestKey("caller", Caller)


@dataclass(frozen=True)
class Rule:
    role: Role
    action: str | None = None  # recorded in the audit log when set
    own_job: bool = False  # below operator, only on a job the caller owns


VIEWER, SCIENTIST, OPERATOR, ADMIN = Role.VIEWER, Role.SCIENTIST, Role.OPERATOR, Role.ADMIN

RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/v1/health"): Rule(VIEWER),
    ("GET", "/v1/agents"): Rule(VIEWER),
    ("GET", "/v1/agents/{agent_id}"): Rule(VIEWER),
    ("GET", "/v1/agents/{agent_id}/history"): Rule(VIEWER),
    ("GET", "/v1/vms"): Rule(VIEWER),
    ("POST", "/v1/agents"): Rule(ADMIN, "agent.enrol"),
    ("POST", "/v1/agents/{agent_id}/revoke"): Rule(ADMIN, "agent.revoke"),
    ("POST", "/v1/agents/{agent_id}/ping"): Rule(OPERATOR),
    ("GET", "/v1/clouds"): Rule(VIEWER),
    ("POST", "/v1/clouds/{cloud}"): Rule(ADMIN, "cloud.link"),
    ("POST", "/v1/clouds/{name}/verify"): Rule(ADMIN, "cloud.verify"),
    ("DELETE", "/v1/clouds/{name}"): Rule(ADMIN, "cloud.remove"),
    ("POST", "/v1/model-files"): Rule(SCIENTIST, "model-file.upload"),
    ("POST", "/v1/jobs"): Rule(SCIENTIST, "job.submit"),
    ("GET", "/v1/jobs"): Rule(VIEWER),
    ("GET", "/v1/jobs/{job_id}"): Rule(VIEWER),
    ("POST", "/v1/jobs/{job_id}/cancel"): Rule(SCIENTIST, "job.cancel", own_job=True),
    ("GET", "/v1/jobs/{job_id}/logs"): Rule(VIEWER),
    ("GET", "/v1/jobs/{job_id}/explain"): Rule(VIEWER),
    ("GET", "/v1/models"): Rule(VIEWER),
    ("GET", "/v1/models/best"): Rule(VIEWER),
    ("GET", "/v1/models/signing-key"): Rule(VIEWER),
    ("GET", "/v1/jobs/{job}/models"): Rule(VIEWER),
    ("GET", "/v1/jobs/{job}/models/{round}"): Rule(VIEWER),
    ("GET", "/v1/jobs/{job}/models/{round}/weights"): Rule(
        SCIENTIST, "model.download", own_job=True
    ),
    ("GET", "/v1/jobs/{job}/models/{round}/metadata"): Rule(VIEWER),
    ("POST", "/v1/jobs/{job}/models/{round}/pin"): Rule(SCIENTIST, "model.pin", own_job=True),
    ("GET", "/v1/users"): Rule(ADMIN),
    ("POST", "/v1/users"): Rule(ADMIN, "user.add"),
    ("POST", "/v1/users/{name}/revoke"): Rule(ADMIN, "user.revoke"),
    ("GET", "/v1/audit"): Rule(ADMIN),
    ("GET", "/v1/audit/verify"): Rule(ADMIN),
    ("GET", "/v1/ca"): Rule(OPERATOR),
    ("POST", "/v1/placement"): Rule(VIEWER),
    ("POST", "/v1/job-specs"): Rule(SCIENTIST),
    ("GET", "/v1/events"): Rule(VIEWER),
    ("GET", "/v1/session"): Rule(VIEWER),
    ("POST", "/v1/session"): Rule(VIEWER, "session.open"),
    ("DELETE", "/v1/session"): Rule(VIEWER, "session.close"),
}


def rule_for(method: str, canonical: str) -> Rule | None:
    return RULES.get(("GET" if method == "HEAD" else method, canonical))


# -- who is calling ----------------------------------------------------------------------------


def _peer_uid(request: web.Request) -> int | None:
    """The uid of a unix-socket peer (SO_PEERCRED), or None for any other transport."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "?"


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CsrfRefused(Exception):
    """A session cookie on a request that changes something, without the session's CSRF token."""


async def identify(request: web.Request) -> Caller | None:
    """The caller, or None when a network caller shows no valid token or session;
    CsrfRefused for a session's unsafe request without its CSRF token."""
    uid = _peer_uid(request)
    if uid is not None:
        return Caller(name=f"uid:{uid}({_login(uid)})", role=Role.ADMIN)
    store = request.app[SERVICES].store
    token = _bearer(request)
    if token is not None:
        found = await store.run(users.user_for_token, token)
        if found is None:
            return None
        name, role = found
        return Caller(name=name, role=role)
    session_id = request.cookies.get(users.SESSION_COOKIE)
    if not session_id:
        return None
    session = await store.run(users.user_for_session, session_id, now=time.time())
    if session is None:
        return None
    name, role, csrf_digest = session
    if request.method not in _SAFE_METHODS:
        given = request.headers.get(users.CSRF_HEADER, "")
        if not given or not hmac.compare_digest(users.token_digest(given), csrf_digest):
            raise CsrfRefused(f"{name}'s session: {users.CSRF_HEADER} is missing or wrong")
    return Caller(name=name, role=role)


# -- the middleware ----------------------------------------------------------------------------


def _outcome(response: web.StreamResponse) -> str:
    if response.status < 400:
        return "ok"
    message = ""
    if isinstance(response, web.Response) and response.body is not None:
        try:
            body = json.loads(bytes(response.body))  # type: ignore[arg-type]
            message = str(body.get("error", "")) if isinstance(body, dict) else ""
        except (ValueError, TypeError):
            message = ""
    return f"refused {response.status}" + (f": {message}" if message else "")


def _target(request: web.Request) -> str:
    explicit = request.get(AUDIT_TARGET)
    if isinstance(explicit, str) and explicit:
        return explicit
    values = list(request.match_info.values())
    return "/".join(values) if values else request.path


async def _record(request: web.Request, caller: Caller, action: str, outcome: str) -> None:
    trail = request.app[SERVICES].audit
    if trail is not None:
        await trail.record_after_the_fact(
            actor=caller.name, action=action, target=_target(request), outcome=outcome
        )


async def _not_own_job(request: web.Request, caller: Caller) -> str | None:
    """Why `caller` may not act on the path's job, or None when it is theirs (or there is no
    such job: the view answers 404)."""
    job_id = request.match_info.get("job_id") or request.match_info.get("job")
    if job_id is None:
        return None
    try:
        job = await request.app[SERVICES].store.run(jobstore.get_job, job_id)
    except jobstore.JobNotFound:
        return None
    owner = job.get("owner")
    if owner == caller.name:
        return None
    whose = f"{owner}'s" if owner else "without a recorded owner"
    return f"{caller.name} may act only on their own jobs (job {job_id} is {whose})"


@web.middleware
async def authorize(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    route = request.match_info.route
    canonical = route.resource.canonical if route.resource else ""
    if (request.method if request.method != "HEAD" else "GET", canonical) in PUBLIC_ROUTES:
        return await handler(request)  # the dashboard's static pages: no data in them
    try:
        caller = await identify(request)
    except CsrfRefused as exc:
        log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, exc)
        return json_error(403, f"CSRF check failed: {exc}", exit_code=exitcodes.FAILED)
    if caller is None:
        log.warning(
            "refused %s %s from %s: no valid token", request.method, request.path, request.remote
        )
        unauthenticated = json_error(
            401,
            "authentication required: give a user's token (fedctl --token-file FILE, or "
            "FEDSKY_TOKEN); an admin makes one with `fedctl users add NAME --role ROLE`",
            exit_code=exitcodes.USAGE,
        )
        unauthenticated.headers["WWW-Authenticate"] = 'Bearer realm="fedsky"'
        return unauthenticated
    if isinstance(route, SystemRoute):  # no such route, or method not allowed: answered as such
        return await handler(request)
    rule = rule_for(request.method, canonical)
    if rule is None:
        log.error("no access rule for %s %s: refused", request.method, request.path)
        return json_error(403, "no access rule for this route", exit_code=exitcodes.FAILED)
    refusal = None
    if caller.role < rule.role:
        refusal = f"{caller.name} is a {caller.role.label}; this needs {rule.role.label}"
    elif rule.own_job and caller.role < Role.OPERATOR:
        refusal = await _not_own_job(request, caller)
    if refusal is not None:
        if rule.action:
            await _record(request, caller, rule.action, f"denied: {refusal}")
        log.warning("denied %s %s: %s", request.method, request.path, refusal)
        return json_error(403, refusal, exit_code=exitcodes.FAILED)
    request[CALLER] = caller
    response = await handler(request)
    if rule.action:
        await _record(request, caller, rule.action, _outcome(response))
    return response


def caller_of(request: web.Request) -> Caller | None:
    """The caller `authorize` found; None for a view called without it (a unit test)."""
    return request.get(CALLER)
