"""A real Mosquitto with mutual TLS for tests, configured exactly as the controller does it.

`MqttBroker.launch(pki=...)` renders the files with `prepare_broker_files` into a directory
Mosquitto can reach (under the system temp dir: as root it drops to the `mosquitto` user, which
cannot enter pytest's 0700 `tmp_path`), starts `mosquitto -c` on a free loopback port and waits
for its "running" line. The process is controlled directly (not through `ManagedBroker`) so
that fault tests decide when it dies and when it comes back: `kill()`, `stop()`, `start()`,
`restart()` (and `astart()`/`arestart()` from async tests, which keep the loop free).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
from fedsky.controller.bus.broker_config import BrokerFiles, prepare_broker_files
from fedsky.controller.security.pki import CertKind, IssuedCertificate, Pki, write_private_key
from fedsky.shared.net import free_port
from fedsky.shared.tls import client_context
from fedsky.shared.topics import Topics

from .wait import eventually_blocking

HOST = "127.0.0.1"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
READY_LINE = "running"


@contextlib.contextmanager
def broker_directory() -> Iterator[Path]:
    """A fresh directory Mosquitto can reach even after dropping root; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fedsky-broker-"))
    path.chmod(0o711)  # others may pass through (not list): Mosquitto reads its own subdirectory
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unique_prefix() -> str:
    return f"fedsky-test-{uuid.uuid4().hex[:12]}/v1"


@dataclass(frozen=True)
class ClientCredentials:
    """A client identity on disk plus a ready TLS context (capped at TLS 1.2)."""

    common_name: str
    kind: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    context: ssl.SSLContext
    serial: int


def write_credentials(
    directory: Path, issued: IssuedCertificate, *, ca_pem: bytes, name: str | None = None
) -> ClientCredentials:
    """Write an issued certificate (and its key) and build a client context from them."""
    assert issued.key_pem is not None, "write_credentials needs a certificate issued with its key"
    stem = name or f"{issued.common_name}-{issued.serial:x}"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_file = directory / f"{stem}.ca.crt"
    cert_file = directory / f"{stem}.crt"
    key_file = directory / f"{stem}.key"
    ca_file.write_bytes(ca_pem)
    cert_file.write_bytes(issued.cert_pem)
    write_private_key(key_file, issued.key_pem, overwrite=True)
    ctx = client_context(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    return ClientCredentials(
        common_name=issued.common_name,
        kind=issued.kind,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        context=ctx,
        serial=issued.serial,
    )


@dataclass
class MqttBroker:
    """A running test broker. Attributes: host, port, prefix, topics, pki, files."""

    pki: Pki
    directory: Path
    port: int
    prefix: str
    files: BrokerFiles
    host: str = HOST
    debug_log: bool = True
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _revoked: dict[int, datetime] = field(default_factory=dict, repr=False)

    @classmethod
    def launch(
        cls, *, pki: Pki, directory: Path, prefix: str | None = None, debug_log: bool = True
    ) -> MqttBroker:
        """Prepare files like the controller does and start the broker on a free port."""
        prefix = prefix or unique_prefix()
        last_error: Exception | None = None
        for _ in range(5):  # another process may take the free port before Mosquitto binds it
            port = free_port()
            files = prepare_broker_files(
                pki=pki,
                broker_dir=directory / "broker",
                host=HOST,
                port=port,
                topic_prefix=prefix,
                debug_log=debug_log,
            )
            broker = cls(pki=pki, directory=directory, port=port, prefix=prefix, files=files)
            try:
                broker.start()
            except RuntimeError as exc:
                if "Address already in use" not in str(exc):
                    raise
                last_error = exc
                continue
            return broker
        raise RuntimeError(f"could not start a test broker: {last_error}")

    # --- identity ---------------------------------------------------------------------------

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    @property
    def log_file(self) -> Path:
        return self.directory / "mosquitto.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client_context_for(
        self, common_name: str, kind: CertKind = "agent", **issue_kwargs: Any
    ) -> ClientCredentials:
        """Issue a certificate for `common_name` from the broker's CA; return paths and context."""
        issued = self.pki.issue(common_name=common_name, kind=kind, **issue_kwargs)
        return write_credentials(self.directory / "clients", issued, ca_pem=self.pki.ca_cert_pem)

    def client(
        self,
        credentials: ClientCredentials | ssl.SSLContext,
        *,
        identifier: str | None = None,
        timeout: float = 5.0,
        **kwargs: Any,
    ) -> aiomqtt.Client:
        """An MQTT 5 client to this broker (not yet connected: use `async with`)."""
        ctx = credentials if isinstance(credentials, ssl.SSLContext) else credentials.context
        name = credentials.common_name if isinstance(credentials, ClientCredentials) else "client"
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=identifier or f"{name}-{uuid.uuid4().hex[:8]}",
            tls_context=ctx,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=timeout,
            **kwargs,
        )

    def revoke(self, *serials: int, restart: bool = True) -> None:
        """Put `serials` on the CRL (with every earlier revocation) and restart to load it."""
        now = datetime.now(UTC)
        for serial in serials:
            self._revoked.setdefault(serial, now)
        self.pki.write_crl(self._revoked.items())
        if restart:
            self.restart()

    # --- process control --------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, *, timeout: float = 10.0) -> None:
        """Start the broker (on the same port as before) and wait for its "running" line."""
        if self.running:
            raise RuntimeError("the test broker is already running")
        self.files.install_crl()
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            proc = self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.files.conf_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

        def new_output() -> str:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")

        def outcome() -> str | None:
            if any(line.endswith(READY_LINE) for line in new_output().splitlines()):
                return "running"
            return "exited" if proc.poll() is not None else None

        try:
            started = eventually_blocking(
                outcome, timeout=timeout, interval=0.01, what="mosquitto to start"
            )
        except AssertionError:
            self.kill()
            raise RuntimeError(f"mosquitto did not start within {timeout} s") from None
        if started == "exited":
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: {new_output().strip()}")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye, as in a crash."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean stop (persistence saved)."""
        self._signal(signal.SIGTERM)

    def restart(self) -> None:
        self.stop()
        self.start()

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def arestart(self) -> None:
        await asyncio.to_thread(self.restart)

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.kill()


async def receive_until(
    client: aiomqtt.Client,
    stop: Callable[[aiomqtt.Message], bool],
    *,
    timeout: float = 5.0,
) -> list[aiomqtt.Message]:
    """Collect messages until `stop(message)` is true (that message included); bounded wait."""
    got: list[aiomqtt.Message] = []
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            got.append(message)
            if stop(message):
                return got
    raise AssertionError("the message stream ended")  # pragma: no cover
