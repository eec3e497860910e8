"""The testbed's smoke run: one federated job with every daemon on its own emulated host.

The controller and its broker in `ctl`, each hospital's agent in its host, an sshd per VM host;
the job completes, each participant's SuperNode runs in its VM's namespace (read from outside
with `ip netns identify`), none on an agent's host or the aggregator's, and every link's RTT is
on target. Needs root (namespaces), as here and in CI. Its own name prefix and subnet keep it
apart from a `python -m benchmarks.testbed` run on the same machine.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.testbed.netns import blackhole_present, list_netns
from benchmarks.testbed.smoke import failures, run_smoke

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

SUBNET = "10.215.0.0/16"
PREFIX = f"s{os.getpid() % 100000}-"


def test_smoke_job_trains_inside_the_vm_hosts() -> None:
    result = run_smoke(subnet=SUBNET, prefix=PREFIX)

    assert failures(result) == [], result
    assert result["job"]["state"] == "completed"
    assert result["job"]["rounds_completed"] == 2
    for participant in result["participants"]:
        assert participant["supernode_netns"] == participant["vm_host"]
        assert participant["vm_host"].startswith(f"{PREFIX}vm-{participant['name']}-")
        assert isinstance(participant["supernode_pid"], int)
    agent_hosts = {f"{PREFIX}h-{p['name']}" for p in result["participants"]}
    seen = {s["netns"] for s in result["supernodes_seen"]}
    assert not seen & agent_hosts
    assert result["aggregator"]["host"] == f"{PREFIX}ctl"
    assert result["aggregator"]["host"] not in seen
    assert len(result["links"]) == 10
    # Everything is gone afterwards.
    assert not [n for n in list_netns() if n.startswith(PREFIX)]
    assert not blackhole_present(SUBNET)
