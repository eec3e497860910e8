"""A job's tasks are kept on their orchestrator attempt's row: one record per attempt, and a
store written before that keeps its tasks across the upgrade."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.orchestrator import store as orchestrator_store
from fedsky.controller.orchestrator.tasks import UnknownAttempt, list_tasks
from fedsky.controller.store import Store

# The schema steps a store had before tasks moved onto the attempts.
OLD_JOBS_STEPS = 5
OLD_ORCHESTRATOR_STEPS = 6


def _tables(store: Store) -> set[str]:
    rows = store.call(
        lambda conn: conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    )
    return {r["name"] for r in rows}


def _attempt(store: Store, job_id: str, participant: str, number: int, vm: str) -> None:
    store.call(
        lambda conn: conn.execute(
            "INSERT INTO orchestrator_attempt(job_id, participant, number, agent_id, vm, vm_key, "
            "state, assigned_at) VALUES (?, ?, ?, ?, ?, ?, 'running', 1.0)",
            (job_id, participant, number, participant, vm, f"{participant}/{vm}"),
        )
    )


def _job(store: Store, job_id: str) -> None:
    # The columns every version of the jobs table has (an older store has no `owner`).
    store.call(
        lambda conn: conn.execute(
            "INSERT INTO jobs(id, name, state, spec_json, model_digest, created_at, updated_at) "
            "VALUES (?, 'j', 'created', '{\"participants\": [\"hospital-eu\"]}', ?, "
            "'2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')",
            (job_id, "ab" * 32),
        )
    )


def test_a_task_is_its_attempts_row(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    jobstore.ensure_schema(store)
    assert "tasks" not in _tables(store)
    _job(store, "j-1")
    _attempt(store, "j-1", "hospital-eu", 1, "vm-001")
    task_id = store.call(jobstore.create_task, job_id="j-1", participant="hospital-eu", attempt=1)
    store.call(jobstore.set_task_state, task_id, "acknowledged", node_id="42", key_role="standby")
    store.call(jobstore.set_task_state, task_id, "failed", reason="vm-001 stopped")
    [task] = store.call(list_tasks, "j-1")
    assert task["id"] == task_id == "j-1-hospital-eu-1"
    assert (task["vm"], task["state"], task["key_role"], task["node_id"], task["reason"]) == (
        "vm-001",
        "failed",
        "standby",
        "42",
        "vm-001 stopped",
    )
    # The job record shows it, and the job's log says what happened, as before.
    assert store.call(jobstore.get_job, "j-1")["tasks"] == [task]
    log = [r["message"] for r in store.call(jobstore.job_log, "j-1")]
    assert "hospital-eu: attempt 1 assigned to vm-001" in log
    assert "hospital-eu: task on vm-001 failed: vm-001 stopped" in log


def test_a_task_needs_an_assigned_attempt(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    jobstore.ensure_schema(store)
    _job(store, "j-1")
    with pytest.raises(UnknownAttempt):
        store.call(jobstore.create_task, job_id="j-1", participant="hospital-eu", attempt=1)
    # An event for a task this controller never gave out changes nothing.
    store.call(jobstore.set_task_state, "j-1-hospital-eu-9", "running")
    assert store.call(list_tasks, "j-1") == []


def test_an_older_store_keeps_its_tasks_on_upgrade(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    store.ensure_schema("orchestrator", orchestrator_store._SCHEMA[:OLD_ORCHESTRATOR_STEPS])
    store.ensure_schema("jobs", jobstore.SCHEMA[:OLD_JOBS_STEPS])
    _job(store, "j-1")
    _attempt(store, "j-1", "hospital-eu", 1, "vm-001")
    _attempt(store, "j-1", "hospital-eu", 2, "vm-002")
    store.call(
        lambda conn: conn.execute(
            "INSERT INTO tasks(id, job_id, participant, attempt, vm, state, key_role, node_id, "
            "reason, created_at, updated_at) VALUES "
            "('j-1-hospital-eu-1', 'j-1', 'hospital-eu', 1, 'vm-001', 'failed', 'node', '7', "
            "'vm-001 stopped', '2026-01-01T00:00:00+00:00', '2026-01-01T00:01:00+00:00'), "
            "('j-1-hospital-eu-2', 'j-1', 'hospital-eu', 2, 'vm-002', 'running', 'standby', '8', "
            "'', '2026-01-01T00:01:00+00:00', '2026-01-01T00:01:05+00:00')"
        )
    )
    jobstore.ensure_schema(store)
    assert "tasks" not in _tables(store)
    tasks = store.call(list_tasks, "j-1")
    assert [(t["id"], t["vm"], t["state"], t["key_role"], t["node_id"]) for t in tasks] == [
        ("j-1-hospital-eu-1", "vm-001", "failed", "node", "7"),
        ("j-1-hospital-eu-2", "vm-002", "running", "standby", "8"),
    ]
    assert tasks[0]["reason"] == "vm-001 stopped"
    assert tasks[0]["created_at"] == "2026-01-01T00:00:00+00:00"
