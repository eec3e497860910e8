"""The agent's task runner: prepare, start and stop one participant's SuperNode per task.

`prepare_task`: re-check the VM (its state may have changed since the controller chose it) and
the dataset name, then make the task's two SuperNode keys (node and standby) here; only the
public halves leave, in the `task_acknowledged` event. `start_task`: start the SuperNode on the
VM through the configured executor with the key the controller names; report `task_starting`,
`task_running`, and `task_finished` or `task_failed` (with a `FailureKind` and a reason scrubbed
of local paths) when it ends. `stop_task`: stop it and report `task_stopped`. A task whose VM leaves the running
state is stopped and reported failed at once, so the controller can move it to another VM.

Outside one-box mode the runner refuses, whatever its config said, an executor that would run
the SuperNode on the agent's own host (`start_failed`). Before anything is made for a task the
hospital's `[policy]` is checked (agent/policy.py): its datasets, VMs and tasks at once, and,
when its IT approves each job by hand, their decision: until then the task waits (kept in the
approvals file, `task_awaiting_approval`) and is prepared, or refused, once they decide. A task's dataset resolves to the VM's own
paths (`[vms.<name>.datasets]`) when the SuperNode runs in the VM; a bundled dataset of the
agent's `[datasets]` works anywhere, a path on the agent's host only in one-box mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedsky.agent.executors.base import (
    Executor,
    ExecutorError,
    LocalExecutorConfig,
    RunningSuperNode,
    SshExecutorConfig,
    SuperNodeLaunch,
    VmSettings,
    VmUnreachable,
    reap_leftovers,
)
from fedsky.agent.executors.factory import make_executor
from fedsky.agent.payload import PayloadSource
from fedsky.agent.policy import Approval, ApprovalBook, PolicySection, refusal
from fedsky.shared.datasets import BundledDatasetSpec, ImageFolderSpec, scrub, write_catalog
from fedsky.shared.messages import (
    ApprovalNote,
    Event,
    EventKind,
    FailureKind,
    PrepareTaskCommand,
    StartTaskCommand,
    StopTaskCommand,
    TaskSummary,
    VmInfo,
    utcnow,
)
from fedsky.shared.supernode import NodeKeyPair, generate_node_key

log = logging.getLogger(__name__)

T = TypeVar("T")
# While a SuperNode is being started (a first start installs the client payload in the VM),
# the agent says `task_starting` this often: the controller's sign that it is still at it.
STARTING_PROGRESS_S = 10.0
Blocking = Callable[[Callable[[], T]], Awaitable[T]]


@dataclass
class _Task:
    task_id: str
    job_id: str
    vm: str
    vm_uuid: str
    dataset: str
    directory: Path
    keys: dict[str, NodeKeyPair] = field(default_factory=dict)
    running: RunningSuperNode | None = None
    watcher: asyncio.Task[None] | None = None
    stopping: bool = False
    state: str = "assigned"


class TaskRunner:
    def __init__(
        self,
        *,
        agent_id: str,
        work_dir: Path,
        datasets: dict[str, BundledDatasetSpec | ImageFolderSpec],
        executor_config: LocalExecutorConfig | SshExecutorConfig | None,
        blocking: Blocking[Any],
        snapshot: Callable[[], list[VmInfo]],
        emit: Callable[[Event], None],
        on_change: Callable[[TaskSummary | None], None],
        one_box: bool = False,
        vms: Mapping[str, VmSettings] | None = None,
        known_hosts_file: Path | None = None,
        payload: PayloadSource | None = None,
        policy: PolicySection | None = None,
        approvals: ApprovalBook | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.policy = policy or PolicySection()
        if self.policy.approval == "manual" and approvals is None:
            raise ValueError("manual approval needs the approvals file")
        self.approvals = approvals
        self.work_dir = work_dir
        self.datasets = datasets
        self.one_box = one_box
        self.vms = dict(vms or {})
        self.executor: Executor | None = (
            None
            if executor_config is None
            else make_executor(
                executor_config,
                work_dir=work_dir,
                known_hosts_file=known_hosts_file,
                vms=self.vms,
                one_box=one_box,
                payload=payload,
                blocking=blocking,
            )
        )
        self._blocking = blocking
        self._snapshot = snapshot
        self._emit_event = emit
        self._on_change = on_change
        self.tasks: dict[str, _Task] = {}
        # Installing the client payload into idle VMs ahead of a failover (one at a time).
        self._prestaging: asyncio.Task[None] | None = None

    # --- events -------------------------------------------------------------------------------

    def _emit(
        self,
        kind: EventKind,
        task: _Task | str,
        command_id: str | None,
        detail: str = "",
        **extra: Any,
    ) -> None:
        task_id = task if isinstance(task, str) else task.task_id
        if not isinstance(task, str):
            task.state = kind
        safe = scrub(detail, [str(self.work_dir), *self._local_paths()])[:2000]
        self._emit_event(
            Event(
                agent_id=self.agent_id,
                kind=kind,
                task_id=task_id,
                command_id=command_id,
                detail=safe,
                **extra,
            )
        )
        self._publish_summary()

    def _fail(
        self,
        task: _Task | str,
        command_id: str | None,
        kind: FailureKind,
        detail: str,
        approval: ApprovalNote | None = None,
    ) -> None:
        self._emit("task_failed", task, command_id, detail, failure_kind=kind, approval=approval)

    def _local_paths(self) -> list[str]:
        specs = [*self.datasets.values()]
        specs += [spec for vm in self.vms.values() for spec in vm.datasets.values()]
        return [str(s.root) for s in specs if isinstance(s, ImageFolderSpec)]

    def _refusal(self) -> str | None:
        """Why no SuperNode may start here at all (None: it may)."""
        if self.executor is None:
            return (
                "no executor is configured at this agent: it runs SuperNodes inside VMs only "
                'with [executor] kind = "ssh"'
            )
        if self.executor.on_agent_host and not self.one_box:
            # The config refuses this already; a runner built some other way refuses it too.
            return (
                "refused: outside one-box mode the SuperNode never runs on the agent's "
                f"(hypervisor) host, and the {self.executor.kind!r} executor would run it there"
            )
        return None

    def _dataset(
        self, vm: str, name: str
    ) -> tuple[BundledDatasetSpec | ImageFolderSpec | None, str]:
        """The loader for dataset `name` where the SuperNode runs, or None and why not."""
        missing = f"dataset {name!r} is not configured at {self.agent_id}"
        if self.executor is not None and self.executor.on_agent_host:
            return self.datasets.get(name), missing
        own = self.vms.get(vm)
        if own is not None and name in own.datasets:
            return own.datasets[name], ""
        spec = self.datasets.get(name)
        if isinstance(spec, ImageFolderSpec):
            # Its path is on the agent's host; the VM has its own disks.
            return None, f"dataset {name!r} has no path in {vm} (set [vms.{vm}.datasets.{name}])"
        return spec, missing

    def _policy_refusal(self, cmd: PrepareTaskCommand) -> tuple[FailureKind, str] | None:
        active = sum(
            1
            for t in self.tasks.values()
            if t.task_id != cmd.task_id
            and t.state not in ("task_failed", "task_finished", "task_stopped")
        )
        found = refusal(
            agent_id=self.agent_id,
            dataset=cmd.dataset,
            vm=cmd.vm,
            active_tasks=active,
            datasets=self.policy.datasets,
            vms=self.policy.vms,
            max_tasks=self.policy.max_tasks,
        )
        return None if found is None else (found.kind, found.detail)

    async def _waits_for_approval(self, cmd: PrepareTaskCommand) -> bool:
        """With manual approval: True when the task must wait for IT (kept, and said so), or
        was refused because they denied the job; False when the job is approved."""
        book = self.approvals
        if self.policy.approval != "manual" or book is None:
            return False
        decided = await self._blocking(lambda: book.state_of(cmd.job_id))
        if decided is not None and decided.state == "approved":
            return False
        if decided is not None and decided.state == "denied":
            self._fail(cmd.task_id, cmd.command_id, FailureKind.DENIED, _denial(decided))
            return True
        await self._blocking(lambda: book.ask(cmd))
        log.info("job %s waits for this hospital's approval (task %s)", cmd.job_id, cmd.task_id)
        self._emit(
            "task_awaiting_approval",
            cmd.task_id,
            cmd.command_id,
            f"job {cmd.job_id} waits for {self.agent_id}'s IT to approve it "
            f"(agentctl jobs approve {cmd.job_id})",
        )
        return True

    async def resume_decided(self) -> int:
        """Answer the tasks whose job IT has decided since they arrived; how many."""
        book = self.approvals
        if book is None:
            return 0
        ready = await self._blocking(book.ready)
        for cmd, decided in ready:
            note = ApprovalNote(
                job_id=decided.job_id,
                decision="approved" if decided.state == "approved" else "denied",
                by=decided.decided_by or "?",
                reason=decided.reason,
            )
            log.info("job %s %s by %s", decided.job_id, note.decision, note.by)
            if decided.state == "approved":
                await self._prepare(cmd, approval=note)
            else:
                self._fail(
                    cmd.task_id,
                    cmd.command_id,
                    FailureKind.DENIED,
                    _denial(decided),
                    approval=note,
                )
        return len(ready)

    def _publish_summary(self) -> None:
        active = [t for t in self.tasks.values() if t.running is not None and t.running.running]
        if not active:
            self._on_change(None)
            return
        task = active[-1]
        self._on_change(
            TaskSummary(
                task_id=task.task_id,
                job_id=task.job_id,
                vm=task.vm,
                state="running",
                since=utcnow(),
            )
        )

    # --- commands -----------------------------------------------------------------------------

    async def handle(
        self, command: PrepareTaskCommand | StartTaskCommand | StopTaskCommand
    ) -> None:
        if isinstance(command, PrepareTaskCommand):
            await self._prepare(command)
        elif isinstance(command, StartTaskCommand):
            await self._start(command)
        else:
            await self._stop(command.task_id, command.command_id, command.reason)

    async def _find_vm(self, name: str) -> VmInfo | None:
        vms = await self._blocking(self._snapshot)
        return next((vm for vm in vms if vm.name == name), None)

    async def _prepare(self, cmd: PrepareTaskCommand, approval: ApprovalNote | None = None) -> None:
        """`approval`: IT's decision that let this waiting task go on (it says so with the
        acknowledgement)."""
        cannot = self._refusal()
        if cannot is not None:
            self._fail(cmd.task_id, cmd.command_id, FailureKind.START_FAILED, cannot, approval)
            return
        spec, why_not = self._dataset(cmd.vm, cmd.dataset)
        if spec is None:
            self._fail(cmd.task_id, cmd.command_id, FailureKind.DATASET_MISSING, why_not, approval)
            return
        refused = self._policy_refusal(cmd)
        if refused is not None:
            self._fail(cmd.task_id, cmd.command_id, *refused, approval)
            return
        # A redelivered command for a task prepared already was approved then.
        fresh = approval is None and cmd.task_id not in self.tasks
        if fresh and await self._waits_for_approval(cmd):
            return
        vm = await self._find_vm(cmd.vm)
        if vm is None or vm.state != "running":
            state = "missing" if vm is None else vm.state
            self._fail(
                cmd.task_id,
                cmd.command_id,
                FailureKind.VM_NOT_RUNNING,
                f"vm-check: {cmd.vm} is {state}, not running",
                approval,
            )
            return
        existing = self.tasks.get(cmd.task_id)
        if existing is None:
            directory = self.work_dir / cmd.task_id
            task = _Task(
                task_id=cmd.task_id,
                job_id=cmd.job_id,
                vm=cmd.vm,
                vm_uuid=vm.uuid,
                dataset=cmd.dataset,
                directory=directory,
            )

            keys_dir = self.work_dir / "keys" / cmd.job_id

            def job_keys() -> dict[str, NodeKeyPair]:
                # Per job, not per task: a failover to another VM uses the standby key the
                # controller registered at the start, with no registration round trip.
                pairs = {}
                for role in ("node", "standby"):
                    pair = NodeKeyPair(
                        private_key=keys_dir / role, public_key=keys_dir / f"{role}.pub"
                    )
                    if cmd.fresh_keys or not pair.private_key.exists():
                        pair = generate_node_key(keys_dir, role)
                    pairs[role] = pair
                return pairs

            task.keys = await self._blocking(job_keys)
            self.tasks[cmd.task_id] = task
        else:
            task = existing  # a redelivered command: answer again with the same keys
        public = await self._blocking(
            lambda: {role: pair.public_text() for role, pair in task.keys.items()}
        )
        self._emit(
            "task_acknowledged",
            task,
            cmd.command_id,
            f"{cmd.vm} is running",
            public_keys=public,
            approval=approval,
        )

    async def _start(self, cmd: StartTaskCommand) -> None:
        task = self.tasks.get(cmd.task_id)
        if task is None:
            self._fail(
                cmd.task_id,
                cmd.command_id,
                FailureKind.NOT_PREPARED,
                "unknown task: it was not prepared here",
            )
            return
        if task.running is not None and task.running.running:
            self._emit("task_running", task, cmd.command_id, "already running")
            return
        refusal = self._refusal()
        if refusal is not None or self.executor is None:
            self._fail(task, cmd.command_id, FailureKind.START_FAILED, refusal or "no executor")
            return
        executor = self.executor
        vm = await self._find_vm(task.vm)
        if vm is None or vm.state != "running":
            state = "missing" if vm is None else vm.state
            self._fail(
                task,
                cmd.command_id,
                FailureKind.VM_NOT_RUNNING,
                f"vm-check: {task.vm} is {state}, not running",
            )
            return
        dataset, why_not = self._dataset(task.vm, cmd.dataset)
        if dataset is None:
            self._fail(task, cmd.command_id, FailureKind.DATASET_MISSING, why_not)
            return
        root_ca = task.directory / "aggregator-ca.crt"
        catalog = task.directory / "datasets.json"
        node_cert = task.directory / "node.crt" if cmd.node_cert_pem else None

        def write_files() -> None:
            task.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            root_ca.write_text(cmd.ca_pem)
            write_catalog(catalog, {cmd.dataset: dataset})
            if node_cert is not None and cmd.node_cert_pem:
                node_cert.write_text(cmd.node_cert_pem)

        await self._blocking(write_files)
        launch = SuperNodeLaunch(
            task_id=task.task_id,
            site=self.agent_id,
            superlink=cmd.superlink,
            root_ca=root_ca,
            private_key=task.keys[cmd.key].private_key,
            dataset_config=catalog,
            node_config=dict(cmd.node_config),
            node_cert=node_cert,
        )
        self._emit(
            "task_starting",
            task,
            cmd.command_id,
            f"starting the SuperNode on {task.vm} with the {cmd.key} key",
        )
        task.stopping = False
        try:
            task.running = await self._with_progress(
                executor.start(launch, vm_name=vm.name, vm_addresses=tuple(vm.addresses)),
                task,
                cmd.command_id,
            )
        except VmUnreachable as exc:
            self._fail(task, cmd.command_id, FailureKind.VM_UNREACHABLE, f"supernode: {exc}")
            return
        except ExecutorError as exc:
            self._fail(task, cmd.command_id, FailureKind.START_FAILED, f"supernode: {exc}")
            return
        self._emit("task_running", task, cmd.command_id, f"SuperNode running on {task.vm}")
        self._prestage_idle_vms()
        task.watcher = asyncio.create_task(
            self._watch(task, cmd.command_id), name=f"task-{task.task_id}"
        )

    async def _with_progress(
        self, starting: Awaitable[RunningSuperNode], task: _Task, command_id: str
    ) -> RunningSuperNode:
        """Await the executor's start, saying `task_starting` every `STARTING_PROGRESS_S` while
        it lasts: a first start in a VM installs the client payload there (minutes), and the
        controller takes these events as a sign of life."""
        start = asyncio.ensure_future(starting)
        began = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({start}, timeout=STARTING_PROGRESS_S)
                if done:
                    return start.result()
                self._emit(
                    "task_starting",
                    task,
                    command_id,
                    f"still starting the SuperNode on {task.vm} "
                    f"({time.monotonic() - began:.0f} s; a first start installs the client payload)",
                )
        finally:
            if not start.done():
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError, ExecutorError):
                    await start

    def _prestage_idle_vms(self) -> None:
        """Start readying this agent's idle running VMs for a failover, unless under way."""
        prestage = getattr(self.executor, "prestage", None)
        if prestage is None or (self._prestaging is not None and not self._prestaging.done()):
            return
        self._prestaging = asyncio.create_task(self._prestage(prestage), name="prestage")

    async def _prestage(self, prestager: Callable[[str, tuple[str, ...]], Awaitable[bool]]) -> None:
        for vm in await self._blocking(self._snapshot):
            busy = {t.vm for t in self.tasks.values()}
            if vm.state != "running" or vm.name in busy:
                continue
            try:
                if not await prestager(vm.name, tuple(vm.addresses)):
                    return  # nothing to install from
            except ExecutorError as exc:
                # Not fatal: a task that starts there later installs it (or says why not).
                log.info("could not ready VM %s for a failover ahead: %s", vm.name, exc)

    async def _watch(self, task: _Task, command_id: str) -> None:
        assert task.running is not None
        status = await task.running.wait()
        if task.stopping:
            return  # _stop reports
        if status.ok:
            self._emit("task_finished", task, command_id, "the SuperNode exited normally")
        else:
            kind = (
                FailureKind.VM_UNREACHABLE if status.unreachable else FailureKind.SUPERNODE_EXITED
            )
            self._fail(task, command_id, kind, f"supernode: {status.reason}")

    async def _stop(
        self,
        task_id: str,
        command_id: str | None,
        reason: str,
        *,
        failed: tuple[FailureKind, str] | None = None,
    ) -> None:
        """Stop the task's SuperNode and report `task_stopped`, or `task_failed` with `failed`'s
        kind and detail when the stop is the agent's own answer to a failure."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            book = self.approvals
            waited = book is not None and await self._blocking(lambda: book.drop_task(task_id))
            self._emit(
                "task_stopped",
                task_id,
                command_id,
                "it no longer waits for approval" if waited else "nothing was running",
            )
            return
        task.stopping = True
        if task.running is not None and task.running.running:
            await task.running.stop()
        if task.watcher is not None:
            task.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task.watcher
        # The job's keys outlive a failed task: the controller moves the participant to another
        # VM with the standby key it registered at the start. They go with the job's last stop.
        last_of_job = failed is None and not any(
            t.job_id == task.job_id for t in self.tasks.values()
        )

        def remove_files() -> None:
            shutil.rmtree(task.directory, ignore_errors=True)
            if last_of_job:
                shutil.rmtree(self.work_dir / "keys" / task.job_id, ignore_errors=True)

        await self._blocking(remove_files)
        if failed is not None:
            self._fail(task, command_id, *failed)
        else:
            self._emit("task_stopped", task, command_id, reason or "stopped")

    # --- VM watch -----------------------------------------------------------------------------

    async def check_vm_states(self, states: Mapping[str, str]) -> None:
        """Called with every poll (uuid -> state): a running task whose VM stopped fails now."""
        for task in list(self.tasks.values()):
            if task.running is None or not task.running.running:
                continue
            state = states.get(task.vm_uuid, "missing")
            if state != "running":
                log.warning(
                    "task %s: VM %s is %s; stopping its SuperNode", task.task_id, task.vm, state
                )
                await self._stop(
                    task.task_id,
                    None,
                    "",
                    failed=(FailureKind.VM_STOPPED, f"vm-left-running: {task.vm} is {state}"),
                )

    async def reap_leftovers(self) -> list[str]:
        """At start: stop what an earlier run of the agent left running (it was killed, so it
        could not stop its tasks) and say so, as for any task stopped (`task_stopped`)."""
        reaped: list[str] = await self._blocking(lambda: reap_leftovers(self.work_dir))
        for task_id in reaped:
            log.warning("task %s: stopped the SuperNode an earlier run of the agent left", task_id)
            self._emit("task_stopped", task_id, None, "the agent restarted and stopped it")
        return reaped

    async def close(self) -> None:
        if self._prestaging is not None:
            self._prestaging.cancel()
            with contextlib.suppress(asyncio.CancelledError, ExecutorError):
                await self._prestaging
        for task_id in list(self.tasks):
            with contextlib.suppress(Exception):
                await self._stop(task_id, None, "the agent is stopping")


def _denial(decided: Approval) -> str:
    why = f": {decided.reason}" if decided.reason else ""
    return f"job {decided.job_id} was denied here by {decided.decided_by}{why}"
