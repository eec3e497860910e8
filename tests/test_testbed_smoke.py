"""The testbed's smoke runs: one federated job with every part on its own emulated host.

The controller, its broker and enrolment listener in `ctl`, each hospital's agent in its host,
an sshd per VM host, and the aggregator on a machine the controller's launcher boots in the
chosen region's host with the AWS start-up script as user data, installing fedsky from the
pinned artifacts. The job completes; each participant's SuperNode runs in its VM's namespace
(read from outside with `ip netns identify`), none on an agent's host or the aggregator's;
every link's RTT is on target. With the failover, the VM host of one participant's SuperNode is
cut off after the first round and the job completes on the hospital's other VM.

Needs root (namespaces), as here and in CI. Their own name prefix and subnet keep them apart
from a `python -m benchmarks.testbed` run on the same machine. The pinned artifacts are built
once from this checkout for every testbed run of the session (about 50 s; `wheelhouse` in
conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.testbed import cloudvm
from benchmarks.testbed.hosts import VM_PATHS
from benchmarks.testbed.netns import blackhole_present, list_netns
from benchmarks.testbed.smoke import failures, run_smoke
from tests.support.testbed import clear_testbed_leftovers

pytestmark = [pytest.mark.e2e]

SUBNET = "10.215.0.0/16"
PREFIX = f"s{os.getpid() % 100000}-"


@pytest.fixture(autouse=True)
def _clean_slate() -> None:
    clear_testbed_leftovers(PREFIX)


# Where the VM hosts and the aggregator machine bind their own directories over this host's.
MACHINE_PATHS = (*cloudvm.MACHINE_PATHS, *VM_PATHS)
EXISTED = {path: Path(path).exists() for path in MACHINE_PATHS}


def _check_common(result: dict[str, Any], rounds: int) -> None:
    assert failures(result) == [], result
    assert result["job"]["state"] == "completed"
    assert result["job"]["rounds_completed"] == rounds
    for participant in result["participants"]:
        assert participant["supernode_netns"] == participant["vm_host"]
        assert participant["vm_host"].startswith(f"{PREFIX}vm-{participant['name']}-")
        assert isinstance(participant["supernode_pid"], int)
    seen = {s["netns"] for s in result["supernodes_seen"]}
    assert not seen & {f"{PREFIX}h-{p['name']}" for p in result["participants"]}
    aggregator = result["aggregator"]
    # Booted by its own user data in the region placement chose, never on the controller.
    assert aggregator["started_by"] == "user-data"
    assert aggregator["provider"] == "testbed"
    region = aggregator["placed_on"].replace(":", "-")
    assert aggregator["host"] == f"{PREFIX}r-{region}"
    assert aggregator["host"] not in seen
    assert aggregator["address"].split(":")[0].startswith("10.215.4.")
    assert aggregator["user_data_exit"] == 0
    # The placement's forecast sits beside every round's measured time.
    assert [r["round"] for r in result["round_times"]] == list(range(1, rounds + 1))
    assert all(r["predicted_s"] > 0 and r["measured_s"] > 0 for r in result["round_times"])
    # The aggregator the start-up script installed times each round's phases.
    assert all(r["phases_s"]["train"] > 0 for r in result["round_times"])
    # Every pair of hosts that talk, measured before the job.
    assert result["links"]
    assert {(x["from"], x["to"]) for x in result["links"]} >= {
        (f"{PREFIX}ctl", f"{PREFIX}r-{region}"),
        *((f"{PREFIX}vm-{p['name']}-vm1", f"{PREFIX}r-{region}") for p in result["participants"]),
    }
    # Everything is gone afterwards.
    assert not [n for n in list_netns() if n.startswith(PREFIX)]
    assert not blackhole_present(SUBNET)
    # The machines' mount points made on this host are gone, with nothing written under them.
    for path in MACHINE_PATHS:
        assert Path(path).exists() == EXISTED[path], path


@pytest.mark.timeout(600)
def test_a_job_trains_inside_the_vm_hosts_refuses_a_hospitals_flwr_and_fails_over(
    wheelhouse: Path,
) -> None:
    """One testbed run (a testbed takes minutes to set up) for three facts: the job trains in
    the VMs' hosts with a booted aggregator; from a hospital's machine Flower's CLI is refused by
    the aggregator's front; a VM host cut off mid-job moves its participant to the hospital's
    other VM and the job completes."""
    result = run_smoke(
        subnet=SUBNET,
        prefix=PREFIX,
        wheelhouse=wheelhouse,
        rebuild_wheelhouse=False,
        failover=True,
    )
    _check_common(result, rounds=4)
    # From a hospital's machine, holding the CA certificate every hospital has, Flower's CLI is
    # refused by the aggregator's front: listing, starting a foreign app, stopping, registering
    # a node key of its own; the controller's own calls (the job above) went through.
    probe = result["control_probe"]
    # Tried from the first participant's VM host, the one cut off afterwards.
    assert probe["from"] == result["failover"]["cut_host"]
    assert [a["command"] for a in probe["attempts"]] == [
        "flwr ls",
        "flwr run",
        "flwr stop",
        "flwr supernode register",
    ]
    for attempt in probe["attempts"]:
        assert attempt["refused"], attempt
        assert "403 Forbidden" in attempt["said"], attempt
    assert not probe["foreign_code_ran"]
    # The cut.
    failover = result["failover"]
    assert failover["cut_host"] == f"{PREFIX}vm-{failover['participant']}-{failover['from_vm']}"
    assert failover["to_vm"] != failover["from_vm"]
    assert failover["to_host"] == f"{PREFIX}vm-{failover['participant']}-{failover['to_vm']}"
    assert 0 < failover["out_s"] < 240
    moved = next(p for p in result["participants"] if p["name"] == failover["participant"])
    assert moved["vm"] == failover["to_vm"]
    assert moved["supernode_netns"] == failover["to_host"]
