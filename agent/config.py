"""The agent's config file (`agent.toml`), validated at start.

Relative paths are relative to the config file's directory. Everything the agent writes lives in
`state_dir`: its private key, certificate, the CA certificate, the installed bundle's metadata,
the status socket and the status file. The broker address and topic prefix come from the
installed enrolment bundle unless `[broker]` overrides them.

Two modes. In hosts mode (the default) the agent runs each participant's SuperNode inside the
chosen VM over SSH (`[executor] kind = "ssh"`) and never on its own host: a `local` executor is
refused when the file is loaded, and the runner checks again before every start. `one_box = true`
is for everything on one machine (the demo, the end-to-end tests): the `local` executor runs the
SuperNode on this host and is then the default.

A minimal production file::

    state_dir = "/var/lib/fedsky-agent"

    [libvirt]
    uri = "qemu:///system"

    [status]
    group = "fedsky"

    [executor]
    kind = "ssh"
    user = "fedsky"
    identity_file = "/etc/fedsky/vm_ssh_key"

    [vms.vm-001]                    # optional: libvirt's address is used otherwise
    address = "10.0.0.21"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fedsky.agent.executors.base import (
    VM_NAME_PATTERN,
    ExecutorConfig,
    LocalExecutorConfig,
    SshExecutorConfig,
    VmSettings,
)
from fedsky.agent.payload import PayloadConfig, PayloadSource
from fedsky.agent.policy import APPROVALS_FILE, PolicySection
from fedsky.shared.bundle import BundleError, EnrolmentBundle, read_bundle
from fedsky.shared.config import ConfigError, load_config, resolve_path
from fedsky.shared.datasets import DatasetSpec
from fedsky.shared.ids import InvalidIdError, check_agent_id
from fedsky.shared.jobspec import DATASET_NAME_PATTERN
from fedsky.shared.net import parse_listen
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:  # cryptography stays out of `agentctl status`
    from fedsky.agent.enroll import InstallPaths

DEFAULT_CONFIG_PATH = Path("/etc/fedsky/agent.toml")
CONFIG_ENV = "FEDSKY_AGENT_CONFIG"
DEFAULT_STATE_DIR = Path("/var/lib/fedsky-agent")

# File names inside state_dir.
KEY_NAME = "agent.key"
CERT_NAME = "agent.crt"
CA_NAME = "ca.crt"
BUNDLE_NAME = "bundle.json"
SOCKET_NAME = "agent.sock"
STATUS_FILE_NAME = "status.json"
KNOWN_HOSTS_NAME = "ssh/known_hosts"

# sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL.
_MAX_SOCKET_PATH = 107

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    return resolve_path(value, (info.context or {}).get("config_dir"))


def _check_socket_path(value: Path | None) -> Path | None:
    if value is not None and len(str(value).encode()) > _MAX_SOCKET_PATH:
        raise ValueError(f"path is too long for a unix socket (at most {_MAX_SOCKET_PATH} bytes)")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LibvirtSection(_Section):
    # Any libvirt URI: `qemu:///system` in production, `test:///abs/path/node.xml` in tests.
    uri: Annotated[str, Field(min_length=1)] = "qemu:///system"


class BrokerSection(_Section):
    # Override the broker address and topic prefix written in the installed bundle.
    host: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    port: Port | None = None
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")] | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    # Time allowed for connecting and for each acknowledged publish.
    timeout_s: Seconds = 10.0
    # Reconnect delays: uniform in [0, min(cap, base * 2**n)] (full jitter).
    reconnect_base_s: Seconds = 0.5
    reconnect_cap_s: Seconds = 30.0
    # How long the broker keeps commands for this agent while it is disconnected.
    session_expiry_s: Annotated[int, Field(ge=0, le=86400)] = 600

    @model_validator(mode="after")
    def _cap_above_base(self) -> BrokerSection:
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError("reconnect_cap_s must be at least reconnect_base_s")
        return self


class TlsSection(_Section):
    # Defaults: ca.crt, agent.crt and agent.key in state_dir (where `agentctl enroll` puts them).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Renewal (agent/renewal.py): ask for a new certificate once the current one has less than
    # this left; look this often.
    renew_before_days: Annotated[float, Field(ge=0, le=3650)] = 30.0
    renew_check_s: Annotated[float, Field(ge=1, le=86400)] = 3600.0

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _paths(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)


def _file_mode(value: Any) -> Any:
    # TOML writes octal as 0o660; accept the familiar "0660" string too.
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ValueError("expected an octal file mode such as 0o660") from None
    return value


class StatusSection(_Section):
    # Unix socket `agentctl status` reads (default: state_dir/agent.sock).
    socket: Path | None = None
    # The status file `agentctl status` falls back to (default: state_dir/status.json).
    state_file: Path | None = None
    mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    # Group that may read the agent's status (hospital IT's group); None: the agent's own group.
    group: Annotated[str, Field(min_length=1, max_length=32)] | None = None

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        return _file_mode(value)

    @field_validator("socket", "state_file")
    @classmethod
    def _paths(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        resolved = _resolve(value, info)
        return _check_socket_path(resolved) if info.field_name == "socket" else resolved


class FaultHookSection(_Section):
    """Test-only hooks. Production configs must not have a `[test]` section.

    `fault_socket`: a unix socket on which the agent accepts `{"action": "destroy" | "suspend" |
    "resume" | "start", "vm": NAME}` and applies it through its own libvirt connection. The
    libvirt test driver keeps a separate state per connection, so a test can only change what
    the agent sees through the agent itself. Anyone who can open this socket can stop VMs.
    """

    fault_socket: Path | None = None

    @field_validator("fault_socket")
    @classmethod
    def _path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _check_socket_path(_resolve(value, info))


class RttProbeSection(_Section):
    """Measure this site's RTT to candidate regions; the optimizer prefers it to its table.

    `targets` maps `cloud:region` to a `host:port` in that region that accepts TCP connections
    (a regional API endpoint on 443 will do). Empty: no probing, the catalog's figures are used.
    """

    targets: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")]] = {}
    interval_s: Annotated[float, Field(ge=10, le=86400)] = 600.0
    timeout_s: Annotated[float, Field(gt=0, le=30)] = 3.0

    @field_validator("targets")
    @classmethod
    def _locations(cls, value: dict[str, str]) -> dict[str, str]:
        from fedsky.shared.ids import check_location

        for location in value:
            try:
                check_location(location)
            except InvalidIdError as exc:
                raise ValueError(str(exc)) from None
        return value


class MetricsSection(_Section):
    """`[metrics]`: the optional metrics endpoint (agent/metrics.py)."""

    # "host:port" of the metrics listener; unset: none.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parse_listen(value)
        return value


class AgentConfig(_Section):
    # Default: the agent id of the installed enrolment bundle; if set, it must match it.
    agent_id: str | None = None
    # Everything on one machine: the SuperNode may run on this host (the `local` executor).
    # Declared before `executor`, whose check reads it.
    one_box: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object per log line (FEDSKY_LOG_FORMAT overrides).
    log_format: Literal["text", "json"] = "text"
    # A full report at this interval, and at once when a VM's state changes.
    report_interval_s: Seconds = 30.0
    # How often the VMs' states are polled to notice a change.
    poll_interval_s: Seconds = 5.0
    libvirt: LibvirtSection = LibvirtSection()
    broker: BrokerSection = BrokerSection()
    tls: TlsSection = TlsSection()
    status: StatusSection = StatusSection()
    test: FaultHookSection | None = None
    rtt_probe: RttProbeSection = RttProbeSection()
    # Dataset name -> local loader. Jobs name a dataset; the paths never leave this host.
    datasets: dict[Annotated[str, Field(pattern=DATASET_NAME_PATTERN)], DatasetSpec] = {}
    # Where a task's SuperNode runs: `ssh` (inside the VM), or `local` (this host, one-box mode
    # only, and its default there). None outside one-box mode: the daemon will not start.
    executor: ExecutorConfig | None = None
    # Where the client payload the agent installs into the VMs comes from (the pinned
    # artifacts). None: the VMs must hold it already. Declared after `executor`, which it reads.
    payload: PayloadConfig | None = None
    # VM name -> what the config says about it: address, port, the VM's own dataset paths.
    vms: dict[Annotated[str, Field(pattern=VM_NAME_PATTERN)], VmSettings] = {}
    # What the hospital allows fedsky's jobs to do here (datasets, VMs, tasks at once, approval).
    policy: PolicySection = PolicySection()
    # The optional metrics endpoint (agent/metrics.py).
    metrics: MetricsSection = MetricsSection()

    @field_validator("payload")
    @classmethod
    def _payload_needs_ssh(
        cls, value: PayloadConfig | None, info: ValidationInfo
    ) -> PayloadConfig | None:
        if value is None:
            return None
        executor = info.data.get("executor")
        if not isinstance(executor, SshExecutorConfig):
            raise ValueError(
                'the client payload is installed into the VMs over SSH: it needs [executor] kind = "ssh"'
            )
        if not executor.remote_bin_dir.rstrip("/").endswith("/bin"):
            raise ValueError(
                f"executor.remote_bin_dir ({executor.remote_bin_dir!r}) must be the bin directory "
                "of the venv the payload is installed into (ending in /bin)"
            )
        return value

    @field_validator("executor")
    @classmethod
    def _not_on_this_host(
        cls, value: LocalExecutorConfig | SshExecutorConfig | None, info: ValidationInfo
    ) -> LocalExecutorConfig | SshExecutorConfig | None:
        if isinstance(value, LocalExecutorConfig) and not info.data.get("one_box", False):
            raise ValueError(
                'kind "local" runs the SuperNode on this (hypervisor) host, which only one-box '
                'mode allows (`one_box = true`); to train inside the chosen VM use kind "ssh"'
            )
        return value

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_agent_id(value)
        except InvalidIdError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: Path, info: ValidationInfo) -> Path:
        resolved = _resolve(value, info)
        assert resolved is not None
        return resolved

    @model_validator(mode="after")
    def _policy_names_configured_datasets(self) -> AgentConfig:
        allowed = self.policy.datasets
        if allowed is None:
            return self
        configured = set(self.datasets) | {d for vm in self.vms.values() for d in vm.datasets}
        unknown = [d for d in allowed if d not in configured]
        if unknown:
            raise ValueError(
                f"policy.datasets names {', '.join(map(repr, unknown))}, which is not configured "
                "here ([datasets] or [vms.NAME.datasets])"
            )
        return self

    @model_validator(mode="after")
    def _socket_fits(self) -> AgentConfig:
        if self.status.socket is None and (
            len(str(self.state_dir / SOCKET_NAME).encode()) > _MAX_SOCKET_PATH
        ):
            raise ValueError(
                "state_dir is too long to hold the status socket; "
                "set status.socket to a shorter path"
            )
        return self

    # Derived locations.
    @property
    def install_paths(self) -> InstallPaths:
        """Where the agent's identity files are (enrolment and renewal write them)."""
        from fedsky.agent.enroll import InstallPaths

        return InstallPaths(
            state_dir=self.state_dir,
            key_file=self.key_file,
            cert_file=self.cert_file,
            ca_file=self.ca_file,
            bundle_file=self.bundle_file,
        )

    @property
    def key_file(self) -> Path:
        return self.tls.key_file or self.state_dir / KEY_NAME

    @property
    def cert_file(self) -> Path:
        return self.tls.cert_file or self.state_dir / CERT_NAME

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_file or self.state_dir / CA_NAME

    @property
    def bundle_file(self) -> Path:
        return self.state_dir / BUNDLE_NAME

    @property
    def status_socket(self) -> Path:
        return self.status.socket or self.state_dir / SOCKET_NAME

    @property
    def tasks_dir(self) -> Path:
        return self.state_dir / "tasks"

    @property
    def approvals_file(self) -> Path:
        """The hospital IT's decisions on jobs (`agentctl jobs`), when approval is manual."""
        return self.state_dir / APPROVALS_FILE

    @property
    def status_file(self) -> Path:
        return self.status.state_file or self.state_dir / STATUS_FILE_NAME

    @property
    def task_executor(self) -> LocalExecutorConfig | SshExecutorConfig | None:
        """The executor tasks use: the configured one, `local` by default in one-box mode."""
        if self.executor is None and self.one_box:
            return LocalExecutorConfig()
        return self.executor

    @property
    def payload_source(self) -> PayloadSource | None:
        """`[payload]` resolved: fedsky's CA is the agent's `tls.ca_file` unless it names another."""
        if self.payload is None:
            return None
        return PayloadSource.from_config(
            self.payload, fedsky_ca_file=self.ca_file, state_dir=self.state_dir
        )

    @property
    def known_hosts_file(self) -> Path:
        """The VMs' pinned SSH host keys (`agentctl vm register` writes them)."""
        if isinstance(self.executor, SshExecutorConfig) and self.executor.known_hosts_file:
            return self.executor.known_hosts_file
        return self.state_dir / KNOWN_HOSTS_NAME


