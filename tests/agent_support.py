"""Helpers for the agent's tests: an enrolled state directory and a config file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fedsky.agent.config import AgentConfig, load_agent_config, resolve_identity
from fedsky.agent.daemon import AgentDaemon
from fedsky.agent.enroll import install_bundle, make_request
from fedsky.controller.security.pki import Pki
from fedsky.shared.bundle import EnrolmentBundle

from tests.support import eventually


def enrol(
    *,
    pki: Pki,
    state_dir: Path,
    agent_id: str,
    broker_host: str = "127.0.0.1",
    broker_port: int = 8883,
    topic_prefix: str = "fedsky/v1",
    location: str = "aws:us-east-1",
) -> EnrolmentBundle:
    """The hospital's way: key and request here, signed by the CA, bundle installed."""
    paths = AgentConfig(state_dir=state_dir).install_paths
    req = make_request(name=agent_id, paths=paths)
    issued = pki.issue(common_name=agent_id, kind="agent", csr_pem=req.csr_pem)
    bundle = EnrolmentBundle(
        agent_id=agent_id,
        location=location,
        ca_pem=pki.ca_cert_pem.decode(),
        cert_pem=issued.cert_pem.decode(),
        broker_host=broker_host,
        broker_port=broker_port,
        topic_prefix=topic_prefix,
        not_after=issued.not_after,
    )
    path = state_dir.parent / f"{agent_id}.bundle.json"
    path.write_text(bundle.dump())
    return install_bundle(bundle_path=path, paths=paths)


def write_config(
    path: Path,
    *,
    uri: str,
    state_dir: str = "state",
    report_interval_s: float = 30.0,
    poll_interval_s: float = 0.2,
    fault_socket: str | None = "state/fault.sock",
    extra: str = "",
    one_box: bool = True,
) -> Path:
    lines = [
        f'state_dir = "{state_dir}"',
        f"one_box = {'true' if one_box else 'false'}",
        f"report_interval_s = {report_interval_s}",
        f"poll_interval_s = {poll_interval_s}",
        'log_level = "DEBUG"',
        extra,
        "[libvirt]",
        f'uri = "{uri}"',
        "[broker]",
        "reconnect_base_s = 0.2",
        "reconnect_cap_s = 1.0",
        "timeout_s = 5",
    ]
    if fault_socket is not None:
        lines += ["[test]", f'fault_socket = "{fault_socket}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def fault(path: Path, action: str, vm: str) -> dict[str, Any]:
    """Ask the agent's test fault hook to act on a VM through the agent's libvirt connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps({"action": action, "vm": vm}).encode() + b"\n")
        reply: dict[str, Any] = json.loads(sock.makefile().readline())
    return reply


@contextlib.asynccontextmanager
async def running_agent(config_path: Path) -> AsyncIterator[AgentDaemon]:
    """The agent daemon in this process (as `fedsky-agent` runs it), stopped on exit."""
    config = load_agent_config(config_path)
    daemon = AgentDaemon(config=config, identity=resolve_identity(config))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop=stop), name="agent")
    try:
        await eventually(lambda: config.status_socket.exists() or task.done(), what="agent start")
        if task.done():
            task.result()
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
