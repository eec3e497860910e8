"""The job driver: stages in order, the end state recorded after clean-up, and a cancel in each
stage leaving nothing running (real SQLite, CA and queue; the bus, provider and SuperLink faked)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.driver import JobManager
from fedsky.controller.jobs.records import JobRejected
from fedsky.shared.messages import Event, PrepareTaskCommand, RunFinished, StopTaskCommand

from tests.fakes.jobs import MODEL_DIGEST, SPEC, Harness, ScriptedAgents, make_harness
from tests.support.wait import eventually


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Harness, JobManager]]:
    h = make_harness(tmp_path)
    manager = JobManager(
        config=h.ctx.config,
        store=h.store,
        pki=h.ctx.pki,
        bus=h.agents,
        models=h.models,
        revocations=h.revocations,
        clouds=h.clouds,
        make_control=lambda **_: h.control,
    )
    # The scripted agents answer into the manager's own waiters.
    h.agents._ctx = lambda: manager.ctx  # type: ignore[method-assign]
    h.ctx = manager.ctx
    runner = asyncio.create_task(manager.run())
    await asyncio.sleep(0)
    yield h, manager
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def _state(h: Harness, job_id: str) -> str:
    return str((await h.job(job_id))["state"])


async def test_a_job_runs_through_every_stage_to_completed(
    setup: tuple[Harness, JobManager],
) -> None:
    h, manager = setup
    job_id = await manager.submit(spec_data=SPEC, model_digest=MODEL_DIGEST)
    await eventually(lambda: _state(h, job_id), until=lambda s: s == "training")
    await eventually(lambda: _run_started(manager, job_id), until=bool)
    manager._run_ended(
        RunFinished(job_id=job_id, status="completed", rounds_completed=2, num_rounds=2)
    )
    await eventually(lambda: _state(h, job_id), until=lambda s: s == "completed")
    job = await h.job(job_id)
    assert {t["state"] for t in job["tasks"]} == {"stopped"}
    assert h.clouds.provider_.terminated
    assert h.models.finished == {job_id: "completed"}
    assert "completed 2 round(s)" in await h.log_text(job_id)


async def _run_started(manager: JobManager, job_id: str) -> bool:
    run = manager._runs.get(job_id)
    return run is not None and run.finished is not None


async def test_submit_refuses_unknown_participants_and_missing_models(
    setup: tuple[Harness, JobManager],
) -> None:
    _, manager = setup
    with pytest.raises(JobRejected, match="not enrolled: hospital-xx"):
        await manager.submit(
            spec_data={**SPEC, "participants": ["hospital-us", "hospital-xx"]},
            model_digest=MODEL_DIGEST,
        )
    with pytest.raises(JobRejected, match="no uploaded model file"):
        await manager.submit(spec_data=SPEC, model_digest="cd" * 32)
    with pytest.raises(JobRejected, match=r"key 'hyperparameters\.rounds'"):
        await manager.submit(
            spec_data={**SPEC, "hyperparameters": {"rounds": 0}}, model_digest=MODEL_DIGEST
        )


async def test_a_job_no_vm_can_run_is_refused_as_infeasible(
    setup: tuple[Harness, JobManager],
) -> None:
    _, manager = setup
    with pytest.raises(JobRejected) as refused:
        await manager.submit(
            spec_data={**SPEC, "resources": {"vcpus": 64, "memory_gib": 2, "disk_gib": 10}},
            model_digest=MODEL_DIGEST,
        )
    assert refused.value.infeasible


async def test_a_failing_stage_fails_the_job_with_its_reason(
    setup: tuple[Harness, JobManager],
) -> None:
    h, manager = setup
    h.clouds.provider_.fail_launch = "quota exceeded"
    job_id = await manager.submit(spec_data=SPEC, model_digest=MODEL_DIGEST)
    await eventually(lambda: _state(h, job_id), until=lambda s: s == "failed")
    job = await h.job(job_id)
    assert job["error"] == "launching the aggregator: quota exceeded"
    assert h.revocations.ended == [False]  # clean-up ran before the end state was recorded


@pytest.mark.parametrize("stage", ["placing", "launching", "assigning", "training"])
async def test_cancel_in_each_stage_stops_everything(
    setup: tuple[Harness, JobManager], stage: str
) -> None:
    h, manager = setup
    gate = asyncio.Event()  # never set: the stage waits until cancelled
    if stage == "placing":
        h.clouds.place_gate = gate
    elif stage == "launching":
        h.clouds.provider_.launch_gate = gate
    elif stage == "assigning":
        h.agents.behave = lambda agent, command: (
            [] if isinstance(command, PrepareTaskCommand) and agent == "hospital-eu" else None
        )
    job_id = await manager.submit(spec_data=SPEC, model_digest=MODEL_DIGEST)
    await eventually(lambda: _state(h, job_id), until=lambda s: s == stage)
    if stage == "assigning":
        await eventually(lambda: _prepared(h.agents, "hospital-eu"), until=bool)
    assert await manager.cancel(job_id)
    assert (await h.job(job_id))["state"] == "cancelled"
    # Every task's stop is sent before the job ends; each agent's confirmation follows.
    job = await eventually(
        lambda: h.job(job_id),
        until=lambda job: all(
            t["state"] in ("stopped", "failed", "finished") for t in job["tasks"]
        ),
    )
    stopped = {c.task_id for _, c in h.agents.commands(StopTaskCommand)}  # type: ignore[attr-defined]
    started = {t["id"] for t in job["tasks"] if t["state"] == "stopped"}
    assert started <= stopped
    launched = stage in ("assigning", "training")
    assert bool(h.clouds.provider_.terminated) == launched
    assert h.models.finished == {job_id: "cancelled"}
    assert await manager.ctx.queue.active_tasks() == {}


async def test_stops_a_restarted_controller_owes_are_sent_once_the_bus_is_up(
    setup: tuple[Harness, JobManager],
) -> None:
    """A controller restarted mid-job recovers before its bus is connected: the stops it could
    not send are owed (tasks `stopping`), sent when the bus is up, and a task ends only on its
    own agent's word."""
    h, manager = setup
    job_id = await manager.submit(spec_data=SPEC, model_digest=MODEL_DIGEST)
    await eventually(lambda: _run_started(manager, job_id), until=bool)
    manager._drivers[job_id].cancel()  # the old controller is gone; its job stays "training"
    await asyncio.sleep(0)
    await h.store.run(jobstore.set_state, job_id, "training")
    h.agents.down = True
    h.agents.sent.clear()
    await manager.recover()
    job = await h.job(job_id)
    assert job["state"] == "failed"
    assert {t["state"] for t in job["tasks"]} == {"stopping"}
    assert h.agents.commands(StopTaskCommand) == []
    # Another hospital's word does not end hospital-us's task.
    us_task = next(t["id"] for t in job["tasks"] if t["participant"] == "hospital-us")
    await manager.on_event(Event(agent_id="hospital-eu", kind="task_stopped", task_id=us_task))
    assert {t["state"] for t in (await h.job(job_id))["tasks"]} == {"stopping"}
    h.agents.down = False
    job = await eventually(
        lambda: h.job(job_id),
        until=lambda job: {t["state"] for t in job["tasks"]} == {"stopped"},
        timeout=10,
    )
    assert {a for a, _ in h.agents.commands(StopTaskCommand)} == {"hospital-us", "hospital-eu"}


async def _prepared(agents: ScriptedAgents, agent: str) -> bool:
    return any(a == agent for a, _ in agents.commands(PrepareTaskCommand))
