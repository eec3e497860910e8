"""The `local` aggregator provider: fedsky's aggregator host (`fedsky-aggregator`: the Flower
SuperLink on loopback behind fedsky's front, `shared/flower/aggregator_host.py`) on this machine.

The embedded default. It binds `[aggregator] bind_host` and is advertised (to the hospitals'
SuperNodes and the controller's own control connection, and in its certificate) as
`advertise_host`: both 127.0.0.1 unless configured. The `onprem` provider (`onprem.py`) is
this one with a fixed port range and a host name for placement.

Each job gets a directory `<work_dir>/<job id>/` holding the SuperLink's TLS files, its
database, its FLWR_HOME (the `flwr` connection and installed app bundles) and its log. The
aggregator host runs in its own process group (with the SuperLink, the `flower-superexec` and
the `flwr-serverapp` processes), so terminate ends all of them. Its front serves the Control
API only to `control_identity`, the controller's own certificate.

The handle's `ref` is `<pid>` so that a restarted controller can still terminate the process;
before signalling it checks that the pid is still this job's SuperLink (a recycled pid is left
alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedsky.controller.clouds.base import (
    AggregatorFiles,
    AggregatorHandle,
    AggregatorSpec,
    ProviderError,
)
from fedsky.controller.clouds.superlink import (
    AGGREGATOR_EXECUTABLE,
    SuperLinkControl,
    SuperLinkTls,
    aggregator_command,
    flower_env,
)
from fedsky.controller.security.pki import Pki
from fedsky.controller.settings import host_port, is_wildcard
from fedsky.shared.files import atomic_write
from fedsky.shared.net import free_port
from fedsky.shared.procs import group_alive

log = logging.getLogger(__name__)

TlsIssuer = Callable[[str, Path, tuple[str, ...]], SuperLinkTls]
"""(job id, directory, host names) -> the SuperLink's CA, certificate and key written there."""

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def pki_tls_issuer(pki: Pki) -> TlsIssuer:
    """A TlsIssuer over fedsky's CA: a `server` certificate (30 days) with every name the
    SuperLink is reached by, written beside the CA certificate and the key (0600)."""

    def issue(job_id: str, directory: Path, names: tuple[str, ...]) -> SuperLinkTls:
        dns = [n for n in names if not _is_ip(n)]
        ips = [n for n in names if _is_ip(n)]
        cert = pki.issue(
            common_name=dns[0] if dns else ips[0],
            kind="server",
            dns_names=dns,
            ip_addresses=ips,
            days=30,
        )
        directory.mkdir(parents=True, exist_ok=True)
        ca, crt, key = (
            directory / "ca.crt",
            directory / "superlink.crt",
            directory / "superlink.key",
        )
        atomic_write(ca, pki.ca_cert_pem, mode=0o644)
        atomic_write(crt, cert.cert_pem, mode=0o644)
        assert cert.key_pem is not None
        atomic_write(key, cert.key_pem, mode=0o600)
        return SuperLinkTls(ca_file=ca, cert_file=crt, key_file=key)

    return issue


