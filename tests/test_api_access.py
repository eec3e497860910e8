"""The operator API over the network: TLS, users' tokens, roles, job owners, the audit log.

The controller runs as the operator runs it (its own process, managed broker) with `[api]
listen` on a loopback port; the admin uses the unix socket (`fedctl users add`), everyone else
the HTTPS listener with a token. The audit log is then checked live and on an edited copy.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fedsky.controller.api.access import RULES
from fedsky.controller.api.app import make_app
from fedsky.controller.api.dashboard import PUBLIC_ROUTES
from fedsky.controller.cli.client import ApiClient, ApiError
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.onebox import Onebox
from fedsky.controller.security import users
from fedsky.controller.services import Services
from fedsky.controller.store import Store
from fedsky.shared.net import free_port

pytestmark = pytest.mark.e2e

SAMPLE = {"agent_id": "hospital-x", "job_id": "no-such-job", "job": "no-such-job", "round": "1"}


def _routes(directory: Path) -> list[web.AbstractRoute]:
    app = make_app(Services(store=Store(directory / "routes.db")))
    return [r for r in app.router.routes() if r.method != "HEAD" and r.resource is not None]


def _paths(directory: Path) -> list[tuple[str, str]]:
    """Every route of the operator API, its parameters filled in (not the dashboard's pages,
    which hold no data and load before a login)."""
    out = []
    for route in _routes(directory):
        assert route.resource is not None
        if (route.method, route.resource.canonical) in PUBLIC_ROUTES:
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: SAMPLE.get(m.group(1), "x"), route.resource.canonical)
        out.append((route.method, path))
    return out


def test_every_route_has_an_access_rule_and_every_rule_a_route(tmp_path: Path) -> None:
    served = {(r.method, r.resource.canonical) for r in _routes(tmp_path) if r.resource}
    assert served == set(RULES) | PUBLIC_ROUTES
    assert not set(RULES) & PUBLIC_ROUTES


# -- the controller with its network listener ----------------------------------------------------


class Box:
    def __init__(self, onebox: Onebox, port: int) -> None:
        self.onebox = onebox
        self.url = f"https://127.0.0.1:{port}"
        self.port = port
        self.ca = onebox.controller_dir / "state" / "pki" / "ca.crt"
        self.tokens: dict[str, str] = {}

    def client(self, token: str | None) -> ApiClient:
        return ApiClient(self.url, token=token, ca_file=self.ca, timeout=30)

    def add_user(self, name: str, role: str) -> str:
        done = self.onebox.fedctl("users", "add", name, "--role", role)
        token = done.stdout.strip()
        assert token.startswith(users.TOKEN_PREFIX), done
        assert "shown only now" in done.stderr
        self.tokens[name] = token
        return token

    def status_of(self, token: str | None, method: str, path: str, payload: Any = None) -> int:
        try:
            self.client(token).request(method, path, payload)
        except ApiError as exc:
            return exc.status
        return 200


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    port = free_port()
    onebox = Onebox(
        root=tmp_path_factory.mktemp("access"),
        controller_extra=f'[api]\nlisten = "127.0.0.1:{port}"',
    )
    try:
        onebox.init_ca()
        onebox.start_controller()
        yield Box(onebox, port)
    finally:
        onebox.stop()


def test_no_route_answers_on_the_network_without_a_valid_token(box: Box, tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    assert len(paths) == len(RULES)
    for method, path in paths:
        assert box.status_of(None, method, path) == 401, (method, path)
        assert box.status_of("fsk_not-a-real-token", method, path) == 401, (method, path)
    # The listener speaks TLS only: a plain HTTP request gets no HTTP answer.
    with socket.create_connection(("127.0.0.1", box.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = sock.recv(100)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/")
    # And a client that does not trust fedsky's CA does not talk to it.
    context = ssl.create_default_context()
    with (
        socket.create_connection(("127.0.0.1", box.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_roles_viewer_reads_only_and_a_revoked_token_stops(box: Box) -> None:
    viewer = box.add_user("vera", "viewer")
    assert box.client(viewer).get("/v1/health")["status"] == "ok"
    assert box.client(viewer).get("/v1/jobs") == []
    # A viewer cannot submit, upload, enrol, revoke, link a cloud or add users.
    refused = [
        ("POST", "/v1/jobs", {"spec": {}, "model_digest": "0" * 64}),
        ("POST", "/v1/agents", {"name": "evil", "location": "aws:us-east-1", "with_key": True}),
        ("POST", "/v1/agents/hospital-x/revoke", None),
        ("POST", "/v1/users", {"name": "mallory", "role": "admin"}),
        ("DELETE", "/v1/clouds/prod", None),
        ("GET", "/v1/audit", None),
    ]
    for method, path, payload in refused:
        assert box.status_of(viewer, method, path, payload) == 403, path
    with pytest.raises(ApiError) as refused_upload:
        box.client(viewer).upload("/v1/model-files", b"weights")
    assert refused_upload.value.status == 403
    assert "vera is a viewer; this needs scientist" in refused_upload.value.message
    # fedctl over the network, as the viewer would run it.
    token_file = box.onebox.root / "vera.token"
    token_file.write_text(viewer + "\n")
    remote = ["--socket", box.url, "--ca", str(box.ca), "--token-file", str(token_file)]
    listed = box.onebox.run("fedctl", *remote, "agents", "--json")
    assert json.loads(listed.stdout) == []
    denied = box.onebox.run("fedctl", *remote, "agents", "revoke", "hospital-x", check=False)
    assert denied.returncode == 1
    assert "needs admin" in denied.stderr
    # An admin's token does what the viewer's cannot; a scientist uploads (the file is checked).
    admin = box.add_user("ada", "admin")
    assert box.status_of(admin, "GET", "/v1/audit") == 200
    scientist = box.add_user("sam", "scientist")
    with pytest.raises(ApiError) as bad_model:
        box.client(scientist).upload("/v1/model-files", b"not a model")
    assert bad_model.value.status == 400
    # Revoked: the token stops at once.
    box.onebox.fedctl("users", "revoke", "vera")
    assert box.status_of(viewer, "GET", "/v1/health") == 401
    listed_users = json.loads(box.onebox.fedctl("users", "list", "--json").stdout)
    assert {u["name"]: (u["role"], u["revoked_at"] is not None) for u in listed_users} == {
        "ada": ("admin", False),
        "sam": ("scientist", False),
        "vera": ("viewer", True),
    }
    # Tokens are shown once: never in the controller's log nor its database.
    log = (box.onebox.controller_dir / "controller.log").read_text()
    state = box.onebox.controller_dir / "state"
    database = b"".join(p.read_bytes() for p in state.glob("controller.db*"))
    for token in box.tokens.values():
        assert token not in log
        assert token.encode() not in database


def test_the_audit_log_records_who_did_what_and_detects_an_edit(box: Box) -> None:
    viewer = box.add_user("vic", "viewer")
    scientist = box.add_user("sue", "scientist")
    assert box.status_of(viewer, "POST", "/v1/agents/hospital-x/revoke") == 403
    assert box.status_of(viewer, "GET", "/v1/jobs") == 200  # reads are not audited
    with pytest.raises(ApiError):
        box.client(scientist).upload("/v1/model-files", b"not a model")
    box.onebox.fedctl("users", "revoke", "vic")
    admin = box.add_user("ann", "admin")
    records = box.client(admin).get("/v1/audit?limit=1000")
    actions = [(r["actor"], r["action"], r["target"], r["outcome"].split(":")[0]) for r in records]
    socket_admin = records[0]["actor"]
    assert re.fullmatch(r"uid:\d+\(\w+\)", socket_admin)
    ours = [a for a in actions if {"vic", "sue", "ann"} & {a[0], a[2]}]
    assert ours == [
        (socket_admin, "user.add", "vic", "ok"),
        (socket_admin, "user.add", "sue", "ok"),
        ("vic", "agent.revoke", "hospital-x", "denied"),
        ("sue", "model-file.upload", "/v1/model-files", "refused 400"),
        (socket_admin, "user.revoke", "vic", "ok"),
        (socket_admin, "user.add", "ann", "ok"),
    ]
    # The chain holds, live and on a copy.
    live = box.onebox.fedctl("audit", "verify", "--json")
    assert json.loads(live.stdout) == {"ok": True, "first_bad_seq": None, "reason": ""}
    state = box.onebox.controller_dir / "state"
    copy = box.onebox.root / "copy"
    copy.mkdir(exist_ok=True)
    for name in ("controller.db", "controller.db-wal", "audit-head.json"):
        if (state / name).exists():
            shutil.copy(state / name, copy / name)
    ca = ["--ca-cert", str(state / "pki" / "ca.crt")]
    assert (
        box.onebox.fedctl("audit", "verify", "--db", str(copy / "controller.db"), *ca).returncode
        == 0
    )

    # One record edited (past the append-only trigger, as someone with the file could).
    edited = copy / "edited.db"
    _copy_db(copy / "controller.db", edited)
    shutil.copy(copy / "audit-head.json", copy / "edited-head.json")
    with sqlite3.connect(edited) as conn:
        conn.execute("DROP TRIGGER audit_log_no_update")
        conn.execute("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2")
    verdict = _verify_copy(box, edited, copy / "edited-head.json", ca)
    assert verdict == (1, {"ok": False, "first_bad_seq": 2, "reason": verdict[1]["reason"]})
    assert "changed" in verdict[1]["reason"]

    # The last records removed: the chain still links, the signed head says what is gone.
    cut = copy / "cut.db"
    _copy_db(copy / "controller.db", cut)
    with sqlite3.connect(cut) as conn:
        conn.execute("DROP TRIGGER audit_log_no_delete")
        total = conn.execute("SELECT max(seq) FROM audit_log").fetchone()[0]
        conn.execute("DELETE FROM audit_log WHERE seq >= ?", (total - 1,))
    code, result = _verify_copy(box, cut, copy / "audit-head.json", ca)
    assert (code, result["ok"], result["first_bad_seq"]) == (1, False, total - 1)
    assert "removed" in result["reason"]

    # A head signed by another key is refused too.
    forged = json.loads((copy / "audit-head.json").read_text())
    forged["seq"] = total - 2
    (copy / "forged-head.json").write_text(json.dumps(forged))
    code, result = _verify_copy(box, cut, copy / "forged-head.json", ca)
    assert (code, result["ok"]) == (1, False)
    assert "signature" in result["reason"]


def _copy_db(source: Path, target: Path) -> None:
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def _verify_copy(box: Box, db: Path, head: Path, ca: list[str]) -> tuple[int, dict[str, Any]]:
    done = box.onebox.fedctl(
        "audit", "verify", "--db", str(db), "--head", str(head), *ca, "--json", check=False
    )
    return done.returncode, json.loads(done.stdout)


# -- scientists act on their own jobs only -------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], dict[str, str]]]:
    store = Store(tmp_path / "controller.db")
    jobstore.ensure_schema(store)
    app: web.Application = make_app(Services(store=store))
    tokens = {
        name: store.call(users.add_user, name=name, role=users.Role.parse(role), created_by="t")
        for name, role in (("alice", "scientist"), ("bob", "scientist"), ("olga", "operator"))
    }
    for job_id, owner in (("alice-job", "alice"), ("legacy-job", None)):
        store.call(
            jobstore.create_job,
            job_id=job_id,
            name=job_id,
            spec={},
            model_digest="0" * 64,
            owner=owner,
        )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, tokens
    finally:
        await client.close()
        store.close()


async def test_a_scientist_acts_only_on_their_own_jobs(
    api: tuple[TestClient[Any, Any], dict[str, str]],
) -> None:
    client, tokens = api

    async def status(who: str, method: str, path: str) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {tokens[who]}"}
        async with client.request(method, path, headers=headers) as resp:
            return resp.status, (await resp.json()).get("error", "")

    for path in (
        ("POST", "/v1/jobs/alice-job/cancel"),
        ("GET", "/v1/jobs/alice-job/models/1/weights"),
        ("POST", "/v1/jobs/alice-job/models/1/pin"),
    ):
        code, error = await status("bob", *path)
        assert (code, error) == (
            403,
            "bob may act only on their own jobs (job alice-job is alice's)",
        ), path
        # Past the access check (this app runs no job manager nor registry: 503).
        assert (await status("alice", *path))[0] == 503, path
        assert (await status("olga", *path))[0] == 503, path
    # A job from before owners were recorded: operators only.
    code, error = await status("alice", "POST", "/v1/jobs/legacy-job/cancel")
    assert code == 403
    assert "without a recorded owner" in error
    # Everyone may read.
    assert (await status("bob", "GET", "/v1/jobs/alice-job"))[0] == 200


def test_ca_status_lists_what_expires_soonest_first(box: Box) -> None:
    shown = box.onebox.fedctl("ca", "status", "--json")
    status = json.loads(shown.stdout)
    entries = {(e["what"], e["name"]): e for e in status["certificates"]}
    assert entries[("ca", "CA")]["days_left"] > 3000
    assert ("crl", "revocation list (next update)") in entries
    assert ("file", "server.crt") in entries  # the managed broker's
    assert ("controller", "controller") in entries
    assert ("server", "127.0.0.1") in entries  # the API listener's, issued at start
    days = [e["days_left"] for e in status["certificates"]]
    assert days == sorted(days)
    assert status["expired"] == 0
    # An agent certificate past its date: listed first, and the command says so by its exit.
    with sqlite3.connect(box.onebox.controller_dir / "state" / "controller.db") as conn:
        conn.execute(
            "INSERT INTO certificates(serial, common_name, kind, issued_at, not_after) VALUES "
            "('123456789', 'hospital-old', 'agent', '2025-01-01T00:00:00+00:00', "
            "'2026-01-01T00:00:00+00:00')"
        )
    table = box.onebox.fedctl("ca", "status", check=False)
    assert table.returncode == 1
    first = table.stdout.splitlines()[1].split()
    assert (first[0], first[1], first[-1]) == ("agent", "hospital-old", "expired")
    assert "1 expired" in table.stdout


def _https(
    box: Box, method: str, path: str, *, headers: dict[str, str] | None = None
) -> tuple[int, Any, list[str]]:
    """One request as a browser would send it (no client of fedsky's); status, JSON body and
    the Set-Cookie headers."""
    context = ssl.create_default_context(cafile=str(box.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", box.port, context=context, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        answer = conn.getresponse()
        body = answer.read()
        return (
            answer.status,
            json.loads(body) if body else None,
            answer.headers.get_all("Set-Cookie") or [],
        )
    finally:
        conn.close()


def test_a_browser_session_stands_for_the_token_and_needs_csrf_to_act(box: Box) -> None:
    token = box.add_user("olga", "operator")
    status, body, cookies = _https(
        box, "POST", "/v1/session", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 201, body
    assert (body["user"], body["role"]) == ("olga", "operator")
    (cookie,) = cookies
    attributes = [a.strip().lower() for a in cookie.split(";")]
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= set(attributes), cookie
    session = cookie.split(";")[0]
    assert session.startswith(f"{users.SESSION_COOKIE}=")
    csrf = body["csrf_token"]
    jar = {"Cookie": session}
    # Reading needs only the cookie.
    assert _https(box, "GET", "/v1/jobs", headers=jar)[0] == 200
    # Acting needs the session's CSRF token too: a cross-site request carries only the cookie.
    ping = "/v1/agents/hospital-x/ping"
    status, body, _ = _https(box, "POST", ping, headers=jar)
    assert status == 403, body
    assert "CSRF check failed" in body["error"]
    assert _https(box, "POST", ping, headers={**jar, "X-CSRF-Token": "forged"})[0] == 403
    status, body, _ = _https(box, "POST", ping, headers={**jar, "X-CSRF-Token": csrf})
    assert status not in (401, 403), body  # through to the view (no such agent here)
    # Neither the session id nor the CSRF token is kept in the clear, nor logged.
    state = box.onebox.controller_dir / "state"
    database = b"".join(p.read_bytes() for p in state.glob("controller.db*"))
    log = (box.onebox.controller_dir / "controller.log").read_bytes()
    for secret in (session.split("=", 1)[1], csrf):
        assert secret.encode() not in database
        assert secret.encode() not in log
    # A session opened from a session (no token) is refused; logout ends it.
    assert _https(box, "POST", "/v1/session", headers={**jar, "X-CSRF-Token": csrf})[0] == 400
    status, body, cleared = _https(
        box, "DELETE", "/v1/session", headers={**jar, "X-CSRF-Token": csrf}
    )
    assert (status, body) == (200, {"ended": True})
    assert any("max-age=0" in c.lower() for c in cleared), cleared
    assert _https(box, "GET", "/v1/jobs", headers=jar)[0] == 401
    # Revoking the user ends every session of theirs at once.
    _, body, cookies = _https(
        box, "POST", "/v1/session", headers={"Authorization": f"Bearer {token}"}
    )
    second = {"Cookie": cookies[0].split(";")[0]}
    assert _https(box, "GET", "/v1/jobs", headers=second)[0] == 200
    box.onebox.fedctl("users", "revoke", "olga")
    assert _https(box, "GET", "/v1/jobs", headers=second)[0] == 401
    opened = [
        r["outcome"]
        for r in json.loads(box.onebox.fedctl("audit", "list", "--json").stdout)
        if r["action"] == "session.open" and r["actor"] == "olga"
    ]
    assert opened[0] == opened[2] == "ok"
    assert opened[1].startswith("refused 400")
