"""API views for the admin: API users and their tokens, browser sessions, the audit log, the
PKI's expiries."""

from __future__ import annotations

import time
from typing import Annotated

from aiohttp import web
from fedsky.controller.api.access import AUDIT_TARGET, caller_of
from fedsky.controller.api.responses import SERVICES, ApiProblem, json_ok, whole_number
from fedsky.controller.security import expiry, users
from fedsky.controller.security.audit import AuditTrail
from fedsky.shared import exitcodes
from pydantic import BaseModel, ConfigDict, Field

routes = web.RouteTableDef()


class AddUserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(max_length=63)]
    role: Annotated[str, Field(max_length=20)]


def _problem(exc: users.UserError) -> ApiProblem:
    return ApiProblem(
        exc.status, str(exc), exit_code=exitcodes.USAGE if exc.status == 400 else exitcodes.FAILED
    )


def _trail(request: web.Request) -> AuditTrail:
    trail = request.app[SERVICES].audit
    if trail is None:
        raise ApiProblem(503, "the audit log is not available", exit_code=exitcodes.UNAVAILABLE)
    return trail


@routes.get("/v1/users")
async def list_users(request: web.Request) -> web.Response:
    return json_ok(await request.app[SERVICES].store.run(users.list_users))


@routes.post("/v1/users")
async def add_user(request: web.Request) -> web.Response:
    body = AddUserRequest.model_validate(await request.json())
    request[AUDIT_TARGET] = body.name[:63]
    caller = caller_of(request)
    try:
        role = users.Role.parse(body.role)
        token = await request.app[SERVICES].store.run(
            users.add_user,
            name=body.name,
            role=role,
            created_by=caller.name if caller else "?",
        )
    except users.UserError as exc:
        raise _problem(exc) from None
    # The token is in this answer and nowhere else: not in the log, not in the audit record.
    return json_ok({"name": body.name, "role": role.label, "token": token}, status=201)


@routes.post("/v1/users/{name}/revoke")
async def revoke_user(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        await request.app[SERVICES].store.run(users.revoke_user, name)
    except users.UserError as exc:
        raise _problem(exc) from None
    return json_ok({"name": name, "revoked": True})


@routes.get("/v1/audit")
async def audit_records(request: web.Request) -> web.Response:
    after = whole_number(request.query.get("after"), "after", default=0, lo=0, hi=2**63 - 1)
    limit = whole_number(request.query.get("limit"), "limit", default=100, lo=1, hi=10_000)
    # ?last=N: the latest N records (the dashboard's recent events), oldest first.
    last = whole_number(request.query.get("last"), "last", default=0, lo=0, hi=10_000)
    if last:
        return json_ok(await _trail(request).records(after=after, limit=last, last=True))
    return json_ok(await _trail(request).records(after=after, limit=limit))


@routes.get("/v1/audit/verify")
async def audit_verify(request: web.Request) -> web.Response:
    return json_ok((await _trail(request).verify()).to_json())


@routes.get("/v1/ca")
async def ca_status(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    # The managed broker's server certificate (not issued through the store's records).
    files = [svc.broker.files.cert_file] if svc.broker is not None else []
    return json_ok(await svc.store.run(expiry.ca_status, pki=svc.need_pki(), files=files))


@routes.get("/v1/session")
async def who_am_i(request: web.Request) -> web.Response:
    """Who the session (or token) is: the dashboard asks on load to know whether to log in."""
    caller = caller_of(request)
    if caller is None:
        raise ApiProblem(401, "no caller", exit_code=exitcodes.USAGE)
    return json_ok({"user": caller.name, "role": caller.role.label})


@routes.post("/v1/session")
async def open_session(request: web.Request) -> web.Response:
    """Trade the bearer token for a browser session: an HttpOnly, Secure, SameSite=Strict
    cookie and the CSRF token the page keeps for requests that change something."""
    svc = request.app[SERVICES]
    caller = caller_of(request)
    if caller is None or caller.name.startswith("uid:") or not request.headers.get("Authorization"):
        raise ApiProblem(
            400,
            "a session is opened with a user's token (Authorization: Bearer TOKEN) on the "
            "network listener",
            exit_code=exitcodes.USAGE,
        )
    ttl = svc.config.api.session_ttl_s if svc.config is not None else 12 * 3600.0
    now = time.time()
    session_id, csrf = await svc.store.run(users.open_session, name=caller.name, ttl_s=ttl, now=now)
    response = json_ok(
        {
            "user": caller.name,
            "role": caller.role.label,
            "csrf_token": csrf,
            "expires_at": now + ttl,
        },
        status=201,
    )
    response.set_cookie(
        users.SESSION_COOKIE,
        session_id,
        max_age=int(ttl),
        path="/",
        secure=True,
        httponly=True,
        samesite="Strict",
    )
    return response


@routes.delete("/v1/session")
async def close_session(request: web.Request) -> web.Response:
    session_id = request.cookies.get(users.SESSION_COOKIE)
    ended = bool(session_id) and await request.app[SERVICES].store.run(
        users.end_session, session_id
    )
    response = json_ok({"ended": ended})
    response.del_cookie(
        users.SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict"
    )
    return response
