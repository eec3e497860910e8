"""What the job pipeline needs from the rest of the controller, as protocols.

The stages depend on these, not on the bus, the clouds service or the Model Manager
themselves: the daemon passes the real parts, unit tests pass small fakes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from fedsky.controller.bus.consumer import AggregatorHandler, EventListener
from fedsky.controller.clouds.base import AggregatorProvider
from fedsky.shared.flower.runconfig import RunSettings
from fedsky.shared.messages import Command, RoundMetrics
from fedsky.shared.metrics import DEFAULT_SELECTION_METRIC


class CommandSender(Protocol):
    """The controller's bus, as far as jobs use it: commands to an agent."""

    async def send_command(self, agent_id: str, command: Command) -> None: ...


class JobBus(CommandSender, Protocol):
    """The bus as the job manager subscribes to it: agents' events and aggregators' messages."""

    aggregator_handler: AggregatorHandler | None

    def add_event_listener(self, listener: EventListener) -> None: ...


class RunControl(Protocol):
    """The control surface of a job's SuperLink (see `clouds.superlink.SuperLinkControl`)."""

    async def register_node(self, public_key: Path, *, name: str | None = None) -> int: ...

    async def unregister_node(self, node_id: int) -> None: ...

    async def start_run(
        self, *, app_dir: Path, settings: RunSettings, run_config_file: Path
    ) -> int: ...

    async def run_status(self, run_id: int) -> str: ...


class RunControlFactory(Protocol):
    def __call__(
        self,
        *,
        flwr_home: Path,
        address: str,
        root_ca: Path,
        client_identity: tuple[Path, Path] | None,
    ) -> RunControl: ...


class CloudAccess(Protocol):
    """Linked cloud accounts, as far as jobs use them: where to place, what launches."""

    async def linked_clouds(self) -> list[str]: ...

    async def provider_for_launch(self, cloud: str, *, region: str) -> AggregatorProvider: ...

    async def provider(self, name: str) -> AggregatorProvider: ...


class ModelRecorder(Protocol):
    """The Model Manager, as far as jobs use it: a job's record and each round's model."""

    async def record_job(
        self,
        *,
        job_id: str,
        name: str | None = None,
        selection_metric: str = DEFAULT_SELECTION_METRIC,
        hyperparameters: Mapping[str, object] | None = None,
        model_digest: str | None = None,
        participants: Sequence[str] = (),
        datasets: Sequence[str] | Mapping[str, str] = (),
    ) -> object: ...

    async def record_round_message(
        self, message: RoundMetrics, *, weights: bytes | None
    ) -> object: ...

    async def finish_job(self, *, job_id: str, status: str) -> None: ...


class JobRevocations(Protocol):
    """Enforcing an ended job's revoked certificates (see `security.revocation`)."""

    def job_certificate_revoked(self, identity: str = "") -> None: ...

    async def job_ended(self, *, others_running: bool) -> None: ...
