"""Assigning: each participant gets a VM from the orchestrator and a SuperNode on it.

The agent re-checks the VM and makes the task's SuperNode keys (node and standby); the
controller registers both public keys with the SuperLink and tells the agent to start the
SuperNode. A failed attempt moves the participant to its next eligible VM until one runs or the
orchestrator's tries run out.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import UTC, datetime

from fedsky.controller.bus.consumer import BusUnavailable
from fedsky.controller.clouds.base import ProviderError
from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.context import JobContext
from fedsky.controller.jobs.records import (
    AttemptFailed,
    Failover,
    JobFailure,
    JobRun,
    Participant,
    command_expiry,
    minimum_resources,
)
from fedsky.controller.orchestrator.failures import FailureReason, failure_reason_of
from fedsky.controller.orchestrator.policy import VmCandidate, candidates_from_inventory
from fedsky.controller.security.enrollment import record_certificate
from fedsky.controller.security.pki import Pki, PkiError
from fedsky.shared.messages import (
    ApprovalNote,
    Event,
    FailureKind,
    PrepareTaskCommand,
    StartTaskCommand,
)

KEY_ROLES = ("node", "standby")
RETRY_FLOOR_S = 0.5


log = logging.getLogger(__name__)

# A refusal that holds for every VM of the hospital: the participant cannot take part.
HOSPITAL_WIDE = frozenset(
    {FailureKind.DATASET_MISSING, FailureKind.DENIED, FailureKind.NOT_ALLOWED}
)


async def candidates_by_participant(
    ctx: JobContext, participants: list[str]
) -> dict[str, list[VmCandidate]]:
    """Every participant's VMs as the orchestrator sees them now (busy ones marked)."""
    tasks = await ctx.queue.active_tasks()
    now = datetime.now(UTC)
    out = {}
    for p in participants:
        rows = await ctx.store.run(inventory.list_vms, p)
        out[p] = candidates_from_inventory(rows, now=now, tasks=tasks)
    return out


async def assign_all(ctx: JobContext, run: JobRun) -> None:
    """Assign every participant at once; the first that cannot be placed stops the rest."""
    try:
        async with asyncio.TaskGroup() as group:
            for part in run.participants.values():
                group.create_task(assign(ctx, run, part), name=f"assign-{part.name}")
    except* JobFailure as failures:
        raise failures.exceptions[0] from None


async def assign(
    ctx: JobContext, run: JobRun, part: Participant, *, failure: Failover | None = None
) -> None:
    """Put `part` on a VM, failing over to the next one until it runs or tries run out."""
    policy = ctx.config.orchestrator
    minimum = minimum_resources(run.spec)
    while True:
        candidates = (await candidates_by_participant(ctx, [part.name]))[part.name]
        if failure is None:
            # The first assignment, or a reassignment after a wait (the failed attempt was
            # recorded as failed when the failover found no VM free).
            decision = await ctx.queue.assign(
                job_id=run.job_id,
                participant=part.name,
                candidates=candidates,
                minimum=minimum,
                policy=policy,
                now=time.time(),
            )
        else:
            decision = await ctx.queue.fail_over(
                job_id=run.job_id,
                participant=part.name,
                reason=failure.reason,
                detail=failure.detail,
                candidates=candidates,
                minimum=minimum,
                policy=policy,
                now=time.time(),
            )
        if decision.chosen is None:
            if decision.retry_at is not None:
                await ctx.log(run.job_id, f"{part.name}: {decision.summary}; retrying later")
                await asyncio.sleep(max(RETRY_FLOOR_S, decision.retry_at - time.time()))
                failure = None
                continue
            raise JobFailure(f"{part.name}: {decision.summary}")
        # The attempt's number is the orchestrator's: the task is bound to that attempt row.
        part.attempt = decision.attempt
        part.vm = decision.chosen.vm
        try:
            await start_on_vm(ctx, run, part)
            await ctx.queue.mark(
                job_id=run.job_id, participant=part.name, state="running", now=time.time()
            )
            return
        except AttemptFailed as exc:
            await ctx.log(
                run.job_id,
                f"{part.name}: attempt {part.attempt} on {part.vm} failed: {exc.detail}",
                "warning",
            )
            failure = Failover(part.name, exc.reason, exc.detail)


