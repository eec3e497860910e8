"""The aggregator provider interface: launch, health, address, terminate.

`local` runs a SuperLink process on this machine (the embedded default); `aws` and `gcp` launch a
VM. Every method is async; blocking SDK calls run in a thread inside the provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ProviderError(Exception):
    """A provider could not do what was asked; the message is safe to show (no secrets)."""


@dataclass(frozen=True)
class AggregatorSpec:
    """What to launch for one job."""

    job_id: str
    cloud: str
    region: str
    instance_type: str
    # Addresses (CIDRs) allowed to reach the SuperLink: the job's hospitals and the controller.
    allowed_sources: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregatorHandle:
    """What a provider returns from launch and needs to act on the aggregator later.

    `ref` is the provider's own reference (a pid, an instance id); it is persisted in the job
    record so that a restarted controller can still terminate the aggregator.
    """

    provider: str
    job_id: str
    ref: str
    region: str
    address: str | None = None  # host:port of the SuperLink once known


class AggregatorProvider(Protocol):
    name: str

    async def launch(self, spec: AggregatorSpec) -> AggregatorHandle: ...

    async def healthy(self, handle: AggregatorHandle) -> bool: ...

    async def address(self, handle: AggregatorHandle) -> str: ...

    async def terminate(self, handle: AggregatorHandle) -> None: ...
