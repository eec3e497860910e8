"""Trust boundaries, tried as a hostile hospital and a careless operator would, against the real
controller, its managed broker and real agents.

hospital-eu is the hostile one: its agent is stopped and the test speaks on the bus with its
own certificate (the broker names a certificate's session after its CN, so the agent and the
test cannot both hold it). hospital-us is the victim.
"""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from fedsky.controller.cli.client import ApiError
from fedsky.controller.onebox import Onebox
from fedsky.shared.messages import Event
from fedsky.shared.tls import client_context
from fedsky.shared.topics import Topics

from tests.support import eventually_blocking
from tests.test_jobs_e2e import _pids, _wait_supernodes_gone, wait_job, write_job

pytestmark = pytest.mark.e2e

HOSPITALS = {"hospital-us": "aws:us-east-1", "hospital-eu": "aws:eu-central-1"}
DIGITS = '[datasets.digits]\nkind = "digits"\n'
# An OpenSSH public key the hostile agent offers as hospital-us's node key.
FOREIGN_KEY = "ecdsa-sha2-nistp384 " + "A" * 180


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Onebox]:
    onebox = Onebox(
        root=tmp_path_factory.mktemp("trust") / "box",
        report_interval_s=2.0,
        poll_interval_s=0.5,
        agent_extra=dict.fromkeys(HOSPITALS, DIGITS),
    )
    try:
        onebox.start(HOSPITALS)
        yield onebox
    finally:
        onebox.stop()


def _publish_as(box: Onebox, agent: str, messages: list[tuple[str, bytes]]) -> None:
    """Publish on the managed broker with `agent`'s own certificate (QoS 1, each acknowledged)."""
    state = box.agents[agent].state_dir
    tls = client_context(
        ca_file=state / "ca.crt", cert_file=state / "agent.crt", key_file=state / "agent.key"
    )

    async def run() -> None:
        async with aiomqtt.Client(
            "127.0.0.1",
            box.broker_port,
            identifier=agent,
            tls_context=tls,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=10,
        ) as client:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1, timeout=10)

    asyncio.run(run())


def _rejected(box: Onebox) -> dict[str, int]:
    return dict(box.api.get("/v1/health")["rejected"])


