"""QueueStore over the controller's real SQLite store: queue position across restarts,
attempts with reasons, failover to max_tries, and `fedctl job explain`'s text."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fedsky.controller.inventory import store as inventory
from fedsky.controller.orchestrator.choice import FailureReason, QueueState, Rest, choose
from fedsky.controller.orchestrator.eligibility import skip_reasons
from fedsky.controller.orchestrator.explain import render_explain
from fedsky.controller.orchestrator.policy import (
    MinResources,
    OrchestratorError,
    Policy,
    VmCandidate,
    candidates_from_inventory,
)
from fedsky.controller.orchestrator.store import QueueStore
from fedsky.controller.store import Store
from fedsky.shared.messages import HostInfo, Report, VmInfo

MIN = MinResources(vcpus=2, memory_gib=4, disk_gib=20)
POLICY = Policy()


def study_vms(agent: str = "hospital-eu") -> list[VmCandidate]:
    def vm(name: str, state: str, vcpus: int, mem: float, disk: float) -> VmCandidate:
        return VmCandidate(
            agent_id=agent, vm=name, state=state, vcpus=vcpus, memory_gib=mem, disk_gib=disk
        )

    return [
        vm("vm-001", "running", 4, 8, 40),
        vm("vm-002", "running", 2, 4, 20),
        vm("vm-003", "shutoff", 8, 16, 80),
        vm("vm-004", "shutoff", 8, 16, 80),
        vm("vm-005", "running", 1, 2, 10),
    ]


def equal_vms(n: int = 3) -> list[VmCandidate]:
    return [
        VmCandidate(
            agent_id="hospital-eu",
            vm=f"vm-00{i}",
            state="running",
            vcpus=2,
            memory_gib=4,
            disk_gib=20,
        )
        for i in range(1, n + 1)
    ]


async def run_job(qs: QueueStore, job: str, vms: list[VmCandidate], now: float) -> str:
    decision = await qs.assign(
        job_id=job, participant="hospital-eu", candidates=vms, minimum=MIN, policy=POLICY, now=now
    )
    assert decision.chosen is not None
    await qs.mark(job_id=job, participant="hospital-eu", state="running", now=now + 5)
    await qs.mark(job_id=job, participant="hospital-eu", state="succeeded", now=now + 60)
    return decision.chosen.vm


async def test_queue_position_survives_a_controller_restart(tmp_path: Path) -> None:
    db = tmp_path / "controller.db"
    store = Store(db)
    qs = QueueStore(store)
    taken = [await run_job(qs, f"job-{i}", equal_vms(), now=100.0 * i) for i in range(2)]
    store.close()

    # A new process opens the same file: the queue goes on where it stopped.
    store = Store(db)
    qs = QueueStore(store)
    assert (await qs.load("hospital-eu")).cursor == "hospital-eu/vm-002"
    taken += [await run_job(qs, f"job-{i}", equal_vms(), now=100.0 * i) for i in range(2, 5)]
    store.close()
    assert taken == ["vm-001", "vm-002", "vm-003", "vm-001", "vm-002"]


async def test_saved_queue_state_loads_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    qs = QueueStore(store)
    assert await qs.load("hospital-eu") == QueueState(participant="hospital-eu")
    state = QueueState(
        participant="hospital-eu",
        cursor="hospital-eu/vm-002",
        credits={"hospital-eu/vm-001": 1.5, "hospital-eu/vm-002": -1.5},
        rests={"hospital-eu/vm-003": Rest(until=130.0, reason="vm_left_running")},
    )
    await qs.save(state, now=10.0)
    assert await qs.load("hospital-eu") == state
    # Saving again replaces the credits and rests; it does not add to them.
    await qs.save(QueueState(participant="hospital-eu", cursor="hospital-eu/vm-001"), now=20.0)
    assert await qs.load("hospital-eu") == QueueState(
        participant="hospital-eu", cursor="hospital-eu/vm-001"
    )
    store.close()


async def test_weighted_credits_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "controller.db"
    taken: list[str] = []
    for i in range(9):
        # Reopen the store before every job: the worst case for a lost position.
        store = Store(db)
        taken.append(await run_job(QueueStore(store), f"job-{i}", study_vms(), now=100.0 * i))
        store.close()
    assert taken.count("vm-001") == 6
    assert taken.count("vm-002") == 3
    assert not set(taken) & {"vm-003", "vm-004", "vm-005"}


async def test_failover_records_each_attempt_and_stops_at_max_tries(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    qs = QueueStore(store)
    policy = Policy(max_tries=3, rest_after_failure_s=0)
    vms = equal_vms(2)
    first = await qs.assign(
        job_id="j1", participant="hospital-eu", candidates=vms, minimum=MIN, policy=policy, now=0
    )
    assert first.chosen is not None
    assert first.chosen.vm == "vm-001"
    assert await qs.active_tasks() == {"hospital-eu/vm-001": 1}
    reasons = [
        FailureReason.SUPERNODE_ERROR,
        FailureReason.VM_LEFT_RUNNING,
        FailureReason.AGENT_UNRESPONSIVE,
    ]
    chosen = ["vm-001"]
    decision = first
    for i, reason in enumerate(reasons, start=1):
        decision = await qs.fail_over(
            job_id="j1",
            participant="hospital-eu",
            reason=reason,
            detail=f"failure {i}",
            candidates=vms,
            minimum=MIN,
            policy=policy,
            now=10.0 * i,
        )
        if decision.chosen is not None:
            chosen.append(decision.chosen.vm)
    assert chosen == ["vm-001", "vm-002", "vm-001"]
    assert decision.chosen is None
    assert decision.summary == "gave up: 3 tries made, the most allowed (max_tries 3)"
    attempts = await qs.attempts("j1")
    assert [(a.number, a.vm, a.state, a.reason, a.detail) for a in attempts] == [
        (1, "vm-001", "failed", "supernode_error", "failure 1"),
        (2, "vm-002", "failed", "vm_left_running", "failure 2"),
        (3, "vm-001", "failed", "agent_unresponsive", "failure 3"),
    ]
    assert [(a.assigned_at, a.ended_at) for a in attempts] == [
        (0.0, 10.0),
        (10.0, 20.0),
        (20.0, 30.0),
    ]
    assert await qs.active_tasks() == {}
    assert len(await qs.decisions("j1")) == 4
    with pytest.raises(OrchestratorError, match="no attempt assigned or running"):
        await qs.fail_over(
            job_id="j1",
            participant="hospital-eu",
            reason=FailureReason.SUPERNODE_ERROR,
            candidates=vms,
            minimum=MIN,
            policy=policy,
            now=40,
        )
    store.close()


async def test_a_second_assignment_while_one_runs_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    qs = QueueStore(store)
    await qs.assign(
        job_id="j",
        participant="hospital-eu",
        candidates=equal_vms(),
        minimum=MIN,
        policy=POLICY,
        now=0,
    )
    with pytest.raises(OrchestratorError, match="already has attempt 1 on vm-001"):
        await qs.assign(
            job_id="j",
            participant="hospital-eu",
            candidates=equal_vms(),
            minimum=MIN,
            policy=POLICY,
            now=1,
        )
    with pytest.raises(OrchestratorError, match="not 'failed'; use fail_over"):
        await qs.mark(job_id="j", participant="hospital-eu", state="failed", now=2)
    store.close()


async def test_concurrent_jobs_take_distinct_turns(tmp_path: Path) -> None:
    # Three stores on one file: three connections, each in its own thread, so the jobs' choices
    # really race; the BEGIN IMMEDIATE around each read-choose-write keeps the turns distinct.
    db = tmp_path / "c.db"
    stores = [Store(db) for _ in range(3)]
    queues = [QueueStore(store) for store in stores]

    async def job(i: int) -> str:
        d = await queues[i % 3].assign(
            job_id=f"j{i}",
            participant="hospital-eu",
            candidates=equal_vms(),
            minimum=MIN,
            policy=POLICY,
            now=float(i),
        )
        assert d.chosen is not None
        return d.chosen.vm

    got = await asyncio.gather(*(job(i) for i in range(6)))
    # Six turns over three VMs: each VM exactly twice, whatever the order the jobs ran in.
    assert sorted(got) == ["vm-001", "vm-001", "vm-002", "vm-002", "vm-003", "vm-003"]
    for store in stores:
        store.close()


async def test_a_failover_moves_to_the_next_vm(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    qs = QueueStore(store)
    d = await qs.assign(
        job_id="j",
        participant="hospital-eu",
        candidates=study_vms(),
        minimum=MIN,
        policy=POLICY,
        now=0,
    )
    assert d.chosen is not None
    await qs.mark(job_id="j", participant="hospital-eu", state="running", now=3)
    assert await qs.active_tasks() == {"hospital-eu/vm-001": 1}
    d2 = await qs.fail_over(
        job_id="j",
        participant="hospital-eu",
        reason=FailureReason.VM_LEFT_RUNNING,
        candidates=study_vms(),
        minimum=MIN,
        policy=POLICY,
        now=30,
    )
    assert d2.chosen is not None
    assert d2.chosen.vm == "vm-002"
    data = await qs.explain("j")
    assert [a["state"] for a in data["participants"]["hospital-eu"]["attempts"]] == [
        "failed",
        "assigned",
    ]
    store.close()


async def test_explain_shows_every_vm_considered_and_why(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    qs = QueueStore(store)
    t0 = 1_750_000_000.0  # a real clock: times render as UTC
    await qs.assign(
        job_id="j7",
        participant="hospital-eu",
        candidates=study_vms(),
        minimum=MIN,
        policy=POLICY,
        now=t0,
    )
    await qs.mark(job_id="j7", participant="hospital-eu", state="running", now=t0 + 6)
    await qs.fail_over(
        job_id="j7",
        participant="hospital-eu",
        reason=FailureReason.VM_LEFT_RUNNING,
        detail="destroyed",
        candidates=study_vms(),
        minimum=MIN,
        policy=POLICY,
        now=t0 + 95,
    )
    await qs.assign(
        job_id="j7",
        participant="hospital-us",
        candidates=study_vms("hospital-us"),
        minimum=MIN,
        policy=POLICY,
        now=t0,
    )
    text = render_explain(await qs.explain("j7"))
    store.close()
    vm5 = (
        "1 vCPUs, below the 2 required; 2 GiB memory, below the 4 GiB required; "
        "10 GiB disk, below the 20 GiB required"
    )
    expected = [
        "job j7",
        "hospital-eu: 2 attempts, on vm-002",
        "  attempt 1 on vm-001 (hospital-eu): "
        "failed after 95 s: the VM left the running state (destroyed)",
        "  attempt 2 on vm-002 (hospital-eu): assigned at 2025-06-15 15:08:15Z, not yet running",
        "  decision for attempt 1 at 2025-06-15 15:06:40Z (job start): "
        "took vm-001 on hospital-eu (2 of 5 VMs eligible)",
        "    vm-001  taken: next in the queue (weight 2 of 3 among 2 eligible VMs)",
        "    vm-002  eligible, not taken: vm-001 was ahead in the queue (weight 1)",
        "    vm-003  skipped: state is shutoff, not running",
        "    vm-004  skipped: state is shutoff, not running",
        "    vm-005  skipped: " + vm5,
        "  decision for attempt 2 at 2025-06-15 15:08:15Z "
        "(failover after vm-001 failed: the VM left the running state (destroyed)): "
        "took vm-002 on hospital-eu (1 of 5 VMs eligible)",
        "    vm-002  taken: next in the queue (weight 1 of 1 among 1 eligible VM)",
        "    vm-003  skipped: state is shutoff, not running",
        "    vm-004  skipped: state is shutoff, not running",
        "    vm-005  skipped: " + vm5,
        "    vm-001  skipped: resting 120 s more after a failure (the VM left the running state)",
        "hospital-us: 1 attempt, on vm-001",
        "  attempt 1 on vm-001 (hospital-us): assigned at 2025-06-15 15:06:40Z, not yet running",
        "  decision for attempt 1 at 2025-06-15 15:06:40Z (job start): "
        "took vm-001 on hospital-us (2 of 5 VMs eligible)",
        "    vm-001  taken: next in the queue (weight 2 of 3 among 2 eligible VMs)",
        "    vm-002  eligible, not taken: vm-001 was ahead in the queue (weight 1)",
        "    vm-003  skipped: state is shutoff, not running",
        "    vm-004  skipped: state is shutoff, not running",
        "    vm-005  skipped: " + vm5,
    ]
    assert text.splitlines() == expected


async def test_explain_of_a_participant_with_no_vm(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    qs = QueueStore(store)
    off = [
        VmCandidate(
            agent_id="h",
            vm="vm-1",
            state="running",
            vcpus=2,
            memory_gib=4,
            disk_gib=20,
            agent_online=False,
        ),
        VmCandidate(agent_id="h", vm="vm-2", state="crashed", vcpus=2, memory_gib=4, disk_gib=20),
    ]
    d = await qs.assign(
        job_id="j", participant="h", candidates=off, minimum=MIN, policy=POLICY, now=5.0
    )
    assert d.chosen is None
    assert await qs.attempts("j") == []
    text = render_explain(await qs.explain("j"))
    assert "h: 0 attempts" in text
    assert "(job start): no eligible VM among 2: 1 offline, 1 not running" in text
    assert "vm-1  skipped: agent h is offline" in text
    assert render_explain(await qs.explain("nope")) == "job nope\n  no assignments recorded"
    await qs.forget_job("j")
    assert await qs.decisions("j") == []
    store.close()


async def test_candidates_from_the_real_inventory_tables(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    inventory.ensure_schema(store)
    qs = QueueStore(store)
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    await store.run(
        lambda conn: conn.execute(
            "INSERT INTO agents(id, location, enrolled_at) "
            "VALUES ('hospital-eu', 'aws:eu-west-1', ?)",
            (now.isoformat(),),
        )
    )
    host = HostInfo(
        hostname="kvm-eu",
        cpu_count=16,
        cpu_percent=20.0,
        load_1m=1.0,
        memory_total_mib=65536,
        memory_available_mib=32768,
        disk_total_gib=1000,
        disk_free_gib=500,
    )
    vms = [
        VmInfo(
            name="vm-001", uuid="1" * 32, state="running", vcpus=4, memory_mib=8192, disk_gib=40
        ),
        VmInfo(
            name="vm-002", uuid="2" * 32, state="running", vcpus=2, memory_mib=4096, disk_gib=20
        ),
        VmInfo(
            name="vm-003", uuid="3" * 32, state="shutoff", vcpus=8, memory_mib=16384, disk_gib=80
        ),
        VmInfo(
            name="vm-005", uuid="5" * 32, state="running", vcpus=1, memory_mib=2048, disk_gib=10
        ),
    ]
    report = Report(agent_id="hospital-eu", seq=1, sent_at=now, host=host, vms=vms)
    await store.run(inventory.record_reports, [(report, now)], history_limit=10)
    rows = await store.run(inventory.list_vms, "hospital-eu")
    first = await qs.assign(
        job_id="j",
        participant="hospital-eu",
        candidates=candidates_from_inventory(rows, now=now),
        minimum=MIN,
        policy=POLICY,
        now=now.timestamp(),
    )
    assert first.chosen is not None
    assert first.chosen.vm == "vm-001"
    assert first.chosen.uuid == "1" * 32
    assert first.chosen.memory_gib == 8.0
    assert first.chosen.host == "kvm-eu"
    assert first.chosen.host_memory_available_gib == 32.0

    # A second job while the first runs: vm-001 is busy, vm-002 is next.
    later = now + timedelta(seconds=20)
    candidates = candidates_from_inventory(rows, now=later, tasks=await qs.active_tasks())
    assert {c.vm: c.tasks for c in candidates} == {
        "vm-001": 1,
        "vm-002": 0,
        "vm-003": 0,
        "vm-005": 0,
    }
    assert [c.report_age_s for c in candidates] == [20.0] * 4
    decision, _ = choose(
        participant="hospital-eu",
        candidates=candidates,
        minimum=MIN,
        policy=POLICY,
        state=QueueState(participant="hospital-eu"),
        now=later.timestamp(),
    )
    assert decision.chosen is not None
    assert decision.chosen.vm == "vm-002"

    # Ten minutes without a report: nothing is trusted.
    stale = candidates_from_inventory(rows, now=now + timedelta(minutes=10))
    for c in stale:
        assert "last report 600 s old (limit 60 s)" in skip_reasons(
            c, minimum=MIN, policy=POLICY, now=0
        )
    store.close()
