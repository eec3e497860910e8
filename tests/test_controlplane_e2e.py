"""The control plane as an operator runs it: controller + managed broker + agents as processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from fedsky.controller.onebox import Onebox

from tests.support import eventually_blocking

pytestmark = pytest.mark.e2e

HOSPITALS = {"hospital-us": "aws:us-east-1", "hospital-eu": "aws:eu-central-1"}


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Onebox]:
    # A local listener stands in for a regional endpoint: hospital-us measures its RTT to it.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    probe = f'[rtt_probe]\ninterval_s = 10\ntargets = {{"aws:eu-central-1" = "127.0.0.1:{port}"}}'
    onebox = Onebox(
        root=tmp_path / "box",
        report_interval_s=3.0,
        poll_interval_s=0.5,
        offline_after_s=15,
        agent_extra={"hospital-us": probe},
    )
    try:
        onebox.start(HOSPITALS)
        yield onebox
    finally:
        onebox.stop()
        listener.close()


def _vms(box: Onebox) -> dict[tuple[str, str], dict[str, object]]:
    out = box.fedctl("vms", "--json").stdout
    return {(v["agent_id"], v["name"]): v for v in json.loads(out)}


def _fault(box: Onebox, agent: str, action: str, vm: str) -> None:
    path = box.agents[agent].state_dir / "fault.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps({"action": action, "vm": vm}).encode() + b"\n")
        reply = sock.recv(65536)
    assert reply, "the fault hook did not answer"


def test_inventory_equals_libvirt_and_follows_state_changes(box: Onebox) -> None:
    vms = _vms(box)
    # What libvirt itself says about each hospital's node (a fresh connection reads the file).
    for agent in box.agents.values():
        conn = libvirt.open(f"test://{agent.node_xml}")
        try:
            for dom in conn.listAllDomains():
                ours = vms[(agent.name, dom.name())]
                state, _, mem_kib, vcpus, _ = dom.info()
                assert ours["uuid"] == dom.UUIDString()
                assert ours["memory_mib"] == mem_kib // 1024
                names = {1: "running", 3: "paused", 5: "shutoff"}
                assert ours["state"] == names[state]
                if state == 1:
                    assert ours["vcpus"] == vcpus
        finally:
            conn.close()
    assert vms[("hospital-us", "vm-001")]["vcpus"] == 4
    agents = {a["id"]: a for a in json.loads(box.fedctl("agents", "--json").stdout)}
    # The measured RTT travels in the report; the agent without targets reports none.
    assert 0 < agents["hospital-us"]["rtt_ms"]["aws:eu-central-1"] < 100
    assert agents["hospital-eu"]["rtt_ms"] == {}
    assert vms[("hospital-us", "vm-001")]["disk_gib"] == 40
    assert vms[("hospital-us", "vm-003")]["state"] == "shutoff"

    started = time.monotonic()
    _fault(box, "hospital-us", "destroy", "vm-001")
    _fault(box, "hospital-eu", "suspend", "vm-002")
    eventually_blocking(
        lambda: (
            _vms(box)[("hospital-us", "vm-001")]["state"] == "shutoff"
            and _vms(box)[("hospital-eu", "vm-002")]["state"] == "paused"
        ),
        timeout=box.report_interval_s + 2,
        interval=0.2,
        what="the destroyed and suspended VMs to show in the controller",
    )
    assert time.monotonic() - started <= box.report_interval_s + 2


def test_broker_killed_agents_reconnect_and_controller_catches_up(box: Onebox) -> None:
    health = box.api.get("/v1/health")
    old_pid = health["broker_pid"]
    assert old_pid
    os.kill(old_pid, signal.SIGKILL)
    eventually_blocking(
        lambda: (
            (h := box.api.get("/v1/health"))["broker_pid"] not in (None, old_pid)
            and h["bus_connected"]
        ),
        timeout=30,
        interval=0.2,
        what="the managed broker to be restarted",
    )
    # A change made after the restart reaches the controller: the agent reconnected.
    _fault(box, "hospital-eu", "destroy", "vm-002")
    eventually_blocking(
        lambda: _vms(box)[("hospital-eu", "vm-002")]["state"] == "shutoff",
        timeout=45,
        interval=0.2,
        what="a state change after the broker restart",
    )


def test_controller_sigkill_loses_nothing(box: Onebox) -> None:
    before_agents = {a["id"]: a for a in box.api.get("/v1/agents")}
    before_vms = _vms(box)
    for name in list(box.agents):
        box.stop_agent(name)
    assert box.controller is not None
    box.controller.send_signal(signal.SIGKILL)  # only the controller: its broker child lives on
    box.controller.wait(10)
    box.start_controller()
    after_agents = {a["id"]: a for a in box.api.get("/v1/agents")}
    assert set(after_agents) == set(before_agents)
    for agent_id, before in before_agents.items():
        assert after_agents[agent_id]["location"] == before["location"]
        assert (
            after_agents[agent_id]["last_seq"] == before["last_seq"]
            or after_agents[agent_id]["last_seq"] >= before["last_seq"]
        )
    after_vms = _vms(box)
    assert {
        k: (v["uuid"], v["vcpus"], v["memory_mib"], v["disk_gib"]) for k, v in after_vms.items()
    } == {k: (v["uuid"], v["vcpus"], v["memory_mib"], v["disk_gib"]) for k, v in before_vms.items()}


def test_fedctl_without_controller_says_so(tmp_path: Path) -> None:
    onebox = Onebox(root=tmp_path / "idle")
    onebox.write_controller_config()
    done = onebox.fedctl("agents", check=False)
    assert done.returncode == 69
    assert "controller is not running" in done.stderr
    done = onebox.fedctl("vms", "--json", check=False)
    assert done.returncode == 69


def test_bad_config_names_file_and_key(tmp_path: Path) -> None:
    runner = Onebox(root=tmp_path)
    cfg = tmp_path / "controller.toml"
    cfg.write_text('state_dir = "s"\n[inventory]\noffline_after_s = "soon"\n')
    done = runner.run("fedsky-controller", "--config", str(cfg), check=False)
    assert done.returncode == 78
    assert str(cfg) in done.stderr
    assert "inventory.offline_after_s" in done.stderr
    cfg.write_text('state_dir = "s"\n[broker]\nmanaged = true\nprot = 8883\n')
    done = runner.run("fedsky-controller", "--config", str(cfg), check=False)
    assert done.returncode == 78
    assert "broker.prot" in done.stderr
    assert "unknown key" in done.stderr
