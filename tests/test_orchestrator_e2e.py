"""Failover with real agents: the VM running a participant's SuperNode is destroyed mid-training
(through the agent's own libvirt connection) and the participant moves to its next VM."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from fedsky.controller.onebox import Onebox

from tests.support import eventually_blocking
from tests.test_jobs_e2e import HOSPITALS, _datasets, wait_job, write_job

pytestmark = pytest.mark.e2e


def _fault(box: Onebox, agent: str, action: str, vm: str) -> None:
    path = box.agents[agent].state_dir / "fault.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps({"action": action, "vm": vm}).encode() + b"\n")
        assert json.loads(sock.recv(65536))["ok"]


def test_destroyed_vm_moves_the_participant_and_the_job_completes(tmp_path: Path) -> None:
    extra = {name: _datasets(i, len(HOSPITALS)) for i, name in enumerate(HOSPITALS)}
    box = Onebox(
        root=tmp_path / "box", report_interval_s=3.0, poll_interval_s=0.5, agent_extra=extra
    )
    try:
        box.start(HOSPITALS)
        spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=5, round_timeout_s=90)
        job = json.loads(box.fedctl("job", "submit", str(spec), "--json").stdout)
        eventually_blocking(
            lambda: box.api.get(f"/v1/jobs/{job['id']}")["rounds_done"] >= 1,
            timeout=180,
            interval=0.5,
            what=f"job {job['id']}'s first round",
            details=lambda: box.fedctl("job", "logs", job["id"]).stdout,
        )
        running = {
            t["participant"]: t
            for t in box.api.get(f"/v1/jobs/{job['id']}")["tasks"]
            if t["state"] == "running"
        }
        victim = running["hospital-us"]["vm"]
        _fault(box, "hospital-us", "destroy", victim)
        ended = wait_job(box, job["id"], ("completed", "failed", "cancelled"), timeout=600)
        logs = box.fedctl("job", "logs", job["id"]).stdout
        assert ended["state"] == "completed", logs
        us = [t for t in ended["tasks"] if t["participant"] == "hospital-us"]
        assert len(us) == 2, us
        assert us[0]["vm"] == victim
        assert us[0]["state"] == "failed"
        assert "vm-left-running" in us[0]["reason"] or "vm-" in us[0]["reason"]
        assert us[1]["vm"] != victim
        assert us[1]["key_role"] == "standby"
        # Never a VM below the minimum or not running.
        assert {t["vm"] for t in ended["tasks"]} <= {"vm-001", "vm-002"}
        # Every round, the last included, has every participant.
        rounds = box.api.get(f"/v1/jobs/{job['id']}/models")
        rounds = rounds["rounds"] if isinstance(rounds, dict) else rounds
        assert len(rounds) == 5
        last = rounds[-1]
        sites = {p["site"] for p in last["participants"]}
        assert sites == set(HOSPITALS), last
        explain = box.fedctl("job", "explain", job["id"]).stdout
        assert "hospital-us" in explain
        # The agent's typed failure kind (vm_stopped) reached the orchestrator as its reason.
        assert f"attempt 1 on {victim} (hospital-us): failed after" in explain
        assert "the VM left the running state (vm-left-running" in explain
    finally:
        box.stop()


def test_queue_position_survives_a_controller_restart(tmp_path: Path) -> None:
    """Successive jobs take each participant's VMs in turn, and a restarted controller goes on
    from where the queue was: a fresh queue would start the second job's look at vm-001 again.

    Every VM weighs the same (`max_weight = 1`, plain round robin): weights follow the hosts'
    CPU load. What the second job then takes also depends on what happened in the first (a VM
    that failed rests), so the queue's position is read from the decision itself: the VMs it
    considered, in queue order, start right after the first job's last choice."""
    extra = {name: _datasets(i, len(HOSPITALS)) for i, name in enumerate(HOSPITALS)}
    box = Onebox(
        root=tmp_path / "box",
        report_interval_s=3.0,
        poll_interval_s=0.5,
        agent_extra=extra,
        orchestrator_extra="max_weight = 1",
    )
    try:
        box.start(HOSPITALS)
        spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=1)
        first = json.loads(
            box.fedctl("job", "submit", str(spec), "--follow", "--json", timeout=300).stdout
        )
        assert first["state"] == "completed"
        first_explain = box.api.get(f"/v1/jobs/{first['id']}/explain")["participants"]
        box.stop_controller()
        box.start_controller()
        box.wait_agents_online(list(HOSPITALS), timeout=60)
        second = json.loads(
            box.fedctl("job", "submit", str(spec), "--follow", "--json", timeout=300).stdout
        )
        assert second["state"] == "completed"
        second_explain = box.api.get(f"/v1/jobs/{second['id']}/explain")["participants"]
        why = box.fedctl("job", "explain", second["id"]).stdout
        for name in HOSPITALS:
            last_taken = [d for d in first_explain[name]["decisions"] if d["chosen"]][-1]
            cursor = last_taken["chosen"]["vm"]
            decision = second_explain[name]["decisions"][0]
            order = [c["vm"] for c in decision["considered"]]
            ring = sorted(order)
            assert order[0] == ring[(ring.index(cursor) + 1) % len(ring)], (name, cursor, why)
            taken = decision["chosen"]["vm"]
            assert taken in {"vm-001", "vm-002"}, why
            # A first job without a failover leaves every credit even: the VM after the
            # cursor, if it may take the task, is the one taken.
            clean = len(first_explain[name]["attempts"]) == 1
            if clean and decision["considered"][0]["outcome"] != "skipped":
                assert taken == order[0], (name, why)
                assert taken != cursor, (name, why)
    finally:
        box.stop()
