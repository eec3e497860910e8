"""The simulator and `fedctl bench orchestrator`: the study's figures, faults, determinism, errors.

Expected rates follow from the scenario: under `random`, 3 of 5 VMs cannot run the task, so a
task drops with probability 0.6 + 0.4 * fail_prob; under fedsky only eligible VMs are tried,
each failing independently, so a task drops when all `max_tries` attempts fail:
fail_prob**max_tries (5 by default).
Ranges are 4 standard deviations of the binomial rate wide, over thousands of tasks.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.cli import bench
from fedsky.controller.orchestrator.simulator import (
    ScenarioError,
    load_scenario,
    parse_scenario,
    simulate,
)
from fedsky.shared import exitcodes

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "benchmarks" / "scenarios" / "study.json"


def study_data(fail_prob: float = 0.0) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(STUDY.read_text())
    for vms in data["participants"].values():
        for vm in vms:
            if vm["id"] in ("vm-001", "vm-002"):
                vm["fail_prob"] = fail_prob
    return data


def within(rate: float, expected: float, tasks: int) -> bool:
    sd = math.sqrt(expected * (1 - expected) / tasks)
    return abs(rate - expected) <= 4 * sd + 1e-9


def test_the_study_file_is_the_study() -> None:
    scenario = load_scenario(STUDY)
    assert sorted(scenario.participants) == ["hospital-asia", "hospital-eu", "hospital-us"]
    for vms in scenario.participants.values():
        assert [(v.id, v.state) for v in vms] == [
            ("vm-001", "running"),
            ("vm-002", "running"),
            ("vm-003", "shutoff"),
            ("vm-004", "shutoff"),
            ("vm-005", "running"),
        ]


def test_study_fedsky_has_no_dropout() -> None:
    out = simulate(load_scenario(STUDY), policy="fedsky", runs=20, seed=1).to_dict()
    assert out["tasks"] == 60
    assert out["dropouts"] == 0
    assert out["dropout_rate"] == 0.0
    assert out["success_rate"] == 1.0
    assert out["job_success_rate"] == 1.0
    assert out["attempts"] == 60
    assert out["failovers"] == 0
    assert out["mean_failover_s"] is None
    # Spread by free capacity: vm-001 (twice the minimum) gets two turns in three.
    for counts in out["assignments"].values():
        assert set(counts) == {"vm-001", "vm-002"}
        assert abs(counts["vm-001"] - 2 * counts["vm-002"]) <= 2


def test_study_random_drops_about_sixty_percent() -> None:
    out = simulate(load_scenario(STUDY), policy="random", runs=2000, seed=3).to_dict()
    assert out["tasks"] == 6000
    assert within(out["dropout_rate"], 0.6, 6000), out["dropout_rate"]
    assert out["success_rate"] == pytest.approx(1 - out["dropout_rate"])
    assert out["attempts"] == 6000
    assert out["failovers"] == 0
    assert out["dropout_causes"] == {"VM not fit": out["dropouts"]}


@pytest.mark.parametrize("fail_prob", [0.1, 0.3, 0.5])
def test_faults_fedsky_drops_only_when_every_try_fails(fail_prob: float) -> None:
    scenario = parse_scenario(study_data(fail_prob))
    fed = simulate(scenario, policy="fedsky", runs=2000, seed=5).to_dict()
    tries = scenario.policy.max_tries
    assert tries == 5
    assert within(fed["dropout_rate"], fail_prob**tries, fed["tasks"]), fed["dropout_rate"]
    assert fed["failovers"] > 0
    assert fed["failures"] == fed["failovers"] + fed["dropouts"]
    assert fed["attempts"] == fed["tasks"] + fed["failovers"]
    # Detection (0 s, up to one report interval, or the unresponsive timeout less up to one
    # interval) plus acknowledgement and start (6 s), plus any wait for a resting VM (<= 120 s).
    assert 6.0 <= fed["mean_failover_s"] <= 6.0 + 30.0 + 120.0
    assert fed["max_failover_s"] <= 6.0 + 30.0 + 120.0 + 1e-6
    rnd = simulate(scenario, policy="random", runs=2000, seed=5).to_dict()
    assert within(rnd["dropout_rate"], 0.6 + 0.4 * fail_prob, rnd["tasks"]), rnd["dropout_rate"]
    assert rnd["failovers"] == 0


def test_failover_time_comes_from_the_timeouts() -> None:
    data = study_data(1.0)
    data["policy"] = {"rest_after_failure_s": 0, "max_tries": 2, "unresponsive_after_s": 45}
    data["sim"] = {"ack_s": 2, "start_s": 8, "report_interval_s": 10}
    data["sim"]["failure_modes"] = {"supernode_error": 1}
    out = simulate(parse_scenario(data), policy="fedsky", runs=5, seed=0).to_dict()
    assert out["dropout_rate"] == 1.0  # every attempt fails, two tries each
    assert out["attempts"] == 30
    assert out["mean_failover_s"] == 10.0  # detected at once, then acknowledge (2) and start (8)
    data["sim"]["failure_modes"] = {"agent_unresponsive": 1}
    out = simulate(parse_scenario(data), policy="fedsky", runs=50, seed=0).to_dict()
    assert 45 - 10 + 10 <= out["mean_failover_s"] <= 45 + 10  # timeout less up to one interval


def test_same_seed_same_output_other_seed_other_output() -> None:
    scenario = parse_scenario(study_data(0.3))
    for policy in ("fedsky", "random"):
        a = simulate(scenario, policy=policy, runs=20, seed=42).to_dict()
        b = simulate(scenario, policy=policy, runs=20, seed=42).to_dict()
        c = simulate(scenario, policy=policy, runs=20, seed=43).to_dict()
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        assert a != c


def test_missing_fields_mean_online_fresh_and_idle() -> None:
    data = study_data()
    vm = data["participants"]["hospital-eu"][0]
    assert "online" not in vm
    scenario = parse_scenario(data)
    candidate = scenario.participants["hospital-eu"][0].candidate("hospital-eu")
    assert candidate.agent_online
    assert candidate.report_age_s == 0.0
    assert candidate.host_cpu_percent == 0.0
    assert candidate.tasks == 0


def test_offline_and_overloaded_vms_are_never_taken() -> None:
    data = study_data()
    data["participants"]["hospital-eu"][0]["online"] = False
    data["participants"]["hospital-us"][1]["host_cpu_percent"] = 99
    out = simulate(parse_scenario(data), policy="fedsky", runs=10, seed=0).to_dict()
    assert out["dropouts"] == 0
    assert out["assignments"]["hospital-eu"] == {"vm-002": 10}
    assert out["assignments"]["hospital-us"] == {"vm-001": 10}


# --- Validation --------------------------------------------------------------------------------


def error_for(data: Any) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, source="s.json")
    return info.value


def test_unknown_state_is_named_with_the_vm() -> None:
    data = study_data()
    data["participants"]["hospital-eu"][2]["state"] = "stopped"
    err = error_for(data)
    assert not err.infeasible
    assert err.message == (
        "s.json: hospital-eu VM #3 (vm-003).state: unknown VM state 'stopped': use one of "
        "libvirt's names (nostate, running, blocked, paused, shutdown, shutoff, crashed, "
        "pmsuspended)"
    )


def test_negative_resources_are_refused() -> None:
    data = study_data()
    data["participants"]["hospital-us"][1]["vcpus"] = -2
    data["min"]["memory_gib"] = -1
    message = error_for(data).message
    assert "s.json: min.memory_gib: Input should be greater than or equal to 0 (got -1)" in message
    assert (
        "s.json: hospital-us VM #2 (vm-002).vcpus: "
        "Input should be greater than or equal to 0 (got -2)" in message
    )


def test_resources_no_vm_has_name_the_participant_and_shortfall() -> None:
    data = study_data()
    data["min"] = {"vcpus": 8, "memory_gib": 4, "disk_gib": 20}
    err = error_for(data)
    assert err.infeasible
    lines = err.message.splitlines()
    assert len(lines) == 3
    assert (
        "s.json: hospital-eu: no running VM has 8 vCPUs (largest running: 4); "
        "would fit but not running: vm-003 (shutoff), vm-004 (shutoff)"
    ) in lines


def test_other_bad_scenarios() -> None:
    data = study_data()
    data["participants"]["hospital-eu"][1]["id"] = "vm-001"
    assert (
        error_for(data).message == "s.json: (top level): hospital-eu: VM id 'vm-001' appears twice"
    )
    data = study_data()
    data["participants"]["hospital-eu"][0]["colour"] = "red"
    assert error_for(data).message == "s.json: hospital-eu VM #1 (vm-001).colour: unknown key"
    data = study_data()
    data["participants"] = {}
    assert "participants: Dictionary should have at least 1 item" in error_for(data).message
    data = study_data()
    data["participants"]["Hospital EU"] = data["participants"].pop("hospital-eu")
    assert "String should match pattern" in error_for(data).message
    data = study_data()
    data["participants"]["hospital-eu"][0]["fail_prob"] = 1.5
    assert (
        "(vm-001).fail_prob: Input should be less than or equal to 1 (got 1.5)"
        in error_for(data).message
    )
    assert (
        error_for([1, 2]).message == "s.json: expected a JSON object with 'min' and 'participants'"
    )


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read the scenario"):
        load_scenario(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ScenarioError, match=r"bad\.json: not valid JSON"):
        load_scenario(bad)


# --- The command -------------------------------------------------------------------------------


def fedctl_bench(argv: list[str]) -> int:
    # The bench command group on its own, as fedctl registers it.
    parser = argparse.ArgumentParser(prog="fedctl")
    bench.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "bench",
        "orchestrator",
        "--scenario",
        str(STUDY),
        "--policy",
        "random",
        "--runs",
        "20",
        "--seed",
        "7",
        "--json",
    ]
    assert fedctl_bench(argv) == exitcodes.OK
    first = json.loads(capsys.readouterr().out)
    for key in (
        "runs",
        "tasks",
        "dropouts",
        "dropout_rate",
        "success_rate",
        "attempts",
        "failovers",
        "mean_failover_s",
    ):
        assert key in first
    assert first["runs"] == 20
    assert first["tasks"] == 60
    assert fedctl_bench(argv) == exitcodes.OK
    assert json.loads(capsys.readouterr().out) == first


def test_command_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "orchestrator", "--scenario", str(STUDY), "--policy", "fedsky", "--runs", "20"]
    assert fedctl_bench(argv) == exitcodes.OK
    out = capsys.readouterr().out
    assert "dropouts                     0 (0.0%)" in out
    assert "success                      60 (100.0%)" in out
    assert "mean failover (simulated s)  -" in out
    assert "hospital-eu    vm-001  " in out


def test_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = study_data()
    data["min"]["disk_gib"] = 500
    infeasible = tmp_path / "big.json"
    infeasible.write_text(json.dumps(data))
    assert (
        fedctl_bench(["bench", "orchestrator", "--scenario", str(infeasible)])
        == exitcodes.INFEASIBLE
    )
    err = capsys.readouterr().err
    assert err.startswith(f"fedctl: {infeasible}: hospital-us: ")
    assert (
        f"{infeasible}: hospital-asia: no running VM has 500 GiB disk (largest running: 40)" in err
    )
    data["min"]["disk_gib"] = 20
    data["participants"]["hospital-eu"][0]["state"] = "on"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    assert fedctl_bench(["bench", "orchestrator", "--scenario", str(broken)]) == exitcodes.CONFIG
    assert "unknown VM state 'on'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fedctl_bench(["bench", "orchestrator", "--scenario", str(STUDY), "--runs", "0"])
    assert "expected at least 1, got 0" in capsys.readouterr().err


def test_benchmark_runs_the_command_for_both_policies_and_every_level() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.orchestrator", "--runs", "4", "--levels", "0,0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split() == [
        "fail_prob",
        "policy",
        "tasks",
        "dropout",
        "success",
        "attempts",
        "failovers",
        "mean_failover_s",
    ]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("0", "fedsky"),
        ("0", "random"),
        ("0.5", "fedsky"),
        ("0.5", "random"),
    ]
    assert rows[0][3:7] == ["0.00%", "100.00%", "12", "0"]
    assert rows[2][6] != "0"  # failovers happen at fail_prob 0.5


def test_an_agent_that_stays_away_is_waited_for_then_given_up() -> None:
    """A participant whose only fit VMs are behind an offline agent is waited for (agent
    restarts come back) for `agent_return_s` of simulated time, then dropped: never a wait
    without end."""
    data = study_data()
    for vm in data["participants"]["hospital-eu"]:
        vm["online"] = False
    out = simulate(parse_scenario(data), policy="fedsky", runs=3, seed=0).to_dict()
    assert out["tasks"] == 9
    assert out["dropouts"] == 3  # hospital-eu's, once per run
    assert out["dropout_causes"] == {"no eligible VM": 3}
