"""The controller's parts as one typed record: what the daemon wires and the API views use.

The daemon fills in every field; tests that serve one part leave the others `None`, and a view
whose part is missing answers 503 ("not running") rather than failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from fedsky.controller.bus.consumer import ControllerBus
from fedsky.controller.bus.supervisor import ManagedBroker
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.config import ControllerConfig
from fedsky.controller.jobs.driver import JobManager
from fedsky.controller.models.service import ModelManager
from fedsky.controller.security.aggregators import AggregatorEnrolment
from fedsky.controller.security.audit import AuditTrail
from fedsky.controller.security.pki import Pki
from fedsky.controller.security.revocation import RevocationEnforcer
from fedsky.controller.store import Store

_T = TypeVar("_T")


@dataclass
class Services:
    """Everything the views may use. Only `store` is always present."""

    store: Store
    config: ControllerConfig | None = None
    pki: Pki | None = None
    bus: ControllerBus | None = None
    broker: ManagedBroker | None = None
    revocations: RevocationEnforcer | None = None
    models: ModelManager | None = None
    clouds: CloudService | None = None
    aggregators: AggregatorEnrolment | None = None
    jobs: JobManager | None = None
    audit: AuditTrail | None = None

    def need_config(self) -> ControllerConfig:
        return _present(self.config, "the controller's configuration")

    def need_pki(self) -> Pki:
        return _present(self.pki, "the certificate authority")

    def need_bus(self) -> ControllerBus:
        return _present(self.bus, "the bus")

    def need_revocations(self) -> RevocationEnforcer:
        return _present(self.revocations, "revocation enforcement")


class PartUnavailable(Exception):
    """A part the request needs is not running in this controller (HTTP 503, exit 69)."""


def _present(part: _T | None, what: str) -> _T:
    if part is None:
        raise PartUnavailable(f"{what} is not available on this controller")
    return part
