"""What a hospital allows: `[policy]` in agent.toml (datasets, VMs, tasks at once) and its IT's
approval of each job (`agentctl jobs pending|list|approve|deny`).

Real parts: the task runner with the `local` executor, the approvals file (SQLite) shared by
the runner and agentctl as two processes would, the events decoded as the controller does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fedsky.agent.cli import main as agentctl
from fedsky.agent.config import load_agent_config
from fedsky.agent.executors.base import LocalExecutorConfig
from fedsky.agent.policy import (
    ApprovalBook,
    DecisionError,
    PolicySection,
    refusal,
)
from fedsky.agent.runner import TaskRunner
from fedsky.controller.orchestrator.failures import FailureReason, failure_reason_of
from fedsky.shared.config import ConfigError
from fedsky.shared.datasets import BundledDatasetSpec
from fedsky.shared.messages import (
    Event,
    FailureKind,
    PrepareTaskCommand,
    StopTaskCommand,
    VmInfo,
    decode,
    utcnow,
)

T = TypeVar("T")
AGENT = "hospital-a"


def test_the_policy_refuses_what_the_hospital_does_not_lend() -> None:
    def check(**kw: Any) -> Any:
        base: dict[str, Any] = {
            "agent_id": AGENT,
            "dataset": "digits",
            "vm": "vm-001",
            "active_tasks": 0,
            "datasets": None,
            "vms": None,
            "max_tasks": None,
        }
        return refusal(**{**base, **kw})

    assert check() is None
    assert check(datasets=["digits"], vms=["vm-001"], max_tasks=1) is None
    not_lent = check(datasets=["xray"])
    assert not_lent.kind is FailureKind.NOT_ALLOWED
    assert "'digits'" in not_lent.detail
    assert "policy.datasets" in not_lent.detail
    vm = check(vms=["vm-002"])
    assert vm.kind is FailureKind.VM_NOT_ALLOWED
    assert "vm-001" in vm.detail
    assert "policy.vms" in vm.detail
    busy = check(max_tasks=2, active_tasks=2)
    assert busy.kind is FailureKind.BUSY
    assert "policy.max_tasks" in busy.detail


def test_a_policy_naming_an_unconfigured_dataset_is_refused_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'one_box = true\n[datasets.digits]\nkind = "digits"\n'
        '[policy]\ndatasets = ["digits", "xray"]\napproval = "manual"\n'
    )
    with pytest.raises(ConfigError, match=r"policy.*'xray'.*not configured"):
        load_agent_config(path)
    path.write_text('one_box = true\n[policy]\napproval = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"policy\.approval"):
        load_agent_config(path)
    path.write_text(
        'one_box = true\n[datasets.digits]\nkind = "digits"\n'
        '[policy]\ndatasets = ["digits"]\nmax_tasks = 1\napproval = "manual"\n'
    )
    policy = load_agent_config(path).policy
    assert policy == PolicySection(datasets=["digits"], max_tasks=1, approval="manual")


def _prepare(task_id: str = "t1", *, job: str = "job-1", vm: str = "vm-001") -> PrepareTaskCommand:
    return PrepareTaskCommand(
        task_id=task_id,
        job_id=job,
        vm=vm,
        dataset="digits",
        expires_at=utcnow() + timedelta(minutes=1),
    )


def test_the_approvals_file_keeps_waiting_tasks_and_one_decision_per_job(tmp_path: Path) -> None:
    path = tmp_path / "approvals.db"
    daemon, it = ApprovalBook(path), ApprovalBook(path, create=False)
    with pytest.raises(DecisionError, match=r"does not exist yet"):
        it.decide("job-1", approve=True, by="alice")
    assert daemon.ask(_prepare("t1")).state == "pending"
    assert path.stat().st_mode & 0o077 == 0
    daemon.ask(_prepare("t2"))  # the same job on another VM: one decision covers both
    assert [a.job_id for a in it.jobs(state="pending")] == ["job-1"]
    assert daemon.ready() == []
    with pytest.raises(DecisionError, match=r"no job 'job-9'"):
        it.decide("job-9", approve=True, by="alice")
    decided = it.decide("job-1", approve=False, by="alice", reason="not on weekends")
    assert (decided.state, decided.decided_by, decided.reason) == (
        "denied",
        "alice",
        "not on weekends",
    )
    with pytest.raises(DecisionError, match=r"already denied by alice"):
        it.decide("job-1", approve=True, by="bob")
    ready = daemon.ready()
    assert [cmd.task_id for cmd, _ in ready] == ["t1", "t2"]
    assert all(a.state == "denied" for _, a in ready)
    assert daemon.ready() == []  # answered once
    # A job whose only waiting task the controller stops no longer asks.
    daemon.ask(_prepare("t3", job="job-2"))
    assert daemon.drop_task("t3")
    assert not daemon.drop_task("t3")
    assert it.jobs(state="pending") == []
    assert [a.job_id for a in it.jobs()] == ["job-1"]


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


@dataclass
class Hospital:
    runner: TaskRunner
    events: asyncio.Queue[Event]
    book: ApprovalBook

    async def next_event(self, timeout: float = 30) -> Event:
        async with asyncio.timeout(timeout):
            event = await self.events.get()
        return decode(Event, event.encode())  # as the controller reads it


def _hospital(tmp_path: Path, policy: PolicySection) -> Hospital:
    vms = [
        VmInfo(
            name=f"vm-00{i}",
            uuid=str(i) * 32,
            state="running",
            vcpus=4,
            memory_mib=8192,
            disk_gib=40,
        )
        for i in (1, 2)
    ]
    events: asyncio.Queue[Event] = asyncio.Queue()
    book = ApprovalBook(tmp_path / "approvals.db")
    runner = TaskRunner(
        agent_id=AGENT,
        work_dir=tmp_path / "tasks",
        datasets={
            "digits": BundledDatasetSpec(kind="digits"),
            "xray": BundledDatasetSpec(kind="digits"),
        },
        executor_config=LocalExecutorConfig(give_up_after_s=120),
        one_box=True,
        blocking=_in_thread,
        snapshot=lambda: list(vms),
        emit=events.put_nowait,
        on_change=lambda summary: None,
        policy=policy,
        approvals=book,
    )
    return Hospital(runner, events, book)


@pytest.fixture
async def manual(tmp_path: Path) -> AsyncIterator[Hospital]:
    hospital = _hospital(tmp_path, PolicySection(approval="manual"))
    try:
        yield hospital
    finally:
        await hospital.runner.close()


async def test_the_runner_refuses_what_the_policy_does_not_allow(tmp_path: Path) -> None:
    hospital = _hospital(tmp_path, PolicySection(datasets=["digits"], vms=["vm-001"], max_tasks=1))
    try:
        await hospital.runner.handle(_prepare("t1", vm="vm-002"))
        refused = await hospital.next_event()
        assert (refused.kind, refused.failure_kind) == ("task_failed", FailureKind.VM_NOT_ALLOWED)
        assert failure_reason_of(refused) is FailureReason.REFUSED_BY_HOSPITAL
        await hospital.runner.handle(_prepare("t2").model_copy(update={"dataset": "xray"}))
        refused = await hospital.next_event()
        assert refused.failure_kind is FailureKind.NOT_ALLOWED
        await hospital.runner.handle(_prepare("t3"))
        assert (await hospital.next_event()).kind == "task_acknowledged"
        await hospital.runner.handle(_prepare("t4", job="job-2"))  # one task at once
        refused = await hospital.next_event()
        assert refused.failure_kind is FailureKind.BUSY
        assert hospital.runner.tasks.keys() == {"t3"}
    finally:
        await hospital.runner.close()


async def test_a_job_waits_for_it_then_goes_on_once_approved(manual: Hospital) -> None:
    await manual.runner.handle(_prepare("t1"))
    waiting = await manual.next_event()
    assert waiting.kind == "task_awaiting_approval"
    assert "agentctl jobs approve job-1" in waiting.detail
    assert manual.runner.tasks == {}  # nothing made for it yet: no keys, no directory
    assert await manual.runner.resume_decided() == 0
    manual.book.decide("job-1", approve=True, by="alice")
    assert await manual.runner.resume_decided() == 1
    ack = await manual.next_event()
    assert ack.kind == "task_acknowledged"
    assert ack.public_keys.keys() == {"node", "standby"}
    assert ack.approval is not None
    assert (ack.approval.job_id, ack.approval.decision, ack.approval.by) == (
        "job-1",
        "approved",
        "alice",
    )
    # The job's failover to another VM asks nothing again, and says nothing of approval.
    await manual.runner.handle(_prepare("t2", vm="vm-002"))
    again = await manual.next_event()
    assert again.kind == "task_acknowledged"
    assert again.approval is None


async def test_a_denied_job_is_refused_with_the_reason_and_stays_refused(manual: Hospital) -> None:
    await manual.runner.handle(_prepare("t1"))
    assert (await manual.next_event()).kind == "task_awaiting_approval"
    manual.book.decide("job-1", approve=False, by="alice", reason="ethics review pending")
    await manual.runner.resume_decided()
    denied = await manual.next_event()
    assert (denied.kind, denied.failure_kind) == ("task_failed", FailureKind.DENIED)
    assert denied.detail == "job job-1 was denied here by alice: ethics review pending"
    assert denied.approval is not None
    assert denied.approval.decision == "denied"
    assert denied.approval.reason == "ethics review pending"
    await manual.runner.handle(_prepare("t2", vm="vm-002"))
    again = await manual.next_event()
    assert again.failure_kind is FailureKind.DENIED
    assert manual.runner.tasks == {}


async def test_a_waiting_task_the_controller_stops_no_longer_waits(manual: Hospital) -> None:
    await manual.runner.handle(_prepare("t1"))
    assert (await manual.next_event()).kind == "task_awaiting_approval"
    await manual.runner.handle(
        StopTaskCommand(task_id="t1", expires_at=utcnow() + timedelta(minutes=1))
    )
    stopped = await manual.next_event()
    assert (stopped.kind, stopped.detail) == ("task_stopped", "it no longer waits for approval")
    assert manual.book.jobs(state="pending") == []


async def test_a_waiting_task_survives_an_agent_restart(tmp_path: Path) -> None:
    first = _hospital(tmp_path, PolicySection(approval="manual"))
    await first.runner.handle(_prepare("t1"))
    assert (await first.next_event()).kind == "task_awaiting_approval"
    await first.runner.close()
    # IT decides while the agent is down; the next agent answers the controller.
    ApprovalBook(tmp_path / "approvals.db", create=False).decide("job-1", approve=True, by="it")
    second = _hospital(tmp_path, PolicySection(approval="manual"))
    try:
        assert await second.runner.resume_decided() == 1
        ack = await second.next_event()
        assert (ack.kind, ack.task_id) == ("task_acknowledged", "t1")
    finally:
        await second.runner.close()


def test_agentctl_jobs_lists_and_decides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f'one_box = true\nstate_dir = "{state}"\n[policy]\napproval = "manual"\n')
    base = ["--config", str(config), "jobs"]
    assert agentctl([*base, "pending"]) == 0  # no file yet: nothing waits
    assert "no job waits" in capsys.readouterr().out
    assert not (state / "approvals.db").exists()  # agentctl never makes it
    book = ApprovalBook(state / "approvals.db")
    book.ask(_prepare("t1"))
    book.ask(_prepare("t2", job="job-2"))
    assert agentctl([*base, "pending", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["job"], j["state"], j["vm"]) for j in listed] == [
        ("job-1", "pending", "vm-001"),
        ("job-2", "pending", "vm-001"),
    ]
    monkeypatch.setenv("SUDO_USER", "alice")
    assert agentctl([*base, "approve", "job-1"]) == 0
    assert "job job-1 approved by alice (via sudo as" in capsys.readouterr().out
    assert agentctl([*base, "deny", "job-2", "--reason", "no consent for this study"]) == 0
    assert agentctl([*base, "approve", "job-2"]) == 1
    assert "already denied" in capsys.readouterr().err
    assert agentctl([*base, "deny", "job-3"]) == 1
    assert agentctl([*base, "deny", "job-1", "--reason", "bad\x1b[2Jreason"]) == 2
    assert agentctl([*base, "list"]) == 0
    table = capsys.readouterr().out
    assert "no consent for this study" in table
    assert "approved" in table
    assert agentctl([*base, "pending"]) == 0
    assert "no job waits" in capsys.readouterr().out
    # A file the user cannot use: exit 69 with the reason, not a traceback.
    (state / "approvals.db").write_bytes(b"not a database")
    assert agentctl([*base, "list"]) == 69
    assert "cannot use the approvals file" in capsys.readouterr().err