async def start_on_vm(ctx: JobContext, run: JobRun, part: Participant) -> None:
    """Prepare the task on the chosen VM, register its keys, start its SuperNode."""
    assert run.control is not None
    assert run.handle is not None
    assert part.vm is not None
    task_id = await ctx.store.run(
        jobstore.create_task,
        job_id=run.job_id,
        participant=part.name,
        attempt=part.attempt,
    )
    part.task_id = task_id
    waiter = ctx.wait_on_task(task_id, agent_id=part.name)
    # Keys: the first attempt uses the node key, a failover the pre-registered standby; past
    # those the agent makes a fresh pair (an unregistered key cannot register again).
    ack = await command(
        ctx,
        part.name,
        PrepareTaskCommand(
            expires_at=command_expiry(ctx.config.bus.command_ttl_s),
            task_id=task_id,
            job_id=run.job_id,
            vm=part.vm,
            dataset=part.dataset,
            fresh_keys=part.attempt > len(KEY_ROLES),
        ),
        waiter,
        want=("task_acknowledged",),
    )
    part.public_keys = {str(k): v for k, v in ack.public_keys.items()}
    for role in KEY_ROLES:
        key = part.public_keys.get(role)
        if key and key not in part.registered and key not in part.burnt:
            path = run.directory / "keys" / f"{part.name}-{part.attempt}-{role}.pub"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(key + "\n")
            try:
                part.registered[key] = await run.control.register_node(
                    path, name=f"{part.name}-{role}"
                )
            except ProviderError as exc:
                raise AttemptFailed(
                    FailureReason.SUPERNODE_ERROR, f"registering its node key: {exc}"
                ) from None
    usable = [
        r
        for r in KEY_ROLES
        if part.public_keys.get(r) in part.registered and part.public_keys[r] not in part.burnt
    ]
    if not usable:
        raise AttemptFailed(FailureReason.SUPERNODE_ERROR, "no usable node key")
    role = part.key_role = usable[0]
    part.node_id = part.registered[part.public_keys[role]]
    await ctx.store.run(
        jobstore.set_task_state, task_id, "acknowledged", node_id=str(part.node_id), key_role=role
    )
    assert run.handle.address is not None
    try:
        node_cert = await ctx.store.run(
            _issue_node_certificate, ctx.pki, part.name, part.public_keys[role]
        )
    except PkiError as exc:
        raise AttemptFailed(FailureReason.SUPERNODE_ERROR, f"its node certificate: {exc}") from None
    await command(
        ctx,
        part.name,
        StartTaskCommand(
            expires_at=command_expiry(ctx.config.bus.command_ttl_s),
            task_id=task_id,
            job_id=run.job_id,
            vm=part.vm,
            dataset=part.dataset,
            superlink=run.handle.address,
            ca_pem=run.superlink_ca_pem,
            key=role,
            node_cert_pem=node_cert,
        ),
        waiter,
        want=("task_running",),
    )
    await ctx.store.run(jobstore.set_task_state, task_id, "running")
    run.followers.append(
        asyncio.get_running_loop().create_task(
            follow_task(ctx, run, part, task_id, waiter), name=f"follow-{task_id}"
        )
    )


def _issue_node_certificate(conn: sqlite3.Connection, pki: Pki, agent: str, public_key: str) -> str:
    """The SuperNode's certificate for the aggregator's front, over the node key the task will
    use (recorded with the others the CA issued)."""
    issued = pki.issue_node(agent, public_key)
    record_certificate(conn, issued)
    return issued.cert_pem.decode()


