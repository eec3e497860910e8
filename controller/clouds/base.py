"""The aggregator provider interface: launch, health, address, terminate.

`local` runs a SuperLink process on this machine (the embedded default); `aws` and `gcp` launch a
VM. Every method is async; blocking SDK calls run in a thread inside the provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass(frozen=True)
class AggregatorFiles:
    """Where the job's ServerApp finds its model file and its bus identity (`agg-<job id>`).

    Paths on the aggregator's host: they go into the Flower run config, and the ServerApp runs
    next to the SuperLink (on the controller for `local`, on the VM for a cloud provider).
    """

    model_file: Path
    ca: Path
    cert: Path
    key: Path


class AggregatorProvider(Protocol):
    name: str

    def aggregator_files(self, job_id: str, *, model_file: Path) -> AggregatorFiles:
        """The run config's paths; `model_file` is the controller's copy of the job's model."""
        ...

    async def launch(self, spec: AggregatorSpec) -> AggregatorHandle: ...

    async def healthy(self, handle: AggregatorHandle) -> bool: ...

    async def address(self, handle: AggregatorHandle) -> str: ...

    async def terminate(self, handle: AggregatorHandle) -> None: ...
