"""Cloud aggregator VMs: redeeming a VM's one-time token for its certificates, and handing its
job's model file to the aggregator that proves who it is.

The token and the certificates it buys are described in `bootstrap_tokens`; the routes that call
this are `POST /v1/aggregators/enroll` and `GET /v1/aggregators/model` (`api/clouds.py`), served
on the enrolment listener the clouds can reach.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedsky.controller.config import ControllerConfig
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.model_files import model_file_path
from fedsky.controller.security import bootstrap_tokens
from fedsky.controller.security.bootstrap_tokens import (
    AggregatorCertificates,
    BrokerEndpoint,
    EnrolledAggregator,
)
from fedsky.controller.security.enrollment import record_certificate
from fedsky.controller.security.pki import Pki, PkiError
from fedsky.controller.store import Store
from fedsky.shared.ids import AGGREGATOR_PREFIX, is_aggregator_id

log = logging.getLogger(__name__)


class AggregatorAccessError(Exception):
    """An aggregator's request that cannot be served; the message is safe to show."""


class AggregatorRefused(AggregatorAccessError):
    """The client is not a live aggregator of this controller (no valid bus certificate)."""


class ModelUnavailable(AggregatorAccessError):
    """The aggregator is known, but its job has ended or its model file is gone."""


class AggregatorEnrolment:
    """Certificates for aggregator VMs, and their jobs' model files.

    `broker` is what an enrolled VM is told to connect to; the model files are the job
    pipeline's, kept by digest under `state_dir`.
    """

    def __init__(
        self, *, store: Store, pki: Pki, broker: BrokerEndpoint, state_dir: Path, cert_days: int
    ) -> None:
        self.store = store
        self.pki = pki
        self.broker = broker
        self.state_dir = state_dir
        self.cert_days = cert_days

    @classmethod
    def open(cls, *, config: ControllerConfig, store: Store, pki: Pki) -> AggregatorEnrolment:
        """Declare the tables enrolment reads (tokens; jobs for the model and the state)."""
        bootstrap_tokens.ensure_schema(store)
        jobstore.ensure_schema(store)
        return cls(
            store=store,
            pki=pki,
            broker=BrokerEndpoint(
                host=config.broker_public_host,
                port=config.broker.port,
                topic_prefix=config.bus.topic_prefix,
            ),
            state_dir=config.state_dir,
            cert_days=config.clouds.cert_days,
        )

    def model_path(self, model_digest: str) -> Path:
        """Where the job pipeline keeps the model file of digest `model_digest`."""
        return model_file_path(self.state_dir, model_digest)

    async def enroll(self, *, token: str, csr_pem: bytes, bus_csr_pem: bytes) -> EnrolledAggregator:
        """Redeem a VM's one-time token for its two certificates (see `bootstrap_tokens`).

        TokenError for a token that cannot be redeemed (yet), PkiError for a CSR the CA refuses.
        Both certificates are recorded, so the job's end revokes them by name with the rest of
        `agg-<job>`'s.
        """
        pki, days = self.pki, self.cert_days

        def enroll(conn: sqlite3.Connection) -> AggregatorCertificates:
            return bootstrap_tokens.enroll_aggregator(
                conn, pki, token=token, csr_pem=csr_pem, bus_csr_pem=bus_csr_pem, days=days
            )

        certs = await self.store.run(enroll)
        for issued in (certs.server, certs.bus):
            try:
                await self.store.run(record_certificate, issued)
            except Exception:  # issued already; a missing record only weakens revocation by name
                log.exception(
                    "could not record the %s certificate of job %s's aggregator",
                    issued.kind,
                    certs.job_id,
                )
        try:
            job = await self.store.run(jobstore.get_job, certs.job_id)
            model_sha256: str | None = str(job["model_digest"])
        except jobstore.JobNotFound:
            log.error("aggregator of job %s enrolled, but the job has no record", certs.job_id)
            model_sha256 = None
        return EnrolledAggregator(
            job_id=certs.job_id,
            cert_pem=certs.server.cert_pem,
            ca_pem=pki.ca_cert_pem,
            bus_cert_pem=certs.bus.cert_pem,
            broker=self.broker,
            model_sha256=model_sha256,
        )

    async def model_file(self, peer_cert_der: bytes | None) -> tuple[Path, str]:
        """The model file (path, SHA-256) of the job whose aggregator presented `peer_cert_der`.

        Only to a bus certificate this CA issued to `agg-<job id>`, recorded as an `aggregator`
        certificate and not revoked (AggregatorRefused), of a job that is still active
        (ModelUnavailable).
        """
        refused = AggregatorRefused("a valid aggregator bus certificate is required (mutual TLS)")
        if not peer_cert_der:
            raise refused
        try:
            cert = x509.load_der_x509_certificate(peer_cert_der)
            self.pki.verify(cert.public_bytes(serialization.Encoding.PEM))
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            common_name = str(names[0].value) if names else ""
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, PkiError, x509.ExtensionNotFound):
            raise refused from None
        if not is_aggregator_id(common_name) or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise refused
        job_id = common_name.removeprefix(AGGREGATOR_PREFIX)
        serial = str(cert.serial_number)

        def lookup(conn: sqlite3.Connection) -> tuple[sqlite3.Row | None, dict[str, Any] | None]:
            row: sqlite3.Row | None = conn.execute(
                "SELECT common_name, kind, revoked_at FROM certificates WHERE serial = ?",
                (serial,),
            ).fetchone()
            try:
                return row, jobstore.get_job(conn, job_id)
            except jobstore.JobNotFound:
                return row, None

        row, job = await self.store.run(lookup)
        if (
            row is None
            or row["common_name"] != common_name
            or row["kind"] != "aggregator"
            or row["revoked_at"] is not None
        ):
            raise refused
        if job is None or job["state"] not in jobstore.ACTIVE_STATES:
            raise ModelUnavailable(f"job {job_id} is not active")
        digest = str(job["model_digest"])
        path = self.model_path(digest)
        if not path.is_file():
            raise ModelUnavailable(f"the model file of job {job_id} is missing")
        return path, digest
