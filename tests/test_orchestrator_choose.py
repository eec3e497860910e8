"""The orchestrator's pure decisions: eligibility, the weighted queue, failover, feasibility."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from fedsky.controller.orchestrator.choice import (
    Failure,
    FailureReason,
    QueueState,
    Rest,
    choose,
    fail_over,
    ring_order,
)
from fedsky.controller.orchestrator.eligibility import (
    capacity_weight,
    check_feasible,
    eligible,
    skip_reasons,
)
from fedsky.controller.orchestrator.policy import (
    MinResources,
    Policy,
    VmCandidate,
    candidates_from_report,
)
from fedsky.shared.messages import VM_STATES, HostInfo, Report, TaskSummary, VmInfo
from hypothesis import given, settings
from hypothesis import strategies as st

MIN = MinResources(vcpus=2, memory_gib=4, disk_gib=20)
POLICY = Policy()


def vm(name: str, **kw: object) -> VmCandidate:
    base: dict[str, object] = {
        "agent_id": "hospital-eu",
        "vm": name,
        "state": "running",
        "vcpus": 2,
        "memory_gib": 4.0,
        "disk_gib": 20.0,
    }
    base.update(kw)
    return VmCandidate(**base)  # type: ignore[arg-type]


def study_vms(agent: str = "hospital-eu") -> list[VmCandidate]:
    return [
        vm("vm-001", agent_id=agent, vcpus=4, memory_gib=8, disk_gib=40),
        vm("vm-002", agent_id=agent),
        vm("vm-003", agent_id=agent, state="shutoff", vcpus=8, memory_gib=16, disk_gib=80),
        vm("vm-004", agent_id=agent, state="shutoff", vcpus=8, memory_gib=16, disk_gib=80),
        vm("vm-005", agent_id=agent, vcpus=1, memory_gib=2, disk_gib=10),
    ]


def pick(
    candidates: list[VmCandidate], state: QueueState, now: float = 0.0, policy: Policy = POLICY
):
    return choose(
        participant="hospital-eu",
        candidates=candidates,
        minimum=MIN,
        policy=policy,
        state=state,
        now=now,
    )


# --- Eligibility -------------------------------------------------------------------------------


def test_a_fit_running_fresh_vm_is_eligible() -> None:
    assert skip_reasons(vm("a"), minimum=MIN, policy=POLICY, now=0) == []
    assert eligible(vm("a"), minimum=MIN, policy=POLICY, now=0)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"agent_online": False}, "agent hospital-eu is offline"),
        ({"state": "paused"}, "state is paused, not running"),
        ({"vcpus": 1}, "1 vCPUs, below the 2 required"),
        ({"memory_gib": 3.5}, "3.5 GiB memory, below the 4 GiB required"),
        ({"disk_gib": 19}, "19 GiB disk, below the 20 GiB required"),
        ({"report_age_s": 61.0}, "last report 61 s old (limit 60 s)"),
        ({"host": "h1", "host_cpu_percent": 95.0}, "host h1 overloaded: CPU at 95% (limit 90%)"),
        (
            {"host_memory_available_gib": 0.4, "host_memory_total_gib": 4.0},
            "host overloaded: 0.4 GiB memory free (needs 0.5)",
        ),
        (
            {"host_memory_available_gib": 2.0, "host_memory_total_gib": 64.0},
            "host overloaded: 2.0 GiB memory free (needs 3.2)",
        ),
        ({"tasks": 1}, "already running 1 task (limit 1)"),
    ],
)
def test_each_rule_skips_with_its_reason(changes: dict[str, object], expected: str) -> None:
    candidate = vm("a", **changes)
    assert skip_reasons(candidate, minimum=MIN, policy=POLICY, now=0) == [expected]
    assert not eligible(candidate, minimum=MIN, policy=POLICY, now=0)


def test_thresholds_are_the_policys() -> None:
    loose = Policy(max_report_age_s=600, host_cpu_max_percent=99, max_tasks_per_vm=2)
    candidate = vm("a", report_age_s=300, host_cpu_percent=95, tasks=1)
    assert eligible(candidate, minimum=MIN, policy=loose, now=0)
    assert not eligible(candidate, minimum=MIN, policy=POLICY, now=0)


def test_resting_vm_is_skipped_until_its_rest_ends() -> None:
    rest = Rest(until=100.0, reason="vm_left_running")
    assert skip_reasons(vm("a"), minimum=MIN, policy=POLICY, now=40, rest=rest) == [
        "resting 60 s more after a failure (the VM left the running state)"
    ]
    assert eligible(vm("a"), minimum=MIN, policy=POLICY, now=100, rest=rest)


def test_every_reason_is_listed_at_once() -> None:
    reasons = skip_reasons(
        vm("a", state="shutoff", vcpus=1, memory_gib=2), minimum=MIN, policy=POLICY, now=0
    )
    assert reasons == [
        "state is shutoff, not running",
        "1 vCPUs, below the 2 required",
        "2 GiB memory, below the 4 GiB required",
    ]


# --- Property: never an unfit VM ---------------------------------------------------------------

candidate_st = st.builds(
    VmCandidate,
    agent_id=st.sampled_from(["hospital-eu", "hospital-us"]),
    vm=st.sampled_from([f"vm-{i:03d}" for i in range(1, 9)]),
    state=st.sampled_from(VM_STATES),
    vcpus=st.integers(0, 8),
    memory_gib=st.floats(0, 16, allow_nan=False),
    disk_gib=st.floats(0, 80, allow_nan=False),
    agent_online=st.booleans(),
    report_age_s=st.floats(0, 120, allow_nan=False),
    host_cpu_percent=st.floats(0, 100, allow_nan=False),
    tasks=st.integers(0, 2),
)


@settings(max_examples=300, deadline=None)
@given(
    candidates=st.lists(candidate_st, max_size=8, unique_by=lambda c: c.key),
    rounds=st.integers(1, 6),
    failing=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_never_chooses_a_vm_under_the_minimum_or_not_running(
    candidates: list[VmCandidate], rounds: int, failing: list[bool]
) -> None:
    state = QueueState(participant="p")
    now = 0.0
    tries = 0
    last: VmCandidate | None = None
    for i in range(rounds):
        if tries and failing[i] and last is not None:
            decision, state = fail_over(
                participant="p",
                failure=Failure(FailureReason.SUPERNODE_ERROR, vm_key=last.key, vm=last.vm),
                tries_so_far=tries,
                candidates=candidates,
                minimum=MIN,
                policy=POLICY,
                state=state,
                now=now,
            )
        else:
            decision, state = choose(
                participant="p",
                candidates=candidates,
                minimum=MIN,
                policy=POLICY,
                state=state,
                now=now,
            )
            tries = 0
        last = decision.chosen
        if last is not None:
            tries += 1
            assert last.state == "running"
            assert last.vcpus >= MIN.vcpus
            assert last.memory_gib >= MIN.memory_gib
            assert last.disk_gib >= MIN.disk_gib
            assert eligible(last, minimum=MIN, policy=POLICY, now=now, rest=None)
            assert last.key not in {k for k, r in state.rests.items() if r.until > now}
        else:
            assert not any(
                eligible(c, minimum=MIN, policy=POLICY, now=now, rest=state.rests.get(c.key))
                for c in candidates
            )
        # Every VM is accounted for in the explanation, exactly once.
        assert sorted(c.vm for c in decision.considerations) == sorted(
            c.vm for c in candidates
        ) or (decision.chosen is None and not decision.considerations)
        now += 7.0


# --- The circular queue ------------------------------------------------------------------------


def test_equal_vms_are_taken_in_turn_round_robin() -> None:
    vms = [vm(f"vm-00{i}") for i in (1, 2, 3)]
    state = QueueState(participant="hospital-eu")
    taken = []
    for _ in range(7):
        decision, state = pick(vms, state)
        assert decision.chosen is not None
        taken.append(decision.chosen.vm)
    assert taken == ["vm-001", "vm-002", "vm-003", "vm-001", "vm-002", "vm-003", "vm-001"]


def test_the_study_participant_spreads_by_free_capacity() -> None:
    # vm-001 fits the minimum twice, vm-002 once: two turns for one over every cycle of three.
    state = QueueState(participant="hospital-eu")
    taken = []
    for _ in range(30):
        decision, state = pick(study_vms(), state)
        assert decision.chosen is not None
        taken.append(decision.chosen.vm)
    assert Counter(taken) == {"vm-001": 20, "vm-002": 10}
    for i in range(0, 30, 3):
        assert sorted(taken[i : i + 3]) == ["vm-001", "vm-001", "vm-002"]


def test_unknown_vms_are_never_in_the_ring_and_a_lost_cursor_keeps_its_place() -> None:
    vms = [vm("vm-001"), vm("vm-003")]
    ordered = ring_order(vms, cursor="hospital-eu/vm-002")  # vm-002 has gone
    assert [c.vm for c in ordered] == ["vm-003", "vm-001"]
    decision, _ = pick(vms, QueueState(participant="hospital-eu", cursor="hospital-eu/vm-002"))
    assert decision.chosen is not None
    assert decision.chosen.vm == "vm-003"


def test_a_vm_coming_back_resumes_its_turn_without_a_burst() -> None:
    vms = [vm("vm-001"), vm("vm-002"), vm("vm-003")]
    state = QueueState(participant="hospital-eu")
    away = [replace(v, state="shutoff") if v.vm == "vm-003" else v for v in vms]
    for _ in range(10):
        _, state = pick(away, state)
    taken = []
    for _ in range(6):
        decision, state = pick(vms, state)
        assert decision.chosen is not None
        taken.append(decision.chosen.vm)
    assert Counter(taken) == {"vm-001": 2, "vm-002": 2, "vm-003": 2}


def test_busy_vms_and_busy_hosts_are_avoided() -> None:
    vms = [vm("vm-001", tasks=1), vm("vm-002", host_cpu_percent=97), vm("vm-003")]
    decision, _ = pick(vms, QueueState(participant="hospital-eu"))
    assert decision.chosen is not None
    assert decision.chosen.vm == "vm-003"


def test_capacity_weight_counts_fits_and_free_host_cpu() -> None:
    big = vm("a", vcpus=8, memory_gib=16, disk_gib=80)
    assert capacity_weight(big, minimum=MIN, policy=POLICY) == 4
    assert capacity_weight(big, minimum=MIN, policy=Policy(max_weight=8)) == 4
    assert capacity_weight(replace(big, memory_gib=8), minimum=MIN, policy=POLICY) == 2
    assert capacity_weight(replace(big, host_cpu_percent=50), minimum=MIN, policy=POLICY) == 2
    assert capacity_weight(vm("b"), minimum=MIN, policy=POLICY) == 1
    assert capacity_weight(vm("b", host_cpu_percent=80), minimum=MIN, policy=POLICY) == 1
    assert capacity_weight(vm("c", vcpus=3), minimum=MinResources(), policy=POLICY) == 3


def test_nothing_eligible_says_why_in_one_line() -> None:
    vms = [vm("vm-003", state="shutoff"), vm("vm-004", state="shutoff"), vm("vm-005", vcpus=1)]
    decision, state = pick(vms, QueueState(participant="hospital-eu", cursor="hospital-eu/vm-004"))
    assert decision.chosen is None
    assert decision.retry_at is None
    assert decision.summary == "no eligible VM among 3: 2 not running, 1 below the minimum"
    assert state.cursor == "hospital-eu/vm-004"  # no turn was taken


# --- Failover ----------------------------------------------------------------------------------


def test_failover_rests_the_failed_vm_and_takes_the_next() -> None:
    state = QueueState(participant="hospital-eu")
    first, state = pick(study_vms(), state, now=0)
    assert first.chosen is not None
    assert first.chosen.vm == "vm-001"
    second, state = fail_over(
        participant="hospital-eu",
        failure=Failure(FailureReason.VM_LEFT_RUNNING, vm_key=first.chosen.key, vm="vm-001"),
        tries_so_far=1,
        candidates=study_vms(),
        minimum=MIN,
        policy=POLICY,
        state=state,
        now=50,
    )
    assert second.chosen is not None
    assert second.chosen.vm == "vm-002"
    assert second.attempt == 2
    assert second.trigger == "failover after vm-001 failed: the VM left the running state"
    assert state.rests["hospital-eu/vm-001"].until == 50 + POLICY.rest_after_failure_s
    texts = {c.vm: c.text() for c in second.considerations}
    assert (
        texts["vm-001"]
        == "skipped: resting 120 s more after a failure (the VM left the running state)"
    )
    assert texts["vm-002"].startswith("taken: next in the queue")


def test_failover_with_only_resting_vms_says_when_to_retry() -> None:
    vms = [vm("vm-001"), vm("vm-002")]
    state = QueueState(participant="hospital-eu")
    decision, state = pick(vms, state, now=0.0)
    for tries, now in enumerate((10.0, 20.0), start=1):
        assert decision.chosen is not None
        decision, state = fail_over(
            participant="hospital-eu",
            failure=Failure(
                FailureReason.SUPERNODE_ERROR, vm_key=decision.chosen.key, vm=decision.chosen.vm
            ),
            tries_so_far=tries,
            candidates=vms,
            minimum=MIN,
            policy=POLICY,
            state=state,
            now=now,
        )
    assert decision.chosen is None
    assert decision.retry_at == 10.0 + POLICY.rest_after_failure_s
    assert "a resting VM is free again in 110 s" in decision.summary
    again, _ = pick(vms, state, now=decision.retry_at)
    assert again.chosen is not None
    assert again.chosen.vm == "vm-001"


def test_failover_stops_at_max_tries() -> None:
    policy = Policy(max_tries=2)
    vms = [vm(f"vm-00{i}") for i in (1, 2, 3)]
    state = QueueState(participant="hospital-eu")
    decision, state = choose(
        participant="hospital-eu", candidates=vms, minimum=MIN, policy=policy, state=state, now=0
    )
    taken = []
    for tries in (1, 2):
        assert decision.chosen is not None
        taken.append(decision.chosen.vm)
        decision, state = fail_over(
            participant="hospital-eu",
            failure=Failure(
                FailureReason.AGENT_UNRESPONSIVE, vm_key=decision.chosen.key, vm=decision.chosen.vm
            ),
            tries_so_far=tries,
            candidates=vms,
            minimum=MIN,
            policy=policy,
            state=state,
            now=float(tries),
        )
    assert taken == ["vm-001", "vm-002"]
    assert decision.chosen is None
    assert decision.summary == "gave up: 2 tries made, the most allowed (max_tries 2)"
    assert "hospital-eu/vm-002" in state.rests  # the last failure still rests its VM


# --- Feasibility -------------------------------------------------------------------------------


def test_study_scenario_is_feasible() -> None:
    result = check_feasible(
        MIN, {"hospital-eu": study_vms(), "hospital-us": study_vms("hospital-us")}
    )
    assert result.ok
    assert result.message == ""


def test_shortfalls_name_the_participant_and_the_gap() -> None:
    big = MinResources(vcpus=8, memory_gib=4, disk_gib=20)
    result = check_feasible(
        big, {"hospital-us": study_vms("hospital-us"), "hospital-eu": study_vms()}
    )
    assert not result.ok
    assert [s.participant for s in result.shortfalls] == ["hospital-us", "hospital-eu"]
    assert result.shortfalls[1].message == (
        "hospital-eu: no running VM has 8 vCPUs (largest running: 4); "
        "would fit but not running: vm-003 (shutoff), vm-004 (shutoff)"
    )


def test_shortfall_messages() -> None:
    need = MinResources(vcpus=2, memory_gib=32, disk_gib=100)
    msg = check_feasible(need, {"h": [vm("a"), vm("b", vcpus=4, memory_gib=8)]}).message
    assert msg == (
        "h: no running VM has 32 GiB memory (largest running: 8); "
        "no running VM has 100 GiB disk (largest running: 20)"
    )
    assert check_feasible(MIN, {"h": []}).message == "h: no VMs reported"
    stopped = [vm("a", state="shutoff"), vm("b", state="paused"), vm("c", state="shutoff")]
    assert check_feasible(MIN, {"h": stopped}).message == (
        "h: no VM is running (1 paused, 2 shutoff); "
        "would fit but not running: a (shutoff), b (paused), c (shutoff)"
    )
    apart = [vm("a", vcpus=4, memory_gib=2), vm("b", vcpus=1, memory_gib=8)]
    assert check_feasible(MIN, {"h": apart}).message == (
        "h: no running VM has 2 vCPUs, 4 GiB memory, 20 GiB disk together "
        "(closest: a with 4 vCPUs, 2 GiB memory, 20 GiB disk)"
    )


# --- From the inventory ------------------------------------------------------------------------


def test_candidates_from_a_report() -> None:
    sent = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    report = Report(
        agent_id="hospital-eu",
        seq=4,
        sent_at=sent,
        host=HostInfo(
            hostname="kvm1",
            cpu_count=8,
            cpu_percent=35.0,
            load_1m=1.0,
            memory_total_mib=65536,
            memory_available_mib=16384,
            disk_total_gib=500,
            disk_free_gib=300,
        ),
        vms=[
            VmInfo(
                name="vm-001", uuid="0" * 32, state="running", vcpus=4, memory_mib=8192, disk_gib=40
            ),
            VmInfo(
                name="vm-002", uuid="1" * 32, state="shutoff", vcpus=2, memory_mib=4096, disk_gib=20
            ),
        ],
        task=TaskSummary(task_id="t", job_id="j", vm="vm-001", state="running", since=sent),
    )
    out = candidates_from_report(report, online=True, now=sent + timedelta(seconds=12))
    assert [c.vm for c in out] == ["vm-001", "vm-002"]
    first = out[0]
    assert first.key == "hospital-eu/vm-001"
    assert first.memory_gib == 8.0
    assert first.report_age_s == 12.0
    assert first.host == "kvm1"
    assert first.host_memory_available_gib == 16.0
    assert first.tasks == 1  # the report says a task runs there
    assert out[1].tasks == 0
    counted = candidates_from_report(
        report, online=False, now=sent, tasks={"hospital-eu/vm-002": 2}
    )
    assert counted[1].tasks == 2
    assert not counted[0].agent_online


def test_an_agent_that_is_briefly_away_is_waited_for_not_given_up() -> None:
    """An agent restarting takes its VMs offline for seconds: a failover then waits for it
    (a one-second agent restart used to fail the whole job: "no eligible VM: 5 offline")."""
    away = [vm(f"vm-00{i}", agent_online=False, report_age_s=8.0) for i in range(1, 4)]
    decision, _ = pick(away, QueueState(participant="hospital-eu"), now=1000.0)
    assert decision.chosen is None
    assert decision.retry_at is not None
    assert 1000.0 < decision.retry_at <= 1010.0
    assert "waiting for agent hospital-eu to come back" in decision.summary
    # Gone for longer than the policy waits: given up, as before.
    gone = [replace(v, report_age_s=POLICY.agent_return_s + 1) for v in away]
    decision, _ = pick(gone, QueueState(participant="hospital-eu"), now=1000.0)
    assert decision.retry_at is None
    # A VM that is away and also too small is not waited for.
    small = [vm("vm-009", agent_online=False, report_age_s=8.0, vcpus=1)]
    decision, _ = pick(small, QueueState(participant="hospital-eu"), now=1000.0)
    assert decision.retry_at is None
