"""The Model Manager's tables (jobs and rounds), their schema, and the SQL over them.

Part `registry` of the controller's SQLite file: `registry_jobs` and `registry_rounds`. Each
metric of the table in `fedsky.shared.metrics` has a column of its name in `registry_rounds`
(every figure of a round is also kept in the `metrics` JSON). Functions here take a connection
and run in the store's thread (`Store.run`); callers hold the Model Manager's lock.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedsky.controller.models.blobs import BlobRef
from fedsky.controller.models.criteria import Criteria, RoundSummary, Threshold
from fedsky.controller.models.errors import ModelManagerError, NotFound
from fedsky.controller.models.records import JobRecord, RoundRecord, StoreUsage, timestamp
from fedsky.controller.models.retention import CheckpointRow, RetentionPolicy
from fedsky.controller.store import transaction
from fedsky.shared.metrics import METRIC_NAMES

SCHEMA_PART = "registry"
# Append-only (see Store.ensure_schema). A metric with a column of its own needs a step here:
# "ALTER TABLE registry_rounds ADD COLUMN <name> REAL".
SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE registry_jobs (
        job_id TEXT PRIMARY KEY,
        name TEXT,
        selection_metric TEXT NOT NULL DEFAULT 'accuracy',
        thresholds TEXT NOT NULL DEFAULT '[]',
        hyperparameters TEXT NOT NULL DEFAULT '{}',
        model_digest TEXT,
        participants TEXT NOT NULL DEFAULT '[]',
        datasets TEXT NOT NULL DEFAULT '[]',
        retention TEXT,
        status TEXT,
        created_at TEXT NOT NULL,
        ended_at TEXT
    )
    """,
    """
    CREATE TABLE registry_rounds (
        job_id TEXT NOT NULL REFERENCES registry_jobs(job_id) ON DELETE CASCADE,
        round INTEGER NOT NULL CHECK (round >= 0),
        accuracy REAL,
        loss REAL,
        f1 REAL,
        recall REAL,
        precision REAL,
        metrics TEXT NOT NULL DEFAULT '{}',
        per_class TEXT,
        confusion TEXT,
        participants TEXT NOT NULL DEFAULT '[]',
        failures TEXT NOT NULL DEFAULT '[]',
        duration_s REAL,
        weights_sha256 TEXT,
        weights_size INTEGER,
        weights_pruned_at TEXT,
        pinned INTEGER NOT NULL DEFAULT 0,
        recorded_at TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (job_id, round)
    )
    """,
    "CREATE INDEX registry_rounds_sha ON registry_rounds(weights_sha256)",
)


def _upsert(table: str, columns: Sequence[str], key: Sequence[str], also: str = "") -> str:
    """INSERT ... ON CONFLICT(key) DO UPDATE every other column (names are constants here)."""
    updates = [f"{c}=excluded.{c}" for c in columns if c not in key and c != "created_at"]
    if also:
        updates.append(also)
    return (
        f"INSERT INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "  # noqa: S608
        f"ON CONFLICT({', '.join(key)}) DO UPDATE SET {', '.join(updates)}"
    )


_JOB_COLUMNS = (
    "job_id",
    "name",
    "selection_metric",
    "thresholds",
    "hyperparameters",
    "model_digest",
    "participants",
    "datasets",
    "retention",
    "created_at",
)
_JOB_UPSERT = _upsert("registry_jobs", _JOB_COLUMNS, ("job_id",))
_ROUND_COLUMNS = (
    "job_id",
    "round",
    *METRIC_NAMES,
    "metrics",
    "per_class",
    "confusion",
    "participants",
    "failures",
    "duration_s",
    "weights_sha256",
    "weights_size",
    "recorded_at",
    "seq",
)
_ROUND_UPSERT = _upsert(
    "registry_rounds", _ROUND_COLUMNS, ("job_id", "round"), also="weights_pruned_at=NULL"
)
# What retention reads of every round (metric names are identifiers: see shared.metrics.Metric).
_CHECKPOINT_SELECT = (
    f"SELECT job_id, round, {', '.join(METRIC_NAMES)}, weights_sha256, weights_size, pinned, seq "  # noqa: S608
    "FROM registry_rounds"
)