def require_executor(config: AgentConfig, path: Path) -> None:
    """The daemon runs tasks: outside one-box mode it needs the `ssh` executor configured."""
    if config.task_executor is None:
        raise ConfigError(
            f"{path}: key 'executor': missing: outside one-box mode the agent runs each "
            'SuperNode inside the chosen VM: add [executor] kind = "ssh" (with user and '
            "identity_file) and pin each VM's host key with `agentctl vm register NAME`; "
            "`one_box = true` runs it on this host instead (one machine only)"
        )


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_agent_config(path: str | Path) -> AgentConfig:
    return load_config(AgentConfig, path)


@dataclass(frozen=True)
class Identity:
    """Who this agent is and where it reports: the installed bundle plus config overrides."""

    agent_id: str
    location: str
    broker_host: str
    broker_port: int
    topic_prefix: str
    cert_not_after: datetime


def read_installed_bundle(config: AgentConfig) -> EnrolmentBundle:
    """The bundle `agentctl enroll` installed; ConfigError if the agent is not enrolled."""
    path = config.bundle_file
    if not path.exists():
        raise ConfigError(
            f"{path}: the agent is not enrolled: run `agentctl enroll request NAME`, have the "
            "operator sign it, then `agentctl enroll BUNDLE`"
        )
    try:
        return read_bundle(path)
    except BundleError as exc:
        raise ConfigError(str(exc)) from None


def resolve_identity(config: AgentConfig) -> Identity:
    """Combine the installed bundle with the config's overrides; ConfigError when they clash."""
    bundle = read_installed_bundle(config)
    if config.agent_id is not None and config.agent_id != bundle.agent_id:
        raise ConfigError(
            f"key 'agent_id': {config.agent_id!r} does not match the enrolled identity "
            f"{bundle.agent_id!r} in {config.bundle_file}"
        )
    for what, path in (
        ("tls.key_file", config.key_file),
        ("tls.cert_file", config.cert_file),
        ("tls.ca_file", config.ca_file),
    ):
        if not path.exists():
            raise ConfigError(f"key '{what}': {path} does not exist (is the agent enrolled?)")
    return Identity(
        agent_id=bundle.agent_id,
        location=bundle.location,
        broker_host=config.broker.host or bundle.broker_host,
        broker_port=config.broker.port or bundle.broker_port,
        topic_prefix=config.broker.topic_prefix or bundle.topic_prefix,
        cert_not_after=bundle.not_after,
    )
