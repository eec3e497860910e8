"""Everything a stage of the job pipeline may use, passed to it explicitly."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from fedsky.controller.clouds.local import LocalProvider
from fedsky.controller.config import ControllerConfig
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.model_files import model_file_path
from fedsky.controller.jobs.ports import (
    CloudAccess,
    CommandSender,
    JobRevocations,
    ModelRecorder,
    RunControlFactory,
)
from fedsky.controller.orchestrator.store import QueueStore
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store
from fedsky.shared.messages import Event


@dataclass
class JobContext:
    """The parts the stages work with; one per job manager, shared by its jobs."""

    config: ControllerConfig
    store: Store
    pki: Pki
    bus: CommandSender
    models: ModelRecorder
    queue: QueueStore
    local: LocalProvider
    make_control: RunControlFactory
    revocations: JobRevocations
    clouds: CloudAccess | None = None
    # Task id -> the queue its agent's events go to while a stage or a follower waits on them.
    waiters: dict[str, asyncio.Queue[Event]] = field(default_factory=dict)

    @property
    def jobs_dir(self) -> Path:
        return self.config.state_dir / "jobs"

    def model_path(self, model_digest: str) -> Path:
        return model_file_path(self.config.state_dir, model_digest)

    async def log(self, job_id: str, message: str, level: str = "info") -> None:
        await self.store.run(jobstore.log_job, job_id, message, level)
