"""The job pipeline's driver (the FL Initializer): from a submitted spec to a trained model.

created -> placing -> launching -> assigning -> training -> completed | failed | cancelled.
Each stage is a function in `jobs.stages` with its dependencies in a `JobContext`; the driver
runs them in order, one task per job in the controller's TaskGroup, routes the agents' events
and the aggregator's messages to them, and records the end state after cleaning up. A
controller restarted mid-job fails the job cleanly (see `JobManager.recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fedsky.controller.clouds.onprem import controller_aggregator
from fedsky.controller.clouds.superlink import SuperLinkControl
from fedsky.controller.config import ControllerConfig
from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.context import JobContext
from fedsky.controller.jobs.model_files import model_file_path
from fedsky.controller.jobs.ports import (
    CloudAccess,
    JobBus,
    JobRevocations,
    ModelRecorder,
    RunControlFactory,
)
from fedsky.controller.jobs.records import JobFailure, JobRejected, JobRun, minimum_resources
from fedsky.controller.jobs.stages.assign import assign_all, candidates_by_participant
from fedsky.controller.jobs.stages.cleanup import clean_up, send_stop
from fedsky.controller.jobs.stages.launch import launch_aggregator
from fedsky.controller.jobs.stages.place import place_aggregator
from fedsky.controller.jobs.stages.train import train
from fedsky.controller.orchestrator.eligibility import check_feasible
from fedsky.controller.orchestrator.failures import Rest
from fedsky.controller.orchestrator.store import QueueStore
from fedsky.controller.orchestrator.tasks import ENDED_BY_EVENT, tasks_stopping
from fedsky.controller.security.audit import AuditTrail
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store
from fedsky.shared.flower.transfer import AggregatorFeed, RoundReady, RunEnded
from fedsky.shared.jobspec import JobSpec
from fedsky.shared.messages import Event, PayloadError, RunFinished
from fedsky.shared.metrics import format_values, metric_values
from pydantic import ValidationError

log = logging.getLogger(__name__)

FEED_EXPIRE_S = 10.0
# How often the stops the controller owes are looked at, and how long one waits for its
# agent's confirmation before it is sent again.
STOP_SWEEP_S = 2.0
STOP_RESEND_S = 60.0


class JobManager:
    """Drives every active job as one task of the controller's TaskGroup."""

    def __init__(
        self,
        *,
        config: ControllerConfig,
        store: Store,
        pki: Pki,
        bus: JobBus,
        models: ModelRecorder,
        revocations: JobRevocations,
        clouds: CloudAccess | None = None,
        make_control: RunControlFactory = SuperLinkControl,
        audit: AuditTrail | None = None,
    ) -> None:
        jobs_dir = config.state_dir / "jobs"
        self.ctx = JobContext(
            config=config,
            store=store,
            pki=pki,
            bus=bus,
            models=models,
            queue=QueueStore(store),
            local=controller_aggregator(config.aggregator, work_dir=jobs_dir, pki=pki),
            make_control=make_control,
            revocations=revocations,
            clouds=clouds,
            audit=audit,
        )
        self._feed = AggregatorFeed()
        self._runs: dict[str, JobRun] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        bus.add_event_listener(self.on_event)
        bus.aggregator_handler = self.on_aggregator

    # --- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            await self.recover()
            group.create_task(self._expire_feed(), name="jobs-feed-expiry")
            group.create_task(self.stop_owed_tasks(), name="jobs-stop-owed-tasks")
            await asyncio.Event().wait()

    async def recover(self) -> None:
        """Fail, cleanly, every job a previous controller left active.

        Its aggregator is terminated through the persisted provider reference and its agents are
        told to stop their SuperNodes; nothing is left running or hanging.
        """
        store = self.ctx.store
        for job in await store.run(jobstore.list_jobs, states=jobstore.ACTIVE_STATES):
            job_id, was = job["id"], job["state"]
            log.warning("job %s was %s when the controller stopped: failing it", job_id, was)
            await store.run(
                jobstore.set_state,
                job_id,
                "failed",
                error=f"the controller restarted while the job was {was}",
                message=f"failed: the controller restarted while the job was {was}",
            )
            await clean_up(self.ctx, job_id, job=job)

    async def stop_owed_tasks(self) -> None:
        """Send the stops the controller still owes (tasks left `stopping`): once the bus is
        up, then again every `STOP_RESEND_S` until each task's agent confirms. A controller
        restarted mid-job recovers before its bus is connected; this is what reaches the
        SuperNodes the previous one left running."""
        sent_at: dict[str, float] = {}
        while True:
            owed = await self.ctx.store.run(tasks_stopping)
            now = time.monotonic()
            for task in owed:
                if now - sent_at.get(task["id"], -math.inf) < STOP_RESEND_S:
                    continue
                if await send_stop(self.ctx, task, reason="the job ended"):
                    sent_at[task["id"]] = now
            live = {task["id"] for task in owed}
            sent_at = {k: v for k, v in sent_at.items() if k in live}
            await asyncio.sleep(STOP_SWEEP_S)

    async def _expire_feed(self) -> None:
        while True:
            await asyncio.sleep(FEED_EXPIRE_S)
            for ready in self._feed.expire():
                await self._record_round(ready)

    # --- submission -------------------------------------------------------------------------

    async def submit(
        self, *, spec_data: Mapping[str, Any], model_digest: str, owner: str | None = None
    ) -> str:
        """Check a job and start driving it; JobRejected when it cannot run at all."""
        ctx = self.ctx
        try:
            spec = JobSpec.model_validate(dict(spec_data))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "spec"
            raise JobRejected(f"invalid job spec: key '{where}': {first.get('msg')}") from None
        if not model_file_path(ctx.config.state_dir, model_digest).is_file():
            raise JobRejected(f"no uploaded model file with digest {model_digest}")
        locations = await ctx.store.run(inventory.location_of, spec.participants)
        missing = [p for p in spec.participants if p not in locations]
        if missing:
            raise JobRejected(f"not enrolled: {', '.join(missing)}")
        agents = {a["id"]: a for a in await ctx.store.run(inventory.list_agents)}
        revoked = [p for p in spec.participants if agents[p]["state"] == "revoked"]
        if revoked:
            raise JobRejected(f"revoked: {', '.join(revoked)}")
        candidates = await candidates_by_participant(ctx, list(spec.participants))
        feasible = check_feasible(minimum_resources(spec), candidates)
        if not feasible.ok:
            raise JobRejected(
                f"no VM can run this job for every participant:\n{feasible.message}",
                infeasible=True,
            )
        job_id = jobstore.new_job_id(spec.name)
        await ctx.store.run(
            jobstore.create_job,
            job_id=job_id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            model_digest=model_digest,
            owner=owner,
        )
        await ctx.models.record_job(
            job_id=job_id,
            name=spec.name,
            selection_metric=spec.selection_metric,
            hyperparameters=spec.hyperparameters.model_dump(mode="json"),
            model_digest=model_digest,
            participants=list(spec.participants),
            datasets={p: spec.dataset_for(p) for p in spec.participants},
        )
        assert self._group is not None, "the job manager is not running"
        self._drivers[job_id] = self._group.create_task(
            self.drive(job_id, spec), name=f"job-{job_id}"
        )
        return job_id

    async def cancel(self, job_id: str) -> bool:
        """Cancel an active job; returns once its SuperNodes and aggregator are stopped."""
        driver = self._drivers.get(job_id)
        run = self._runs.get(job_id)
        if driver is None or run is None or driver.done():
            return bool(
                await self.ctx.store.run(
                    jobstore.set_state, job_id, "cancelled", message="cancelled by the operator"
                )
            )
        run.cancel_requested = True
        driver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(driver)
        return True

    # --- the driver -------------------------------------------------------------------------

    async def drive(self, job_id: str, spec: JobSpec) -> None:
        """Run the stages in order and record how the job ended."""
        ctx = self.ctx
        run = JobRun.new(job_id=job_id, spec=spec, directory=ctx.jobs_dir / job_id)
        self._runs[job_id] = run
        state: jobstore.JobState = "failed"
        error: str | None = None
        message: str | None = None
        try:
            await self._enter(job_id, "placing")
            placement = await place_aggregator(ctx, run)
            await self._enter(job_id, "launching")
            await launch_aggregator(ctx, run, placement)
            await self._enter(job_id, "assigning")
            await assign_all(ctx, run)
            await self._enter(job_id, "training")
            outcome = await train(ctx, run)
            if outcome.status != "completed":
                raise JobFailure(outcome.reason or "the run failed")
            state, message = "completed", f"completed {outcome.rounds_completed} round(s)"
        except asyncio.CancelledError:
            if run.cancel_requested:
                state, message = "cancelled", "cancelled by the operator"
            else:
                error = "the controller stopped during the job"
            await self._finish(run, state, error=error, message=message)
            raise
        except JobFailure as exc:
            error, message = str(exc), f"failed: {exc}"
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            error = f"internal error: {type(exc).__name__}"
        await self._finish(run, state, error=error, message=message)

    async def _finish(
        self, run: JobRun, state: jobstore.JobState, *, error: str | None, message: str | None
    ) -> None:
        """Clean up first, then record the end state: a job shown as ended has nothing running."""
        others = any(job_id != run.job_id for job_id in self._runs)
        await clean_up(self.ctx, run.job_id, run=run, final_state=state, others_running=others)
        self._runs.pop(run.job_id, None)
        self._drivers.pop(run.job_id, None)
        await self.ctx.store.run(
            jobstore.set_state, run.job_id, state, error=error, message=message
        )

    async def _enter(self, job_id: str, state: jobstore.JobState) -> None:
        if not await self.ctx.store.run(jobstore.set_state, job_id, state):
            raise asyncio.CancelledError  # cancelled meanwhile

    # --- what arrives from the bus ----------------------------------------------------------

    async def on_event(self, event: Event) -> None:
        """An agent's event: to the stage or follower waiting on its task, if it is the
        task's own agent's (PayloadError otherwise); else, the end of a task being stopped."""
        if self.ctx.route_event(event) or event.task_id is None:
            return
        ended = ENDED_BY_EVENT.get(event.kind)
        if ended is not None:
            await self.ctx.store.run(
                jobstore.confirm_task_ended,
                event.task_id,
                agent_id=event.agent_id,
                state=ended,
                reason=event.detail,
            )

    async def on_aggregator(self, sender: str, channel: str, payload: bytes) -> None:
        """A job's ServerApp publishing its rounds and its result."""
        if channel != "metrics":
            raise PayloadError("bad_channel", channel)
        for item in self._feed.feed(sender, payload):
            if isinstance(item, RoundReady):
                await self._record_round(item)
            elif isinstance(item, RunEnded):
                self._run_ended(item.message)

    async def _record_round(self, ready: RoundReady) -> None:
        ctx = self.ctx
        metrics = ready.metrics
        job_id = metrics.job_id
        try:
            job = await ctx.store.run(jobstore.get_job, job_id)
        except jobstore.JobNotFound:
            raise PayloadError("no_job", f"job {job_id} is not known") from None
        if job["state"] != "training":
            raise PayloadError("job_not_training", f"job {job_id} is {job['state']}")
        await ctx.models.record_round_message(metrics, weights=ready.weights)
        await ctx.store.run(jobstore.update_job, job_id, rounds_done=metrics.round)
        await ctx.log(
            job_id,
            f"round {metrics.round}/{metrics.num_rounds}: {format_values(metric_values(metrics))} "
            f"({len(metrics.participants)} sites, {metrics.duration_s:.1f} s)",
        )

    def _run_ended(self, message: RunFinished) -> None:
        run = self._runs.get(message.job_id)
        if run is None or run.finished is None or run.finished.done():
            return
        run.finished.set_result(message)

    # --- reading ----------------------------------------------------------------------------

    async def explain(self, job_id: str) -> dict[str, Any]:
        return await self.ctx.queue.explain(job_id)

    async def active_tasks(self) -> dict[str, int]:
        """Tasks running now per VM key (`agent/vm`): what makes a VM busy."""
        return dict(await self.ctx.queue.active_tasks())

    async def rests(self, participants: Iterable[str]) -> dict[str, Rest]:
        """The VMs resting after a failed task, per VM key, in these participants' queues."""
        out: dict[str, Rest] = {}
        for participant in participants:
            out.update((await self.ctx.queue.load(participant)).rests)
        return out
