"""How a cloud aggregator VM gets its certificates without a private key ever travelling.

The controller puts a one-time enrolment token in the VM's startup script. The VM makes two
keys, one for the SuperLink's TLS and one for the ServerApp's bus identity (`agg-<job id>`),
sends both CSRs with the token to `POST /v1/aggregators/enroll`, and gets back a server
certificate and an `aggregator` client certificate from the controller's CA, the broker's
public address and the digest of the job's model file. With its new client certificate it then
fetches the model file (`GET /v1/aggregators/model`, mutual TLS) and checks the digest. The
token:

- is 256 random bits, shown once (in the startup script) and stored only as its SHA-256 (a
  leaked database does not let anyone enrol; a fast hash suffices for random tokens);
- is single use: redeeming marks it used inside one `BEGIN IMMEDIATE` transaction;
- expires (`clouds.token_ttl_s`, 30 min by default: long enough for boot and the install) and is revoked when the job's aggregator is terminated;
- only yields a certificate for the names the controller recorded for that job (`bind`, done
  once the cloud reports the VM's public address). The CSR's own names are ignored: a stolen
  token cannot get a certificate for the broker's name or anyone else's. Until the address is
  bound the token answers "not ready" (409) without being spent, and the VM retries. The bus
  certificate is `agg-<job id>`'s whatever the CSR asks, carries no names, and is revoked with
  the job's other certificates when the job ends.

The module also gives the providers the startup script (`VmBootstrap`: a fresh token inside the
script `startup_script.py` renders, bash: cloud-init user data on EC2, the `startup-script`
metadata on GCE) and holds the readiness probe, the one seam tests replace (instances in moto and
in the local GCP fake run nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import sqlite3
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fedsky.controller.clouds.common import wait_superlink_answers
from fedsky.controller.security.pki import IssuedCertificate, Pki, PkiError
from fedsky.controller.security.startup_script import aggregator_artifacts, render_startup_script
from fedsky.controller.store import Store, transaction
from fedsky.shared.ids import aggregator_id

log = logging.getLogger(__name__)

TOKEN_PREFIX = "fsk1_"  # noqa: S105 - a marker that makes leaked tokens easy to find, not a secret

MODEL_PATH = "/v1/aggregators/model"


SCHEMA = [
    """
    CREATE TABLE bootstrap_tokens (
        token_hash TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        common_name TEXT NOT NULL,
        dns_names TEXT,
        ip_addresses TEXT,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT,
        revoked_at TEXT
    )
    """,
    "CREATE INDEX bootstrap_tokens_job ON bootstrap_tokens(job_id)",
]


class TokenError(Exception):
    """A token that cannot be redeemed. `reason` is for the log; callers answer generically."""

    def __init__(self, reason: str, *, not_ready: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.not_ready = not_ready


@dataclass(frozen=True)
class TokenGrant:
    """What a redeemed token entitles the VM to."""

    job_id: str
    common_name: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def ensure_schema(store: Store) -> None:
    store.ensure_schema("bootstrap_tokens", SCHEMA)


def issue_token(
    conn: sqlite3.Connection, *, job_id: str, ttl_s: float, now: datetime | None = None
) -> str:
    """Make a token for the aggregator of `job_id`; returns it (the only time it is seen)."""
    now = now or _now()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction(conn):
        conn.execute(
            "INSERT INTO bootstrap_tokens(token_hash, job_id, common_name, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                hash_token(token),
                job_id,
                aggregator_id(job_id),
                now.isoformat(),
                (now + timedelta(seconds=ttl_s)).isoformat(),
            ),
        )
    return token


def bind_addresses(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    ip_addresses: Sequence[str],
    dns_names: Sequence[str] = (),
) -> int:
    """Record the names the job's certificate will carry; returns the number of tokens bound."""
    with transaction(conn):
        return conn.execute(
            "UPDATE bootstrap_tokens SET ip_addresses = ?, dns_names = ? "
            "WHERE job_id = ? AND used_at IS NULL AND revoked_at IS NULL",
            (json.dumps(list(ip_addresses)), json.dumps(list(dns_names)), job_id),
        ).rowcount


