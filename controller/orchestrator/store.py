"""The orchestrator's tables in the controller's store: queue state, attempts, decisions.

`QueueStore` is the one piece of the orchestrator that touches SQL. Each call loads a
participant's queue state, runs the pure choice (`orchestrator.choice`) inside one
`BEGIN IMMEDIATE` transaction and saves the result with the decision and the attempt, so two
jobs choosing at once cannot take the same turn. Every call runs in the store's thread, off the
event loop. `orchestrator_attempt` is the one record of which VM a participant's attempt runs on.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

from fedsky.controller.orchestrator.choice import (
    Decision,
    Failure,
    FailureReason,
    QueueState,
    Rest,
    choose,
    fail_over,
)
from fedsky.controller.orchestrator.explain import explain_data
from fedsky.controller.orchestrator.policy import (
    MinResources,
    OrchestratorError,
    Policy,
    VmCandidate,
)
from fedsky.controller.orchestrator.records import ACTIVE_STATES, Attempt, AttemptState
from fedsky.controller.store import Store, transaction

# Callers of the store name an attempt's record and states from here.
__all__ = ["Attempt", "AttemptState", "QueueStore"]

log = logging.getLogger(__name__)

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE orchestrator_queue (
        participant TEXT PRIMARY KEY,
        cursor TEXT,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE orchestrator_credit (
        participant TEXT NOT NULL,
        vm_key TEXT NOT NULL,
        credit REAL NOT NULL,
        PRIMARY KEY (participant, vm_key)
    )""",
    """CREATE TABLE orchestrator_rest (
        participant TEXT NOT NULL,
        vm_key TEXT NOT NULL,
        until REAL NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (participant, vm_key)
    )""",
    """CREATE TABLE orchestrator_attempt (
        job_id TEXT NOT NULL,
        participant TEXT NOT NULL,
        number INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        vm TEXT NOT NULL,
        vm_key TEXT NOT NULL,
        state TEXT NOT NULL,
        assigned_at REAL NOT NULL,
        running_at REAL,
        ended_at REAL,
        reason TEXT,
        detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (job_id, participant, number)
    )""",
    "CREATE INDEX orchestrator_attempt_active ON orchestrator_attempt(state, vm_key)",
    """CREATE TABLE orchestrator_decision (
        job_id TEXT NOT NULL,
        participant TEXT NOT NULL,
        seq INTEGER NOT NULL,
        decided_at REAL NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, participant, seq)
    )""",
    # The task each attempt runs (see `orchestrator.tasks`): the attempt's one row holds it.
    "ALTER TABLE orchestrator_attempt ADD COLUMN task_id TEXT",
    "ALTER TABLE orchestrator_attempt ADD COLUMN task_state TEXT",
    "ALTER TABLE orchestrator_attempt ADD COLUMN key_role TEXT NOT NULL DEFAULT 'node'",
    "ALTER TABLE orchestrator_attempt ADD COLUMN node_id TEXT",
    "ALTER TABLE orchestrator_attempt ADD COLUMN task_reason TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE orchestrator_attempt ADD COLUMN task_created_at TEXT",
    "ALTER TABLE orchestrator_attempt ADD COLUMN task_updated_at TEXT",
    "CREATE UNIQUE INDEX orchestrator_attempt_task ON orchestrator_attempt(task_id)",
)
SCHEMA_PART = "orchestrator"


def ensure_schema(store: Store) -> None:
    """Create or upgrade the orchestrator's tables (the job pipeline's tasks live in them)."""
    store.ensure_schema(SCHEMA_PART, _SCHEMA)


def _load_state(conn: sqlite3.Connection, participant: str) -> QueueState:
    row = conn.execute(
        "SELECT cursor FROM orchestrator_queue WHERE participant = ?", (participant,)
    ).fetchone()
    credits = {
        str(r["vm_key"]): float(r["credit"])
        for r in conn.execute(
            "SELECT vm_key, credit FROM orchestrator_credit WHERE participant = ?", (participant,)
        )
    }
    rests = {
        str(r["vm_key"]): Rest(until=float(r["until"]), reason=str(r["reason"]))
        for r in conn.execute(
            "SELECT vm_key, until, reason FROM orchestrator_rest WHERE participant = ?",
            (participant,),
        )
    }
    return QueueState(
        participant=participant,
        cursor=(row["cursor"] if row else None),
        credits=credits,
        rests=rests,
    )


def _save_state(conn: sqlite3.Connection, state: QueueState, now: float) -> None:
    p = state.participant
    conn.execute(
        "INSERT INTO orchestrator_queue(participant, cursor, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT(participant) DO UPDATE SET cursor = excluded.cursor, "
        "updated_at = excluded.updated_at",
        (p, state.cursor, now),
    )
    conn.execute("DELETE FROM orchestrator_credit WHERE participant = ?", (p,))
    conn.executemany(
        "INSERT INTO orchestrator_credit(participant, vm_key, credit) VALUES (?, ?, ?)",
        [(p, k, v) for k, v in state.credits.items()],
    )
    conn.execute("DELETE FROM orchestrator_rest WHERE participant = ?", (p,))
    conn.executemany(
        "INSERT INTO orchestrator_rest(participant, vm_key, until, reason) VALUES (?, ?, ?, ?)",
        [(p, k, r.until, r.reason) for k, r in state.rests.items()],
    )


