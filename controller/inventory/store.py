"""The inventory: agents, their VMs, host figures, a bounded history, and agent events.

Plain functions over a SQLite connection, run in the store's thread. The bus consumer and the
API call them; nothing here knows about MQTT or HTTP.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fedsky.controller.store import Store, transaction
from fedsky.shared.messages import AgentStatus, Event, Report

SCHEMA = [
    """
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        location TEXT NOT NULL,
        enrolled_at TEXT NOT NULL,
        revoked_at TEXT,
        online INTEGER NOT NULL DEFAULT 0,
        status_at TEXT,
        last_seen_at TEXT,
        last_report_at TEXT,
        last_report_sent_at TEXT,
        last_seq INTEGER,
        host_json TEXT,
        rtt_json TEXT,
        task_json TEXT
    )
    """,
    """
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        common_name TEXT NOT NULL,
        kind TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        not_after TEXT NOT NULL,
        revoked_at TEXT
    )
    """,
    "CREATE INDEX certificates_cn ON certificates(common_name)",
    """
    CREATE TABLE vms (
        agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
        uuid TEXT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_gib REAL NOT NULL,
        addresses_json TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (agent_id, uuid)
    )
    """,
    """
    CREATE TABLE report_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
        received_at TEXT NOT NULL,
        seq INTEGER NOT NULL,
        payload TEXT NOT NULL
    )
    """,
    "CREATE INDEX report_history_agent ON report_history(agent_id, id)",
    """
    CREATE TABLE agent_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        command_id TEXT,
        task_id TEXT,
        detail TEXT NOT NULL,
        at TEXT NOT NULL,
        received_at TEXT NOT NULL
    )
    """,
    "CREATE INDEX agent_events_agent ON agent_events(agent_id, id)",
    "CREATE INDEX agent_events_command ON agent_events(command_id)",
]

EVENTS_PER_AGENT = 1000


def ensure_schema(store: Store) -> None:
    store.ensure_schema("inventory", SCHEMA)


# How far ahead of the controller's clock an agent's `sent_at` may be. A report from further
# ahead is refused: stored as the newest, it would make every genuine report after it look
# stale until the agent's clock caught up with it.
MAX_CLOCK_AHEAD = timedelta(seconds=60)


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


class UnknownAgent(Exception):
    """A message from an id that is not enrolled (or was revoked)."""


@dataclass(frozen=True)
class ReportOutcome:
    agent_id: str
    accepted: bool
    came_online: bool
    reason: str = ""


def _active_agent(conn: sqlite3.Connection, agent_id: str) -> sqlite3.Row:
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM agents WHERE id = ?", (agent_id,)
    ).fetchone()
    if row is None or row["revoked_at"] is not None:
        raise UnknownAgent(agent_id)
    return row


def record_reports(
    conn: sqlite3.Connection,
    reports: Sequence[tuple[Report, datetime]],
    *,
    history_limit: int,
    history_bytes: int = 4 << 20,
) -> list[ReportOutcome]:
    """Store a batch of reports in one transaction; returns what happened to each.

    A report older than the newest one stored for its agent (by the agent's `sent_at`) is
    ignored: after a reconnect the agent sends only its newest, but QoS 1 may redeliver. A
    report sent more than `MAX_CLOCK_AHEAD` after it was received is refused ("from_future");
    a newest time stored beyond that bound (by an earlier version) does not make reports stale.
    """
    outcomes: list[ReportOutcome] = []
    trimmed: set[str] = set()
    with transaction(conn):
        for report, received_at in reports:
            try:
                agent = _active_agent(conn, report.agent_id)
            except UnknownAgent:
                outcomes.append(ReportOutcome(report.agent_id, False, False, "unknown_agent"))
                continue
            latest_credible = received_at + MAX_CLOCK_AHEAD
            if report.sent_at > latest_credible:
                outcomes.append(ReportOutcome(report.agent_id, False, False, "from_future"))
                continue
            newest = agent["last_report_sent_at"]
            if (
                newest is not None
                and report.sent_at < datetime.fromisoformat(newest) <= latest_credible
            ):
                outcomes.append(ReportOutcome(report.agent_id, False, False, "stale"))
                continue
            sent = _iso(report.sent_at)
            now = _iso(received_at)
            conn.execute(
                """
                UPDATE agents SET online = 1, last_seen_at = ?, last_report_at = ?,
                    last_report_sent_at = ?, last_seq = ?, host_json = ?, rtt_json = ?, task_json = ?
                WHERE id = ?
                """,
                (
                    now,
                    now,
                    sent,
                    report.seq,
                    report.host.model_dump_json(),
                    json.dumps(report.rtt_ms),
                    report.task.model_dump_json() if report.task else None,
                    report.agent_id,
                ),
            )
            uuids = [vm.uuid for vm in report.vms]
            conn.execute(
                f"DELETE FROM vms WHERE agent_id = ? AND uuid NOT IN ({','.join('?' * len(uuids))})",  # noqa: S608 - placeholders only
                (report.agent_id, *uuids),
            )
            conn.executemany(
                """
                INSERT INTO vms(agent_id, uuid, name, state, vcpus, memory_mib, disk_gib,
                                addresses_json, updated_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(agent_id, uuid) DO UPDATE SET name = excluded.name,
                    state = excluded.state, vcpus = excluded.vcpus,
                    memory_mib = excluded.memory_mib, disk_gib = excluded.disk_gib,
                    addresses_json = excluded.addresses_json, updated_at = excluded.updated_at
                """,
                [
                    (
                        report.agent_id,
                        vm.uuid,
                        vm.name,
                        vm.state,
                        vm.vcpus,
                        vm.memory_mib,
                        vm.disk_gib,
                        json.dumps(vm.addresses),
                        now,
                    )
                    for vm in report.vms
                ],
            )
            conn.execute(
                "INSERT INTO report_history(agent_id, received_at, seq, payload) VALUES (?, ?, ?, ?)",
                (report.agent_id, now, report.seq, report.model_dump_json(by_alias=True)),
            )
            trimmed.add(report.agent_id)
            outcomes.append(ReportOutcome(report.agent_id, True, not agent["online"]))
        for agent_id in trimmed:
            conn.execute(
                """
                DELETE FROM report_history WHERE agent_id = ? AND id <= (
                    SELECT id FROM report_history WHERE agent_id = ?
                    ORDER BY id DESC LIMIT 1 OFFSET ?)
                """,
                (agent_id, agent_id, history_limit),
            )
            # The newest reports that fit in `history_bytes`; older ones go.
            conn.execute(
                """
                DELETE FROM report_history WHERE agent_id = ? AND id <= (
                    SELECT id FROM (
                        SELECT id, SUM(length(payload)) OVER (ORDER BY id DESC) AS total
                        FROM report_history WHERE agent_id = ?)
                    WHERE total > ? ORDER BY id DESC LIMIT 1)
                """,
                (agent_id, agent_id, history_bytes),
            )
    return outcomes


def record_status(conn: sqlite3.Connection, status: AgentStatus, *, received_at: datetime) -> bool:
    """Apply an online/offline status (retained, or the will). Returns whether it changed."""
    with transaction(conn):
        agent = _active_agent(conn, status.agent_id)
        online = 1 if status.state == "online" else 0
        conn.execute(
            "UPDATE agents SET online = ?, status_at = ?, last_seen_at = COALESCE(?, last_seen_at) WHERE id = ?",
            (online, _iso(received_at), _iso(received_at) if online else None, status.agent_id),
        )
        return bool(agent["online"]) != bool(online)


def record_event(conn: sqlite3.Connection, event: Event, *, received_at: datetime) -> int:
    with transaction(conn):
        _active_agent(conn, event.agent_id)
        cur = conn.execute(
            """
            INSERT INTO agent_events(agent_id, kind, command_id, task_id, detail, at, received_at)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            """,
            (
                event.agent_id,
                event.kind,
                event.command_id,
                event.task_id,
                event.detail,
                _iso(event.at),
                _iso(received_at),
            ),
        )
        conn.execute(
            "UPDATE agents SET last_seen_at = ? WHERE id = ?", (_iso(received_at), event.agent_id)
        )
        conn.execute(
            """
            DELETE FROM agent_events WHERE agent_id = ? AND id <= (
                SELECT id FROM agent_events WHERE agent_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)
            """,
            (event.agent_id, event.agent_id, EVENTS_PER_AGENT),
        )
        return int(cur.lastrowid or 0)


def mark_stale_offline(
    conn: sqlite3.Connection, *, now: datetime, offline_after_s: float
) -> list[str]:
    """Agents online whose last sign of life is older than `offline_after_s`: mark them offline."""
    cutoff = _iso(now - timedelta(seconds=offline_after_s))
    with transaction(conn):
        rows = conn.execute(
            "SELECT id FROM agents WHERE online = 1 AND revoked_at IS NULL "
            "AND (last_seen_at IS NULL OR last_seen_at < ?)",
            (cutoff,),
        ).fetchall()
        ids = [str(r["id"]) for r in rows]
        conn.executemany(
            "UPDATE agents SET online = 0, status_at = ? WHERE id = ?",
            [(_iso(now), i) for i in ids],
        )
    return ids


# --- Reading ---------------------------------------------------------------------------------


def _agent_view(row: sqlite3.Row, vm_count: int) -> dict[str, Any]:
    host = json.loads(row["host_json"]) if row["host_json"] else None
    return {
        "id": row["id"],
        "location": row["location"],
        "state": "revoked" if row["revoked_at"] else ("online" if row["online"] else "offline"),
        "enrolled_at": row["enrolled_at"],
        "revoked_at": row["revoked_at"],
        "last_seen_at": row["last_seen_at"],
        "last_report_at": row["last_report_at"],
        "last_seq": row["last_seq"],
        "vms": vm_count,
        "host": host,
        "rtt_ms": json.loads(row["rtt_json"]) if row["rtt_json"] else {},
        "task": json.loads(row["task_json"]) if row["task_json"] else None,
    }


def list_agents(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    counts = {
        str(r["agent_id"]): int(r["n"])
        for r in conn.execute("SELECT agent_id, COUNT(*) AS n FROM vms GROUP BY agent_id")
    }
    rows = conn.execute("SELECT * FROM agents ORDER BY id").fetchall()
    return [_agent_view(r, counts.get(str(r["id"]), 0)) for r in rows]


def get_agent(conn: sqlite3.Connection, agent_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone()
    if row is None:
        return None
    n = conn.execute("SELECT COUNT(*) FROM vms WHERE agent_id = ?", (agent_id,)).fetchone()[0]
    return _agent_view(row, int(n))


def list_vms(conn: sqlite3.Connection, agent_id: str | None = None) -> list[dict[str, Any]]:
    query = (
        "SELECT v.*, a.online AS agent_online, a.last_report_at AS report_at, a.host_json AS host_json "
        "FROM vms v JOIN agents a ON a.id = v.agent_id WHERE a.revoked_at IS NULL"
    )
    params: tuple[str, ...] = ()
    if agent_id is not None:
        query += " AND v.agent_id = ?"
        params = (agent_id,)
    query += " ORDER BY v.agent_id, v.name"
    return [
        {
            "agent_id": r["agent_id"],
            "name": r["name"],
            "uuid": r["uuid"],
            "state": r["state"],
            "vcpus": r["vcpus"],
            "memory_mib": r["memory_mib"],
            "disk_gib": r["disk_gib"],
            "addresses": json.loads(r["addresses_json"]),
            "updated_at": r["updated_at"],
            "agent_online": bool(r["agent_online"]),
            "report_at": r["report_at"],
            "host": json.loads(r["host_json"]) if r["host_json"] else None,
        }
        for r in conn.execute(query, params)
    ]


def recent_events(
    conn: sqlite3.Connection,
    *,
    agent_id: str | None = None,
    command_id: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    clauses, params = [], []
    if agent_id:
        clauses.append("agent_id = ?")
        params.append(agent_id)
    if command_id:
        clauses.append("command_id = ?")
        params.append(command_id)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT * FROM agent_events {where} ORDER BY id DESC LIMIT ?",  # noqa: S608 - fixed clauses
        (*params, limit),
    ).fetchall()
    return [dict(r) for r in rows]


def history(conn: sqlite3.Connection, agent_id: str, limit: int = 50) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT received_at, seq, payload FROM report_history WHERE agent_id = ? ORDER BY id DESC LIMIT ?",
        (agent_id, limit),
    ).fetchall()
    return [
        {"received_at": r["received_at"], "seq": r["seq"], "report": json.loads(r["payload"])}
        for r in rows
    ]


def location_of(conn: sqlite3.Connection, agent_ids: Iterable[str]) -> dict[str, str]:
    ids = list(agent_ids)
    if not ids:
        return {}
    rows = conn.execute(
        f"SELECT id, location FROM agents WHERE id IN ({','.join('?' * len(ids))})",  # noqa: S608
        ids,
    ).fetchall()
    return {str(r["id"]): str(r["location"]) for r in rows}