async def command(
    ctx: JobContext,
    agent: str,
    message: PrepareTaskCommand | StartTaskCommand,
    waiter: asyncio.Queue[Event],
    *,
    want: tuple[str, ...],
) -> Event:
    """Send `message` to `agent` and wait for the event that says it was done."""
    try:
        await ctx.bus.send_command(agent, message)
    except BusUnavailable as exc:
        raise AttemptFailed(FailureReason.AGENT_UNRESPONSIVE, str(exc)) from None
    timeout = ctx.config.orchestrator.ack_timeout_s
    loop = asyncio.get_running_loop()
    awaiting_approval = False
    try:
        async with asyncio.timeout(timeout) as deadline:
            while True:
                event = await waiter.get()
                if event.approval is not None:
                    await _record_decision(ctx, agent, message.job_id, event.approval)
                if event.kind in want:
                    return event
                if event.kind == "task_awaiting_approval":
                    # The hospital's IT decides (agentctl jobs approve|deny); their answer comes
                    # as this task's acknowledgement or refusal.
                    if not awaiting_approval:
                        await ctx.log(message.job_id, f"{agent}: {event.detail}")
                        await ctx.audit_after_the_fact(
                            actor=f"agent {agent}",
                            action="job.approval_requested",
                            target=message.job_id,
                            outcome="pending",
                        )
                    awaiting_approval = True
                    timeout = ctx.config.orchestrator.approval_timeout_s
                    deadline.reschedule(loop.time() + timeout)
                    continue
                if event.kind == "task_starting":
                    # The agent is alive and still at it (a first start installs the client
                    # payload in the VM, which takes minutes): it says so every few seconds,
                    # and silence for `ack_timeout_s` still means it stopped answering.
                    deadline.reschedule(loop.time() + timeout)
                    continue
                if event.kind == "task_failed":
                    if event.failure_kind in HOSPITAL_WIDE:
                        # Another VM of the same hospital has the same datasets and the same
                        # IT and policy: no retry there.
                        raise JobFailure(f"{agent}: {event.detail}")
                    raise AttemptFailed(failure_reason_of(event), event.detail)
                if event.kind == "command_rejected":
                    raise AttemptFailed(
                        FailureReason.SUPERNODE_ERROR, f"command rejected: {event.detail}"
                    )
    except TimeoutError:
        if awaiting_approval:
            raise JobFailure(
                f"{agent}: its IT did not approve the job within {timeout:g} s "
                "(orchestrator.approval_timeout_s)"
            ) from None
        raise AttemptFailed(
            FailureReason.AGENT_UNRESPONSIVE, f"{agent} did not answer within {timeout:g} s"
        ) from None


async def _record_decision(ctx: JobContext, agent: str, job_id: str, note: ApprovalNote) -> None:
    """A hospital IT's decision, in the job log and the audit log (a note naming another job
    than the one this task belongs to is not taken as a decision on either)."""
    if note.job_id != job_id:
        log.warning("%s sent a decision on job %s for a task of job %s", agent, note.job_id, job_id)
        return
    why = f": {note.reason}" if note.reason else ""
    await ctx.log(job_id, f"{agent}: the job was {note.decision} by {note.by} there{why}")
    await ctx.audit_after_the_fact(
        actor=f"{agent} IT ({note.by})",
        action="job.approve" if note.decision == "approved" else "job.deny",
        target=job_id,
        outcome="ok" if note.decision == "approved" else f"denied{why}",
    )


async def follow_task(
    ctx: JobContext, run: JobRun, part: Participant, task_id: str, waiter: asyncio.Queue[Event]
) -> None:
    """After start: a failure of this task while the job trains queues a failover."""
    while True:
        event = await waiter.get()
        if event.kind in ("task_failed", "task_finished"):
            state = "failed" if event.kind == "task_failed" else "finished"
            await ctx.store.run(jobstore.set_task_state, task_id, state, reason=event.detail)
            if part.task_id == task_id and event.kind == "task_failed":
                await run.failures.put(Failover(part.name, failure_reason_of(event), event.detail))
            return
        if event.kind == "task_stopped":
            await ctx.store.run(jobstore.set_task_state, task_id, "stopped", reason=event.detail)
            if part.task_id == task_id:
                # Not the controller's stop (it sends those after moving the participant on, or
                # at the job's end, when no one follows the task): the agent stopped it on its
                # own, on its way down for a restart. The participant moves on, the agent's VMs
                # waited for while it is away.
                await run.failures.put(
                    Failover(
                        part.name,
                        FailureReason.AGENT_UNRESPONSIVE,
                        f"its agent stopped the task ({event.detail})",
                    )
                )
            return