def _row_attempt(r: sqlite3.Row) -> Attempt:
    return Attempt(
        job_id=r["job_id"],
        participant=r["participant"],
        number=int(r["number"]),
        agent_id=r["agent_id"],
        vm=r["vm"],
        vm_key=r["vm_key"],
        state=r["state"],
        assigned_at=float(r["assigned_at"]),
        running_at=r["running_at"],
        ended_at=r["ended_at"],
        reason=r["reason"],
        detail=r["detail"],
    )


def _latest_attempt(conn: sqlite3.Connection, job_id: str, participant: str) -> Attempt | None:
    row = conn.execute(
        "SELECT * FROM orchestrator_attempt WHERE job_id = ? AND participant = ? "
        "ORDER BY number DESC LIMIT 1",
        (job_id, participant),
    ).fetchone()
    return _row_attempt(row) if row else None


def _record(conn: sqlite3.Connection, job_id: str, decision: Decision) -> None:
    seq_row = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM orchestrator_decision "
        "WHERE job_id = ? AND participant = ?",
        (job_id, decision.participant),
    ).fetchone()
    conn.execute(
        "INSERT INTO orchestrator_decision(job_id, participant, seq, decided_at, body) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            job_id,
            decision.participant,
            int(seq_row["next"]),
            decision.decided_at,
            json.dumps(decision.to_dict()),
        ),
    )
    vm = decision.chosen
    if vm is not None:
        conn.execute(
            "INSERT INTO orchestrator_attempt"
            "(job_id, participant, number, agent_id, vm, vm_key, state, assigned_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'assigned', ?)",
            (
                job_id,
                decision.participant,
                decision.attempt,
                vm.agent_id,
                vm.vm,
                vm.key,
                decision.decided_at,
            ),
        )


def _assign(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    participant: str,
    candidates: Sequence[VmCandidate],
    minimum: MinResources,
    policy: Policy,
    now: float,
) -> Decision:
    with transaction(conn):
        last = _latest_attempt(conn, job_id, participant)
        if last is not None and last.state in ACTIVE_STATES:
            raise OrchestratorError(
                f"job {job_id}: {participant} already has attempt {last.number} on {last.vm} "
                f"({last.state}); end it or fail it over first"
            )
        tries = last.number if last is not None else 0
        state = _load_state(conn, participant)
        if tries >= policy.max_tries:
            decision = Decision(
                participant=participant,
                attempt=tries + 1,
                trigger="job start",
                decided_at=now,
                chosen=None,
                considerations=(),
                summary=f"gave up: {tries} tries made, the most allowed "
                f"(max_tries {policy.max_tries})",
            )
        else:
            decision, state = choose(
                participant=participant,
                candidates=candidates,
                minimum=minimum,
                policy=policy,
                state=state,
                now=now,
                attempt=tries + 1,
                trigger="job start" if tries == 0 else "reassignment",
            )
        _save_state(conn, state, now)
        _record(conn, job_id, decision)
    _log_decision(job_id, decision)
    return decision


def _fail_over(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    participant: str,
    reason: FailureReason,
    detail: str,
    candidates: Sequence[VmCandidate],
    minimum: MinResources,
    policy: Policy,
    now: float,
) -> Decision:
    with transaction(conn):
        last = _latest_attempt(conn, job_id, participant)
        if last is None or last.state not in ACTIVE_STATES:
            raise OrchestratorError(
                f"job {job_id}: {participant} has no attempt assigned or running to fail over"
            )
        conn.execute(
            "UPDATE orchestrator_attempt SET state = 'failed', reason = ?, detail = ?, "
            "ended_at = ? "
            "WHERE job_id = ? AND participant = ? AND number = ?",
            (reason.value, detail, now, job_id, participant, last.number),
        )
        state = _load_state(conn, participant)
        decision, state = fail_over(
            participant=participant,
            failure=Failure(reason=reason, vm_key=last.vm_key, vm=last.vm, detail=detail),
            tries_so_far=last.number,
            candidates=candidates,
            minimum=minimum,
            policy=policy,
            state=state,
            now=now,
        )
        _save_state(conn, state, now)
        _record(conn, job_id, decision)
    _log_decision(job_id, decision)
    return decision


def _mark(
    conn: sqlite3.Connection, *, job_id: str, participant: str, state: AttemptState, now: float
) -> Attempt:
    if state not in ("running", "succeeded", "cancelled"):
        raise OrchestratorError(
            f"attempts are marked running, succeeded or cancelled, not {state!r}; use fail_over"
        )
    with transaction(conn):
        last = _latest_attempt(conn, job_id, participant)
        if last is None or last.state not in ACTIVE_STATES:
            raise OrchestratorError(
                f"job {job_id}: {participant} has no attempt assigned or running"
            )
        if state == "running":
            conn.execute(
                "UPDATE orchestrator_attempt SET state = 'running', "
                "running_at = COALESCE(running_at, ?) "
                "WHERE job_id = ? AND participant = ? AND number = ?",
                (now, job_id, participant, last.number),
            )
        else:
            conn.execute(
                "UPDATE orchestrator_attempt SET state = ?, ended_at = ? "
                "WHERE job_id = ? AND participant = ? AND number = ?",
                (state, now, job_id, participant, last.number),
            )
        updated = _latest_attempt(conn, job_id, participant)
    assert updated is not None
    return updated


