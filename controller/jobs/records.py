"""What the job pipeline keeps in memory for a running job, and its errors.

The job's durable state is in `jobs.store` (SQLite); these records hold what only a live run
needs: the aggregator's handle and control client, each participant's keys and current task.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from fedsky.controller.clouds.base import AggregatorHandle, AggregatorProvider
from fedsky.controller.jobs.ports import RunControl
from fedsky.controller.orchestrator.failures import FailureReason
from fedsky.controller.orchestrator.policy import MinResources
from fedsky.shared.jobspec import JobSpec
from fedsky.shared.messages import RunFinished, utcnow


class JobRejected(Exception):
    """A submission that cannot become a job; nothing was created or launched."""

    def __init__(self, message: str, *, infeasible: bool = False) -> None:
        super().__init__(message)
        self.infeasible = infeasible


class JobFailure(Exception):
    """A job that cannot go on; the message is the job's error, safe to show."""


class AttemptFailed(Exception):
    """One participant's attempt on one VM failed; the orchestrator may try its next VM."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Participant:
    """One hospital of a running job: its current attempt, task and SuperNode keys."""

    name: str
    dataset: str
    attempt: int = 0
    task_id: str | None = None
    vm: str | None = None
    node_id: int | None = None
    key_role: str = "node"
    public_keys: dict[str, str] = field(default_factory=dict)
    registered: dict[str, int] = field(default_factory=dict)  # public key text -> node id
    burnt: set[str] = field(default_factory=set)  # keys of failed nodes (unregistered)


@dataclass
class Failover:
    """A participant to move to its next VM, queued by whoever noticed its failure."""

    participant: str
    reason: FailureReason
    detail: str


@dataclass
class JobRun:
    """A job while its driver runs."""

    job_id: str
    spec: JobSpec
    directory: Path
    participants: dict[str, Participant]
    provider: AggregatorProvider | None = None
    handle: AggregatorHandle | None = None
    control: RunControl | None = None
    superlink_ca_pem: str = ""
    run_id: int | None = None
    cancel_requested: bool = False
    finished: asyncio.Future[RunFinished] | None = None
    failures: asyncio.Queue[Failover] = field(default_factory=asyncio.Queue)
    # One task per started SuperNode, following its events; cancelled when the job ends.
    followers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def new(cls, *, job_id: str, spec: JobSpec, directory: Path) -> JobRun:
        return cls(
            job_id=job_id,
            spec=spec,
            directory=directory,
            participants={
                p: Participant(name=p, dataset=spec.dataset_for(p)) for p in spec.participants
            },
        )

    def active_participants(self) -> int:
        return sum(1 for p in self.participants.values() if p.task_id)


def minimum_resources(spec: JobSpec) -> MinResources:
    r = spec.resources
    return MinResources(vcpus=r.vcpus, memory_gib=r.memory_gib, disk_gib=r.disk_gib)


def command_expiry(ttl_s: float) -> datetime:
    return utcnow() + timedelta(seconds=ttl_s)