def revoke_tokens(conn: sqlite3.Connection, *, job_id: str, now: datetime | None = None) -> int:
    with transaction(conn):
        return conn.execute(
            "UPDATE bootstrap_tokens SET revoked_at = ? WHERE job_id = ? AND used_at IS NULL AND revoked_at IS NULL",
            ((now or _now()).isoformat(), job_id),
        ).rowcount


def _check(row: sqlite3.Row | None, now: datetime) -> TokenGrant:
    if row is None:
        raise TokenError("unknown token")
    if row["revoked_at"] is not None:
        raise TokenError(f"token of job {row['job_id']} was revoked")
    if row["used_at"] is not None:
        raise TokenError(f"token of job {row['job_id']} was already used at {row['used_at']}")
    if datetime.fromisoformat(row["expires_at"]) <= now:
        raise TokenError(f"token of job {row['job_id']} expired at {row['expires_at']}")
    if row["ip_addresses"] is None:
        raise TokenError(
            f"address of job {row['job_id']}'s aggregator not known yet", not_ready=True
        )
    return TokenGrant(
        job_id=row["job_id"],
        common_name=row["common_name"],
        dns_names=tuple(json.loads(row["dns_names"] or "[]")),
        ip_addresses=tuple(json.loads(row["ip_addresses"])),
    )


def redeem_token(
    conn: sqlite3.Connection,
    token: str,
    *,
    use: Callable[[TokenGrant], Any] | None = None,
    now: datetime | None = None,
) -> TokenGrant:
    """Check and spend `token` atomically; `use(grant)` runs inside the same transaction.

    If `use` raises (e.g. the CSR does not verify), nothing is spent: the VM may try again.
    """
    now = now or _now()
    with transaction(conn):
        row = conn.execute(
            "SELECT * FROM bootstrap_tokens WHERE token_hash = ?", (hash_token(token),)
        ).fetchone()
        grant = _check(row, now)
        if use is not None:
            use(grant)
        conn.execute(
            "UPDATE bootstrap_tokens SET used_at = ? WHERE token_hash = ?",
            (now.isoformat(), hash_token(token)),
        )
    return grant


# -- the enrolment itself --------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerEndpoint:
    """The broker as the aggregator VM reaches it (the controller's `broker.public_host`)."""

    host: str
    port: int
    topic_prefix: str


@dataclass(frozen=True)
class EnrolledAggregator:
    """The enrolment's answer: the certificates, where the broker is, the model to fetch."""

    job_id: str
    cert_pem: bytes  # the SuperLink's server certificate
    ca_pem: bytes
    bus_cert_pem: bytes  # agg-<job id>, an `aggregator` client certificate
    broker: BrokerEndpoint
    model_sha256: str | None  # None only for a token whose job has no record


@dataclass(frozen=True)
class AggregatorCertificates:
    """What one token redemption signed."""

    job_id: str
    server: IssuedCertificate
    bus: IssuedCertificate


def enroll_aggregator(
    conn: sqlite3.Connection,
    pki: Pki,
    *,
    token: str,
    csr_pem: bytes,
    bus_csr_pem: bytes,
    days: int,
) -> AggregatorCertificates:
    """Redeem `token` for the SuperLink's server certificate and the ServerApp's bus certificate.

    The server certificate's names are the ones bound to the token (the VM's public address)
    plus `localhost`/`127.0.0.1` for checks on the VM itself; the CSR's names are ignored (its
    subject must be the aggregator's name). The bus certificate is an `aggregator` client
    certificate for `agg-<job id>` without names, on a key of its own. A CSR the CA refuses
    raises `PkiError` and spends nothing.
    """
    issued: list[tuple[IssuedCertificate, IssuedCertificate]] = []

    def sign(grant: TokenGrant) -> None:
        server = pki.issue(
            common_name=grant.common_name,
            kind="server",
            csr_pem=csr_pem,
            dns_names=[*grant.dns_names, "localhost"],
            ip_addresses=[*grant.ip_addresses, "127.0.0.1"],
            days=days,
        )
        bus = pki.issue(
            common_name=grant.common_name, kind="aggregator", csr_pem=bus_csr_pem, days=days
        )
        # Two keys: the SuperLink's (serving the internet) and the bus identity's stay apart.
        if _public_key(server) == _public_key(bus):
            raise PkiError("the bus CSR must be for a key of its own, not the SuperLink's")
        issued.append((server, bus))

    grant = redeem_token(conn, token, use=sign)
    server, bus = issued[0]
    log.info(
        "aggregator of job %s enrolled: server certificate serial %s for %s, bus certificate "
        "serial %s",
        grant.job_id,
        server.serial,
        grant.ip_addresses,
        bus.serial,
    )
    return AggregatorCertificates(job_id=grant.job_id, server=server, bus=bus)


