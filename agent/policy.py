"""What this hospital allows fedsky's jobs to do here (`[policy]` in agent.toml), and its IT's
decisions on jobs when they approve each one by hand.

The policy is checked when a task is prepared, before anything is made for it:

- `datasets`: the datasets jobs may train on (unset: every configured one). A job naming
  another is refused here for all of this hospital's VMs (`not_allowed`).
- `vms`: the VMs fedsky may use (unset: all). Another VM is refused (`vm_not_allowed`); the
  controller tries the hospital's next VM.
- `max_tasks`: tasks at once (unset: no cap); past it a task is refused (`busy`).
- `approval`: `automatic`, or `manual`: a new job waits until IT runs
  `agentctl jobs approve JOB` (or `deny JOB --reason ...`). The decision holds for the whole
  job (a failover to another VM asks nothing again).

Decisions live in a SQLite file in the agent's state directory (`approvals.db`, 0600), which
`agentctl` writes and the daemon reads: a decision taken while the daemon is down is applied
when it starts, and a task waiting for one survives a restart. The daemon answers the
controller once a decision is there (`ApprovalBook.ready`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fedsky.agent.executors.base import VM_NAME_PATTERN
from fedsky.shared.jobspec import DATASET_NAME_PATTERN
from fedsky.shared.messages import FailureKind, PrepareTaskCommand
from pydantic import BaseModel, ConfigDict, Field

APPROVALS_FILE = "approvals.db"
Decision = Literal["pending", "approved", "denied"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
    dataset TEXT NOT NULL,
    vm TEXT NOT NULL,
    asked_at REAL NOT NULL,
    decided_at REAL,
    decided_by TEXT,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS waiting (
    task_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES approvals(job_id),
    command TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""


class PolicySection(BaseModel):
    """`[policy]` in agent.toml; unset lists allow all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datasets: list[Annotated[str, Field(pattern=DATASET_NAME_PATTERN)]] | None = None
    vms: list[Annotated[str, Field(pattern=VM_NAME_PATTERN)]] | None = None
    max_tasks: Annotated[int, Field(ge=1, le=1000)] | None = None
    # "manual": each new job waits for `agentctl jobs approve JOB` (or `deny`).
    approval: Literal["automatic", "manual"] = "automatic"


@dataclass(frozen=True)
class Refusal:
    kind: FailureKind
    detail: str


def refusal(
    *,
    agent_id: str,
    dataset: str,
    vm: str,
    active_tasks: int,
    datasets: Sequence[str] | None,
    vms: Sequence[str] | None,
    max_tasks: int | None,
) -> Refusal | None:
    """Why this hospital's policy refuses a task (None: it allows it)."""
    if datasets is not None and dataset not in datasets:
        return Refusal(
            FailureKind.NOT_ALLOWED,
            f"{agent_id} does not lend dataset {dataset!r} to fedsky jobs (policy.datasets)",
        )
    if vms is not None and vm not in vms:
        return Refusal(
            FailureKind.VM_NOT_ALLOWED, f"{agent_id} does not lend {vm} to fedsky (policy.vms)"
        )
    if max_tasks is not None and active_tasks >= max_tasks:
        return Refusal(
            FailureKind.BUSY,
            f"{agent_id} already runs {active_tasks} fedsky task(s), as many as it allows "
            "at once (policy.max_tasks)",
        )
    return None


@dataclass(frozen=True)
class Approval:
    job_id: str
    state: Decision
    dataset: str
    vm: str
    asked_at: float
    decided_at: float | None
    decided_by: str | None
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "job": self.job_id,
            "state": self.state,
            "dataset": self.dataset,
            "vm": self.vm,
            "asked_at": self.asked_at,
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "reason": self.reason,
        }


class DecisionError(Exception):
    """A decision that cannot be taken (unknown job, already decided); the message says why."""


class NoApprovalsYet(DecisionError):
    """The agent has not made its approvals file: no job has asked."""


