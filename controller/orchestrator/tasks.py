"""The SuperNode task each attempt runs, kept on the attempt's own row.

An attempt (`orchestrator_attempt`) is the orchestrator's record of a participant on a VM; the
job pipeline adds to the same row what only the task has: the task id the agent's events echo,
the state the agent reports (assigned, acknowledged, running, then finished, failed or stopped;
stopping while the controller waits for the agent to confirm a stop it sent or still owes),
the SuperNode key's role and its node id. One row per attempt, one place to read it from.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any, Literal

TaskState = Literal[
    "assigned", "acknowledged", "starting", "running", "stopping", "finished", "failed", "stopped"
]
LIVE_TASK_STATES: tuple[TaskState, ...] = (
    "assigned",
    "acknowledged",
    "starting",
    "running",
    "stopping",
)
# The agent's own word that a task ended, and the state it leaves the task in.
ENDED_BY_EVENT: dict[str, TaskState] = {
    "task_stopped": "stopped",
    "task_finished": "finished",
    "task_failed": "failed",
}
TASK_ID_MAX = 80


class UnknownAttempt(Exception):
    """No attempt of that job and participant has that number (it was never assigned)."""


def task_id_for(job_id: str, participant: str, attempt: int) -> str:
    return f"{job_id}-{participant}-{attempt}"[:TASK_ID_MAX]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def bind_task(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    participant: str,
    attempt: int,
    key_role: str = "node",
) -> tuple[str, str]:
    """Give attempt `attempt` its task; returns the task id and the attempt's VM.

    The caller holds the transaction (the job's log line goes in with it).
    """
    task_id = task_id_for(job_id, participant, attempt)
    now = _now()
    row = conn.execute(
        "UPDATE orchestrator_attempt SET task_id = ?, task_state = 'assigned', key_role = ?, "
        "task_reason = '', task_created_at = ?, task_updated_at = ? "
        "WHERE job_id = ? AND participant = ? AND number = ? RETURNING vm",
        (task_id, key_role, now, now, job_id, participant, attempt),
    ).fetchone()
    if row is None:
        raise UnknownAttempt(f"job {job_id}: {participant} has no attempt {attempt}")
    return task_id, str(row["vm"])


def update_task(
    conn: sqlite3.Connection,
    task_id: str,
    state: TaskState,
    *,
    reason: str = "",
    node_id: str | None = None,
    key_role: str | None = None,
) -> sqlite3.Row | None:
    """Set a task's state (and what it learnt); returns its job, participant and VM, or None
    for a task id this controller never gave out. The caller holds the transaction."""
    row: sqlite3.Row | None = conn.execute(
        "UPDATE orchestrator_attempt SET task_state = ?, "
        "task_reason = CASE WHEN ? = '' THEN task_reason ELSE ? END, "
        "node_id = COALESCE(?, node_id), key_role = COALESCE(?, key_role), task_updated_at = ? "
        "WHERE task_id = ? RETURNING job_id, participant, vm",
        (state, reason, reason, node_id, key_role, _now(), task_id),
    ).fetchone()
    return row


def tasks_stopping(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every task of any job still waiting for its agent to confirm a stop."""
    rows = conn.execute(
        "SELECT task_id AS id, job_id, participant FROM orchestrator_attempt "
        "WHERE task_state = 'stopping' ORDER BY task_updated_at"
    ).fetchall()
    return [dict(r) for r in rows]


def confirm_ended(
    conn: sqlite3.Connection, task_id: str, *, agent_id: str, state: TaskState, reason: str
) -> sqlite3.Row | None:
    """A stopping task's own agent says it ended: record it. None (nothing changed) when the
    task is not stopping or is not that agent's. The caller holds the transaction."""
    row: sqlite3.Row | None = conn.execute(
        "UPDATE orchestrator_attempt SET task_state = ?, "
        "task_reason = CASE WHEN ? = '' THEN task_reason ELSE ? END, task_updated_at = ? "
        "WHERE task_id = ? AND participant = ? AND task_state = 'stopping' "
        "RETURNING job_id, participant, vm",
        (state, reason, reason, _now(), task_id, agent_id),
    ).fetchone()
    return row


def list_tasks(conn: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    """A job's tasks, oldest attempt first per participant, as `fedctl job status` shows them."""
    rows = conn.execute(
        "SELECT task_id AS id, job_id, participant, number AS attempt, vm, task_state AS state, "
        "key_role, node_id, task_reason AS reason, task_created_at AS created_at, "
        "task_updated_at AS updated_at FROM orchestrator_attempt "
        "WHERE job_id = ? AND task_id IS NOT NULL ORDER BY participant, number",
        (job_id,),
    ).fetchall()
    return [dict(r) for r in rows]
