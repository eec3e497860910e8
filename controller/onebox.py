"""fedsky on one machine: a controller with its managed broker and agents on libvirt test nodes.

This is what `make demo` runs and what the end-to-end tests and benchmarks start: the real
daemons as processes, set up through the real CLIs exactly as an operator and hospital IT would
(`fedctl ca init`, `agentctl enroll request`, `fedctl agents enroll --csr`, `agentctl enroll`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedsky.agent.testnode import write_test_node
from fedsky.controller.cli.client import ApiClient, ApiError, ControllerUnavailable
from fedsky.shared.net import free_port

STUDY_HOSPITALS: dict[str, str] = {
    "hospital-us": "aws:us-east-1",
    "hospital-asia": "aws:ap-northeast-2",
    "hospital-eu": "aws:eu-central-1",
}


class OneboxError(RuntimeError):
    pass


def _bin(name: str) -> str:
    """A console script of this installation (the venv's bin first)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class AgentProcess:
    name: str
    location: str
    config: Path
    state_dir: Path
    node_xml: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


@dataclass
class Onebox:
    """Controller + managed broker + agents under one directory; every process is a child."""

    root: Path
    topic_prefix: str = "fedsky/v1"
    report_interval_s: float = 5.0
    poll_interval_s: float = 1.0
    offline_after_s: float = 30.0
    agent_extra: Mapping[str, str] = field(default_factory=dict)  # extra TOML per agent
    controller_extra: str = ""
    inventory_extra: str = ""  # more `[inventory]` keys
    orchestrator_extra: str = ""  # more `[orchestrator]` keys
    quiet: bool = True
    controller: subprocess.Popen[bytes] | None = None
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    broker_port: int = 0
    # Where the managed broker binds and the name agents reach it by (unset: `broker_host`).
    broker_host: str = "127.0.0.1"
    broker_public_host: str | None = None

    @property
    def controller_dir(self) -> Path:
        return self.root / "controller"

    @property
    def controller_config(self) -> Path:
        return self.controller_dir / "controller.toml"

    @property
    def api_socket(self) -> Path:
        return self.controller_dir / "state" / "controller.sock"

    @property
    def api(self) -> ApiClient:
        return ApiClient(str(self.api_socket))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env["FEDSKY_CONTROLLER_CONFIG"] = str(self.controller_config)
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        return env

    # -- running commands ---------------------------------------------------------------------

    # -- where each process runs: all on this machine here; the testbed's harness puts each
    # on its own emulated host by overriding these two.

    def command(self, where: str, argv: Sequence[str]) -> list[str]:
        """`argv` (a console script of this installation first) as run for `where`: the
        controller's side ("controller") or an agent's (its name)."""
        return [_bin(argv[0]), *argv[1:]]

    def spawn(self, where: str, argv: Sequence[str], *, log: IO[bytes]) -> subprocess.Popen[bytes]:
        """A daemon for `where`, in a session of its own, logging to `log`."""
        return subprocess.Popen(
            self.command(where, argv),
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, where: str = "controller"
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.command(where, argv)
        done = subprocess.run(
            cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise OneboxError(
                f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def fedctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "fedctl", "--config", str(self.controller_config), *args, check=check, timeout=timeout
        )

    # -- controller ---------------------------------------------------------------------------

    def write_controller_config(self) -> None:
        self.controller_dir.mkdir(parents=True, exist_ok=True)
        self.broker_port = self.broker_port or free_port()
        self.controller_config.write_text(
            "\n".join(
                [
                    'state_dir = "state"',
                    'log_level = "INFO"',
                    "[broker]",
                    "managed = true",
                    f'host = "{self.broker_host}"',
                    f'public_host = "{self.broker_public_host or self.broker_host}"',
                    f"port = {self.broker_port}",
                    "[bus]",
                    f'topic_prefix = "{self.topic_prefix}"',
                    "[inventory]",
                    f"offline_after_s = {self.offline_after_s}",
                    "sweep_interval_s = 1.0",
                    self.inventory_extra,
                    # Every simulated hospital reports this one machine as its host: under a
                    # test suite's load its CPU is often above the production threshold.
                    "[orchestrator]",
                    "host_cpu_max_percent = 100.0",
                    self.orchestrator_extra,
                    self.controller_extra,
                    "",
                ]
            )
        )

    def init_ca(self) -> None:
        self.write_controller_config()
        self.fedctl("ca", "init")

    def start_controller(self, *, timeout: float = 60) -> None:
        log = (self.controller_dir / "controller.log").open("ab")
        self.controller = self.spawn(
            "controller", ["fedsky-controller", "--config", str(self.controller_config)], log=log
        )
        self.wait_controller(timeout=timeout)

    def wait_controller(self, *, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.controller is not None and self.controller.poll() is not None:
                raise OneboxError(
                    f"the controller exited with {self.controller.returncode}; see {self.controller_dir / 'controller.log'}"
                )
            try:
                health: dict[str, Any] = self.api.get("/v1/health")
                if health.get("bus_connected"):
                    return health
                last = "bus not connected yet"
            except (ControllerUnavailable, ApiError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise OneboxError(f"the controller did not come up in {timeout:g} s: {last}")

    def stop_controller(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        _stop(self.controller, sig, timeout)
        self.controller = None

    # -- agents -------------------------------------------------------------------------------

    def add_agent(self, name: str, location: str, *, extra: str = "") -> AgentProcess:
        """Enrol an agent the way a hospital does: key + CSR at home, signed by the operator."""
        home = self.root / "agents" / name
        state = home / "state"
        state.mkdir(parents=True, exist_ok=True)
        node_xml = home / "node.xml"
        uri = write_test_node(node_xml, hospital=name)
        config = home / "agent.toml"
        lines = [
            'state_dir = "state"',
            f"report_interval_s = {self.report_interval_s}",
            f"poll_interval_s = {self.poll_interval_s}",
            # Everything on this machine: the SuperNodes run here (the `local` executor).
            "one_box = true",
            "[libvirt]",
            f'uri = "{uri}"',
            "[test]",
            'fault_socket = "state/fault.sock"',
            extra or self.agent_extra.get(name, ""),
            "",
        ]
        config.write_text("\n".join(lines))
        csr = home / f"{name}.csr"
        self.run("agentctl", "--config", str(config), "enroll", "request", name, "--out", str(csr))
        bundle = home / f"{name}.bundle.json"
        self.fedctl(
            "agents",
            "enroll",
            name,
            "--location",
            location,
            "--csr",
            str(csr),
            "--out",
            str(bundle),
        )
        self.run("agentctl", "--config", str(config), "enroll", str(bundle))
        agent = AgentProcess(
            name=name, location=location, config=config, state_dir=state, node_xml=node_xml
        )
        self.agents[name] = agent
        return agent

    def start_agent(self, name: str) -> None:
        agent = self.agents[name]
        agent.log_path = agent.config.parent / "agent.log"
        log = agent.log_path.open("ab")
        agent.proc = self.spawn(name, ["fedsky-agent", "--config", str(agent.config)], log=log)

    def stop_agent(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        agent = self.agents[name]
        _stop(agent.proc, sig, timeout)
        agent.proc = None

    def wait_agents_online(
        self, names: Sequence[str] | None = None, *, vms: int = 5, timeout: float = 60
    ) -> list[dict[str, Any]]:
        wanted = set(names or self.agents)
        deadline = time.monotonic() + timeout
        agents: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                agents = self.api.get("/v1/agents")
            except (ControllerUnavailable, ApiError):
                agents = []
            ready = {a["id"] for a in agents if a["state"] == "online" and a["vms"] >= vms}
            if wanted <= ready:
                return agents
            time.sleep(0.25)
        raise OneboxError(
            f"agents not online with {vms} VMs after {timeout:g} s: {json.dumps(agents)[:2000]}"
        )

    # -- whole --------------------------------------------------------------------------------

    def start(self, hospitals: Mapping[str, str] = STUDY_HOSPITALS) -> None:
        self.init_ca()
        self.start_controller()
        for name, location in hospitals.items():
            self.add_agent(name, location)
            self.start_agent(name)
        self.wait_agents_online(list(hospitals))

    def stop(self) -> None:
        for name in list(self.agents):
            self.stop_agent(name)
        self.stop_controller()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