def _approval(row: Mapping[str, object]) -> Approval:
    return Approval(
        job_id=str(row["job_id"]),
        state=row["state"],  # type: ignore[arg-type]
        dataset=str(row["dataset"]),
        vm=str(row["vm"]),
        asked_at=float(row["asked_at"]),  # type: ignore[arg-type]
        decided_at=None if row["decided_at"] is None else float(row["decided_at"]),  # type: ignore[arg-type]
        decided_by=None if row["decided_by"] is None else str(row["decided_by"]),
        reason=str(row["reason"]),
    )


class ApprovalBook:
    """The decisions file. Blocking (SQLite): the daemon calls it on its worker thread."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """`create`: the daemon makes the file (its user owns it); agentctl only opens it, so
        that running it as root first cannot leave a file the agent cannot read."""
        self.path = path
        self.create = create

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self.path.exists():
            if not self.create:
                raise NoApprovalsYet(f"{self.path} does not exist yet: no job has asked here")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created 0600: who may decide is who may write this file (the agent's user, root).
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.executescript(_SCHEMA)
            yield conn
        finally:
            conn.close()

    def state_of(self, job_id: str) -> Approval | None:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM approvals WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _approval(row)

    def ask(self, command: PrepareTaskCommand) -> Approval:
        """Keep `command` until its job is decided; the job is pending if it is new."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR IGNORE INTO approvals (job_id, state, dataset, vm, asked_at) "
                "VALUES (?, 'pending', ?, ?, ?)",
                (command.job_id, command.dataset, command.vm, time.time()),
            )
            conn.execute(
                "INSERT OR REPLACE INTO waiting (task_id, job_id, command, received_at) "
                "VALUES (?, ?, ?, ?)",
                (
                    command.task_id,
                    command.job_id,
                    command.model_dump_json(by_alias=True),
                    time.time(),
                ),
            )
            row = conn.execute(
                "SELECT * FROM approvals WHERE job_id = ?", (command.job_id,)
            ).fetchone()
            conn.execute("COMMIT")
        return _approval(row)

    def decide(self, job_id: str, *, approve: bool, by: str, reason: str = "") -> Approval:
        """IT's decision on a pending job (`agentctl jobs approve|deny`)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT * FROM approvals WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                raise DecisionError(f"no job {job_id!r} has asked to run here")
            if row["state"] != "pending":
                conn.execute("ROLLBACK")
                raise DecisionError(
                    f"job {job_id} was already {row['state']} by {row['decided_by']}"
                )
            conn.execute(
                "UPDATE approvals SET state = ?, decided_at = ?, decided_by = ?, reason = ? "
                "WHERE job_id = ?",
                ("approved" if approve else "denied", time.time(), by, reason, job_id),
            )
            row = conn.execute("SELECT * FROM approvals WHERE job_id = ?", (job_id,)).fetchone()
            conn.execute("COMMIT")
        return _approval(row)

    def ready(self) -> list[tuple[PrepareTaskCommand, Approval]]:
        """Waiting tasks whose job has been decided, removed from the waiting list."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "SELECT w.task_id, w.command, a.* FROM waiting AS w "
                "JOIN approvals AS a ON a.job_id = w.job_id "
                "WHERE a.state != 'pending' ORDER BY w.received_at"
            ).fetchall()
            conn.executemany(
                "DELETE FROM waiting WHERE task_id = ?", [(r["task_id"],) for r in rows]
            )
            conn.execute("COMMIT")
        return [(PrepareTaskCommand.model_validate_json(r["command"]), _approval(r)) for r in rows]

    def drop_task(self, task_id: str) -> bool:
        """Forget a waiting task (the controller stopped it: the job was cancelled or gave up
        waiting); a pending job no task waits for any more is no longer asking. False if the
        task was not waiting."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "DELETE FROM waiting WHERE task_id = ? RETURNING job_id", (task_id,)
            ).fetchone()
            if row is not None:
                conn.execute(
                    "DELETE FROM approvals WHERE job_id = ? AND state = 'pending' "
                    "AND NOT EXISTS (SELECT 1 FROM waiting WHERE job_id = ?)",
                    (row["job_id"], row["job_id"]),
                )
            conn.execute("COMMIT")
        return row is not None

    def jobs(self, *, state: Decision | None = None) -> list[Approval]:
        query = "SELECT * FROM approvals"
        args: tuple[str, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state,)
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY asked_at", args).fetchall()
        return [_approval(r) for r in rows]