def finite(value: Any) -> float | None:
    """A metric value as float; NaN, infinities and non-numbers become None (not recorded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def json_or_none(value: Any, what: str) -> str | None:
    """`value` as JSON text (None stays None); ModelManagerError names `what` if it is not JSON."""
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError):
        raise ModelManagerError(
            f"{what} is not plain JSON data (numbers, strings, lists, maps)"
        ) from None


def _load(text: str | None, default: Any) -> Any:
    return default if text is None else json.loads(text)


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    thresholds = tuple(
        Threshold(metric=t["metric"], kind=t["kind"], bound=float(t["bound"]))
        for t in _load(row["thresholds"], [])
    )
    return JobRecord(
        job_id=row["job_id"],
        name=row["name"],
        selection=Criteria(metric=row["selection_metric"], thresholds=thresholds),
        hyperparameters=_load(row["hyperparameters"], {}),
        model_digest=row["model_digest"],
        participants=_load(row["participants"], []),
        datasets=_load(row["datasets"], []),
        retention=RetentionPolicy.parse(row["retention"]) if row["retention"] else None,
        status=row["status"],
        created_at=row["created_at"],
        ended_at=row["ended_at"],
    )


def _round_from_row(row: sqlite3.Row) -> RoundRecord:
    return RoundRecord(
        job_id=row["job_id"],
        round=int(row["round"]),
        metrics={m: row[m] for m in METRIC_NAMES},
        all_metrics=_load(row["metrics"], {}),
        per_class=_load(row["per_class"], None),
        confusion_matrix=_load(row["confusion"], None),
        participants=_load(row["participants"], []),
        failures=_load(row["failures"], []),
        duration_s=row["duration_s"],
        weights_sha256=row["weights_sha256"],
        weights_size=row["weights_size"],
        weights_pruned_at=row["weights_pruned_at"],
        pinned=bool(row["pinned"]),
        recorded_at=row["recorded_at"],
    )


# --- reads ----------------------------------------------------------------------------------------


def get_job(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = conn.execute("SELECT * FROM registry_jobs WHERE job_id = ?", (job_id,)).fetchone()
    return _job_from_row(row) if row else None


def list_jobs(conn: sqlite3.Connection) -> list[JobRecord]:
    rows = conn.execute("SELECT * FROM registry_jobs ORDER BY created_at, job_id")
    return [_job_from_row(r) for r in rows]


def get_rounds(conn: sqlite3.Connection, job_id: str | None) -> list[RoundRecord]:
    """A job's rounds in order, or (job_id None) every job's."""
    if job_id is None:
        rows = conn.execute("SELECT * FROM registry_rounds ORDER BY job_id, round").fetchall()
    else:
        rows = conn.execute(
            "SELECT * FROM registry_rounds WHERE job_id = ? ORDER BY round", (job_id,)
        ).fetchall()
    return [_round_from_row(r) for r in rows]


def get_round(conn: sqlite3.Connection, job_id: str, round_no: int) -> RoundRecord | None:
    row = conn.execute(
        "SELECT * FROM registry_rounds WHERE job_id = ? AND round = ?", (job_id, round_no)
    ).fetchone()
    return _round_from_row(row) if row else None


def checkpoint_rows(conn: sqlite3.Connection, job_id: str | None) -> list[CheckpointRow]:
    """Rounds as retention sees them: a job's, or (job_id None) every job's."""
    rows = (
        conn.execute(_CHECKPOINT_SELECT + " WHERE job_id = ?", (job_id,)).fetchall()
        if job_id
        else conn.execute(_CHECKPOINT_SELECT).fetchall()
    )
    return [
        CheckpointRow(
            summary=RoundSummary(r["job_id"], int(r["round"]), {m: r[m] for m in METRIC_NAMES}),
            sha256=r["weights_sha256"],
            size=int(r["weights_size"] or 0),
            pinned=bool(r["pinned"]),
            order=int(r["seq"]),
        )
        for r in rows
    ]


def held_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the distinct checkpoints rounds refer to (a shared blob counts once)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(size), 0) FROM (SELECT DISTINCT weights_sha256, weights_size AS size "
        "FROM registry_rounds WHERE weights_sha256 IS NOT NULL)"
    ).fetchone()
    return int(row[0])


def referenced(conn: sqlite3.Connection) -> set[str]:
    """The SHA-256 of every checkpoint some round refers to."""
    rows = conn.execute(
        "SELECT DISTINCT weights_sha256 FROM registry_rounds WHERE weights_sha256 IS NOT NULL"
    )
    return {r[0] for r in rows}


def usage(conn: sqlite3.Connection, max_bytes: int) -> StoreUsage:
    blobs = conn.execute(
        "SELECT COUNT(DISTINCT weights_sha256) FROM registry_rounds "
        "WHERE weights_sha256 IS NOT NULL"
    ).fetchone()[0]
    n = conn.execute(
        "SELECT COUNT(*) FROM registry_rounds WHERE weights_sha256 IS NOT NULL"
    ).fetchone()[0]
    return StoreUsage(
        blobs=int(blobs), bytes=held_bytes(conn), max_bytes=max_bytes, checkpoints=int(n)
    )


# --- writes -------------------------------------------------------------------------------------


def upsert_job(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    name: str | None,
    selection: Criteria,
    hyperparameters_json: str | None,
    model_digest: str | None,
    participants: Sequence[str],
    datasets_json: str | None,
    retention: RetentionPolicy | None,
) -> JobRecord:
    """Record (or update) a job; its status and end are left as they are."""
    values = (
        job_id,
        name,
        selection.metric,
        json.dumps([t.to_dict() for t in selection.thresholds]),
        hyperparameters_json,
        model_digest,
        json.dumps(list(participants)),
        datasets_json,
        retention.describe() if retention else None,
        timestamp(),
    )
    with transaction(conn):
        conn.execute(_JOB_UPSERT, values)
        job = get_job(conn, job_id)
    assert job is not None
    return job


@dataclass(frozen=True)
class NewRound:
    """A round to write, already checked and serialised by the service."""

    job_id: str
    round: int
    metrics: dict[str, float | None]  # one value (or None) per metric of the table
    all_metrics: dict[str, float]
    per_class_json: str | None
    confusion: list[list[int]] | None
    participants: list[dict[str, Any]]
    failures_json: str
    duration_s: float | None
    weights: BlobRef | None


def insert_round(conn: sqlite3.Connection, new: NewRound) -> tuple[RoundRecord, list[str]]:
    """Write a round (replacing one of the same number); returns it and the blobs it let go of."""
    now = timestamp()
    ref = new.weights
    with transaction(conn):
        old = conn.execute(
            "SELECT weights_sha256 FROM registry_rounds WHERE job_id = ? AND round = ?",
            (new.job_id, new.round),
        ).fetchone()
        conn.execute(
            "INSERT OR IGNORE INTO registry_jobs(job_id, created_at) VALUES (?, ?)",
            (new.job_id, now),
        )
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM registry_rounds").fetchone()
        conn.execute(
            _ROUND_UPSERT,
            (
                new.job_id,
                new.round,
                *(new.metrics.get(m) for m in METRIC_NAMES),
                json.dumps(new.all_metrics, sort_keys=True),
                new.per_class_json,
                None if new.confusion is None else json.dumps(new.confusion),
                json_or_none(new.participants, "participants"),
                new.failures_json,
                finite(new.duration_s),
                ref.sha256 if ref else None,
                ref.size if ref else None,
                now,
                seq[0],
            ),
        )
        row = get_round(conn, new.job_id, new.round)
    assert row is not None
    # A redelivered round with other weights leaves the old blob for collection.
    replaced = [old[0]] if old and old[0] and old[0] != row.weights_sha256 else []
    return row, replaced


def finish_job(conn: sqlite3.Connection, job_id: str, status: str) -> None:
    now = timestamp()
    conn.execute(
        "INSERT INTO registry_jobs(job_id, created_at, status, ended_at) "
        "VALUES (?, ?, ?, ?) ON CONFLICT(job_id) DO UPDATE SET "
        "status=excluded.status, ended_at=excluded.ended_at",
        (job_id, now, status, now),
    )


def delete_job(conn: sqlite3.Connection, job_id: str) -> tuple[int, list[str]]:
    """Delete a job and its rounds; returns the rounds removed and the blobs no round uses now."""
    with transaction(conn):
        before = referenced(conn)
        n = conn.execute("DELETE FROM registry_rounds WHERE job_id = ?", (job_id,)).rowcount
        conn.execute("DELETE FROM registry_jobs WHERE job_id = ?", (job_id,))
        gone = sorted(before - referenced(conn))
    return n, gone


def set_pinned(conn: sqlite3.Connection, job_id: str, round_no: int, pinned: bool) -> RoundRecord:
    record = get_round(conn, job_id, round_no)
    if record is None:
        raise NotFound(f"job {job_id} has no round {round_no}")
    if pinned and record.weights_sha256 is None:
        raise ModelManagerError(
            f"job {job_id} round {round_no} has no checkpoint left to pin (pruned)"
        )
    conn.execute(
        "UPDATE registry_rounds SET pinned = ? WHERE job_id = ? AND round = ?",
        (int(pinned), job_id, round_no),
    )
    return replace(record, pinned=pinned)


def drop_checkpoints(conn: sqlite3.Connection, drops: Sequence[tuple[str, int]]) -> list[str]:
    """Forget the weights of these (job, round)s (metrics stay); returns blobs no round uses now.

    Call inside the transaction that chose `drops`.
    """
    before = referenced(conn)
    now = timestamp()
    conn.executemany(
        "UPDATE registry_rounds SET weights_sha256 = NULL, weights_size = NULL, "
        "weights_pruned_at = ? "
        "WHERE job_id = ? AND round = ?",
        [(now, jid, n) for jid, n in drops],
    )
    return sorted(before - referenced(conn))
