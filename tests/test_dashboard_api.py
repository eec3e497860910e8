"""The dashboard's side of the controller: its pages served before a login with a strict
Content-Security-Policy and nothing else reachable through them, who the session is, the live
stream (`/v1/events`), the placement plan and the job-spec check it calls, each input checked.

The controller runs as the operator runs it (its own process) with `[api] listen` on a loopback
port; the browser's view of the same pages is tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.api.dashboard import static_file
from fedsky.controller.dashboard import STATIC_DIR, VENDOR_FILES
from fedsky.controller.onebox import Onebox
from fedsky.controller.orchestrator.eligibility import annotate_eligibility
from fedsky.controller.orchestrator.policy import MinResources, Policy
from fedsky.shared.net import free_port

pytestmark = pytest.mark.e2e


class Api:
    """Raw HTTPS to the controller's listener, trusting fedsky's CA: cookies and streams as a
    browser sends them."""

    def __init__(self, box: Onebox, port: int) -> None:
        self.box = box
        self.port = port
        ca = box.controller_dir / "state" / "pki" / "ca.crt"
        self.context = ssl.create_default_context(cafile=str(ca))

    def connect(self, timeout: float = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context, timeout=timeout
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, token: str, payload: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        body = None
        if payload is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(payload).encode()
        status, _, data = self.call(method, path, body=body, headers=headers)
        return status, json.loads(data) if data else None

    def add_user(self, name: str, role: str) -> str:
        return self.box.fedctl("users", "add", name, "--role", role).stdout.strip()

    def session(self, token: str) -> tuple[str, str]:
        """(cookie header, CSRF token) of a new browser session."""
        status, headers, body = self.call(
            "POST", "/v1/session", headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 201, body
        cookie = headers["Set-Cookie"].split(";")[0]
        return cookie, json.loads(body)["csrf_token"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    port = free_port()
    box = Onebox(
        root=tmp_path_factory.mktemp("dashboard"),
        controller_extra=f'[api]\nlisten = "127.0.0.1:{port}"\nevents_interval_s = 0.2',
    )
    try:
        box.init_ca()
        box.start_controller()
        yield Api(box, port)
    finally:
        box.stop()


def test_pages_load_without_a_login_under_a_strict_policy(api: Api) -> None:
    status, headers, _ = api.call("GET", "/")
    assert (status, headers["Location"]) == (302, "/ui/")
    status, headers, body = api.call("GET", "/ui/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'type="module"' in body
    # The pinned library, built into the package at install.
    for name in VENDOR_FILES:
        status, headers, body = api.call("GET", f"/ui/vendor/{name}")
        assert status == 200, name
        assert body
    assert api.call("GET", "/ui/vendor/uPlot.iife.min.js")[1]["Content-Type"].startswith(
        "text/javascript"
    )
    # Only plain files of the static directory: nothing above it, no directory, nothing hidden.
    for path in (
        "/ui/../v1/agents",
        "/ui/%2e%2e/%2e%2e/controller.toml",
        "/ui/vendor",
        "/ui/.hidden",
        "/ui/vendor/../../__init__.py",
        "/ui/index.html%00.js",
    ):
        status, _, body = api.call("GET", path)
        assert status in (401, 404), (path, status)
        assert b"PRIVATE" not in body
        assert b"state_dir" not in body
    # The data routes still need a caller.
    assert api.call("GET", "/v1/agents")[0] == 401


def test_static_file_lookup_refuses_anything_but_plain_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.js").write_text("x")
    (tmp_path / "secret").write_text("no")
    root = tmp_path / "sub"
    assert static_file(root, "a.js") == (root / "a.js").resolve()
    for bad in ("", "../secret", "sub/../a.js", ".a.js", "a.js/", "/etc/passwd", "b.js", "."):
        assert static_file(root, bad) is None, bad
    (root / "link.js").symlink_to(tmp_path / "secret")
    assert static_file(root, "link.js") is None
    assert (STATIC_DIR / "index.html").is_file()


def test_who_the_session_is_and_the_session_cookie(api: Api) -> None:
    token = api.add_user("dora", "scientist")
    assert api.json("GET", "/v1/session", token) == (200, {"user": "dora", "role": "scientist"})
    cookie, _ = api.session(token)
    status, _, body = api.call("GET", "/v1/session", headers={"Cookie": cookie})
    assert (status, json.loads(body)) == (200, {"user": "dora", "role": "scientist"})
    assert api.call("GET", "/v1/session")[0] == 401
    # The overview's recent audit events: the latest N, oldest first.
    admin = api.add_user("adele", "admin")
    status, every = api.json("GET", "/v1/audit?limit=1000", admin)
    assert status == 200
    status, latest = api.json("GET", "/v1/audit?last=2", admin)
    assert (status, latest) == (200, every[-2:])
    assert api.json("GET", "/v1/audit?last=-1", admin)[0] == 400


def _read_events(
    api: Api, path: str, cookie: str, *, until: set[str], timeout: float = 20
) -> tuple[dict[str, Any], http.client.HTTPResponse, http.client.HTTPSConnection]:
    conn = api.connect(timeout=timeout)
    conn.request("GET", path, headers={"Cookie": cookie, "Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    seen: dict[str, Any] = {}
    name = None
    deadline = time.monotonic() + timeout
    while not until <= set(seen) and time.monotonic() < deadline:
        line = response.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: ") and name is not None:
            seen[name] = json.loads(line[len("data: ") :])
    return seen, response, conn


def test_the_live_stream_sends_snapshots_and_changes_and_stops_for_a_revoked_user(api: Api) -> None:
    token = api.add_user("vick", "viewer")
    cookie, _ = api.session(token)
    seen, response, conn = _read_events(api, "/v1/events", cookie, until={"agents", "vms", "jobs"})
    try:
        assert seen == {"agents": [], "vms": [], "jobs": []}
        # An agent enrolled meanwhile arrives as a change.
        api.box.fedctl("agents", "enroll", "hospital-q", "--location", "aws:us-east-1",
                       "--with-key", "--out", str(api.box.root / "q.json"))  # fmt: skip
        name, data = None, None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = response.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name == "agents":
                data = json.loads(line[len("data: ") :])
                break
        assert data is not None
        assert [a["id"] for a in data] == ["hospital-q"]
        # Revoked: the stream ends at the next look.
        api.box.fedctl("users", "revoke", "vick")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and response.readline():
            pass
        assert time.monotonic() < deadline, "the stream went on after the user was revoked"
    finally:
        conn.close()
    assert api.call("GET", "/v1/events", headers={"Cookie": cookie})[0] == 401
    # A job that does not exist is refused before any stream opens.
    viewer = api.add_user("vera", "viewer")
    assert api.json("GET", "/v1/events?job=no-such-job", viewer)[0] == 404
    # No HEAD on a stream (its answer would have no end).
    assert api.json("HEAD", "/v1/events", viewer)[0] == 405
    # One caller holds a few streams at most; the others' stay free.
    cookie, _ = api.session(viewer)
    held = [_read_events(api, "/v1/events", cookie, until={"jobs"}) for _ in range(4)]
    try:
        status, _, body = api.call("GET", "/v1/events", headers={"Cookie": cookie})
        assert status == 503
        assert "already follows 4 live streams" in json.loads(body)["error"]
        other_cookie, _ = api.session(api.add_user("otto", "viewer"))
        _, _, other = _read_events(api, "/v1/events", other_cookie, until={"agents"})
        other.close()
    finally:
        for _, _, conn in held:
            conn.close()


PLAN = {
    "participants": {
        "us": "aws:us-east-1",
        "asia": "aws:ap-northeast-2",
        "eu": "aws:eu-central-1",
    },
    "model_mb": 26,
    "rounds": 20,
    "max_cost": "85000 KRW/month",
    "max_latency_ms": 250,
    "cost_weight": 0.5,
}


def test_a_plan_has_the_front_the_choice_and_every_offer(api: Api) -> None:
    viewer = api.add_user("pia", "viewer")
    status, plan = api.json("POST", "/v1/placement", viewer, PLAN)
    assert status == 200, plan
    assert plan["currency"] == "KRW"
    assert plan["front"]
    assert plan["choice"]["feasible"]
    assert plan["baseline"] is not None
    candidates = plan["candidates"]
    assert any(not c["feasible"] for c in candidates)
    assert len(candidates) >= len(plan["front"])
    # Nothing feasible: the reason and the closest offers instead of a choice.
    status, none = api.json("POST", "/v1/placement", viewer, {**PLAN, "max_cost": "1 KRW/month"})
    assert status == 200
    assert "choice" not in none
    assert none["reason"]
    assert none["closest"]
    # Bad input: a clear 400 naming what is wrong; the controller goes on serving.
    for change, words in (
        ({"max_cost": "lots"}, "cost"),
        ({"participants": {"us": "nowhere"}}, "us"),
        ({"participants": {}}, "participants"),
        ({"rounds": 0}, "rounds"),
        ({"cost_weight": 2}, "cost_weight"),
        ({"surprise": 1}, "surprise"),
    ):
        status, body = api.json("POST", "/v1/placement", viewer, {**PLAN, **change})
        assert status == 400, (change, body)
        assert words in body["error"], (change, body)
    assert api.json("GET", "/v1/session", viewer)[0] == 200


SPEC = """\
name = "dashboard-check"
model = "digits.safetensors"
participants = ["hospital-a"]
dataset = "digits"
[hyperparameters]
rounds = 2
"""


def test_a_spec_file_is_checked_as_fedctl_reads_it(api: Api) -> None:
    scientist = api.add_user("sid", "scientist")
    headers = {"Authorization": f"Bearer {scientist}", "Content-Type": "application/toml"}
    status, _, body = api.call("POST", "/v1/job-specs", body=SPEC.encode(), headers=headers)
    assert status == 200, body
    spec = json.loads(body)["spec"]
    assert (spec["name"], spec["participants"]) == ("dashboard-check", ["hospital-a"])
    for bad, code, words in (
        (b"name = ", 400, "not valid TOML"),
        (b"", 400, "empty"),
        (b"\xff\xfe", 400, "UTF-8"),
        (SPEC.replace("rounds = 2", "rounds = -1").encode(), 400, "rounds"),
        (b"#" * (300 << 10), 413, "KiB"),
    ):
        status, _, body = api.call("POST", "/v1/job-specs", body=bad, headers=headers)
        assert status == code, (bad[:20], body)
        assert words in json.loads(body)["error"]
    # Nothing of the controller's own files: the model is named by its file name alone.
    for model in ("../../../../proc/self/fd/5", "~root/x", "/etc/passwd", "..", "a/b.pt"):
        bad = SPEC.replace('"digits.safetensors"', json.dumps(model)).encode()
        status, _, body = api.call("POST", "/v1/job-specs", body=bad, headers=headers)
        assert status == 400, (model, body)
        error = json.loads(body)["error"]
        assert "model file's name alone" in error
        assert "/proc" not in error.replace(model, "")
    # YAML: aliases refused (a few hundred bytes of nested ones expand to gigabytes), and a
    # value shown in an error is cut short.
    bomb = "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
    )
    started = time.monotonic()
    status, _, body = api.call(
        "POST", "/v1/job-specs?format=yaml", body=(bomb + "name: *a8\n").encode(),
        headers=headers,
    )  # fmt: skip
    assert status == 400
    assert "aliases" in json.loads(body)["error"]
    assert time.monotonic() - started < 10
    long_list = "name: [" + ", ".join(["x" * 50] * 2000) + "]\n"
    status, _, body = api.call(
        "POST", "/v1/job-specs?format=yaml", body=long_list.encode(), headers=headers
    )
    assert status == 400
    assert len(json.loads(body)["error"]) < 2000
    # A viewer cannot (the page hides the form; the API refuses it anyway).
    viewer = api.add_user("val", "viewer")
    status, _, _ = api.call(
        "POST", "/v1/job-specs", body=SPEC.encode(), headers={"Authorization": f"Bearer {viewer}"}
    )
    assert status == 403


def _row(name: str, state: str, vcpus: int, memory_mib: int, online: bool = True) -> dict[str, Any]:
    return {
        "agent_id": "hospital-a",
        "name": name,
        "uuid": "",
        "state": state,
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "disk_gib": 20.0,
        "addresses": [],
        "updated_at": None,
        "agent_online": online,
        "report_at": "2026-12-05T10:00:00+00:00",
        "host": None,
    }


def test_each_vm_says_whether_it_could_take_a_job_and_why_not() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 12, 5, 10, 0, 5, tzinfo=UTC)
    rows = [
        _row("vm-001", "running", 4, 8192),
        _row("vm-002", "shutoff", 4, 8192),
        _row("vm-003", "running", 1, 1024),
    ]
    out = annotate_eligibility(
        rows,
        minimum=MinResources(vcpus=2, memory_gib=4),
        policy=Policy(),
        now=now,
        tasks={"hospital-a/vm-001": 1},
    )
    assert [(r["name"], r["eligible"]) for r in out] == [
        ("vm-001", False),
        ("vm-002", False),
        ("vm-003", False),
    ]
    assert "already running 1 task" in out[0]["reasons"][0]
    assert out[1]["reasons"] == ["state is shutoff, not running"]
    assert any("vCPU" in r for r in out[2]["reasons"])
    free = annotate_eligibility(rows[:1], minimum=MinResources(vcpus=2), policy=Policy(), now=now)
    assert free[0]["eligible"]
    assert free[0]["reasons"] == []
