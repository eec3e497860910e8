"""An agent's failure kind becomes the orchestrator's failure reason in one place."""

from __future__ import annotations

import json

import pytest
from fedsky.controller.orchestrator.choice import FailureReason, failure_reason_of
from fedsky.shared.messages import Event, FailureKind, decode

EXPECTED = {
    FailureKind.VM_NOT_RUNNING: FailureReason.VM_LEFT_RUNNING,
    FailureKind.VM_STOPPED: FailureReason.VM_LEFT_RUNNING,
    FailureKind.VM_UNREACHABLE: FailureReason.SUPERNODE_ERROR,
    FailureKind.DATASET_MISSING: FailureReason.SUPERNODE_ERROR,
    FailureKind.NOT_PREPARED: FailureReason.SUPERNODE_ERROR,
    FailureKind.START_FAILED: FailureReason.SUPERNODE_ERROR,
    FailureKind.SUPERNODE_EXITED: FailureReason.SUPERNODE_ERROR,
    FailureKind.VM_NOT_ALLOWED: FailureReason.REFUSED_BY_HOSPITAL,
    FailureKind.BUSY: FailureReason.REFUSED_BY_HOSPITAL,
    FailureKind.DENIED: FailureReason.REFUSED_BY_HOSPITAL,
    FailureKind.NOT_ALLOWED: FailureReason.REFUSED_BY_HOSPITAL,
    FailureKind.OTHER: FailureReason.SUPERNODE_ERROR,
}


def test_every_kind_is_mapped() -> None:
    assert set(EXPECTED) == set(FailureKind)


@pytest.mark.parametrize(("kind", "reason"), EXPECTED.items())
def test_each_kind_maps_to_its_reason(kind: FailureKind, reason: FailureReason) -> None:
    event = Event(agent_id="hospital-a", kind="task_failed", failure_kind=kind, detail="x")
    assert failure_reason_of(event) is reason


@pytest.mark.parametrize(
    ("detail", "reason"),
    [
        ("vm-left-running: vm-001 is shutoff", FailureReason.VM_LEFT_RUNNING),
        ("vm-check: vm-001 is paused, not running", FailureReason.VM_LEFT_RUNNING),
        ("supernode: the SuperNode exited with code 1", FailureReason.SUPERNODE_ERROR),
    ],
)
def test_an_old_agents_event_maps_as_its_words_said(detail: str, reason: FailureReason) -> None:
    payload = {"schema": "1.0", "agent_id": "hospital-a", "kind": "task_failed", "detail": detail}
    assert failure_reason_of(decode(Event, json.dumps(payload).encode())) is reason