def test_state_directory_and_database_are_closed_to_other_users(box: Onebox) -> None:
    state = box.controller_dir / "state"
    for path in (state, state / "controller.db"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & 0o007, f"{path} is {mode:04o}: other users may read it"
    assert not stat.S_IMODE((state / "controller.db").stat().st_mode) & 0o077


def test_a_second_controller_on_the_same_state_is_refused(box: Onebox) -> None:
    before = box.api.get("/v1/health")
    second = subprocess.run(
        ["fedsky-controller", "--config", str(box.controller_config)],
        env=box.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1, second.stderr
    assert "another controller" in second.stderr
    assert box.controller is not None
    assert str(box.controller.pid) in second.stderr
    # The first one still runs on its own broker, socket and database, its bus connected.
    after = box.api.get("/v1/health")
    assert after["broker_pid"] == before["broker_pid"]
    assert after["bus_connected"]
    assert box.controller.poll() is None


def _supernode(box: Onebox) -> int:
    """The one SuperNode of the box's running job (hospital-us's), once it has started."""
    (pid,) = eventually_blocking(
        lambda: _pids(b"flower-supernode", box),
        timeout=60,
        interval=0.5,
        what="hospital-us's SuperNode",
    )
    return int(pid)


def _agent(box: Onebox, name: str) -> dict[str, Any]:
    agent: dict[str, Any] = box.api.get(f"/v1/agents/{name}")
    return agent


def test_a_report_from_the_future_is_refused_and_later_reports_still_land(box: Onebox) -> None:
    """Stored as the newest, one report dated a day ahead made every genuine report after it
    stale, even after the agent restarted."""
    eventually_blocking(
        lambda: _agent(box, "hospital-eu")["last_seq"] or 0,
        until=lambda seq: seq >= 2,
        timeout=30,
        interval=0.5,
        what="hospital-eu's third report",
    )
    genuine = box.api.get("/v1/agents/hospital-eu/history?limit=1")[0]["report"]
    box.stop_agent("hospital-eu")
    ahead = dict(genuine, seq=genuine["seq"] + 10_000)
    ahead["sent_at"] = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    topic = Topics(box.topic_prefix).report("hospital-eu")
    _publish_as(box, "hospital-eu", [(topic, json.dumps(ahead).encode())])
    eventually_blocking(
        lambda: _rejected(box).get("from_future", 0) >= 1,
        timeout=15,
        interval=0.2,
        what="the report from the future to be refused",
    )
    assert _agent(box, "hospital-eu")["last_seq"] < ahead["seq"]
    box.start_agent("hospital-eu")
    # The restarted agent counts its reports from 0 again; they are stored.
    eventually_blocking(
        lambda: _agent(box, "hospital-eu")["last_seq"],
        until=lambda seq: seq is not None and seq < genuine["seq"],
        timeout=30,
        interval=0.5,
        what="the restarted agent's reports to be stored",
    )


def test_one_hospital_cannot_fail_or_take_over_anothers_task(box: Onebox, tmp_path: Path) -> None:
    """Task ids are predictable; events hospital-eu sends about hospital-us's task (on its own
    topic, with its own certificate) are refused: the task is neither failed over nor given
    hospital-eu's node key, and the job completes on hospital-us's first attempt."""
    spec = write_job(tmp_path, participants=["hospital-us"], rounds=2, name="trust-task")
    job_id = json.loads(box.fedctl("job", "submit", str(spec), "--json").stdout)["id"]
    job = wait_job(box, job_id, ("training", "failed", "cancelled"), timeout=180)
    assert job["state"] == "training", box.fedctl("job", "logs", job_id, check=False).stdout
    victim_task = job["tasks"][0]["id"]
    box.stop_agent("hospital-eu")
    before = _rejected(box).get("foreign_task", 0)
    topic = Topics(box.topic_prefix).events("hospital-eu")
    forged = [
        Event(agent_id="hospital-eu", kind="task_failed", task_id=victim_task, detail="vm gone"),
        Event(agent_id="hospital-eu", kind="task_failed", task_id=victim_task, detail="again"),
        Event(
            agent_id="hospital-eu",
            kind="task_acknowledged",
            task_id=victim_task,
            public_keys={"node": FOREIGN_KEY},
        ),
    ]
    try:
        _publish_as(box, "hospital-eu", [(topic, e.encode()) for e in forged])
        eventually_blocking(
            lambda: _rejected(box).get("foreign_task", 0) - before,
            until=lambda n: n >= len(forged),
            timeout=15,
            interval=0.2,
            what="the forged events to be refused",
        )
        job = wait_job(box, job_id, ("completed", "failed", "cancelled"), timeout=300)
    finally:
        box.start_agent("hospital-eu")
    logs = box.fedctl("job", "logs", job_id, check=False).stdout
    assert job["state"] == "completed", logs
    assert [(t["participant"], t["attempt"]) for t in job["tasks"]] == [("hospital-us", 1)], logs
    assert "failed" not in {t["state"] for t in job["tasks"]}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/no-such-job/logs?after=abc",
        "/v1/agents/hospital-us/history?limit=abc",
        "/v1/agents/hospital-us/history?limit=-5",
        "/v1/jobs/no-such-job/models/12345678901234567890123",
        "/v1/models/best?all_jobs=1&runners_up=x",
    ],
)
def test_bad_values_in_a_request_get_a_400_not_a_traceback(box: Onebox, path: str) -> None:
    with pytest.raises(ApiError) as refused:
        box.api.get(path)
    assert refused.value.status == 400, refused.value.message
    assert "internal error" not in refused.value.message


def test_a_ping_timeout_that_is_not_a_number_is_refused(box: Onebox) -> None:
    with pytest.raises(ApiError) as refused:
        box.api.post("/v1/agents/hospital-us/ping?timeout=nan")
    assert refused.value.status == 400
    cli = box.fedctl("agents", "ping", "hospital-us", "--timeout", "nan", check=False)
    assert cli.returncode == 2
    assert "Traceback" not in cli.stderr


