"""Enrolment and revocation of agents: the one path from a name to a signed certificate.

`fedctl agents enroll` (through the API) and, later, the dashboard both call `enroll_agent`; the
controller's own identity and the aggregators' certificates go through `Pki.issue` too.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fedsky.controller.security.pki import IssuedCertificate, Pki
from fedsky.controller.store import transaction
from fedsky.shared.bundle import EnrolmentBundle
from fedsky.shared.ids import check_agent_id, check_location


class EnrolmentError(Exception):
    """An enrolment or revocation that cannot be done as asked; the message says why."""

    def __init__(self, message: str, *, conflict: bool = False, not_found: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict
        self.not_found = not_found


@dataclass(frozen=True)
class Enrolment:
    bundle: EnrolmentBundle
    key_pem: bytes | None  # only with `with_key`: the one-machine flow


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _insert_certificate(conn: sqlite3.Connection, cert: IssuedCertificate) -> None:
    conn.execute(
        "INSERT INTO certificates(serial, common_name, kind, issued_at, not_after) VALUES (?, ?, ?, ?, ?)",
        (str(cert.serial), cert.common_name, cert.kind, _now(), cert.not_after.isoformat()),
    )


def _issue_agent(
    conn: sqlite3.Connection, pki: Pki, *, agent_id: str, csr_pem: bytes | None, days: int
) -> IssuedCertificate:
    """Sign (or, without a CSR, make) an agent's certificate for `agent_id` and record it."""
    try:
        cert = pki.issue(common_name=agent_id, kind="agent", csr_pem=csr_pem, days=days)
    except ValueError as exc:
        raise EnrolmentError(f"cannot sign the request for {agent_id!r}: {exc}") from None
    _insert_certificate(conn, cert)
    return cert


def enroll_agent(
    conn: sqlite3.Connection,
    pki: Pki,
    *,
    agent_id: str,
    location: str,
    csr_pem: bytes | None,
    broker_host: str,
    broker_port: int,
    topic_prefix: str,
    days: int = 365,
) -> Enrolment:
    """Sign the agent's CSR (or make a key when `csr_pem` is None) and record the agent.

    An enrolled, unrevoked id is refused: revoke it first. A revoked id may enrol again with a
    new certificate; its old one stays on the CRL.
    """
    check_agent_id(agent_id)
    check_location(location)
    with transaction(conn):
        row = conn.execute("SELECT revoked_at FROM agents WHERE id = ?", (agent_id,)).fetchone()
        if row is not None and row["revoked_at"] is None:
            raise EnrolmentError(
                f"agent {agent_id!r} is already enrolled; revoke it first to issue a new certificate",
                conflict=True,
            )
        cert = _issue_agent(conn, pki, agent_id=agent_id, csr_pem=csr_pem, days=days)
        if row is None:
            conn.execute(
                "INSERT INTO agents(id, location, enrolled_at) VALUES (?, ?, ?)",
                (agent_id, location, _now()),
            )
        else:
            conn.execute(
                "UPDATE agents SET location = ?, enrolled_at = ?, revoked_at = NULL, online = 0 WHERE id = ?",
                (location, _now(), agent_id),
            )
    bundle = EnrolmentBundle(
        agent_id=agent_id,
        location=location,
        ca_pem=pki.ca_cert_pem.decode(),
        cert_pem=cert.cert_pem.decode(),
        broker_host=broker_host,
        broker_port=broker_port,
        topic_prefix=topic_prefix,
        not_after=cert.not_after,
    )
    return Enrolment(bundle=bundle, key_pem=cert.key_pem)


def record_certificate(conn: sqlite3.Connection, cert: IssuedCertificate) -> None:
    """Record a certificate issued outside enrolment (controller, aggregators, servers)."""
    with transaction(conn):
        _insert_certificate(conn, cert)


def revoked_serials(conn: sqlite3.Connection) -> list[tuple[int, datetime]]:
    rows = conn.execute("SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL")
    return [(int(r["serial"]), datetime.fromisoformat(r["revoked_at"])) for r in rows]


def revoke_common_name(conn: sqlite3.Connection, pki: Pki, common_name: str) -> int:
    """Put every unrevoked certificate of `common_name` on the CRL; returns how many."""
    now = _now()
    with transaction(conn):
        cur = conn.execute(
            "UPDATE certificates SET revoked_at = ? WHERE common_name = ? AND revoked_at IS NULL",
            (now, common_name),
        )
        count = cur.rowcount
        pki.write_crl(revoked_serials(conn))
    return count


def revoke_agent(conn: sqlite3.Connection, pki: Pki, agent_id: str) -> int:
    row = conn.execute("SELECT revoked_at FROM agents WHERE id = ?", (agent_id,)).fetchone()
    if row is None:
        raise EnrolmentError(f"no agent {agent_id!r} is enrolled", not_found=True)
    if row["revoked_at"] is not None:
        raise EnrolmentError(
            f"agent {agent_id!r} was already revoked at {row['revoked_at']}", conflict=True
        )
    count = revoke_common_name(conn, pki, agent_id)
    with transaction(conn):
        conn.execute(
            "UPDATE agents SET revoked_at = ?, online = 0 WHERE id = ?", (_now(), agent_id)
        )
    return count


# An agent may renew at most this often by default (`[pki] renewal_min_interval_s`): each
# renewal is a certificate that stays valid until it expires.
RENEWAL_MIN_INTERVAL = timedelta(hours=1)


def renew_agent(
    conn: sqlite3.Connection,
    pki: Pki,
    *,
    agent_id: str,
    csr_pem: bytes,
    days: int = 365,
    min_interval: timedelta = RENEWAL_MIN_INTERVAL,
    now: datetime | None = None,
) -> IssuedCertificate:
    """Sign an enrolled, unrevoked agent's renewal CSR (for its own name, whatever the CSR says)
    and record it. EnrolmentError when the agent is unknown or revoked, asked less than
    `min_interval` after its last certificate, or the request is unusable."""
    moment = now or datetime.now(UTC)
    with transaction(conn):
        row = conn.execute("SELECT revoked_at FROM agents WHERE id = ?", (agent_id,)).fetchone()
        if row is None:
            raise EnrolmentError(f"no agent {agent_id!r} is enrolled", not_found=True)
        if row["revoked_at"] is not None:
            raise EnrolmentError(f"agent {agent_id!r} is revoked", conflict=True)
        last = conn.execute(
            "SELECT max(issued_at) AS at FROM certificates WHERE common_name = ? AND kind = 'agent'",
            (agent_id,),
        ).fetchone()["at"]
        if last is not None and moment - datetime.fromisoformat(last) < min_interval:
            raise EnrolmentError(
                f"agent {agent_id!r} got a certificate at {last}: renewals are at most every "
                f"{min_interval.total_seconds():.0f} s",
                conflict=True,
            )
        cert = _issue_agent(conn, pki, agent_id=agent_id, csr_pem=csr_pem, days=days)
    return cert
