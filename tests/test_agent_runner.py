"""The agent's task runner: every `task_failed` it sends says why as a `FailureKind`.

Real parts: the runner with the `local` executor (a real SuperNode process); the VM inventory
is its one seam, a list the test changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fedsky.agent.executors.base import LocalExecutorConfig
from fedsky.agent.runner import TaskRunner
from fedsky.controller.orchestrator.choice import FailureReason, failure_reason_of
from fedsky.controller.security.pki import Pki
from fedsky.shared.datasets import BundledDatasetSpec
from fedsky.shared.messages import (
    Event,
    FailureKind,
    PrepareTaskCommand,
    StartTaskCommand,
    VmInfo,
    decode,
    utcnow,
)

from tests.support import eventually, free_port

T = TypeVar("T")
AGENT = "hospital-a"
UUID = "7" * 32


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


@dataclass
class Runner:
    runner: TaskRunner
    vms: list[VmInfo]
    events: asyncio.Queue[Event]

    def set_state(self, state: str) -> None:
        self.vms[0] = self.vms[0].model_copy(update={"state": state})

    async def next_event(self, *kinds: str, timeout: float = 60) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if event.kind in kinds:
                    return event


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[Runner]:
    vms = [VmInfo(name="vm-001", uuid=UUID, state="running", vcpus=4, memory_mib=8192, disk_gib=40)]
    events: asyncio.Queue[Event] = asyncio.Queue()
    task_runner = TaskRunner(
        agent_id=AGENT,
        work_dir=tmp_path / "tasks",
        datasets={"digits": BundledDatasetSpec(kind="digits")},
        # Long enough that a SuperNode with no aggregator is still running when the VM stops.
        executor_config=LocalExecutorConfig(give_up_after_s=120),
        one_box=True,
        blocking=_in_thread,
        snapshot=lambda: list(vms),
        emit=events.put_nowait,
        on_change=lambda summary: None,
    )
    try:
        yield Runner(task_runner, vms, events)
    finally:
        await task_runner.close()


def prepare(
    task_id: str = "t1", *, vm: str = "vm-001", dataset: str = "digits"
) -> PrepareTaskCommand:
    return PrepareTaskCommand(
        task_id=task_id,
        job_id="job-1",
        vm=vm,
        dataset=dataset,
        expires_at=utcnow() + timedelta(minutes=1),
    )


def start(pki: Pki, task_id: str = "t1", *, dataset: str = "digits") -> StartTaskCommand:
    return StartTaskCommand(
        task_id=task_id,
        job_id="job-1",
        vm="vm-001",
        dataset=dataset,
        superlink=f"127.0.0.1:{free_port()}",  # nothing listens: the SuperNode keeps retrying
        ca_pem=pki.ca_cert_pem.decode(),
        expires_at=utcnow() + timedelta(minutes=1),
    )


def on_the_wire(event: Event) -> Event:
    """The event as the controller decodes it."""
    return decode(Event, event.encode())


async def test_a_vm_that_stops_under_a_running_task_is_reported_as_stopped(
    runner: Runner, pki: Pki
) -> None:
    await runner.runner.handle(prepare())
    await runner.next_event("task_acknowledged")
    await runner.runner.handle(start(pki))
    await runner.next_event("task_running")

    runner.set_state("shutoff")
    await runner.runner.check_vm_states({UUID: "shutoff"})
    failed = on_the_wire(await runner.next_event("task_failed", timeout=30))
    assert failed.failure_kind is FailureKind.VM_STOPPED
    assert failed.detail == "vm-left-running: vm-001 is shutoff"
    assert failure_reason_of(failed) is FailureReason.VM_LEFT_RUNNING
    assert runner.runner.tasks == {}


async def test_each_refusal_before_the_supernode_starts_has_its_kind(
    runner: Runner, pki: Pki
) -> None:
    async def failure(command: PrepareTaskCommand | StartTaskCommand) -> Event:
        await runner.runner.handle(command)
        return on_the_wire(await runner.next_event("task_failed", "task_acknowledged"))

    missing = await failure(prepare(dataset="chest-xray"))
    assert (missing.failure_kind, missing.detail) == (
        FailureKind.DATASET_MISSING,
        f"dataset 'chest-xray' is not configured at {AGENT}",
    )
    gone = await failure(prepare(vm="vm-009"))
    assert (gone.failure_kind, gone.detail) == (
        FailureKind.VM_NOT_RUNNING,
        "vm-check: vm-009 is missing, not running",
    )
    unknown = await failure(start(pki, task_id="never-prepared"))
    assert unknown.failure_kind is FailureKind.NOT_PREPARED

    assert (await failure(prepare())).kind == "task_acknowledged"
    runner.set_state("paused")
    paused = await failure(start(pki))
    assert (paused.failure_kind, paused.detail) == (
        FailureKind.VM_NOT_RUNNING,
        "vm-check: vm-001 is paused, not running",
    )
    runner.set_state("running")
    no_dataset = await failure(start(pki, dataset="chest-xray"))
    assert no_dataset.failure_kind is FailureKind.DATASET_MISSING


async def test_a_supernode_that_cannot_start_or_exits_has_its_kind(
    tmp_path: Path, pki: Pki
) -> None:
    events: asyncio.Queue[Event] = asyncio.Queue()

    def task_runner(executor: LocalExecutorConfig) -> TaskRunner:
        return TaskRunner(
            agent_id=AGENT,
            work_dir=tmp_path / "tasks",
            datasets={"digits": BundledDatasetSpec(kind="digits")},
            executor_config=executor,
            one_box=True,
            blocking=_in_thread,
            snapshot=lambda: [
                VmInfo(
                    name="vm-001", uuid=UUID, state="running", vcpus=4, memory_mib=8192, disk_gib=40
                )
            ],
            emit=events.put_nowait,
            on_change=lambda summary: None,
        )

    async def failed_after(runner: TaskRunner, *commands: Any) -> Event:
        for command in commands:
            await runner.handle(command)
        async with asyncio.timeout(60):
            while (event := await events.get()).kind != "task_failed":
                pass
        await runner.close()
        return on_the_wire(event)

    # No Flower scripts where the executor looks: the SuperNode cannot start.
    no_flower = task_runner(LocalExecutorConfig(bin_dir=tmp_path / "no-such-bin"))
    cannot = await failed_after(no_flower, prepare("t1"), start(pki, "t1"))
    assert cannot.failure_kind is FailureKind.START_FAILED
    assert cannot.detail.startswith("supernode: cannot start the SuperNode")

    # No aggregator, and the SuperNode gives up after 3 s: it exits with an error.
    impatient = task_runner(LocalExecutorConfig(give_up_after_s=3))
    exited = await failed_after(impatient, prepare("t2"), start(pki, "t2"))
    assert exited.failure_kind is FailureKind.SUPERNODE_EXITED
    assert "could not connect to the aggregator" in exited.detail
    assert failure_reason_of(exited) is FailureReason.SUPERNODE_ERROR


async def test_a_long_start_keeps_saying_it_is_starting(
    runner: Runner, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A first start in a VM installs the client payload (minutes): the controller must hear
    # from the agent meanwhile, or it takes the agent for unresponsive.
    import fedsky.agent.runner as runner_module

    monkeypatch.setattr(runner_module, "STARTING_PROGRESS_S", 0.05)
    executor = runner.runner.executor
    assert executor is not None
    real_start = executor.start

    async def slow_start(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await real_start(*args, **kwargs)

    monkeypatch.setattr(executor, "start", slow_start)
    await runner.runner.handle(prepare())
    await runner.next_event("task_acknowledged")
    await runner.runner.handle(start(pki))
    kinds = []
    while not kinds or kinds[-1] != "task_running":
        kinds.append((await runner.next_event("task_starting", "task_running")).kind)
    assert kinds.count("task_starting") >= 4  # the first one, then one every 0.05 s
    progress = [k for k in kinds if k == "task_starting"]
    assert len(progress) == kinds.index("task_running")


async def test_once_a_supernode_runs_the_idle_vms_are_readied_for_a_failover(
    runner: Runner, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner.vms += [
        VmInfo(
            name="vm-002", uuid="8" * 32, state="running", vcpus=2, memory_mib=4096, disk_gib=20
        ),
        VmInfo(
            name="vm-003", uuid="9" * 32, state="shutoff", vcpus=2, memory_mib=4096, disk_gib=20
        ),
    ]
    readied: list[str] = []

    async def prestage(vm_name: str, vm_addresses: tuple[str, ...]) -> bool:
        readied.append(vm_name)
        return True

    monkeypatch.setattr(runner.runner.executor, "prestage", prestage, raising=False)
    await runner.runner.handle(prepare())
    await runner.next_event("task_acknowledged")
    await runner.runner.handle(start(pki))
    await runner.next_event("task_running")
    await eventually(lambda: readied == ["vm-002"], what="vm-002 to be readied")
    # Not the VM of the running task, nor a VM that is not running.
    await asyncio.sleep(0.2)
    assert readied == ["vm-002"]
