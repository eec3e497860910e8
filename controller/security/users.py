"""People who use the operator API over the network, their roles and their tokens.

A token is shown once, when the user is added; the controller keeps only its SHA-256 (a token
is 256 random bits, so a plain hash is enough and a lookup by hash costs one index probe).
Revoking a user keeps the row (the audit log and job owners still name them) and stops the
token at once.

Roles, each allowed what the one below it is, and more:
- viewer: read agents, VMs, jobs, their logs and models' metadata, clouds (never credentials);
- scientist: upload model files, submit jobs; cancel, pin and download the models of their own;
- operator: the same for every job; ping agents;
- admin: the PKI (enrol, revoke), clouds, users, the audit log.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import sqlite3
from datetime import UTC, datetime
from typing import Any

from fedsky.controller.store import Store, transaction

TOKEN_PREFIX = "fsk_"  # noqa: S105 (marks a token in a file or a leak scan)
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")

SCHEMA = [
    """
    CREATE TABLE api_users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        revoked_at TEXT
    )
    """,
    # Browser sessions (below): digests of the session id and of its CSRF token.
    """
    CREATE TABLE api_sessions (
        id_sha256 TEXT PRIMARY KEY,
        user_name TEXT NOT NULL REFERENCES api_users(name),
        csrf_sha256 TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at REAL NOT NULL,
        ended_at TEXT
    )
    """,
]


class Role(enum.IntEnum):
    VIEWER = 1
    SCIENTIST = 2
    OPERATOR = 3
    ADMIN = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise UserError(
                f"unknown role {text!r}: one of {', '.join(r.label for r in cls)}"
            ) from None


class UserError(Exception):
    """A request about users that cannot be done (bad name, unknown role, exists, not found)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def ensure_schema(store: Store) -> None:
    store.ensure_schema("users", SCHEMA)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise UserError(
            f"invalid user name {name[:70]!r}: lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter, at most 63 characters"
        )
    return name


def add_user(conn: sqlite3.Connection, *, name: str, role: Role, created_by: str) -> str:
    """Add a user; returns their token (the only time it exists outside the caller's hands)."""
    check_name(name)
    token = new_token()
    with transaction(conn):
        if conn.execute("SELECT 1 FROM api_users WHERE name = ?", (name,)).fetchone():
            raise UserError(f"user {name!r} already exists", status=409)
        conn.execute(
            "INSERT INTO api_users(name, role, token_sha256, created_at, created_by) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, role.label, token_digest(token), datetime.now(UTC).isoformat(), created_by),
        )
    return token


def revoke_user(conn: sqlite3.Connection, name: str) -> None:
    with transaction(conn):
        row = conn.execute("SELECT revoked_at FROM api_users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UserError(f"no user {name!r}", status=404)
        if row["revoked_at"] is not None:
            raise UserError(f"user {name!r} is already revoked", status=409)
        conn.execute(
            "UPDATE api_users SET revoked_at = ? WHERE name = ?",
            (datetime.now(UTC).isoformat(), name),
        )


def list_users(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT name, role, created_at, created_by, revoked_at FROM api_users ORDER BY name"
    ).fetchall()
    return [dict(r) for r in rows]


def user_for_token(conn: sqlite3.Connection, token: str) -> tuple[str, Role] | None:
    """The active user holding `token`, or None."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = conn.execute(
        "SELECT name, role FROM api_users WHERE token_sha256 = ? AND revoked_at IS NULL",
        (token_digest(token),),
    ).fetchone()
    if row is None:
        return None
    return str(row["name"]), Role.parse(str(row["role"]))


# -- browser sessions (the dashboard) ------------------------------------------------------------
#
# A browser trades a user's token for a session once (`POST /v1/session` with the token as a
# bearer): the session id goes into an HttpOnly, Secure, SameSite=Strict cookie, which page
# scripts cannot read; every request that changes something must also carry the session's CSRF
# token in `X-CSRF-Token` (a cookie alone, which the browser attaches by itself, never acts).
# Only digests of both are stored. A session ends at its expiry, at logout, or when its user is
# revoked.

SESSION_COOKIE = "fedsky_session"
CSRF_HEADER = "X-CSRF-Token"


def open_session(
    conn: sqlite3.Connection, *, name: str, ttl_s: float, now: float
) -> tuple[str, str]:
    """A new session for user `name`: (session id, CSRF token), each shown only to the caller."""
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with transaction(conn):
        conn.execute(
            "INSERT INTO api_sessions(id_sha256, user_name, csrf_sha256, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                token_digest(session_id),
                name,
                token_digest(csrf),
                datetime.now(UTC).isoformat(),
                now + ttl_s,
            ),
        )
        # Ended and expired sessions are of no use to anyone: keep the table small.
        conn.execute(
            "DELETE FROM api_sessions WHERE expires_at < ? OR ended_at IS NOT NULL", (now,)
        )
    return session_id, csrf


def user_for_session(
    conn: sqlite3.Connection, session_id: str, *, now: float
) -> tuple[str, Role, str] | None:
    """The active user of a live session: (name, role, CSRF digest), or None."""
    if len(session_id) > 200:
        return None
    row = conn.execute(
        "SELECT u.name, u.role, s.csrf_sha256 FROM api_sessions AS s "
        "JOIN api_users AS u ON u.name = s.user_name "
        "WHERE s.id_sha256 = ? AND s.ended_at IS NULL AND s.expires_at > ? "
        "AND u.revoked_at IS NULL",
        (token_digest(session_id), now),
    ).fetchone()
    if row is None:
        return None
    return str(row["name"]), Role.parse(str(row["role"])), str(row["csrf_sha256"])


def end_session(conn: sqlite3.Connection, session_id: str) -> bool:
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE api_sessions SET ended_at = ? WHERE id_sha256 = ? AND ended_at IS NULL",
            (datetime.now(UTC).isoformat(), token_digest(session_id)),
        )
    return cursor.rowcount > 0
