"""The audit log: who did what, when, with what outcome; append-only and chained by hash.

Each record's hash covers its fields and the previous record's hash, so editing or removing a
record breaks the chain at that record. Removing the *last* records leaves a shorter chain that
still holds: the chain's head (sequence, hash) is therefore also kept outside the table, in
`audit-head.json` beside the database, signed with the controller's key; `verify` checks the
chain and that it ends where the signed head says.

The head is written before the record's transaction commits: a crash between the two leaves the
head one record ahead of the table, which `verify` reports (with the reason) rather than hides.

The table refuses UPDATE and DELETE by trigger (a mistake in fedsky's own code cannot rewrite
history); someone editing the file directly is what the chain and the head catch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fedsky.controller.store import Store, transaction
from fedsky.shared.files import atomic_write

log = logging.getLogger(__name__)

HEAD_FILE = "audit-head.json"
GENESIS = "0" * 64
MAX_FIELD = 500  # a target or a detail longer than this is cut (and marked)

SCHEMA = [
    """
    CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )
    """,
    """
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END
    """,
    """
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END
    """,
]

FIELDS = ("seq", "at", "actor", "action", "target", "outcome", "detail", "prev_hash")
_INSERT = (
    "INSERT INTO audit_log(seq, at, actor, action, target, outcome, detail, prev_hash, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def ensure_schema(store: Store) -> None:
    store.ensure_schema("audit", SCHEMA)


class AuditError(Exception):
    """The audit log cannot be written or read."""


def record_hash(record: dict[str, Any]) -> str:
    """The hash of a record: SHA-256 over its fields (and the previous hash) as canonical JSON."""
    canonical = json.dumps([record[f] for f in FIELDS], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 1] + "…"


# -- the signed head ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSigner:
    """Signs the chain's head with the controller's key; the head carries the certificate, so
    a copy of the database and its head can be checked elsewhere against the CA."""

    path: Path
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes

    @classmethod
    def load(cls, *, path: Path, key_file: Path, cert_file: Path) -> HeadSigner:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AuditError(f"{key_file}: the audit head is signed with an EC key")
        return cls(path=path, key=key, cert_pem=cert_file.read_bytes())

    def write(self, seq: int, head_hash: str) -> None:
        message = _head_message(seq, head_hash)
        signature = self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        body = {
            "seq": seq,
            "hash": head_hash,
            "signature": base64.b64encode(signature).decode(),
            "certificate": self.cert_pem.decode(),
        }
        atomic_write(self.path, json.dumps(body, indent=1).encode(), mode=0o600)


def _head_message(seq: int, head_hash: str) -> bytes:
    return f"fedsky-audit-head:{seq}:{head_hash}".encode()


# -- writing -----------------------------------------------------------------------------------


def append(
    conn: sqlite3.Connection,
    *,
    actor: str,
    action: str,
    target: str,
    outcome: str,
    detail: str = "",
    signer: HeadSigner | None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """Append one record (in the store's thread) and move the signed head to it."""
    with transaction(conn):
        last = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        record: dict[str, Any] = {
            "seq": (int(last["seq"]) + 1) if last else 1,
            "at": (at or datetime.now(UTC)).isoformat(),
            "actor": _cut(actor),
            "action": _cut(action),
            "target": _cut(target),
            "outcome": _cut(outcome),
            "detail": _cut(detail),
            "prev_hash": str(last["hash"]) if last else GENESIS,
        }
        record["hash"] = record_hash(record)
        conn.execute(_INSERT, [record[f] for f in (*FIELDS, "hash")])
        if signer is not None:
            try:
                signer.write(record["seq"], record["hash"])
            except OSError as exc:
                raise AuditError(f"cannot write the audit head {signer.path}: {exc}") from None
    return record


def list_records(
    conn: sqlite3.Connection, *, after: int = 0, limit: int = 100, last: bool = False
) -> list[dict[str, Any]]:
    """Records after `after` in order, at most `limit`; with `last`, the latest `limit` of them
    (still oldest first)."""
    if last:
        rows = conn.execute(
            "SELECT * FROM (SELECT * FROM audit_log WHERE seq > ? ORDER BY seq DESC LIMIT ?) "
            "ORDER BY seq",
            (after, limit),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT * FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
    return [dict(r) for r in rows]


# -- verifying ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
        }


def verify_chain(rows: Sequence[dict[str, Any]]) -> Verdict:
    """Check that `rows` (in seq order) number 1, 2, ... and each hashes to itself and links to
    the one before."""
    prev_hash = GENESIS
    for expected_seq, row in enumerate(rows, start=1):
        seq = int(row["seq"])
        if seq != expected_seq:
            return Verdict(False, len(rows), expected_seq, f"record {expected_seq} is missing")
        if row["prev_hash"] != prev_hash:
            return Verdict(False, len(rows), seq, f"record {seq} does not follow record {seq - 1}")
        if record_hash(row) != row["hash"]:
            return Verdict(False, len(rows), seq, f"record {seq} was changed after it was written")
        prev_hash = row["hash"]
    return Verdict(True, len(rows))


def verify_head(
    head: dict[str, Any], rows: Sequence[dict[str, Any]], *, ca_cert_pem: bytes | None
) -> Verdict:
    """Check the signed head against a chain that holds: signed by a certificate from the CA,
    and the chain ends at its sequence and hash."""
    count = len(rows)
    try:
        seq, head_hash = int(head["seq"]), str(head["hash"])
        signature = base64.b64decode(head["signature"], validate=True)
        cert = x509.load_pem_x509_certificate(str(head["certificate"]).encode())
    except (KeyError, TypeError, ValueError):
        return Verdict(False, count, None, "the signed head is malformed")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return Verdict(False, count, None, "the signed head's certificate has no EC key")
    try:
        public.verify(signature, _head_message(seq, head_hash), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return Verdict(False, count, None, "the head's signature does not match it")
    if ca_cert_pem is not None:
        ca = x509.load_pem_x509_certificate(ca_cert_pem)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return Verdict(False, count, None, "the head is not signed by a certificate of the CA")
    if seq > count:
        return Verdict(
            False,
            count,
            count + 1,
            f"the signed head is at record {seq} but the log ends at {count}: "
            f"records {count + 1}-{seq} were removed",
        )
    if seq < count:
        return Verdict(
            False,
            count,
            seq + 1,
            f"records after {seq} are not covered by the signed head (added outside fedsky)",
        )
    if count and rows[-1]["hash"] != head_hash:
        return Verdict(False, count, seq, f"record {seq} is not the one the head was signed for")
    return Verdict(True, count)


def verify(conn: sqlite3.Connection, *, head_path: Path, ca_cert_pem: bytes | None) -> Verdict:
    """The whole check: the chain, then the signed head (which must exist once there is a
    record)."""
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY seq").fetchall()]
    except sqlite3.Error as exc:
        return Verdict(False, 0, None, f"the audit log cannot be read: {exc}")
    chain = verify_chain(rows)
    if not chain.ok:
        return chain
    try:
        head = json.loads(head_path.read_text())
    except FileNotFoundError:
        if not rows:
            return Verdict(True, 0)
        return Verdict(False, len(rows), None, f"the signed head {head_path} is missing")
    except (OSError, ValueError):
        return Verdict(False, len(rows), None, f"the signed head {head_path} cannot be read")
    if not isinstance(head, dict):
        return Verdict(False, len(rows), None, "the signed head is malformed")
    return verify_head(head, rows, ca_cert_pem=ca_cert_pem)


def verify_file(db_path: Path, *, head_path: Path, ca_cert_pem: bytes | None) -> Verdict:
    """Check a copy of the database offline (read-only)."""
    if not db_path.is_file():
        raise AuditError(f"no database at {db_path}")
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open {db_path}: {exc}") from None
    conn.row_factory = sqlite3.Row
    try:
        return verify(conn, head_path=head_path, ca_cert_pem=ca_cert_pem)
    finally:
        conn.close()


class AuditTrail:
    """The daemon's writer: records go through the store's thread; the head is signed."""

    def __init__(self, *, store: Store, signer: HeadSigner | None, ca_cert_pem: bytes | None):
        self.store = store
        self.signer = signer
        self.ca_cert_pem = ca_cert_pem

    async def record(
        self, *, actor: str, action: str, target: str, outcome: str, detail: str = ""
    ) -> dict[str, Any]:
        return await self.store.run(
            append,
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            detail=detail,
            signer=self.signer,
        )

    async def record_after_the_fact(
        self, *, actor: str, action: str, target: str, outcome: str
    ) -> None:
        """`record` for an action that already happened: a failure to write is logged (the log
        then says the record is missing), never raised into the action's answer."""
        try:
            await self.record(actor=actor, action=action, target=target, outcome=outcome)
        except Exception:
            log.exception("cannot write the audit record of %s by %s", action, actor)

    async def records(
        self, *, after: int = 0, limit: int = 100, last: bool = False
    ) -> list[dict[str, Any]]:
        return await self.store.run(list_records, after=after, limit=limit, last=last)

    async def verify(self) -> Verdict:
        head_path = self.signer.path if self.signer else self.store.path.parent / HEAD_FILE
        return await self.store.run(verify, head_path=head_path, ca_cert_pem=self.ca_cert_pem)
