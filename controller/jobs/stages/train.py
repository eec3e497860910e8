"""Training: the Flower run on the job's SuperLink, watched until it reports its result.

Each round's metrics and weights arrive over the bus (see the driver); this stage starts the run
and, while it goes, fails participants over, notices a crashed ServerApp, an aggregator that
stopped answering and agents that went offline.
"""

from __future__ import annotations

import asyncio

from fedsky.controller.clouds.base import ProviderError
from fedsky.controller.clouds.superlink import prepare_app_dir
from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.context import JobContext
from fedsky.controller.jobs.records import Failover, JobFailure, JobRun
from fedsky.controller.jobs.stages.failover import fail_over
from fedsky.controller.orchestrator.failures import FailureReason
from fedsky.shared.flower.runconfig import settings_for_job
from fedsky.shared.messages import RunFinished

RUN_POLL_S = 5.0


async def train(ctx: JobContext, run: JobRun, *, poll_s: float = RUN_POLL_S) -> RunFinished:
    """Start the Flower run and wait for its result, handling failures meanwhile."""
    assert run.control is not None
    assert run.handle is not None
    assert run.provider is not None
    spec = run.spec
    model_digest = str((await ctx.store.run(jobstore.get_job, run.job_id))["model_digest"])
    # Paths on the aggregator's host: the controller's for `local`, the VM's for a cloud.
    files = run.provider.aggregator_files(run.job_id, model_file=ctx.model_path(model_digest))
    config = ctx.config
    settings = settings_for_job(
        spec,
        job_id=run.job_id,
        model_file=files.model_file,
        model_sha256=model_digest,
        sink="mqtt",
        mqtt={
            "host": config.broker_public_host,
            "port": config.broker.port,
            "ca": files.ca,
            "cert": files.cert,
            "key": files.key,
            "prefix": config.bus.topic_prefix,
        },
    )
    finished: asyncio.Future[RunFinished] = asyncio.get_running_loop().create_future()
    run.finished = finished
    app_dir = prepare_app_dir(run.directory / "app")
    try:
        run.run_id = await run.control.start_run(
            app_dir=app_dir, settings=settings, run_config_file=run.directory / "run-config.toml"
        )
    except ProviderError as exc:
        raise JobFailure(f"the aggregator did not start the Flower run: {exc}") from None
    await ctx.log(
        run.job_id, f"Flower run {run.run_id} started: {spec.hyperparameters.rounds} round(s)"
    )
    while True:
        failure_wait: asyncio.Future[Failover] = asyncio.ensure_future(run.failures.get())
        waiting: set[asyncio.Future[RunFinished] | asyncio.Future[Failover]] = {
            finished,
            failure_wait,
        }
        done, _ = await asyncio.wait(waiting, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
        if finished in done:
            failure_wait.cancel()
            return finished.result()
        if failure_wait in done:
            await fail_over(ctx, run, failure_wait.result())
            continue
        failure_wait.cancel()
        await check_run(run, settle_s=poll_s)
        await check_agents(ctx, run)


async def check_run(run: JobRun, *, settle_s: float = RUN_POLL_S) -> None:
    """A run that ended without its RunFinished (the ServerApp crashed) fails the job."""
    assert run.control is not None
    assert run.run_id is not None
    try:
        status = await run.control.run_status(run.run_id)
    except ProviderError as exc:
        assert run.provider is not None
        assert run.handle is not None
        if not await run.provider.healthy(run.handle):
            raise JobFailure(f"the aggregator stopped answering: {exc}") from None
        return
    if status.startswith("finished") and run.finished is not None and not run.finished.done():
        # Give the last messages a moment to arrive before calling it.
        await asyncio.sleep(settle_s)
        if not run.finished.done():
            raise JobFailure(f"the Flower run ended ({status}) without reporting its result")


async def check_agents(ctx: JobContext, run: JobRun) -> None:
    """A participant whose agent went offline is moved to its next VM."""
    agents = {a["id"]: a for a in await ctx.store.run(inventory.list_agents)}
    for part in run.participants.values():
        if part.task_id and agents.get(part.name, {}).get("state") != "online":
            await fail_over(
                ctx,
                run,
                Failover(part.name, FailureReason.AGENT_UNRESPONSIVE, f"{part.name} is offline"),
            )
