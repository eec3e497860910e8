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
from fedsky.controller.security.audit import AuditTrail
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store
from fedsky.shared.messages import Event, PayloadError


@dataclass(frozen=True)
class TaskWaiter:
    """A task's agent, and the queue for the events that agent sends about it."""

    agent_id: str
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)


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
    # The audit log (hospitals' decisions on jobs); None in tests of bare stages.
    audit: AuditTrail | None = None
    # Task id -> its agent and the queue that agent's events for it go to while a stage or a
    # follower waits on them.
    waiters: dict[str, TaskWaiter] = field(default_factory=dict)

    def wait_on_task(self, task_id: str, *, agent_id: str) -> asyncio.Queue[Event]:
        """The queue the task's events will arrive on: only those its own agent sends."""
        waiter = TaskWaiter(agent_id=agent_id)
        self.waiters[task_id] = waiter
        return waiter.events

    def route_event(self, event: Event) -> bool:
        """Hand an agent's event to whoever waits on its task. Task ids are predictable
        (`{job}-{participant}-{attempt}`), so an event for a task another agent runs is refused
        (PayloadError, counted against its sender) before it can fail, stop or take over the task.
        True when a waiter took it."""
        if event.task_id is None:
            return False
        waiter = self.waiters.get(event.task_id)
        if waiter is None:
            return False
        if event.agent_id != waiter.agent_id:
            raise PayloadError(
                "foreign_task", f"task {event.task_id} is not {event.agent_id}'s: event ignored"
            )
        waiter.events.put_nowait(event)
        return True

    @property
    def jobs_dir(self) -> Path:
        return self.config.state_dir / "jobs"

    def model_path(self, model_digest: str) -> Path:
        return model_file_path(self.config.state_dir, model_digest)

    async def log(self, job_id: str, message: str, level: str = "info") -> None:
        await self.store.run(jobstore.log_job, job_id, message, level)

    async def audit_after_the_fact(
        self, *, actor: str, action: str, target: str, outcome: str
    ) -> None:
        if self.audit is not None:
            await self.audit.record_after_the_fact(
                actor=actor, action=action, target=target, outcome=outcome
            )
