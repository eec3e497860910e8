"""What every executor shares: the launch request, the running SuperNode, its exit status and
the `[executor]` config section.

An executor runs one participant's SuperNode where the agent was told to: `local` on the agent's
host (one-box mode only), `ssh` inside the chosen VM. The agent's runner awaits `wait()` to learn
when it ends and calls `stop()` when the job ends or is cancelled. `ExitStatus.reason` may be sent
off-site: it is scrubbed of local paths; the full log stays on the agent's host.

`VmSettings` is one `[vms.<name>]` table of the agent's config: what the agent knows about a VM
that libvirt does not tell it (the address to reach it at, the paths of its own datasets).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Protocol

from fedsky.shared.config import resolve_path
from fedsky.shared.datasets import DatasetSpec
from fedsky.shared.jobspec import DATASET_NAME_PATTERN
from fedsky.shared.supernode import DEFAULT_MAX_WAIT_S
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# Flower's exit codes (the SuperNode logs "Exit Code: N"; the process itself often exits 1).
_FLOWER_EXITS = {
    302: "its node key is invalid",
    305: "it could not connect to the aggregator, or the aggregator refused its node key",
    603: "the aggregator's CA certificate does not fit",
    604: "a file it needs is missing",
    605: "a TLS certificate is invalid",
}
_EXIT_LINE = re.compile(r"Exit Code: (\d+)")


# In a task's directory on the agent's host while its SuperNode (or the SSH session running it
# in the VM) runs: the local process's pid, so that an agent killed without stopping its tasks
# finds them when it starts again.
PID_FILE = "supernode.pid"
REAP_WAIT_S = 5.0


def record_pid(task_dir: Path, pid: int) -> None:
    (task_dir / PID_FILE).write_text(f"{pid}\n")


def reap_leftovers(work_dir: Path) -> list[str]:
    """Stop the SuperNodes (or SSH sessions) an earlier run of the agent left running (it was
    killed, not stopped); the ids of their tasks. A pid is only signalled when its command line
    names the task: a pid the system has since given to another process is left alone."""
    reaped: list[str] = []
    for pid_file in sorted(work_dir.glob(f"*/{PID_FILE}")):
        task_id = pid_file.parent.name
        try:
            pid = int(pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            command = b""
        if task_id.encode() in command:
            _stop_group(pid)
            reaped.append(task_id)
        pid_file.unlink(missing_ok=True)
    return reaped


def _stop_group(pid: int) -> None:
    """SIGTERM to the process group `pid` leads (executors start it in a session of its
    own), SIGKILL if it is still there after `REAP_WAIT_S`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + REAP_WAIT_S
        while time.monotonic() < deadline:
            os.killpg(pid, 0)  # ProcessLookupError once the group is gone
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)


class ExecutorError(Exception):
    """A SuperNode could not be started; the message is safe to report (no local paths)."""


class VmUnreachable(ExecutorError):
    """The VM could not be reached to start the SuperNode there (no address, SSH failed)."""


class HostKeyNotPinned(VmUnreachable):
    """The VM has no SSH host key pinned by `agentctl vm register`: the agent will not trust
    whatever key answers (a job never trusts on first use)."""


class OnAgentHost(ExecutorError):
    """Outside one-box mode the SuperNode would have run on the agent's (hypervisor) host."""


class PayloadMissing(ExecutorError):
    """The VM has no client payload (the Flower scripts) where the config says it is."""


@dataclass(frozen=True)
class SuperNodeLaunch:
    """One participant's SuperNode for one task. Paths are on the agent's host."""

    task_id: str
    site: str  # this agent's id: the ClientApp reports it
    superlink: str  # host:port of the aggregator
    root_ca: Path  # the aggregator's CA certificate (PEM)
    private_key: Path  # the node key (OpenSSH, P-384) registered for this task
    dataset_config: Path  # dataset catalog for the ClientApp, with paths valid where it runs
    node_config: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    # The node's TLS certificate (PEM, `<agent>.node`, over the node key) for the aggregator's
    # front; None only where no front asks for one.
    node_cert: Path | None = None


def files_of(launch: SuperNodeLaunch) -> list[Path]:
    """The files a SuperNode needs (all on the agent's host before it starts)."""
    needed = [launch.root_ca, launch.private_key, launch.dataset_config]
    return needed + ([launch.node_cert] if launch.node_cert is not None else [])


@dataclass(frozen=True)
class ExitStatus:
    code: int | None  # None: killed by a signal
    signal: int | None
    reason: str  # scrubbed of local paths; safe to report
    unreachable: bool = False  # the connection to the VM failed, not the SuperNode itself

    @property
    def ok(self) -> bool:
        return self.code == 0


_NOISE = re.compile(r"\x1b\[[0-9;]*m")


def last_lines(text: str, n: int = 3) -> str:
    lines = [_NOISE.sub("", line).strip() for line in text.splitlines()]
    return " | ".join([line for line in lines if line][-n:])


