"""Agents' certificate renewal, the controller's side (the agent's is `agent/renewal.py`).

An agent sends a `certificate_requested` event with a CSR over the bus session of its current
certificate: the broker has checked that certificate (CA, CRL) and the topic is bound to its
name, which is what vouches for the request. The controller signs it for that name only (the
PKI refuses a CSR naming anyone else), at most once per `[pki] renewal_min_interval_s`, records
it, answers with a `certificate_issued` command and writes an audit record. The old certificate stays valid until
it expires (an agent that has not reconnected yet still needs it).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from fedsky.controller.bus.consumer import BusUnavailable, ControllerBus
from fedsky.controller.security.audit import AuditTrail
from fedsky.controller.security.enrollment import (
    RENEWAL_MIN_INTERVAL,
    EnrolmentError,
    renew_agent,
)
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store
from fedsky.shared.messages import CertificateIssuedCommand, Event, PayloadError, utcnow

log = logging.getLogger(__name__)

# How long the agent may take to receive its certificate (the broker keeps it queued).
ANSWER_TTL = timedelta(hours=1)


class CertificateRenewal:
    """The bus's event listener for renewals (`ControllerBus.add_event_listener`)."""

    def __init__(
        self,
        *,
        store: Store,
        pki: Pki,
        bus: ControllerBus,
        audit: AuditTrail | None,
        days: int = 365,
        min_interval: timedelta = RENEWAL_MIN_INTERVAL,
    ) -> None:
        self._store = store
        self._pki = pki
        self._bus = bus
        self._audit = audit
        self._days = days
        self._min_interval = min_interval

    async def on_event(self, event: Event) -> None:
        if event.kind != "certificate_requested":
            return
        agent_id = event.agent_id  # the sender: the consumer checked it against the topic
        if not event.csr_pem:
            raise PayloadError("bad_renewal", "a certificate_requested event without a CSR")
        try:
            cert = await self._store.run(
                renew_agent,
                self._pki,
                agent_id=agent_id,
                csr_pem=event.csr_pem.encode(),
                days=self._days,
                min_interval=self._min_interval,
            )
        except EnrolmentError as exc:
            await self._record(agent_id, f"refused: {exc}")
            log.warning("renewal for %s refused: %s", agent_id, exc)
            raise PayloadError("renewal_refused", str(exc)) from None
        command = CertificateIssuedCommand(
            cert_pem=cert.cert_pem.decode(), expires_at=utcnow() + ANSWER_TTL
        )
        try:
            await self._bus.send_command(agent_id, command)
        except BusUnavailable as exc:
            # The agent asks again in an hour; the certificate issued now is simply unused.
            await self._record(agent_id, f"issued, not sent: {exc}")
            log.warning("renewed certificate for %s not sent: %s", agent_id, exc)
            return
        await self._record(agent_id, f"ok: serial {cert.serial:x}, until {cert.not_after:%Y-%m-%d}")
        log.info(
            "renewed the certificate of %s (serial %x, valid until %s)",
            agent_id,
            cert.serial,
            cert.not_after.isoformat(),
        )

    async def _record(self, agent_id: str, outcome: str) -> None:
        if self._audit is not None:
            await self._audit.record_after_the_fact(
                actor=f"agent {agent_id} (its current certificate)",
                action="agent.renew",
                target=agent_id,
                outcome=outcome,
            )
