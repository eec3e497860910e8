"""Flower control for an aggregator, whatever runs it: the aggregator host's command line, the
`flwr` connection, node key registration, starting and stopping runs.

The `local` provider runs the aggregator host (`fedsky-aggregator`: the SuperLink behind
fedsky's front) as a child process; the cloud providers put the same command into their VM's
start-up script and talk to it with the same `SuperLinkControl`, which presents the
controller's client certificate: the front serves the Control API to nothing else.
It speaks the SuperLink's Control API (protobuf over HTTPS, verified against fedsky's CA) in
this process through Flower's own client, the calls the `flwr` CLI makes: a `flwr` process per
call costs seconds of interpreter and import start-up each (two registrations per participant,
the run start, a status poll every few seconds), a request costs milliseconds. Every call has a
timeout and an error that says what failed. The aggregator's FLWR_HOME still holds a `flwr`
connection for an operator's `flwr` commands and `run_command`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedsky.controller.clouds.base import ProviderError
from fedsky.shared.flower.runconfig import RunSettings

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION = "fedsky"
CLI_TIMEOUT_S = 60.0  # per Control API request
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


AGGREGATOR_EXECUTABLE = "fedsky-aggregator"


def aggregator_command(
    *,
    host: str,
    port: int,
    database: Path,
    tls: SuperLinkTls,
    work_dir: Path,
    executable: str | None = None,
) -> list[str]:
    """The command line of a fedsky aggregator host: the SuperLink on loopback (TLS, SuperNode
    authentication, no runtime dependency installs) behind fedsky's front on `host:port`, which
    serves Fleet to nodes and Control to the controller's certificate only
    (`fedsky.shared.flower.aggregator_host`)."""
    return [
        executable or str(flower_bin_dir() / AGGREGATOR_EXECUTABLE),
        "--listen",
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--ca",
        str(tls.ca_file),
        "--cert",
        str(tls.cert_file),
        "--key",
        str(tls.key_file),
        "--database",
        str(database),
        "--work-dir",
        str(work_dir),
    ]


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
    """A Control API call failed; the message says which and why (no secrets: keys are files)."""


def _public_key_bytes(path: Path) -> bytes:
    """The key as the SuperLink stores it; a clear error for a file that is not a NIST EC key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as exc:
        raise FlowerCliError(f"cannot read the node key {path.name}: {exc.strerror}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise FlowerCliError(f"{path.name} is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise FlowerCliError(f"{path.name} is not a NIST EC (e.g. P-384) public key")
    return bytes(public_key_to_bytes(key))


class _VersionHeaders:
    """Flower's runtime-version request headers (the SuperLink checks them), without the `flwr`
    CLI's interceptor, which exits the process on a version mismatch."""

    def __init__(self) -> None:
        from flwr.supercore.runtime_version_compatibility import RuntimeVersionMetadata

        self._headers = dict(RuntimeVersionMetadata.from_local_component("flwr CLI").as_metadata())

    def intercept(self, context: Any, call_next: Any) -> Any:
        context.request.headers.update(self._headers)
        return call_next(context)


class SuperLinkControl:
    """Control API of one SuperLink (what the `flwr` CLI does), called from this process."""

    def __init__(
        self,
        *,
        flwr_home: Path,
        address: str,
        root_ca: Path | None,
        client_identity: tuple[Path, Path] | None = None,
        timeout_s: float = CLI_TIMEOUT_S,
    ) -> None:
        self.flwr_home = flwr_home
        self.address = address
        self.root_ca = root_ca
        self.client_identity = client_identity
        self.timeout_s = timeout_s
        write_connection(flwr_home, address=address, root_ca=root_ca)

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    @contextmanager
    def _client(self, what: str) -> Iterator[ControlHttpClient]:
        """A client for one call; Flower's HTTP errors become a FlowerCliError about `what`."""
        import click
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.cli.utils import flwr_cli_exc_handler
        from flwr.supercore.control import ControlHttpClient

        verify: ssl.SSLContext | bool
        if self.root_ca is None:
            scheme, verify = "http", False
        else:
            # Verified against fedsky's CA, host name included, as the `flwr` CLI does.
            scheme, verify = "https", ssl.create_default_context(cafile=str(self.root_ca))
            if self.client_identity is not None:
                # The aggregator's front serves Control only to the controller's certificate.
                cert, key = self.client_identity
                try:
                    verify.load_cert_chain(str(cert), str(key))
                except (OSError, ssl.SSLError) as exc:
                    raise FlowerCliError(
                        f"{what}: the controller's client certificate {cert.name} cannot be "
                        f"used: {getattr(exc, 'strerror', None) or exc}"
                    ) from None
        client = ControlHttpClient(
            f"{scheme}://{self.address}",
            interceptors=[CliClientHttpInterceptor(), _VersionHeaders()],
            verify=verify,
            timeout=self.timeout_s,
        )
        try:
            with flwr_cli_exc_handler():
                yield client
        except click.ClickException as exc:
            raise FlowerCliError(
                f"{what} at the SuperLink {self.address} failed: {exc.format_message()}"
            ) from None
        finally:
            client.close()

    async def _call(self, what: str, fn: Callable[[ControlHttpClient], T]) -> T:
        def blocking() -> T:
            with self._client(what) as client:
                return fn(client)

        return await asyncio.to_thread(blocking)

    async def register_node(self, public_key: Path, *, name: str | None = None) -> int:
        """Register a SuperNode public key (OpenSSH, NIST P-384); returns its node id."""
        from flwr.proto.control_pb2 import RegisterNodeRequest

        key = await asyncio.to_thread(_public_key_bytes, public_key)
        request = RegisterNodeRequest(public_key=key, name=name)
        response = await self._call("registering a node key", lambda c: c.RegisterNode(request))
        if not response.node_id:
            raise FlowerCliError(f"the SuperLink {self.address} registered no node for the key")
        return int(response.node_id)

    async def unregister_node(self, node_id: int) -> None:
        """Unregister a node: its pending messages fail at once (failover) and its key can never
        be registered again on this SuperLink."""
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        request = UnregisterNodeRequest(node_id=node_id)
        await self._call(f"unregistering node {node_id}", lambda c: c.UnregisterNode(request))

    async def list_nodes(self) -> list[NodeStatus]:
        from flwr.proto.control_pb2 import ListNodesRequest
        from google.protobuf.json_format import MessageToDict

        response = await self._call("listing nodes", lambda c: c.ListNodes(ListNodesRequest()))
        return [
            NodeStatus(
                node_id=int(n.node_id),
                status=str(n.status),
                name=str(n.name or ""),
                raw=MessageToDict(n, preserving_proto_field_name=True),
            )
            for n in response.nodes_info
        ]

    async def start_run(
        self, *, app_dir: Path, settings: RunSettings, run_config_file: Path
    ) -> int:
        """Start the fedsky app with `settings` (kept in `run_config_file`); returns the run id.

        What `flwr run APP --run-config FILE` sends: the app bundle built from `app_dir` and the
        run config as overrides of the app's defaults.
        """
        from flwr.cli.build import build_fab_from_disk
        from flwr.common.config import parse_config_args
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        def request() -> StartRunRequest:
            run_config_file.write_text(settings.to_toml())
            try:
                fab = build_fab_from_disk(app_dir)
            except Exception as exc:  # Flower raises several kinds for a bad app directory
                raise FlowerCliError(f"building the app bundle from {app_dir}: {exc}") from None
            return StartRunRequest(
                fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                override_config=user_config_to_proto(parse_config_args([str(run_config_file)])),
                federation="",
                app_spec="",
            )

        req = await asyncio.to_thread(request)
        response = await self._call("starting the run", lambda c: c.StartRun(req))
        if not response.HasField("run_id"):
            raise FlowerCliError(f"the SuperLink {self.address} started no run")
        return int(response.run_id)

    async def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. 'running', 'finished:completed', 'finished:failed'."""
        from flwr.proto.control_pb2 import ListRunsRequest

        response = await self._call(
            f"reading run {run_id}", lambda c: c.ListRuns(ListRunsRequest(run_id=run_id))
        )
        for run in response.run_dict.values():
            if int(run.run_id) == run_id:
                status, sub = str(run.status.status), str(run.status.sub_status)
                return f"{status}:{sub}" if sub else status
        raise FlowerCliError(f"run {run_id} is not known to the SuperLink")

    async def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        response = await self._call(
            f"stopping run {run_id}", lambda c: c.StopRun(StopRunRequest(run_id=run_id))
        )
        if not response.success:
            raise FlowerCliError(f"the SuperLink {self.address} did not stop run {run_id}")

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
