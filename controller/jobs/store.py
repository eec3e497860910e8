"""Jobs and their log in the controller's store; a job's tasks are its orchestrator attempts.

A job's life: created -> placing -> launching -> assigning -> training -> completed | failed |
cancelled. Every transition is written before the work of the next state starts, so a
restarted controller knows where each job was.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from datetime import UTC, datetime
from typing import Any, Literal

from fedsky.controller.orchestrator import store as orchestrator_store
from fedsky.controller.orchestrator import tasks as attempt_tasks
from fedsky.controller.orchestrator.tasks import TaskState, list_tasks
from fedsky.controller.store import Store, transaction

JobState = Literal[
    "created", "placing", "launching", "assigning", "training", "completed", "failed", "cancelled"
]
ACTIVE_STATES: tuple[JobState, ...] = ("created", "placing", "launching", "assigning", "training")
END_STATES: tuple[JobState, ...] = ("completed", "failed", "cancelled")

SCHEMA = [
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        spec_json TEXT NOT NULL,
        model_digest TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        ended_at TEXT,
        placement_json TEXT,
        provider TEXT,
        provider_ref TEXT,
        aggregator_json TEXT,
        rounds_done INTEGER NOT NULL DEFAULT 0,
        error TEXT
    )
    """,
    "CREATE INDEX jobs_state ON jobs(state)",
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        participant TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        vm TEXT NOT NULL,
        state TEXT NOT NULL,
        key_role TEXT NOT NULL DEFAULT 'node',
        node_id TEXT,
        reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )
    """,
    "CREATE INDEX tasks_job ON tasks(job_id, participant, attempt)",
    """
    CREATE TABLE job_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        at TEXT NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL
    )
    """,
    "CREATE INDEX job_log_job ON job_log(job_id, id)",
    # Tasks live on their attempt's row (`orchestrator.tasks`): carry them over, then drop.
    """
    UPDATE orchestrator_attempt SET
        (task_id, task_state, key_role, node_id, task_reason, task_created_at, task_updated_at)
        = (SELECT t.id, t.state, t.key_role, t.node_id, t.reason, t.created_at, t.updated_at
           FROM tasks AS t
           WHERE t.job_id = orchestrator_attempt.job_id
             AND t.participant = orchestrator_attempt.participant
             AND t.attempt = orchestrator_attempt.number)
    WHERE EXISTS (SELECT 1 FROM tasks AS t
                  WHERE t.job_id = orchestrator_attempt.job_id
                    AND t.participant = orchestrator_attempt.participant
                    AND t.attempt = orchestrator_attempt.number)
    """,
    "DROP TABLE tasks",
    # Who submitted the job: an API user's name, or `uid:N(login)` on the unix socket.
    "ALTER TABLE jobs ADD COLUMN owner TEXT",
]


def ensure_schema(store: Store) -> None:
    # A job's tasks are rows of the orchestrator's attempt table: it must exist first.
    orchestrator_store.ensure_schema(store)
    store.ensure_schema("jobs", SCHEMA)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def new_job_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:30] or "job"
    return f"{slug}-{secrets.token_hex(3)}"


class JobNotFound(Exception):
    pass


class JobConflict(Exception):
    """The job is not in a state that allows what was asked."""


def create_job(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    name: str,
    spec: dict[str, Any],
    model_digest: str,
    owner: str | None = None,
) -> None:
    now = _now()
    with transaction(conn):
        conn.execute(
            "INSERT INTO jobs(id, name, state, spec_json, model_digest, created_at, updated_at, "
            "owner) VALUES (?, ?, 'created', ?, ?, ?, ?, ?)",
            (job_id, name, json.dumps(spec), model_digest, now, now, owner),
        )
        _log(conn, job_id, "info", f"job {name!r} created")


def _log(conn: sqlite3.Connection, job_id: str, level: str, message: str) -> None:
    conn.execute(
        "INSERT INTO job_log(job_id, at, level, message) VALUES (?, ?, ?, ?)",
        (job_id, _now(), level, message[:4000]),
    )


def log_job(conn: sqlite3.Connection, job_id: str, message: str, level: str = "info") -> None:
    with transaction(conn):
        _log(conn, job_id, level, message)


def set_state(
    conn: sqlite3.Connection,
    job_id: str,
    state: JobState,
    *,
    message: str | None = None,
    error: str | None = None,
    only_from: tuple[JobState, ...] = ACTIVE_STATES,
) -> bool:
    """Move a job to `state` if it is in one of `only_from`; returns whether it moved."""
    with transaction(conn):
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        if row["state"] not in only_from:
            return False
        now = _now()
        ended = now if state in END_STATES else None
        conn.execute(
            "UPDATE jobs SET state = ?, updated_at = ?, ended_at = COALESCE(?, ended_at), "
            "error = COALESCE(?, error) WHERE id = ?",
            (state, now, ended, error, job_id),
        )
        _log(conn, job_id, "error" if state == "failed" else "info", message or f"state: {state}")
        return True


def update_job(conn: sqlite3.Connection, job_id: str, **fields: Any) -> None:
    allowed = {"placement_json", "provider", "provider_ref", "aggregator_json", "rounds_done"}
    bad = set(fields) - allowed
    if bad:
        raise ValueError(f"not updatable: {sorted(bad)}")
    cols = ", ".join(f"{k} = ?" for k in fields)
    with transaction(conn):
        conn.execute(
            f"UPDATE jobs SET {cols}, updated_at = ? WHERE id = ?",  # noqa: S608 - whitelisted columns
            (*fields.values(), _now(), job_id),
        )


def _job_view(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "state": row["state"],
        "spec": json.loads(row["spec_json"]),
        "model_digest": row["model_digest"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "ended_at": row["ended_at"],
        "placement": json.loads(row["placement_json"]) if row["placement_json"] else None,
        "provider": row["provider"],
        "provider_ref": row["provider_ref"],
        "aggregator": json.loads(row["aggregator_json"]) if row["aggregator_json"] else None,
        "rounds_done": row["rounds_done"],
        "error": row["error"],
        "owner": row["owner"],
    }


def get_job(conn: sqlite3.Connection, job_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(job_id)
    job = _job_view(row)
    job["tasks"] = list_tasks(conn, job_id)
    return job


def list_jobs(
    conn: sqlite3.Connection, *, states: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    if states:
        rows = conn.execute(
            f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))}) ORDER BY created_at",  # noqa: S608
            states,
        ).fetchall()
    else:
        rows = conn.execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
    return [_job_view(r) for r in rows]


def job_log(
    conn: sqlite3.Connection, job_id: str, *, after_id: int = 0, limit: int = 1000
) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT id, at, level, message FROM job_log WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
        (job_id, after_id, limit),
    ).fetchall()
    return [dict(r) for r in rows]


# --- Tasks -------------------------------------------------------------------------------------


def create_task(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    participant: str,
    attempt: int,
    key_role: str = "node",
) -> str:
    """Start the task of an assigned attempt; returns its id (the agent's events echo it)."""
    with transaction(conn):
        task_id, vm = attempt_tasks.bind_task(
            conn, job_id=job_id, participant=participant, attempt=attempt, key_role=key_role
        )
        _log(conn, job_id, "info", f"{participant}: attempt {attempt} assigned to {vm}")
    return task_id


def confirm_task_ended(
    conn: sqlite3.Connection, task_id: str, *, agent_id: str, state: TaskState, reason: str
) -> bool:
    """A stopping task's own agent confirmed its end (see `tasks.confirm_ended`)."""
    with transaction(conn):
        row = attempt_tasks.confirm_ended(
            conn, task_id, agent_id=agent_id, state=state, reason=reason
        )
        if row is None:
            return False
        _log(
            conn,
            row["job_id"],
            "info",
            f"{row['participant']}: task on {row['vm']} {state}: confirmed by its agent",
        )
        return True


def set_task_state(
    conn: sqlite3.Connection,
    task_id: str,
    state: TaskState,
    *,
    reason: str = "",
    node_id: str | None = None,
    key_role: str | None = None,
) -> None:
    with transaction(conn):
        row = attempt_tasks.update_task(
            conn, task_id, state, reason=reason, node_id=node_id, key_role=key_role
        )
        if row is None:
            return
        text = f"{row['participant']}: task on {row['vm']} {state}" + (
            f": {reason}" if reason else ""
        )
        _log(conn, row["job_id"], "error" if state == "failed" else "info", text)
