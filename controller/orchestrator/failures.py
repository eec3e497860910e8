"""How the orchestrator names a failed attempt, and how an agent's failure kind maps onto it.

`FailureReason` is the orchestrator's word for why a task stopped (it is stored with the attempt
and shown by `fedctl job explain`); `failure_reason_of` is the one place an agent's
`task_failed` event becomes one. A VM rests after a failure (`Rest`) so no job takes it again
at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fedsky.shared.messages import Event, FailureKind


class FailureReason(StrEnum):
    """Why a task stopped: the three ways the orchestrator learns of a failure."""

    SUPERNODE_ERROR = "supernode_error"
    VM_LEFT_RUNNING = "vm_left_running"
    AGENT_UNRESPONSIVE = "agent_unresponsive"
    # The hospital's `[policy]` would not lend that VM, or not now (its cap on tasks at once).
    REFUSED_BY_HOSPITAL = "refused_by_hospital"

    @property
    def text(self) -> str:
        return _FAILURE_TEXT[self]


_FAILURE_TEXT: dict[FailureReason, str] = {
    FailureReason.SUPERNODE_ERROR: "the SuperNode exited with an error",
    FailureReason.VM_LEFT_RUNNING: "the VM left the running state",
    FailureReason.AGENT_UNRESPONSIVE: "the agent stopped answering",
    FailureReason.REFUSED_BY_HOSPITAL: "the hospital's policy refused it",
}


def reason_text(reason: str) -> str:
    """A stored reason in words; a value this version does not know is shown as it is."""
    try:
        return FailureReason(reason).text
    except ValueError:
        return reason or "unknown reason"


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt, as the job pipeline saw it."""

    reason: FailureReason
    vm_key: str
    vm: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Rest:
    """A VM is not chosen until `until` because a task on it failed."""

    until: float
    reason: str


# The VM itself went away: the failover rests it as a VM that left the running state. Every
# other kind is the SuperNode's failure on a VM that may be fine (an unreachable VM included:
# the agent reports it as a SuperNode that could not start or lost its session).
FAILURE_REASONS: dict[FailureKind, FailureReason] = {
    FailureKind.VM_NOT_RUNNING: FailureReason.VM_LEFT_RUNNING,
    FailureKind.VM_STOPPED: FailureReason.VM_LEFT_RUNNING,
    FailureKind.VM_UNREACHABLE: FailureReason.SUPERNODE_ERROR,
    FailureKind.DATASET_MISSING: FailureReason.SUPERNODE_ERROR,
    FailureKind.NOT_PREPARED: FailureReason.SUPERNODE_ERROR,
    FailureKind.START_FAILED: FailureReason.SUPERNODE_ERROR,
    FailureKind.SUPERNODE_EXITED: FailureReason.SUPERNODE_ERROR,
    FailureKind.VM_NOT_ALLOWED: FailureReason.REFUSED_BY_HOSPITAL,
    FailureKind.BUSY: FailureReason.REFUSED_BY_HOSPITAL,
    # The job pipeline ends the participant on these (no other VM of the hospital would do).
    FailureKind.DENIED: FailureReason.REFUSED_BY_HOSPITAL,
    FailureKind.NOT_ALLOWED: FailureReason.REFUSED_BY_HOSPITAL,
    FailureKind.OTHER: FailureReason.SUPERNODE_ERROR,
}


def failure_reason_of(event: Event) -> FailureReason:
    """The orchestrator's reason for an agent's `task_failed` event, from its `failure_kind`.

    A missing dataset maps to a SuperNode error here; the job pipeline fails the whole job on
    it (`FailureKind.DATASET_MISSING`) instead of failing over, as no other VM of the same
    hospital has other datasets.
    """
    return FAILURE_REASONS[event.failure_kind or FailureKind.OTHER]
