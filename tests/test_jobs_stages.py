"""The job pipeline's stages, one by one, on real SQLite, a real CA and the real orchestrator
queue, with the bus, the provider, the SuperLink control and the Model Manager faked: every
stage's failure paths without sockets or child processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.records import Failover, JobFailure
from fedsky.controller.jobs.stages.assign import assign_all
from fedsky.controller.jobs.stages.cleanup import clean_up
from fedsky.controller.jobs.stages.launch import launch_aggregator
from fedsky.controller.jobs.stages.place import place_aggregator
from fedsky.controller.jobs.stages.train import check_agents, check_run, train
from fedsky.controller.orchestrator.failures import FailureReason
from fedsky.controller.orchestrator.tasks import list_tasks
from fedsky.controller.placement.settings import PlacementConfig
from fedsky.shared.messages import (
    Event,
    FailureKind,
    PrepareTaskCommand,
    RunFinished,
    StartTaskCommand,
    StopTaskCommand,
)

from tests.fakes.jobs import Harness, make_harness
from tests.support.wait import eventually


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


async def _launched(h: Harness, job_id: str = "unit-0001") -> object:
    run = await h.new_job(job_id)
    placement = await place_aggregator(h.ctx, run)
    await launch_aggregator(h.ctx, run, placement)
    return run


# --- placing -----------------------------------------------------------------------------------


async def test_place_chooses_a_linked_cloud_and_records_it(h: Harness) -> None:
    run = await h.new_job()
    placement = await place_aggregator(h.ctx, run)
    assert placement.provider == "aws"
    assert placement.cloud == "aws"
    job = await h.job()
    assert job["placement"]["provider"] == "aws"
    assert job["placement"]["choice"]["region"] == placement.region
    assert "placed on aws:" in await h.log_text()


async def test_place_without_linked_clouds_uses_the_local_provider(h: Harness) -> None:
    h.clouds.linked = []
    placement = await place_aggregator(h.ctx, await h.new_job())
    assert placement.provider == "local"
    assert "no cloud is linked: the local provider stands in" in await h.log_text()


async def test_place_uses_the_jobs_search_and_the_configured_baseline(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    h.ctx.config = h.ctx.config.model_copy(
        update={
            "placement": PlacementConfig(baseline="aws:ap-northeast-2:m5.xlarge", krw_per_usd=1500)
        }
    )
    run = await h.new_job(placement={"method": "nsga2"})
    placement = await place_aggregator(h.ctx, run)
    assert placement.method == "nsga2"
    record = (await h.job())["placement"]
    assert record["method"] == "nsga2"
    assert (record["baseline"]["region"], record["baseline"]["instance_type"]) == (
        "ap-northeast-2",
        "m5.xlarge",
    )


async def test_place_infeasible_fails_the_job_with_the_reason(h: Harness) -> None:
    run = await h.new_job(placement={"max_cost": "0.01 USD/month"})
    with pytest.raises(JobFailure, match="no feasible placement"):
        await place_aggregator(h.ctx, run)


# --- launching ---------------------------------------------------------------------------------


async def test_launch_records_the_aggregator_and_opens_only_allowed_sources(h: Harness) -> None:
    run = await _launched(h)
    provider = h.clouds.provider_
    assert len(provider.launched) == 1
    assert provider.launched[0].allowed_sources == ("203.0.113.0/24",)
    job = await h.job()
    assert job["aggregator"]["ref"] == "i-unit-0001"
    assert job["aggregator"]["account"] == "acme-aws"
    assert run.control is h.control  # type: ignore[attr-defined]
    assert "aggregator up at 198.51.100.7:9092 (aws)" in await h.log_text()


async def test_launch_failure_fails_the_job(h: Harness) -> None:
    h.clouds.provider_.fail_launch = "InsufficientInstanceCapacity"
    run = await h.new_job()
    placement = await place_aggregator(h.ctx, run)
    with pytest.raises(JobFailure, match="launching the aggregator: InsufficientInstanceCapacity"):
        await launch_aggregator(h.ctx, run, placement)


async def test_launch_refused_when_no_account_validates(h: Harness) -> None:
    h.clouds.refuse_launch = "no linked aws account validates now"
    run = await h.new_job()
    placement = await place_aggregator(h.ctx, run)
    with pytest.raises(JobFailure, match="no linked aws account validates now"):
        await launch_aggregator(h.ctx, run, placement)
    assert h.clouds.provider_.launched == []


# --- assigning ---------------------------------------------------------------------------------


async def test_assign_puts_every_participant_on_a_vm_with_registered_keys(h: Harness) -> None:
    run = await _launched(h)
    await assign_all(h.ctx, run)  # type: ignore[arg-type]
    for part in run.participants.values():  # type: ignore[attr-defined]
        assert part.vm == "vm-001"
        assert part.node_id in h.control.registered
        assert part.key_role == "node"
    tasks = await h.store.run(list_tasks, "unit-0001")
    assert sorted(t["state"] for t in tasks) == ["running", "running"]
    starts = h.agents.commands(StartTaskCommand)
    assert {a for a, _ in starts} == {"hospital-us", "hospital-eu"}
    assert all(c.superlink == "198.51.100.7:9092" for _, c in starts)  # type: ignore[attr-defined]


async def test_an_agent_that_refuses_moves_the_participant_to_its_next_vm(h: Harness) -> None:
    def refuse_first_vm(agent: str, command: object) -> list[tuple[str, str]] | None:
        if (
            isinstance(command, PrepareTaskCommand)
            and agent == "hospital-eu"
            and command.vm == "vm-001"
        ):
            return [("command_rejected", "vm-001 is not running")]
        return None

    h.agents.behave = refuse_first_vm
    run = await _launched(h)
    await assign_all(h.ctx, run)  # type: ignore[arg-type]
    eu = run.participants["hospital-eu"]  # type: ignore[attr-defined]
    assert eu.vm == "vm-002"
    assert eu.attempt == 2
    explain = await h.ctx.queue.explain("unit-0001")
    attempts = explain["participants"]["hospital-eu"]["attempts"]
    assert [a["vm"] for a in attempts] == ["vm-001", "vm-002"]
    assert attempts[0]["state"] == "failed"
    assert "attempt 1 on vm-001 failed: command rejected" in await h.log_text()


async def test_an_agent_refusing_on_every_vm_fails_the_job_after_max_tries(
    tmp_path: Path,
) -> None:
    # Three VMs, five tries: the fourth and fifth wait for a VM to be rested.
    h = make_harness(tmp_path, rest_after_failure_s=0.2)
    h.agents.behave = lambda agent, command: (
        [("task_failed", "the SuperNode exited with status 1", FailureKind.SUPERNODE_EXITED)]
        if isinstance(command, PrepareTaskCommand) and agent == "hospital-us"
        else None
    )
    run = await _launched(h)
    with pytest.raises(JobFailure, match="hospital-us"):
        await assign_all(h.ctx, run)  # type: ignore[arg-type]
    prepares = [c for a, c in h.agents.commands(PrepareTaskCommand) if a == "hospital-us"]
    assert len(prepares) == h.ctx.config.orchestrator.max_tries


async def test_a_missing_dataset_fails_the_job_without_trying_other_vms(h: Harness) -> None:
    h.agents.behave = lambda agent, command: (
        [("task_failed", "dataset 'digits' is not configured", FailureKind.DATASET_MISSING)]
        if isinstance(command, PrepareTaskCommand) and agent == "hospital-eu"
        else None
    )
    run = await _launched(h)
    with pytest.raises(JobFailure, match="dataset 'digits'"):
        await assign_all(h.ctx, run)  # type: ignore[arg-type]
    assert len([a for a, _ in h.agents.commands(PrepareTaskCommand) if a == "hospital-eu"]) == 1


async def test_a_failover_that_waits_for_a_rested_vm_then_uses_it(tmp_path: Path) -> None:
    # Every VM of hospital-eu fails once: the fourth try finds them all resting, waits for the
    # first to be rested and reassigns the participant to it (it used to crash the job).
    h = make_harness(tmp_path, max_tries=5, rest_after_failure_s=0.6)
    failed: set[str] = set()

    def each_vm_fails_once(agent: str, command: object) -> list[tuple[str, str]] | None:
        if (
            isinstance(command, PrepareTaskCommand)
            and agent == "hospital-eu"
            and command.vm not in failed
        ):
            failed.add(command.vm)
            return [("command_rejected", f"{command.vm} is not running")]
        return None

    h.agents.behave = each_vm_fails_once
    run = await _launched(h)
    await assign_all(h.ctx, run)  # type: ignore[arg-type]
    eu = run.participants["hospital-eu"]  # type: ignore[attr-defined]
    assert eu.attempt == 4
    assert failed == {"vm-001", "vm-002", "vm-003"}
    attempts = (await h.ctx.queue.explain("unit-0001"))["participants"]["hospital-eu"]["attempts"]
    assert [a["state"] for a in attempts] == ["failed", "failed", "failed", "running"]
    assert "retrying later" in await h.log_text()


async def test_an_agent_still_starting_is_not_taken_for_silent(tmp_path: Path) -> None:
    # A first start installs the client payload in the VM (minutes): the agent says
    # `task_starting` every few seconds, and each one restarts the acknowledgement clock.
    h = make_harness(tmp_path, ack_timeout_s=0.3, max_tries=1)
    real_send = h.agents.send_command

    async def progress(agent: str, task_id: str) -> None:
        for _ in range(5):  # 1 s of progress, over three times the timeout
            await asyncio.sleep(0.2)
            h.agents.deliver(Event(agent_id=agent, kind="task_starting", task_id=task_id))
        h.agents.deliver(Event(agent_id=agent, kind="task_running", task_id=task_id))

    background: list[asyncio.Task[None]] = []

    async def slow_start(agent: str, command: object) -> None:
        if isinstance(command, StartTaskCommand) and agent == "hospital-us":
            h.agents.sent.append((agent, command))  # type: ignore[arg-type]
            background.append(asyncio.create_task(progress(agent, command.task_id)))
            return
        await real_send(agent, command)  # type: ignore[arg-type]

    h.agents.send_command = slow_start  # type: ignore[method-assign]
    run = await _launched(h)
    await assign_all(h.ctx, run)  # type: ignore[arg-type]
    assert run.participants["hospital-us"].attempt == 1  # type: ignore[attr-defined]
    # Silence is still silence: progress that stops is taken as an unresponsive agent.
    h2 = make_harness(tmp_path / "again", ack_timeout_s=0.3, max_tries=1)

    async def progress_then_silence(agent: str, command: object) -> None:
        if isinstance(command, StartTaskCommand) and agent == "hospital-us":
            h2.agents.deliver(Event(agent_id=agent, kind="task_starting", task_id=command.task_id))
            return
        await h2.agents.__class__.send_command(h2.agents, agent, command)  # type: ignore[arg-type]

    h2.agents.send_command = progress_then_silence  # type: ignore[method-assign]
    run2 = await _launched(h2)
    with pytest.raises(JobFailure, match="hospital-us"):
        await assign_all(h2.ctx, run2)  # type: ignore[arg-type]


async def test_a_silent_agent_counts_as_unresponsive(tmp_path: Path) -> None:
    h = make_harness(tmp_path, ack_timeout_s=0.2, max_tries=1)
    h.agents.behave = lambda agent, command: [] if agent == "hospital-us" else None
    run = await _launched(h)
    with pytest.raises(JobFailure, match="hospital-us"):
        await assign_all(h.ctx, run)  # type: ignore[arg-type]
    explain = await h.ctx.queue.explain("unit-0001")
    us = explain["participants"]["hospital-us"]["attempts"]
    assert us[0]["reason"] == FailureReason.AGENT_UNRESPONSIVE.value


# --- training ----------------------------------------------------------------------------------


async def _training(h: Harness) -> tuple[object, asyncio.Task[RunFinished]]:
    run = await _launched(h)
    await assign_all(h.ctx, run)  # type: ignore[arg-type]
    task = asyncio.create_task(train(h.ctx, run, poll_s=0.05))  # type: ignore[arg-type]
    await eventually(lambda: run.finished is not None, what="the run to start")  # type: ignore[attr-defined]
    return run, task


def _finish(run: object, status: str = "completed") -> None:
    run.finished.set_result(  # type: ignore[attr-defined]
        RunFinished(job_id="unit-0001", status=status, rounds_completed=2, num_rounds=2)
    )


async def test_train_returns_the_run_result(h: Harness) -> None:
    run, task = await _training(h)
    assert h.control.runs_started == 1
    _finish(run)
    result = await asyncio.wait_for(task, 5)
    assert result.status == "completed"


async def test_a_vm_dying_mid_training_fails_the_participant_over(h: Harness) -> None:
    run, task = await _training(h)
    eu = run.participants["hospital-eu"]  # type: ignore[attr-defined]
    old_task, old_node = eu.task_id, eu.node_id
    # The agent reports the SuperNode's VM gone, as it does when libvirt says it stopped.
    h.agents.deliver(
        Event(
            agent_id="hospital-eu",
            kind="task_failed",
            task_id=old_task,
            detail="vm-001 stopped",
            failure_kind=FailureKind.VM_STOPPED,
        )
    )
    await eventually(
        lambda: eu.task_id not in (None, old_task) and eu.vm == "vm-002",
        what="hospital-eu to run on its next VM",
    )
    assert eu.vm == "vm-002"
    assert old_node in h.control.unregistered
    assert eu.key_role == "standby"  # the pre-registered key: no new registration round-trip
    stops = [c for a, c in h.agents.commands(StopTaskCommand) if a == "hospital-eu"]
    assert [c.task_id for c in stops] == [old_task]  # type: ignore[attr-defined]
    _finish(run)
    await asyncio.wait_for(task, 5)


async def test_an_agent_going_offline_mid_training_is_failed_over(h: Harness) -> None:
    run = await _launched(h)
    await assign_all(h.ctx, run)  # type: ignore[arg-type]
    us = run.participants["hospital-us"]  # type: ignore[attr-defined]
    old_task, old_node = us.task_id, us.node_id
    h.set_online("hospital-us", False)
    # Offline, none of the hospital's VMs is eligible: below min_participants the job fails,
    # after the lost node was unregistered and its task told to stop.
    with pytest.raises(JobFailure, match="hospital-us: no eligible VM among 3: 3 offline"):
        await check_agents(h.ctx, run)  # type: ignore[arg-type]
    assert old_node in h.control.unregistered
    assert [c.task_id for _, c in h.agents.commands(StopTaskCommand)] == [old_task]  # type: ignore[attr-defined]
    assert "hospital-us is offline; moving it to its next VM" in await h.log_text()


async def test_the_job_goes_on_without_a_participant_while_enough_remain(tmp_path: Path) -> None:
    h = make_harness(tmp_path, max_tries=1)
    run = await h.new_job(hyperparameters={"rounds": 2, "min_participants": 1})
    placement = await place_aggregator(h.ctx, run)
    await launch_aggregator(h.ctx, run, placement)
    await assign_all(h.ctx, run)
    from fedsky.controller.jobs.stages.failover import fail_over

    await fail_over(h.ctx, run, Failover("hospital-eu", FailureReason.SUPERNODE_ERROR, "boom"))
    assert run.participants["hospital-eu"].task_id is None
    assert "the job carries on without it" in await h.log_text()


async def test_losing_a_participant_below_the_minimum_fails_the_job(tmp_path: Path) -> None:
    h = make_harness(tmp_path, max_tries=1)
    run = await _launched(h)
    await assign_all(h.ctx, run)  # type: ignore[arg-type]
    from fedsky.controller.jobs.stages.failover import fail_over

    with pytest.raises(JobFailure, match="hospital-eu"):
        await fail_over(
            h.ctx,
            run,  # type: ignore[arg-type]
            Failover("hospital-eu", FailureReason.SUPERNODE_ERROR, "boom"),
        )


async def test_a_run_that_ends_without_its_result_fails_the_job(h: Harness) -> None:
    run = await _launched(h)
    run.run_id = 7  # type: ignore[attr-defined]
    run.finished = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
    h.control.status = "finished:failed"
    with pytest.raises(JobFailure, match="without reporting its result"):
        await check_run(run, settle_s=0.01)  # type: ignore[arg-type]


async def test_an_aggregator_that_stops_answering_fails_the_job(h: Harness) -> None:
    run = await _launched(h)
    run.run_id = 7  # type: ignore[attr-defined]

    async def broken(run_id: int) -> str:
        from fedsky.controller.clouds.base import ProviderError

        raise ProviderError("connection refused")

    h.control.run_status = broken  # type: ignore[method-assign]
    h.clouds.provider_.healthy_answer = False
    with pytest.raises(JobFailure, match="stopped answering"):
        await check_run(run, settle_s=0.01)  # type: ignore[arg-type]


# --- cleaning up -------------------------------------------------------------------------------


async def test_cleanup_stops_tasks_terminates_the_aggregator_and_revokes(h: Harness) -> None:
    run = await _launched(h)
    await assign_all(h.ctx, run)  # type: ignore[arg-type]
    await h.store.run(jobstore.set_state, "unit-0001", "failed", error="x", message="x")
    await clean_up(h.ctx, "unit-0001", run=run, final_state="failed")  # type: ignore[arg-type]
    stops = h.agents.commands(StopTaskCommand)
    assert {a for a, _ in stops} == {"hospital-us", "hospital-eu"}
    tasks = await h.store.run(list_tasks, "unit-0001")
    # Stopping until each agent confirms (the job manager records that: test_jobs_driver).
    assert {t["state"] for t in tasks} == {"stopping"}
    assert [x.ref for x in h.clouds.provider_.terminated] == ["i-unit-0001"]
    assert h.revocations.revoked == 0  # a cloud VM enrols for its own certificate
    assert h.revocations.ended == [False]
    assert h.models.finished == {"unit-0001": "failed"}
    assert await h.ctx.queue.active_tasks() == {}


async def test_cleanup_after_a_restart_finds_the_aggregator_from_the_record(h: Harness) -> None:
    await _launched(h)
    job = await h.job()
    await clean_up(h.ctx, "unit-0001", job=job, final_state="failed")
    assert [x.ref for x in h.clouds.provider_.terminated] == ["i-unit-0001"]


def test_each_rounds_prediction_sits_beside_its_measurement() -> None:
    from fedsky.controller.jobs.forecast import round_times
    from fedsky.controller.models.records import RoundRecord

    def record(number: int, duration: float | None, phases: tuple[float, ...] = ()) -> RoundRecord:
        return RoundRecord(
            job_id="unit-0001",
            round=number,
            metrics={},
            all_metrics={
                f"{name}_phase_s": value
                for name, value in zip(("train", "aggregate", "evaluate"), phases, strict=False)
            },
            per_class=None,
            confusion_matrix=None,
            participants=[],
            failures=[],
            duration_s=duration,
            weights_sha256=None,
            weights_size=None,
            weights_pruned_at=None,
            pinned=False,
            recorded_at="2026-12-04T00:00:00+00:00",
        )

    placement = {"choice": {"round_time_s": 22.0}}
    rows = round_times(
        placement, [record(2, 30.0), record(1, 20.0, (14.0, 0.5, 5.5)), record(3, None)]
    )
    assert rows == [
        {
            "round": 1,
            "predicted_s": 22.0,
            "measured_s": 20.0,
            "error": 0.1,
            "phases_s": {"train": 14.0, "aggregate": 0.5, "evaluate": 5.5},
            "forecast_s": 22.0,  # nothing measured yet: the placement's
            "forecast_error": 0.1,
        },
        {
            "round": 2,
            "predicted_s": 22.0,
            "measured_s": 30.0,
            "error": 0.2667,
            "phases_s": None,  # an aggregator that did not time its phases
            "forecast_s": 20.0,  # round 1 as measured
            "forecast_error": 0.3333,
        },
        {
            "round": 3,
            "predicted_s": 22.0,
            "measured_s": None,
            "error": None,
            "phases_s": None,
            "forecast_s": 25.0,  # the mean of rounds 1 and 2
            "forecast_error": None,
        },
    ]
    assert round_times(None, [record(1, 20.0)])[0]["predicted_s"] is None