def describe_exit(code: int | None, sig: int | None, *, stopped: bool, log_text: str = "") -> str:
    """Why a SuperNode ended, from its exit status and its log (scrub before sending off-site)."""
    if stopped:
        return "stopped"
    if sig is not None:
        return f"the SuperNode was killed by signal {sig}"
    if code == 0:
        return "the SuperNode finished"
    lines = [_NOISE.sub("", line).strip() for line in log_text.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        m = _EXIT_LINE.search(lines[i])
        if m:
            flower = int(m.group(1))
            known = _FLOWER_EXITS.get(flower, "see Flower's exit code reference")
            detail = []
            for line in lines[i + 1 :]:
                if not line or line.startswith(("For more information", "INFO", "WARNING")):
                    break
                detail.append(line)
            more = f" ({' '.join(detail)})" if detail else ""
            return f"the SuperNode failed with Flower exit code {flower}: {known}{more}"
    tail = last_lines(log_text)
    return f"the SuperNode exited with code {code}" + (f" ({tail})" if tail else "")


class RunningSuperNode(Protocol):
    task_id: str

    @property
    def running(self) -> bool: ...

    async def wait(self) -> ExitStatus: ...

    async def stop(self, *, timeout_s: float = 10.0) -> ExitStatus: ...


class Executor(Protocol):
    kind: str
    # True: the SuperNode runs on the agent's own host (allowed in one-box mode only).
    on_agent_host: bool

    async def start(
        self, launch: SuperNodeLaunch, *, vm_name: str, vm_addresses: tuple[str, ...] = ()
    ) -> RunningSuperNode: ...


# --- Config ---------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalExecutorConfig(_Section):
    """Run the SuperNode as a process on the agent's host (the embedded default)."""

    kind: Literal["local"] = "local"
    # Where the Flower scripts are; default: beside the agent's Python.
    bin_dir: Path | None = None
    # A SuperNode that cannot reach its aggregator for this long exits (the task fails).
    give_up_after_s: Annotated[float, Field(gt=0, le=86_400)] = DEFAULT_MAX_WAIT_S


class SshExecutorConfig(_Section):
    """Run the SuperNode inside the chosen VM over SSH (the system `ssh` client)."""

    kind: Literal["ssh"]
    user: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")]
    identity_file: Path
    # The VMs' host keys pinned by `agentctl vm register` (default: state_dir/ssh/known_hosts).
    # The only file SSH consults; a VM with no key in it is refused.
    known_hosts_file: Path | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    # On the VM: where tasks keep their files (relative to the login's home) and where the
    # client payload's Flower scripts are (the bin directory of the venv the payload is
    # installed into).
    remote_work_dir: str = ".fedsky/tasks"
    remote_bin_dir: str = "/opt/fedsky/venv/bin"
    runtime_port: Annotated[int, Field(ge=1, le=65535)] = 9094
    connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = 15.0
    give_up_after_s: Annotated[float, Field(gt=0, le=86_400)] = DEFAULT_MAX_WAIT_S

    @field_validator("identity_file", "known_hosts_file")
    @classmethod
    def _paths(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        return resolve_path(value, (info.context or {}).get("config_dir"))

    @field_validator("remote_work_dir", "remote_bin_dir")
    @classmethod
    def _remote(cls, value: str) -> str:
        return check_remote_path(value, absolute=False)


ExecutorConfig = Annotated[LocalExecutorConfig | SshExecutorConfig, Field(discriminator="kind")]


# --- Per-VM settings ------------------------------------------------------------------------------

# A VM name the agent can pin a host key for: it is the host key's name in the known-hosts file.
VM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_remote_path(value: str, *, absolute: bool) -> str:
    """A path on the VM, put into shell commands quoted: plain text, no shell characters."""
    if not value or any(c in value for c in "\n\r\0'\"$`\\"):
        raise ValueError("a remote path must be plain text without quotes or shell characters")
    if absolute and not value.startswith("/"):
        raise ValueError("a path inside the VM must be absolute (it is not on this host)")
    return value


def check_vm_address(value: str) -> str:
    """An address to reach a VM at: an IP address or a DNS name (no port, no brackets)."""
    text = value.strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        name = text.rstrip(".")
        if (
            not name
            or len(name) > 253
            or not all(_HOST_LABEL.match(label) for label in name.split("."))
        ):
            raise ValueError(
                "expected an IP address or a host name (letters, digits, hyphens and dots; "
                "no port, scheme or brackets)"
            ) from None
        return name.lower()
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{text} is not the address of one machine")
    return str(ip)


class VmSettings(_Section):
    """`[vms.<name>]`: what the agent's config says about one VM.

    `address` (and `port`) win over the addresses libvirt reports. `datasets` maps a dataset
    name to its loader with paths inside the VM: a job's dataset resolves there first; a bundled
    dataset of the agent's `[datasets]` (no path) also works in any VM, a path on the agent's
    host never does.
    """

    address: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    datasets: dict[Annotated[str, Field(pattern=DATASET_NAME_PATTERN)], DatasetSpec] = {}

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else check_vm_address(value)

    @field_validator("datasets", mode="before")
    @classmethod
    def _vm_paths(cls, value: Any) -> Any:
        # Checked before the loader resolves relative paths against the config's directory:
        # these paths are the VM's, never this host's.
        if isinstance(value, Mapping):
            for spec in value.values():
                root = spec.get("root") if isinstance(spec, Mapping) else None
                if isinstance(root, str):
                    check_remote_path(root, absolute=True)
                    if ".." in PurePosixPath(root).parts:
                        raise ValueError("a path inside the VM must not contain '..'")
        return value
