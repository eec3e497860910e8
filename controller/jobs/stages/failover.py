"""Failing over: a participant whose SuperNode, VM or agent failed moves to its next VM.

The failed node is unregistered first, so that its pending messages fail at once and the round
closes; the replacement starts with the pre-registered standby key.
"""

from __future__ import annotations

import contextlib

from fedsky.controller.bus.consumer import BusUnavailable
from fedsky.controller.clouds.base import ProviderError
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.context import JobContext
from fedsky.controller.jobs.records import (
    Failover,
    JobFailure,
    JobRun,
    command_expiry,
)
from fedsky.controller.jobs.stages.assign import assign
from fedsky.shared.messages import StopTaskCommand


async def fail_over(ctx: JobContext, run: JobRun, failure: Failover) -> None:
    """Move the failed participant on; the job carries on without it while enough remain."""
    assert run.control is not None
    part = run.participants[failure.participant]
    await ctx.log(run.job_id, f"{part.name}: {failure.detail}; moving it to its next VM", "warning")
    failed_key = part.public_keys.get(part.key_role)
    if part.node_id is not None:
        with contextlib.suppress(ProviderError):
            await run.control.unregister_node(part.node_id)
    if failed_key:
        part.burnt.add(failed_key)
    old_task = part.task_id
    part.task_id = None
    if old_task:
        await ctx.store.run(jobstore.set_task_state, old_task, "failed", reason=failure.detail)
        with contextlib.suppress(BusUnavailable):
            await ctx.bus.send_command(
                part.name,
                StopTaskCommand(
                    expires_at=command_expiry(ctx.config.bus.command_ttl_s),
                    task_id=old_task,
                    reason="failed over",
                ),
            )
    try:
        await assign(ctx, run, part, failure=failure)
    except JobFailure as exc:
        if run.active_participants() >= run.spec.min_participants:
            await ctx.log(run.job_id, f"{exc}; the job carries on without it", "warning")
            return
        raise