def test_a_model_over_the_limit_is_refused_before_it_is_read(box: Onebox, tmp_path: Path) -> None:
    spec = write_job(tmp_path, participants=["hospital-us"], rounds=1, name="too-big")
    model = tmp_path / "digits.safetensors"
    with model.open("r+b") as f:  # a sparse file: 65 MiB long, nothing written
        f.truncate(65 << 20)
    cli = box.fedctl("job", "submit", str(spec), check=False)
    assert cli.returncode == 2, cli.stderr
    assert "up to 60 MiB" in cli.stderr
    assert "Traceback" not in cli.stderr
    # Sent anyway, the controller answers in JSON (it used to answer plain text).
    with pytest.raises(ApiError) as refused:
        box.api.upload("/v1/model-files", b"\0" * (65 << 20))
    assert refused.value.status == 413
    assert refused.value.message == "request body too large"
    assert box.api.get("/v1/health")["status"] == "ok"


def test_an_unknown_route_answers_in_json(box: Onebox) -> None:
    with pytest.raises(ApiError) as refused:
        box.api.get("/v1/no-such-thing")
    assert refused.value.status == 404
    assert refused.value.body == {"error": "no such route", "exit_code": 2}


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_short_agent_restart_mid_job_moves_the_participant_on(
    box: Onebox, tmp_path: Path, how: signal.Signals
) -> None:
    """A stopped agent stops its SuperNode and says so; a killed one leaves it running, and the
    agent's next run stops it and says so. The job used to lose that participant for good, or
    fail ("no eligible VM among 5: 5 offline"); the killed agent's SuperNode ran on after the
    job. Now the participant moves to another of its VMs once its agent is back."""
    spec = write_job(tmp_path, participants=["hospital-us"], rounds=4, name=f"agent-{how.name}")
    job_id = json.loads(box.fedctl("job", "submit", str(spec), "--json").stdout)["id"]
    wait_job(box, job_id, ("training",), timeout=180)
    first = _supernode(box)
    box.stop_agent("hospital-us", sig=how)
    if how == signal.SIGKILL:
        assert first in _pids(b"flower-supernode", box)  # left behind
    box.start_agent("hospital-us")
    eventually_blocking(
        lambda: first not in _pids(b"flower-supernode", box),
        timeout=30,
        interval=0.5,
        what="the first SuperNode to be stopped",
    )
    job = wait_job(box, job_id, ("completed", "failed", "cancelled"), timeout=480)
    logs = box.fedctl("job", "logs", job_id, check=False).stdout
    assert job["state"] == "completed", logs
    assert len(job["tasks"]) >= 2, logs
    assert "its agent stopped the task" in logs


def test_a_restarted_controller_stops_the_supernodes_a_killed_one_left(
    box: Onebox, tmp_path: Path
) -> None:
    """Recovery used to send its stops before the bus was connected (they were lost) and
    record the tasks stopped: the SuperNodes trained on for good."""
    spec = write_job(tmp_path, participants=["hospital-us"], rounds=50, name="orphaned")
    job_id = json.loads(box.fedctl("job", "submit", str(spec), "--json").stdout)["id"]
    wait_job(box, job_id, ("training",), timeout=180)
    _supernode(box)
    assert box.controller is not None
    box.controller.send_signal(signal.SIGKILL)  # only the controller: its broker lives on
    box.controller.wait(10)
    box.start_controller()
    failed = wait_job(box, job_id, ("failed",), timeout=60)
    assert "controller restarted" in failed["error"]
    eventually_blocking(
        lambda: {t["state"] for t in box.api.get(f"/v1/jobs/{job_id}")["tasks"]},
        until=lambda states: states == {"stopped"},
        timeout=60,
        interval=0.5,
        what="hospital-us to confirm its task stopped",
    )
    _wait_supernodes_gone(box)


