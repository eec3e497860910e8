"""Making the broker refuse revoked certificates: cut the live session, refuse the next one.

A revocation writes the CRL. Mosquitto 2.0 checks a CRL it reloads (SIGHUP) on new connections
only, so a revoked client that is connected stays connected until its session is cut. With the
managed broker and its dynamic-security plugin (`bus.broker_config`), both happen at once and
nobody else is disturbed: the CRL is copied in and reloaded, and the controller's bus sends the
plugin `createClient` + `deleteClient` for the identity, which closes every connection of that
username (measured: a few ms; every other agent and aggregator stays connected).

Without the plugin the managed broker is restarted instead (every client reconnects; their
sessions and queued commands are kept), so when to restart is a choice:
- an agent revoked by the operator: at once;
- a job's aggregator identity revoked when the job ended: once no other job runs, so that no
  aggregator loses its bus mid-round; a failed restart stays pending for the next job to end.
With an external broker, its operator is told what to do (`agent_revoked`).
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
SESSION_CUT = (
    "the session was cut at once and the broker refuses the certificate from now on "
    "(no restart: every other client stayed connected)"
)


class RestartableBroker(Protocol):
    """The managed broker (`fedsky.controller.bus.supervisor.ManagedBroker`), as far as
    revocation needs it."""

    @property
    def can_cut_sessions(self) -> bool:
        """Its dynamic-security plugin is loaded."""
        ...

    async def restart(self) -> None:
        """Load the current CRL by a restart; return once it serves."""
        ...

    async def reload_crl(self) -> None:
        """Load the current CRL for new connections (SIGHUP), without a restart."""
        ...


class SessionCutter(Protocol):
    """The controller's bus, as far as revocation needs it (`ControllerBus.cut_session`)."""

    async def cut_session(self, username: str) -> None: ...


class RevocationEnforcer:
    """Applies new revocations to the broker, for the API (agents) and the job pipeline (jobs).

    `broker` is the managed broker, or None when the broker is external (or not running here).
    """

    def __init__(
        self,
        *,
        settings: BrokerConfig,
        broker: RestartableBroker | None,
        pki: Pki,
        sessions: SessionCutter | None = None,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._pki = pki
        self._sessions = sessions
        self._job_identities_pending: list[str] = []

    @property
    def job_revocations_pending(self) -> bool:
        """A job's identity was revoked and the broker does not refuse it yet."""
        return bool(self._job_identities_pending)

    async def _cut(self, identity: str) -> bool:
        """Reload the CRL and cut `identity`'s session without a restart; False when this
        broker cannot, or it failed (logged: the caller falls back to a restart)."""
        broker, sessions = self._broker, self._sessions
        if broker is None or sessions is None or not identity or not broker.can_cut_sessions:
            return False
        try:
            await broker.reload_crl()
            await sessions.cut_session(identity)
        except Exception as exc:  # the bus or the plugin: the restart still enforces it
            log.warning("cutting %s's session without a restart failed: %s", identity, exc)
            return False
        log.info("cut the session of %s; the broker refuses its certificate from now on", identity)
        return True

    async def agent_revoked(self, agent_id: str = "") -> str:
        """Enforce an agent's revocation now; says how it was (or must be) enforced.

        A failed restart raises (`BrokerError`): the revocation is written, but the caller must
        know the broker still accepts the certificate.
        """
        if self._settings.managed and self._broker is not None:
            if await self._cut(agent_id):
                return SESSION_CUT
            await self._broker.restart()
            return MANAGED_BROKER_RESTARTED
        return external_revocation_instructions(crl_path=self._pki.crl_path)

    def job_certificate_revoked(self, identity: str = "") -> None:
        """Note that an ending job's identity was revoked; `job_ended` applies it."""
        self._job_identities_pending.append(identity)

    async def job_ended(self, *, others_running: bool) -> None:
        """Apply the pending job revocations: cut each session at once where the broker can;
        otherwise restart the managed broker, unless another job runs (the last job to end
        restarts it). A failure is logged and kept pending; it never fails the job's clean-up.
        """
        pending, broker = self._job_identities_pending, self._broker
        if not pending or broker is None:
            return
        left = [identity for identity in pending if not await self._cut(identity)]
        self._job_identities_pending = left
        if not left or others_running:
            return
        self._job_identities_pending = []
        try:
            await broker.restart()
        except Exception as exc:
            self._job_identities_pending = left
            log.error("restarting the broker to apply revocations failed: %s", exc)