def _attempts(conn: sqlite3.Connection, job_id: str) -> list[Attempt]:
    rows = conn.execute(
        "SELECT * FROM orchestrator_attempt WHERE job_id = ? ORDER BY participant, number",
        (job_id,),
    ).fetchall()
    return [_row_attempt(r) for r in rows]


def _decisions(conn: sqlite3.Connection, job_id: str) -> list[Decision]:
    rows = conn.execute(
        "SELECT body FROM orchestrator_decision WHERE job_id = ? ORDER BY participant, seq",
        (job_id,),
    ).fetchall()
    return [Decision.from_dict(json.loads(r["body"])) for r in rows]


def _explain(conn: sqlite3.Connection, job_id: str) -> dict[str, Any]:
    return explain_data(job_id, _decisions(conn, job_id), _attempts(conn, job_id))


def _active_tasks(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute(
        "SELECT vm_key, COUNT(*) AS n FROM orchestrator_attempt "
        "WHERE state IN ('assigned', 'running') GROUP BY vm_key"
    ).fetchall()
    return {str(r["vm_key"]): int(r["n"]) for r in rows}


def _save(conn: sqlite3.Connection, *, state: QueueState, now: float) -> None:
    with transaction(conn):
        _save_state(conn, state, now)


def _forget_job(conn: sqlite3.Connection, job_id: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM orchestrator_attempt WHERE job_id = ?", (job_id,))
        conn.execute("DELETE FROM orchestrator_decision WHERE job_id = ?", (job_id,))


def _log_decision(job_id: str, decision: Decision) -> None:
    if decision.chosen is not None:
        log.info(
            "job %s: %s attempt %s -> %s (%s)",
            job_id,
            decision.participant,
            decision.attempt,
            decision.chosen.vm,
            decision.trigger,
        )
    else:
        log.warning(
            "job %s: %s: %s (%s)", job_id, decision.participant, decision.summary, decision.trigger
        )


class QueueStore:
    """The orchestrator's tables in the controller's store: queue state, attempts, decisions.

    Each method runs in one transaction, in the store's thread.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        ensure_schema(store)

    # -- queue state --------------------------------------------------------------------------

    async def load(self, participant: str) -> QueueState:
        return await self._store.run(_load_state, participant)

    async def save(self, state: QueueState, *, now: float) -> None:
        await self._store.run(_save, state=state, now=now)

    async def active_tasks(self) -> dict[str, int]:
        """VM key -> attempts assigned or running there (for `VmCandidate.tasks`)."""
        return await self._store.run(_active_tasks)

    # -- the job pipeline's calls -------------------------------------------------------------

    async def assign(
        self,
        *,
        job_id: str,
        participant: str,
        candidates: Sequence[VmCandidate],
        minimum: MinResources,
        policy: Policy,
        now: float,
    ) -> Decision:
        """Choose a VM for the participant's first (or next) attempt and record it as assigned.

        `decision.chosen is None` means no VM can take it now; `decision.summary` says why.
        """
        return await self._store.run(
            _assign,
            job_id=job_id,
            participant=participant,
            candidates=candidates,
            minimum=minimum,
            policy=policy,
            now=now,
        )

    async def fail_over(
        self,
        *,
        job_id: str,
        participant: str,
        reason: FailureReason,
        candidates: Sequence[VmCandidate],
        minimum: MinResources,
        policy: Policy,
        now: float,
        detail: str = "",
    ) -> Decision:
        """Record the current attempt as failed, rest its VM, choose the next (up to max_tries)."""
        return await self._store.run(
            _fail_over,
            job_id=job_id,
            participant=participant,
            reason=reason,
            detail=detail,
            candidates=candidates,
            minimum=minimum,
            policy=policy,
            now=now,
        )

    async def mark(
        self, *, job_id: str, participant: str, state: AttemptState, now: float
    ) -> Attempt:
        """Move the participant's current attempt to running, succeeded or cancelled."""
        return await self._store.run(
            _mark, job_id=job_id, participant=participant, state=state, now=now
        )

    # -- reading ------------------------------------------------------------------------------

    async def attempts(self, job_id: str) -> list[Attempt]:
        return await self._store.run(_attempts, job_id)

    async def decisions(self, job_id: str) -> list[Decision]:
        return await self._store.run(_decisions, job_id)

    async def explain(self, job_id: str) -> dict[str, Any]:
        """`explain_data` for the job (render it with `explain.render_explain`)."""
        return await self._store.run(_explain, job_id)

    async def forget_job(self, job_id: str) -> None:
        """Drop a job's attempts and decisions (the queue state is kept: it spans jobs)."""
        await self._store.run(_forget_job, job_id)
