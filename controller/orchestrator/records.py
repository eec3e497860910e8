"""An attempt: one VM tried for one participant of one job, as the orchestrator's store keeps it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

AttemptState = Literal["assigned", "running", "succeeded", "failed", "cancelled"]
# An attempt in one of these states holds its VM (`VmCandidate.tasks` counts it).
ACTIVE_STATES: tuple[AttemptState, ...] = ("assigned", "running")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One VM tried for one participant of one job."""

    job_id: str
    participant: str
    number: int
    agent_id: str
    vm: str
    vm_key: str
    state: AttemptState
    assigned_at: float
    running_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None  # a FailureReason value when state is failed
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
