"""Task events on the wire: the failure kind of schema 1.1, and events of other minor versions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fedsky.shared.messages import (
    SCHEMA_VERSION,
    ApprovalNote,
    Event,
    FailureKind,
    PayloadError,
    decode,
)
from hypothesis import given
from hypothesis import strategies as st


def event(**fields: Any) -> bytes:
    return json.dumps({"agent_id": "hospital-a", "kind": "task_failed", **fields}).encode()


def test_this_version_sends_its_kind_and_reads_it_back() -> None:
    assert SCHEMA_VERSION == "1.4"
    sent = Event(
        agent_id="hospital-a",
        kind="task_failed",
        detail="vm-left-running: vm-001 is shutoff",
        failure_kind=FailureKind.VM_STOPPED,
    )
    wire = json.loads(sent.encode())
    assert (wire["schema"], wire["failure_kind"]) == ("1.4", "vm_stopped")
    assert decode(Event, sent.encode()) == sent


@pytest.mark.parametrize("kind", list(FailureKind))
def test_every_kind_travels(kind: FailureKind) -> None:
    assert decode(Event, event(schema="1.1", failure_kind=kind.value)).failure_kind is kind


@pytest.mark.parametrize(
    ("detail", "kind"),
    [
        ("vm-left-running: vm-001 is shutoff", FailureKind.VM_STOPPED),
        ("vm-check: vm-002 is paused, not running", FailureKind.VM_NOT_RUNNING),
        ("dataset 'chest' is not configured at hospital-a", FailureKind.DATASET_MISSING),
        ("supernode: the SuperNode exited with code 1", FailureKind.OTHER),
        ("unknown task: it was not prepared here", FailureKind.OTHER),
        ("", FailureKind.OTHER),
    ],
)
def test_an_event_of_minor_0_is_accepted_and_its_kind_read_from_its_words(
    detail: str, kind: FailureKind
) -> None:
    old = decode(Event, event(schema="1.0", detail=detail))
    assert old.schema_ == "1.0"
    assert old.detail == detail
    assert old.failure_kind is kind


def test_words_count_only_for_minor_0() -> None:
    # From 1.1 on the kind is the agent's to say; a 1.1 event without one is of another kind.
    quiet = decode(Event, event(schema="1.1", detail="vm-left-running: vm-001 is shutoff"))
    assert quiet.failure_kind is FailureKind.OTHER
    # And a 1.0 agent's words never override a kind that is given.
    given_kind = decode(
        Event, event(schema="1.0", detail="vm-check: x", failure_kind="supernode_exited")
    )
    assert given_kind.failure_kind is FailureKind.SUPERNODE_EXITED


def test_only_task_failed_carries_a_kind() -> None:
    for schema in ("1.0", "1.1"):
        pong = decode(Event, event(schema=schema, kind="pong", detail="vm-left-running"))
        assert pong.failure_kind is None


@given(
    extra=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(
            lambda k: k not in Event.model_fields and k != "schema"
        ),
        st.none() | st.integers() | st.text(max_size=20) | st.lists(st.integers(), max_size=3),
        max_size=4,
    ),
    minor=st.integers(min_value=1, max_value=999),
    new_kind=st.text(min_size=1, max_size=20).filter(
        lambda k: k not in {kind.value for kind in FailureKind}
    ),
)
def test_a_newer_minor_is_accepted_its_new_fields_and_kinds_ignored(
    extra: dict[str, Any], minor: int, new_kind: str
) -> None:
    newer = decode(Event, event(schema=f"1.{minor}", detail="x", failure_kind=new_kind, **extra))
    assert newer.failure_kind is FailureKind.OTHER
    assert newer.detail == "x"
    known = decode(Event, event(schema=f"1.{minor}", failure_kind="vm_stopped", **extra))
    assert known.failure_kind is FailureKind.VM_STOPPED


def test_another_major_is_still_refused() -> None:
    with pytest.raises(PayloadError) as err:
        decode(Event, event(schema="2.0", failure_kind="vm_stopped"))
    assert err.value.reason == "schema_version"


def test_certificate_renewal_travels_as_an_event_and_a_command() -> None:
    from fedsky.shared.messages import CertificateIssuedCommand, decode_command

    csr = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
    sent = Event(agent_id="hospital-a", kind="certificate_requested", csr_pem=csr)
    assert decode(Event, sent.encode()).csr_pem == csr
    with pytest.raises(PayloadError):
        decode(Event, event(kind="certificate_requested", csr_pem="x" * 20000))
    command = CertificateIssuedCommand(
        cert_pem="-----BEGIN CERTIFICATE-----\n...",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    assert decode_command(command.encode()) == command


def test_an_approval_note_travels_and_a_bad_one_is_refused() -> None:
    sent = Event(
        agent_id="hospital-a",
        kind="task_failed",
        task_id="job-1-hospital-a-1",
        failure_kind=FailureKind.DENIED,
        approval=ApprovalNote(job_id="job-1", decision="denied", by="alice", reason="no consent"),
    )
    assert decode(Event, sent.encode()) == sent
    waiting = decode(Event, event(kind="task_awaiting_approval", schema="1.4", detail="wait"))
    assert waiting.kind == "task_awaiting_approval"
    for bad in (
        {"job_id": "job-1", "decision": "maybe", "by": "alice"},
        {"job_id": "Job 1!", "decision": "approved", "by": "alice"},
        {"job_id": "job-1", "decision": "approved", "by": "a" * 300},
    ):
        with pytest.raises(PayloadError):
            decode(Event, event(schema="1.4", approval=bad))
