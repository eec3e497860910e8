"""Cleaning up: every end state stops the SuperNodes, terminates the aggregator and revokes the
job's bus certificate, before the end state is recorded (a job shown as ended has nothing
running)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from fedsky.controller.bus.consumer import BusUnavailable
from fedsky.controller.clouds.base import AggregatorHandle, AggregatorProvider, ProviderError
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.context import JobContext
from fedsky.controller.jobs.records import JobRun, command_expiry
from fedsky.controller.orchestrator.policy import OrchestratorError
from fedsky.controller.orchestrator.store import AttemptState
from fedsky.controller.orchestrator.tasks import LIVE_TASK_STATES, list_tasks
from fedsky.controller.security.enrollment import revoke_common_name
from fedsky.shared.ids import aggregator_id
from fedsky.shared.messages import StopTaskCommand

log = logging.getLogger(__name__)


async def clean_up(
    ctx: JobContext,
    job_id: str,
    *,
    run: JobRun | None = None,
    job: Mapping[str, Any] | None = None,
    final_state: str | None = None,
    others_running: bool = False,
) -> None:
    """Stop every SuperNode, terminate the aggregator, revoke the job's certificate."""
    if job is None:
        job = await ctx.store.run(jobstore.get_job, job_id)
    assert job is not None
    tasks: list[dict[str, Any]] = job.get("tasks") or []
    if not tasks:
        tasks = await ctx.store.run(list_tasks, job_id)
    for task in tasks:
        # No follower hears of this task any more: the agent's answer to the stop below is a
        # confirmation (`JobManager.on_event`), not a reason to fail the participant over.
        ctx.waiters.pop(task["id"], None)
        if task["state"] in LIVE_TASK_STATES:
            # Stopping until the task's agent confirms (`JobManager.on_event`); a stop the bus
            # could not carry now is sent when it can (`JobManager.stop_owed_tasks`).
            # Marked first: the agent's confirmation may come back before `send_stop` returns.
            await ctx.store.run(
                jobstore.set_task_state, task["id"], "stopping", reason="the job ended"
            )
            if not await send_stop(ctx, task, reason=f"job {final_state or job['state']}"):
                await ctx.log(
                    job_id, f"{task['participant']}: the stop of its task waits for the bus"
                )
    # End the participants' attempts so their VMs count as free again.
    outcome: AttemptState = "succeeded" if final_state == "completed" else "cancelled"
    for participant in job["spec"]["participants"]:
        with contextlib.suppress(OrchestratorError):
            await ctx.queue.mark(
                job_id=job_id, participant=participant, state=outcome, now=time.time()
            )
    await _terminate_aggregator(ctx, job_id, run=run, job=job)
    with contextlib.suppress(Exception):
        if await ctx.store.run(revoke_common_name, ctx.pki, aggregator_id(job_id)):
            ctx.revocations.job_certificate_revoked(aggregator_id(job_id))
    await ctx.revocations.job_ended(others_running=others_running)
    if final_state is None:
        final_state = str((await ctx.store.run(jobstore.get_job, job_id))["state"])
    with contextlib.suppress(Exception):
        await ctx.models.finish_job(job_id=job_id, status=final_state)
    if run is not None:
        for follower in run.followers:
            follower.cancel()


async def send_stop(ctx: JobContext, task: Mapping[str, Any], *, reason: str) -> bool:
    """Tell a task's agent to stop it; False when the bus cannot carry the command now."""
    try:
        await ctx.bus.send_command(
            task["participant"],
            StopTaskCommand(
                expires_at=command_expiry(ctx.config.bus.command_ttl_s),
                task_id=task["id"],
                reason=reason,
            ),
        )
    except BusUnavailable:
        return False
    return True


async def _terminate_aggregator(
    ctx: JobContext, job_id: str, *, run: JobRun | None, job: Mapping[str, Any]
) -> None:
    handle = run.handle if run else handle_from(job)
    if handle is None:
        return
    provider = run.provider if run else None
    try:
        if provider is None:
            provider = await provider_for_handle(ctx, handle, job)
        await provider.terminate(handle)
        await ctx.log(job_id, f"aggregator terminated ({handle.provider} {handle.ref})")
    except Exception as exc:  # a leak is worse than a noisy log: say it loudly
        log.error("job %s: terminating its aggregator %s failed: %s", job_id, handle.ref, exc)
        await ctx.log(job_id, f"terminating the aggregator failed: {exc}", "error")


async def provider_for_handle(
    ctx: JobContext, handle: AggregatorHandle, job: Mapping[str, Any]
) -> AggregatorProvider:
    """The provider that can act on an aggregator launched by an earlier run of the controller."""
    if handle.provider in ("local", "onprem"):  # the controller's own SuperLink, either name
        return ctx.local
    account = (job.get("aggregator") or {}).get("account")
    if ctx.clouds is None or not account:
        raise ProviderError(f"no linked account to terminate {handle.provider} {handle.ref}")
    return await ctx.clouds.provider(account)


def handle_from(job: Mapping[str, Any]) -> AggregatorHandle | None:
    """The aggregator's handle as persisted in the job record, if it was launched."""
    agg = job.get("aggregator")
    if not agg:
        return None
    return AggregatorHandle(
        provider=str(agg["provider"]),
        job_id=str(job["id"]),
        ref=str(agg["ref"]),
        region=str(agg.get("region") or ""),
        address=agg.get("address"),
    )