def _public_key(cert: IssuedCertificate) -> bytes:
    return (
        x509.load_pem_x509_certificate(cert.cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


# -- what the providers use ----------------------------------------------------------------------

HealthCheck = Callable[[str], Awaitable[bool]]


def tls_probe(ca_pem: bytes, *, timeout_s: float = 5.0) -> HealthCheck:
    """A readiness probe: a TLS handshake with `host:port` that verifies fedsky's CA and the name.

    A SuperLink that answers with a certificate from our CA for its own address is up and
    enrolled; anything else (refused, timeout, wrong certificate) is not ready yet.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    async def probe(address: str) -> bool:
        host, _, port = address.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host.strip("[]"), int(port), ssl=ctx, server_hostname=host.strip("[]")
                ),
                timeout_s,
            )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            log.debug("aggregator at %s not ready: %s", address, exc)
            return False
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return True

    return probe


@dataclass(frozen=True)
class TokenIssuer:
    """The token functions over a store, for the providers (async, off the event loop)."""

    store: Store
    ttl_s: float

    async def issue(self, job_id: str) -> str:
        return await self.store.run(lambda conn: issue_token(conn, job_id=job_id, ttl_s=self.ttl_s))

    async def bind(
        self, job_id: str, *, ip_addresses: Sequence[str], dns_names: Sequence[str] = ()
    ) -> None:
        await self.store.run(
            lambda conn: bind_addresses(
                conn, job_id=job_id, ip_addresses=ip_addresses, dns_names=dns_names
            )
        )

    async def revoke(self, job_id: str) -> None:
        await self.store.run(lambda conn: revoke_tokens(conn, job_id=job_id))


@dataclass(frozen=True)
class VmBootstrap:
    """Everything a cloud provider needs to start an aggregator VM that enrols itself."""

    tokens: TokenIssuer
    enroll_url: str | None
    ca_pem: bytes
    superlink_port: int
    preinstalled: bool
    health_check: HealthCheck
    ready_timeout_s: float
    poll_interval_s: float
    controller_uid: str
    # The wheelhouse whose manifest pins the install (`[artifacts] dir`), and a mirror of it.
    artifacts_dir: Path | None = None
    artifacts_url: str | None = None

    async def wait_answers(self, address: str, *, ref: str, console_hint: str) -> None:
        """Wait until the machine's SuperLink answers at `address` with a certificate from
        fedsky's CA (`ready_timeout_s`); ProviderError naming `console_hint` when it does not."""
        await wait_superlink_answers(
            health_check=self.health_check,
            address=address,
            timeout_s=self.ready_timeout_s,
            interval_s=self.poll_interval_s,
            ref=ref,
            console_hint=console_hint,
        )

    async def startup_script(self, job_id: str) -> str:
        """A fresh token for `job_id`'s aggregator, inside the script that redeems it.

        ValueError (before any token is made) when the controller has no enrolment URL, or no
        wheelhouse to pin the install to (unless the image has fedsky preinstalled).
        """
        if not self.enroll_url:
            raise ValueError(
                "clouds.enroll_url is not set: aggregator VMs would have nowhere to enrol"
            )
        artifacts = None
        if not self.preinstalled:
            if self.artifacts_dir is None:
                raise ValueError("the controller has no artifacts directory to pin the install to")
            artifacts = await asyncio.to_thread(
                aggregator_artifacts,
                directory=self.artifacts_dir,
                enroll_url=self.enroll_url,
                mirror_url=self.artifacts_url,
            )
        token = await self.tokens.issue(job_id)
        return render_startup_script(
            job_id=job_id,
            token=token,
            enroll_url=self.enroll_url,
            ca_pem=self.ca_pem.decode(),
            port=self.superlink_port,
            artifacts=artifacts,
            preinstalled=self.preinstalled,
        )