def _is_ip(value: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class LocalPaths:
    job_dir: Path

    @property
    def tls_dir(self) -> Path:
        return self.job_dir / "tls"

    @property
    def database(self) -> Path:
        return self.job_dir / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.job_dir / "flwr-home"

    @property
    def log_file(self) -> Path:
        return self.job_dir / "superlink.log"

    @property
    def bus_dir(self) -> Path:
        """The ServerApp's bus identity (`agg-<job id>`): ca.crt, agg.crt, agg.key."""
        return self.job_dir / "bus"


class LocalProvider:
    """Runs each job's SuperLink as a child process group of the controller."""

    name = "local"

    def __init__(
        self,
        *,
        work_dir: Path,
        issue_tls: TlsIssuer,
        bind_host: str = "127.0.0.1",
        advertise_host: str = "127.0.0.1",
        control_identity: tuple[Path, Path] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.issue_tls = issue_tls
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.control_identity = control_identity
        self.start_timeout_s = start_timeout_s
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def paths(self, job_id: str) -> LocalPaths:
        return LocalPaths(self.work_dir / job_id)

    def tls(self, job_id: str) -> SuperLinkTls:
        d = self.paths(job_id).tls_dir
        return SuperLinkTls(
            ca_file=d / "ca.crt", cert_file=d / "superlink.crt", key_file=d / "superlink.key"
        )

    def aggregator_files(self, job_id: str, *, model_file: Path) -> AggregatorFiles:
        """The ServerApp runs on this machine: the controller's model file, the job's bus dir."""
        bus = self.paths(job_id).bus_dir
        return AggregatorFiles(
            model_file=model_file, ca=bus / "ca.crt", cert=bus / "agg.crt", key=bus / "agg.key"
        )

    def control(self, handle: AggregatorHandle) -> SuperLinkControl:
        """The Flower control (register keys, start runs) of a launched aggregator."""
        if handle.address is None:
            raise ProviderError(f"aggregator of job {handle.job_id} has no address yet")
        return SuperLinkControl(
            flwr_home=self.paths(handle.job_id).flwr_home,
            address=handle.address,
            root_ca=self.tls(handle.job_id).ca_file,
            client_identity=self.control_identity,
        )

    async def launch(self, spec: AggregatorSpec) -> AggregatorHandle:
        launching = asyncio.ensure_future(asyncio.to_thread(self._launch, spec))
        try:
            return await asyncio.shield(launching)
        except asyncio.CancelledError:
            # The start runs in a thread, which a cancel cannot interrupt: wait for it and stop
            # what it started, or a job cancelled while its aggregator starts would leave the
            # aggregator running with no handle for the clean-up to terminate.
            with contextlib.suppress(Exception):
                await self.terminate(await launching)
            raise

    def describe(self) -> str:
        """How the job log names this provider's aggregator host."""
        return "the local provider"

    def certificate_names(self) -> tuple[str, ...]:
        """Every name the SuperLink is reached by: the advertised one, loopback (the controller's
        readiness probe on a wildcard bind) and a specific bind address."""
        names = ["localhost", "127.0.0.1", self.advertise_host, _probe_host(self.bind_host)]
        return tuple(dict.fromkeys(names))

    def candidate_ports(self) -> Iterator[int]:
        """Ports to try, in order: any free port, three times (it can be taken between the
        probe and the SuperLink's bind)."""
        for _ in range(3):
            yield free_port(self.bind_host)

    def _launch(self, spec: AggregatorSpec) -> AggregatorHandle:
        paths = self.paths(spec.job_id)
        paths.job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tls = self.issue_tls(spec.job_id, paths.tls_dir, self.certificate_names())
        paths.flwr_home.mkdir(exist_ok=True)
        last_error = "no port to listen on was free"
        for port in self.candidate_ports():
            proc = self._spawn(paths, tls, port)
            ready, last_error = self._wait_ready(proc, tls, port, paths)
            if ready:
                self._procs[spec.job_id] = proc
                address = host_port(self.advertise_host, port)
                log.info(
                    "job %s: aggregator host pid %s (SuperLink behind fedsky's front) on %s",
                    spec.job_id,
                    proc.pid,
                    address,
                )
                return AggregatorHandle(
                    provider=self.name,
                    job_id=spec.job_id,
                    ref=str(proc.pid),
                    region=spec.region,
                    address=address,
                )
            _kill_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
            if "address already in use" not in last_error.lower():
                break
        raise ProviderError(f"the SuperLink for job {spec.job_id} did not start: {last_error}")

    def _spawn(self, paths: LocalPaths, tls: SuperLinkTls, port: int) -> subprocess.Popen[bytes]:
        cmd = aggregator_command(
            host=self.bind_host,
            port=port,
            database=paths.database,
            tls=tls,
            work_dir=paths.job_dir,
        )
        with open(paths.log_file, "ab") as logf:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=flower_env(paths.flwr_home),
                cwd=paths.job_dir,
                start_new_session=True,  # its own process group: terminate reaches its children
            )

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], tls: SuperLinkTls, port: int, paths: LocalPaths
    ) -> tuple[bool, str]:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False, f"exited with code {proc.returncode}: {_log_tail(paths.log_file)}"
            if _tls_ready(_probe_host(self.bind_host), port, tls.ca_file):
                return True, ""
            time.sleep(0.2)
        return (
            False,
            f"not answering after {self.start_timeout_s:.0f} s: {_log_tail(paths.log_file)}",
        )

    async def healthy(self, handle: AggregatorHandle) -> bool:
        return await asyncio.to_thread(self._healthy, handle)

    def _healthy(self, handle: AggregatorHandle) -> bool:
        if not self._is_ours(handle):
            return False
        if handle.address is None:
            return False
        host, _, port = handle.address.rpartition(":")
        return _tls_ready(host.strip("[]"), int(port), self.tls(handle.job_id).ca_file)

    async def address(self, handle: AggregatorHandle) -> str:
        if handle.address is None:
            raise ProviderError(f"aggregator of job {handle.job_id} has no address")
        return handle.address

    async def terminate(self, handle: AggregatorHandle) -> None:
        await asyncio.to_thread(self._terminate, handle)

    def _terminate(self, handle: AggregatorHandle) -> None:
        proc = self._procs.pop(handle.job_id, None)
        if not self._is_ours(handle):
            log.info("job %s: SuperLink (pid %s) is already gone", handle.job_id, handle.ref)
            if proc is not None:
                proc.poll()
            return
        pid = int(handle.ref)
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and group_alive(pid):
            if proc is not None:
                proc.poll()
            time.sleep(0.1)
        if group_alive(pid):
            log.warning("job %s: SuperLink did not stop on SIGTERM; killing it", handle.job_id)
            _signal_group(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
        log.info("job %s: SuperLink stopped", handle.job_id)

    def _is_ours(self, handle: AggregatorHandle) -> bool:
        """Is `handle.ref` still this job's SuperLink process group (not a recycled pid)?"""
        try:
            pid = int(handle.ref)
        except ValueError:
            return False
        proc = self._procs.get(handle.job_id)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None or group_alive(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            any(AGGREGATOR_EXECUTABLE.encode() in part for part in cmdline)
            and str(self.paths(handle.job_id).database).encode() in cmdline
        )


def _probe_host(bind_host: str) -> str:
    """Where this machine reaches a listener bound to `bind_host` (loopback for a wildcard)."""
    if is_wildcard(bind_host):
        return "::1" if ":" in bind_host else "127.0.0.1"
    return bind_host


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_is_free(host: str, port: int) -> bool:
    """Can a listener bind `host:port` right now?"""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # As the SuperLink binds: a port left in TIME_WAIT is free, a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tls_ready(host: str, port: int, ca_file: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with (
            socket.create_connection((host, port), timeout=2) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill_group(pid: int) -> None:
    _signal_group(pid, signal.SIGKILL)


def _log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-1200:] or "(empty log)"
