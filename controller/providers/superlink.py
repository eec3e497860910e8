"""Flower control for an aggregator, whatever runs it: the SuperLink's command line, the `flwr`
connection, node key registration, starting and stopping runs.

The `local` provider runs the SuperLink as a child process; the cloud providers put the same
command line into their VM's start-up script and talk to it with the same `SuperLinkControl`.
Every call to the `flwr` CLI runs in a subprocess with this aggregator's own FLWR_HOME, a
timeout, and an error that says what failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fedsky.controller.providers.base import ProviderError
from fedsky.shared.flower.runconfig import RunSettings

log = logging.getLogger(__name__)

CONNECTION = "fedsky"
CLI_TIMEOUT_S = 60.0
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = "0.2"


@dataclass(frozen=True)
class SuperLinkTls:
    """The SuperLink's server certificate (names: every address nodes and the controller use)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def flower_bin_dir() -> Path:
    """The directory of the interpreter's scripts (flower-superlink, flwr, ...)."""
    return Path(sys.executable).parent


def flower_env(flwr_home: Path, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no telemetry or update checks, and the
    venv's bin first on PATH (the SuperLink starts `flower-superexec` by name)."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = os.pathsep.join([str(flower_bin_dir()), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The SuperExec looks for new app processes to start every second by default; a finer poll
    # takes up to a second off the start of every ServerApp (cheap local HTTP requests).
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
    return env


def superlink_command(
    *,
    host: str,
    port: int,
    database: Path,
    tls: SuperLinkTls | None,
    node_auth: bool = True,
    executable: str | None = None,
) -> list[str]:
    """The `flower-superlink` command line of a fedsky aggregator.

    TLS and SuperNode authentication are on unless `tls` is None (tests of the bare app only:
    node authentication needs TLS). Runtime dependency installation is off: it would run
    `uv sync` on every run and reach for the internet.
    """
    cmd = [
        executable or str(flower_bin_dir() / "flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        if node_auth:
            raise ValueError("SuperNode authentication needs TLS")
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(tls.ca_file),
            "--ssl-certfile",
            str(tls.cert_file),
            "--ssl-keyfile",
            str(tls.key_file),
        ]
        if node_auth:
            cmd.append("--enable-supernode-auth")
    return cmd


def write_connection(
    flwr_home: Path, *, address: str, root_ca: Path | None, name: str = CONNECTION
) -> Path:
    """Write `$FLWR_HOME/config.toml` with one SuperLink connection, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f"address = {json.dumps(address)}",
    ]
    if root_ca is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_ca))}")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def app_template_dir() -> Path:
    """The installed fedsky Flower app's directory (its pyproject.toml)."""
    return Path(str(resources.files("fedsky.shared.flower")))


def prepare_app_dir(dest: Path) -> Path:
    """A directory holding only the app's pyproject.toml: the bundle (FAB) carries nothing else,
    and `flwr run` never writes into the installed package."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(app_template_dir() / "pyproject.toml", dest / "pyproject.toml")
    return dest


@dataclass(frozen=True)
class NodeStatus:
    node_id: int
    status: str  # "online", "offline", "registered", "unregistered"
    name: str
    raw: Mapping[str, Any]


class FlowerCliError(ProviderError):
    """A `flwr` command failed; the message has its output (no secrets: keys are files)."""


class SuperLinkControl:
    """Control API of one SuperLink through the `flwr` CLI with its own FLWR_HOME."""

    def __init__(
        self,
        *,
        flwr_home: Path,
        address: str,
        root_ca: Path | None,
        timeout_s: float = CLI_TIMEOUT_S,
    ) -> None:
        self.flwr_home = flwr_home
        self.address = address
        self.root_ca = root_ca
        self.timeout_s = timeout_s
        write_connection(flwr_home, address=address, root_ca=root_ca)

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    async def _flwr(self, *args: str, timeout_s: float | None = None) -> tuple[str, str]:
        cmd = [str(flower_bin_dir() / "flwr"), *args]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s or self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise FlowerCliError(
                f"`flwr {args[0]}` did not finish within {timeout_s or self.timeout_s:.0f} s"
            ) from None
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if proc.returncode != 0:
            raise FlowerCliError(
                f"`flwr {' '.join(args[:2])}` failed (exit {proc.returncode}): {_tail(stdout + stderr)}"
            )
        return stdout, stderr

    async def _json(self, *args: str, timeout_s: float | None = None) -> dict[str, Any]:
        out, err = await self._flwr(*args, "--format", "json", timeout_s=timeout_s)
        try:
            data = json.loads(out[out.index("{") :])
        except (ValueError, json.JSONDecodeError):
            raise FlowerCliError(f"`flwr {args[0]}` gave no JSON: {_tail(out + err)}") from None
        if not isinstance(data, dict):
            raise FlowerCliError(f"`flwr {args[0]}` gave unexpected JSON")
        if data.get("success") is False:
            raise FlowerCliError(
                f"`flwr {' '.join(args[:2])}` failed: {data.get('error-message', data)}"
            )
        return data

    async def register_node(self, public_key: Path, *, name: str | None = None) -> int:
        """Register a SuperNode public key (OpenSSH, NIST P-384); returns its node id."""
        args = ["supernode", "register", str(public_key), CONNECTION]
        if name:
            args += ["--name", name]
        data = await self._json(*args)
        return int(data["node-id"])

    async def unregister_node(self, node_id: int) -> None:
        """Unregister a node: its pending messages fail at once (failover) and its key can never
        be registered again on this SuperLink."""
        await self._json("supernode", "unregister", str(node_id), CONNECTION)

    async def list_nodes(self) -> list[NodeStatus]:
        data = await self._json("supernode", "ls", CONNECTION)
        out = []
        for n in data.get("nodes", []):
            out.append(
                NodeStatus(
                    node_id=int(n.get("node-id", 0)),
                    status=str(n.get("status", "")),
                    name=str(n.get("name", "") or ""),
                    raw=n,
                )
            )
        return out

    async def start_run(
        self, *, app_dir: Path, settings: RunSettings, run_config_file: Path
    ) -> int:
        """Start the fedsky app with `settings`; returns the run id at once (no streaming)."""
        await asyncio.to_thread(run_config_file.write_text, settings.to_toml())
        data = await self._json(
            "run", str(app_dir), CONNECTION, "--run-config", str(run_config_file)
        )
        run_id = data.get("run-id")
        if run_id is None:
            raise FlowerCliError(f"`flwr run` started no run: {data}")
        return int(run_id)

    async def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. 'running', 'finished:completed', 'finished:failed'."""
        data = await self._json("ls", CONNECTION, "--run-id", str(run_id))
        for run in data.get("runs", []):
            if int(run.get("run-id", -1)) == run_id:
                return str(run.get("status", ""))
        raise FlowerCliError(f"run {run_id} is not known to the SuperLink")

    async def stop_run(self, run_id: int) -> None:
        await self._json("stop", str(run_id), CONNECTION)

    def run_command(
        self, *, app_dir: Path, run_config_file: Path, stream: bool = True
    ) -> list[str]:
        """The `flwr run` command line (for a caller that runs and follows it itself)."""
        cmd = [
            str(flower_bin_dir() / "flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            str(run_config_file),
        ]
        return cmd + (["--stream"] if stream else [])


def _tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-1500:] or "(no output)"