def test_a_flood_of_large_reports_is_held_to_the_agents_quota(box: Onebox) -> None:
    """310 valid reports of 4,096 VMs each once grew the database by hundreds of MB and made
    `GET /v1/agents` take 15 s: an agent's reports beyond its quota are refused before they
    are parsed, and its history keeps a byte budget."""
    genuine = box.api.get("/v1/agents/hospital-eu/history?limit=1")[0]["report"]
    box.stop_agent("hospital-eu")
    before = _rejected(box).get("rate_limited", 0)
    vms = [
        {"name": f"vm-{i:04d}", "uuid": f"{i:032x}", "state": "running", "vcpus": 2,
         "memory_mib": 2048, "disk_gib": 20}
        for i in range(4096)
    ]  # fmt: skip
    topic = Topics(box.topic_prefix).report("hospital-eu")
    flood = [
        (topic, json.dumps(dict(genuine, seq=10**6 + n, sent_at=datetime.now(UTC).isoformat(),
                                vms=vms)).encode())
        for n in range(60)
    ]  # fmt: skip
    try:
        _publish_as(box, "hospital-eu", flood)
        eventually_blocking(
            lambda: _rejected(box).get("rate_limited", 0) - before,
            until=lambda n: n >= 40,
            timeout=30,
            interval=0.2,
            what="the reports beyond the quota to be refused",
        )
        history = box.api.get("/v1/agents/hospital-eu/history?limit=1000")
        assert len(json.dumps(history)) < 6 << 20
        assert len(box.api.get("/v1/agents")) == len(HOSPITALS)
    finally:
        box.start_agent("hospital-eu")


def test_revoking_an_agent_mid_job_cuts_only_its_session(box: Onebox, tmp_path: Path) -> None:
    """hospital-eu is revoked while a job trains on hospital-us: its session is cut at once
    through the broker's dynamic-security plugin and its certificate refused from then on; the
    broker is not restarted, so hospital-us, the aggregator and the controller stay connected
    and the job completes. (Last in this module: hospital-eu stays revoked.)"""
    spec = write_job(tmp_path, participants=["hospital-us"], rounds=3, name="revoke-mid-job")
    job_id = json.loads(box.fedctl("job", "submit", str(spec), "--json").stdout)["id"]
    wait_job(box, job_id, ("training",), timeout=180)
    before = box.api.get("/v1/health")
    us_log, eu_log = (box.agents[n].log_path for n in ("hospital-us", "hospital-eu"))
    assert us_log is not None
    assert eu_log is not None
    us_connects = us_log.read_text().count("connected to broker")
    eu_connects = eu_log.read_text().count("connected to broker")
    controller_log = box.controller_dir / "controller.log"

    done = box.fedctl("agents", "revoke", "hospital-eu")
    assert "no restart" in done.stdout, done.stdout
    eventually_blocking(
        lambda: (
            "hospital-eu been disconnected by administrative action" in controller_log.read_text()
        ),
        timeout=2.0,
        interval=0.05,
        what="hospital-eu's session to be cut",
    )
    job = wait_job(box, job_id, ("completed", "failed", "cancelled"), timeout=300)
    logs = box.fedctl("job", "logs", job_id, check=False).stdout
    assert job["state"] == "completed", logs
    after = box.api.get("/v1/health")
    # No restart, and the controller's own connection never dropped.
    assert after["broker_pid"] == before["broker_pid"]
    assert after["bus_connected_since"] == before["bus_connected_since"]
    # hospital-us never reconnected; hospital-eu tried and is refused (the CRL, reloaded).
    assert us_log.read_text().count("connected to broker") == us_connects
    assert eu_log.read_text().count("connected to broker") == eu_connects
    # The agent's own view of its next try: the broker's TLS alert.
    assert "CERTIFICATE_REVOKED" in eu_log.read_text()
    # From the revocation to the cut, by the controller's own log clock.
    lines = controller_log.read_text().splitlines()
    revoked_at = _logged_at(lines, "revoked 1 certificate(s) of agent hospital-eu")
    cut_at = _logged_at(lines, "Client hospital-eu been disconnected by administrative action")
    assert timedelta(0) <= cut_at - revoked_at < timedelta(seconds=2)


def _logged_at(lines: list[str], text: str) -> datetime:
    line = next(line for line in lines if text in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
