"""Making the broker refuse revoked certificates: the one policy for when it restarts.

A revocation only writes the CRL. Mosquitto 2.0 reads its CRL at start, and a restart drops
every connection (clients reconnect within seconds; their sessions and queued commands are
kept), so when to restart is a choice:

- an agent revoked by the operator: restart the managed broker now, so the agent is cut off at
  once; with an external broker, tell its operator what to do (`agent_revoked`);
- a job's aggregator certificate revoked when the job ended: restart once no other job is
  running, so that no aggregator loses its bus mid-round (`job_certificate_revoked`, then
  `job_ended`). A restart that fails stays pending for the next job to end.
"""

from __future__ import annotations

import logging
from typing import Protocol

from fedsky.controller.bus.broker_config import external_revocation_instructions
from fedsky.controller.bus.settings import BrokerConfig
from fedsky.controller.security.pki import Pki

log = logging.getLogger(__name__)

MANAGED_BROKER_RESTARTED = (
    "the managed broker was restarted and refuses the certificate from now on"
)


class RestartableBroker(Protocol):
    """The managed broker (`fedsky.controller.bus.supervisor.ManagedBroker`), as far as
    revocation needs it: a restart that loads the current CRL and returns once it serves."""

    async def restart(self) -> None: ...


class RevocationEnforcer:
    """Applies new revocations to the broker, for the API (agents) and the job pipeline (jobs).

    `broker` is the managed broker, or None when the broker is external (or not running here).
    """

    def __init__(
        self, *, settings: BrokerConfig, broker: RestartableBroker | None, pki: Pki
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._pki = pki
        self._job_revocations_pending = False

    @property
    def job_revocations_pending(self) -> bool:
        """A job's certificate was revoked and the broker has not been restarted for it yet."""
        return self._job_revocations_pending

    async def agent_revoked(self) -> str:
        """Enforce an agent's revocation now; says how it was (or must be) enforced.

        A failed restart raises (`BrokerError`): the revocation is written, but the caller must
        know the broker still accepts the certificate.
        """
        if self._settings.managed and self._broker is not None:
            await self._broker.restart()
            return MANAGED_BROKER_RESTARTED
        return external_revocation_instructions(crl_path=self._pki.crl_path)

    def job_certificate_revoked(self) -> None:
        """Note that an ending job's certificate was revoked; `job_ended` applies it."""
        self._job_revocations_pending = True

    async def job_ended(self, *, others_running: bool) -> None:
        """Restart the managed broker for the pending job revocations, unless another job runs.

        The last job to end restarts it. A failed restart is logged and kept pending, so the
        next job to end tries again; it never fails the job's clean-up.
        """
        if not self._job_revocations_pending or self._broker is None:
            return
        if others_running:
            return
        self._job_revocations_pending = False
        try:
            await self._broker.restart()
        except Exception as exc:
            self._job_revocations_pending = True
            log.error("restarting the broker to apply revocations failed: %s", exc)
