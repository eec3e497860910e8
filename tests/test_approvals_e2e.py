"""A hospital whose IT approves each job by hand (`[policy] approval = "manual"`), end to end:
the real controller, broker and agents, `agentctl jobs` as IT runs it.

A denied job fails at once with IT's reason; an approved one waits for the decision, then
trains and completes; the audit log holds the request and both decisions with who took them.
The controller's metrics endpoint (`[metrics] listen`) then counts what happened.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedsky.controller.onebox import Onebox

from tests.support import free_port
from tests.support.wait import eventually_blocking
from tests.test_jobs_e2e import HOSPITALS, _datasets, wait_job, write_job

pytestmark = pytest.mark.e2e

MANUAL = "hospital-asia"
METRICS_PORT = free_port()
AGENT_METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Onebox]:
    root = tmp_path_factory.mktemp("approvals")
    extra = {name: _datasets(i, len(HOSPITALS)) for i, name in enumerate(HOSPITALS)}
    extra[MANUAL] += '[policy]\napproval = "manual"\ndatasets = ["digits"]\n'
    extra[MANUAL] += f'[metrics]\nlisten = "127.0.0.1:{AGENT_METRICS_PORT}"\n'
    onebox = Onebox(
        root=root / "box",
        report_interval_s=3.0,
        poll_interval_s=0.5,
        agent_extra=extra,
        controller_extra=f'[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"',
    )
    try:
        onebox.start(HOSPITALS)
        yield onebox
    finally:
        onebox.stop()


def agentctl(box: Onebox, *args: str, check: bool = True) -> str:
    agent = box.agents[MANUAL]
    done = box.run("agentctl", "--config", str(agent.config), "jobs", *args, check=check)
    return done.stdout


def _pending(box: Onebox, job_id: str) -> None:
    eventually_blocking(
        lambda: [j["job"] for j in json.loads(agentctl(box, "pending", "--json"))],
        until=lambda jobs: job_id in jobs,
        timeout=120,
        what=f"job {job_id} to wait for {MANUAL}'s approval",
        details=lambda: box.fedctl("job", "logs", job_id, check=False).stdout,
    )


def _audit(box: Onebox, job_id: str) -> list[dict[str, str]]:
    records = json.loads(box.fedctl("audit", "list", "--json").stdout)
    return [r for r in records if r["target"] == job_id]


def test_a_denied_job_fails_with_the_hospitals_reason(box: Onebox, tmp_path: Path) -> None:
    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=1, name="denied")
    job_id = json.loads(box.fedctl("job", "submit", str(spec), "--json").stdout)["id"]
    _pending(box, job_id)
    assert box.api.get(f"/v1/jobs/{job_id}")["state"] not in ("failed", "completed")
    agentctl(box, "deny", job_id, "--reason", "no ethics approval for this study")
    job = wait_job(box, job_id, ("failed",), timeout=120)
    assert "no ethics approval for this study" in (job["error"] or ""), job
    logs = box.fedctl("job", "logs", job_id).stdout
    assert f"waits for {MANUAL}'s IT to approve it" in logs
    assert "the job was denied by" in logs
    actions = [(r["action"], r["outcome"]) for r in _audit(box, job_id)]
    assert ("job.approval_requested", "pending") in actions
    assert ("job.deny", "denied: no ethics approval for this study") in actions
    assert json.loads(box.fedctl("audit", "verify", "--json").stdout)["ok"] is True


def test_an_approved_job_waits_then_completes(box: Onebox, tmp_path: Path) -> None:
    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=1, name="approved")
    job_id = json.loads(box.fedctl("job", "submit", str(spec), "--json").stdout)["id"]
    _pending(box, job_id)
    job = box.api.get(f"/v1/jobs/{job_id}")
    assert job["rounds_done"] == 0
    agentctl(box, "approve", job_id)
    job = wait_job(box, job_id, ("completed", "failed"), timeout=600)
    assert job["state"] == "completed", box.fedctl("job", "logs", job_id).stdout
    records = _audit(box, job_id)
    approve = next(r for r in records if r["action"] == "job.approve")
    assert approve["outcome"] == "ok"
    assert approve["actor"].startswith(f"{MANUAL} IT (")
    assert "no job waits" in agentctl(box, "pending")
    listed = {j["job"]: j["state"] for j in json.loads(agentctl(box, "list", "--json"))}
    assert listed[job_id] == "approved"


def _scrape(port: int = METRICS_PORT) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    for name in HOSPITALS:
        assert name not in text  # counts only: no hospital, job or VM names
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_metrics_endpoint_counts_what_happened(box: Onebox) -> None:
    """After the two jobs above: one failed (denied), one completed with its round timed."""
    first = _scrape()
    assert first[("fedsky_agents", (("state", "online"),))] == len(HOSPITALS)
    assert first[("fedsky_jobs", (("state", "completed"),))] == 1
    assert first[("fedsky_jobs", (("state", "failed"),))] == 1
    assert first[("fedsky_placements_total", ())] == 2
    assert first[("fedsky_task_attempts_total", (("kind", "first"),))] >= 3
    assert first[("fedsky_round_duration_seconds_count", ())] == 1
    assert 0 < first[("fedsky_round_duration_seconds_sum", ())] < 600
    vms = sum(v for (name, _), v in first.items() if name == "fedsky_vms")
    assert vms == 10  # five per hospital, by state
    # Reports keep arriving (every 3 s here): the counter moves between two scrapes.
    eventually_blocking(
        _scrape,
        until=lambda now: (
            now[("fedsky_reports_ingested_total", ())]
            > first[("fedsky_reports_ingested_total", ())]
        ),
        timeout=30,
        what="the reports counter to move",
    )
    # The hospital's agent, optionally, the same way.
    agent = _scrape(AGENT_METRICS_PORT)
    assert agent[("fedsky_agent_broker_connected", ())] == 1
    assert agent[("fedsky_agent_reports_sent_total", ())] >= 1
    assert sum(v for (name, _), v in agent.items() if name == "fedsky_agent_vms") == 5
    assert agent[("fedsky_agent_tasks_running", ())] == 0
    assert agent[("fedsky_agent_certificate_expiry_timestamp_seconds", ())] > time.time()
