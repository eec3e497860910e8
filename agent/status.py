"""The agent's local status: what `agentctl status` shows on the hospital machine.

The running daemon keeps an `AgentState` (owned by the event loop) and serves it as one JSON
document on a unix socket (mode and group from the config, by default 0660) and also writes it
atomically to a state file with the same permissions, so `agentctl status` still answers when the
socket does not (and tells a crashed agent from a running one by its pid). Neither says anything
the broker would not: no key material, no paths of datasets.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from fedsky.shared.messages import HostInfo, TaskSummary, VmInfo, utcnow
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

STATUS_SCHEMA = "1.0"
# Rewrite the status file at most this often, and at least this often when nothing changes (so
# its `updated_at` shows that the agent is alive).
_FILE_MIN_INTERVAL_S = 1.0
_FILE_REFRESH_S = 30.0

T = TypeVar("T")
RunBlocking = Callable[[Callable[[], T]], Awaitable[T]]


# --- The document ------------------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class BrokerStatus(_Doc):
    address: str
    connected: bool
    connected_since: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    connects: int = 0


class IdentityStatus(_Doc):
    agent_id: str
    location: str
    cert_not_after: datetime


class ReportStatus(_Doc):
    seq: int
    sent_at: datetime


class InventoryStatus(_Doc):
    uri: str
    updated_at: datetime | None = None
    error: str | None = None
    host: HostInfo | None = None
    vms: list[VmInfo] = []


class StatusDoc(_Doc):
    schema_: str = Field(default=STATUS_SCHEMA, alias="schema")
    running: bool
    pid: int
    # psutil's create_time of the process, to tell it from a later process with the same pid.
    pid_started_at: float | None = None
    started_at: datetime
    updated_at: datetime
    identity: IdentityStatus
    broker: BrokerStatus
    last_report: ReportStatus | None = None
    # A report waiting for the broker (only the newest is kept).
    pending_report_seq: int | None = None
    inventory: InventoryStatus
    task: TaskSummary | None = None
    bad_commands: dict[str, int] = {}
    events_queued: int = 0

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True)


# --- The daemon's live state -------------------------------------------------------------------


def _process_start_time() -> float | None:
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return None


@dataclass
class AgentState:
    """Mutable state of the running agent; only the event loop touches it."""

    agent_id: str
    location: str
    cert_not_after: datetime
    broker_address: str
    libvirt_uri: str
    pid: int = field(default_factory=os.getpid)
    pid_started_at: float | None = field(default_factory=_process_start_time)
    started_at: datetime = field(default_factory=utcnow)
    running: bool = True
    # Link.
    connected: bool = False
    connected_since: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    connects: int = 0
    last_report_seq: int | None = None
    last_report_at: datetime | None = None
    pending_report_seq: int | None = None
    bad_commands: dict[str, int] = field(default_factory=dict)
    events_queued: int = 0
    # Inventory.
    vms: list[VmInfo] = field(default_factory=list)
    host: HostInfo | None = None
    inventory_at: datetime | None = None
    inventory_error: str | None = None
    # The task runner (issue 4) sets this.
    task: TaskSummary | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def touch(self) -> None:
        """Something changed: the status file is rewritten soon."""
        self._changed.set()

    # Updates from the link.
    def link_up(self) -> None:
        self.connected = True
        self.connected_since = utcnow()
        self.connects += 1
        self.touch()

    def link_down(self, error: str | None) -> None:
        self.connected = False
        self.connected_since = None
        if error is not None:
            self.last_error = error
            self.last_error_at = utcnow()
        self.touch()

    def report_sent(self, seq: int, at: datetime) -> None:
        self.last_report_seq = seq
        self.last_report_at = at
        if self.pending_report_seq == seq:
            self.pending_report_seq = None
        self.touch()

    def doc(self) -> StatusDoc:
        last = (
            ReportStatus(seq=self.last_report_seq, sent_at=self.last_report_at)
            if self.last_report_seq is not None and self.last_report_at is not None
            else None
        )
        return StatusDoc(
            running=self.running,
            pid=self.pid,
            pid_started_at=self.pid_started_at,
            started_at=self.started_at,
            updated_at=utcnow(),
            identity=IdentityStatus(
                agent_id=self.agent_id, location=self.location, cert_not_after=self.cert_not_after
            ),
            broker=BrokerStatus(
                address=self.broker_address,
                connected=self.connected,
                connected_since=self.connected_since,
                last_error=self.last_error,
                last_error_at=self.last_error_at,
                connects=self.connects,
            ),
            last_report=last,
            pending_report_seq=self.pending_report_seq,
            inventory=InventoryStatus(
                uri=self.libvirt_uri,
                updated_at=self.inventory_at,
                error=self.inventory_error,
                host=self.host,
                vms=list(self.vms),
            ),
            task=self.task,
            bad_commands=dict(self.bad_commands),
            events_queued=self.events_queued,
        )


# --- Serving it --------------------------------------------------------------------------------


class StatusError(RuntimeError):
    """The status socket cannot be served (another agent runs, no such group, ...)."""


def resolve_group(name: str | None) -> int | None:
    """The gid of `name`; StatusError if there is no such group."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StatusError(f"no such group {name!r} (key 'status.group')") from None


def _apply_permissions(path: Path, *, mode: int, gid: int | None) -> None:
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)


def write_status_file(path: Path, doc: StatusDoc, *, mode: int, gid: int | None) -> None:
    """Atomically replace `path` (blocking: call it off the event loop)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(doc.dump())
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _apply_permissions(tmp, mode=mode, gid=gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _clear_socket_path(path: Path) -> None:
    """Remove a socket left behind by a killed agent; StatusError if a live one answers."""
    if path.exists() or path.is_symlink():
        if _socket_answers(path):
            raise StatusError(f"another agent is running: {path} answers")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)


class StatusServer:
    """Serves `state` on a unix socket and mirrors it into the state file until cancelled."""

    def __init__(
        self,
        *,
        state: AgentState,
        socket_path: Path,
        state_file: Path,
        mode: int,
        gid: int | None,
        run_blocking: RunBlocking[Any],
    ) -> None:
        self._state = state
        self._socket_path = socket_path
        self._state_file = state_file
        self._mode = mode
        self._gid = gid
        self._run_blocking = run_blocking
        self._file_error_logged = False

    async def start(self) -> asyncio.Server:
        """Bind the socket; StatusError if another agent already serves it."""
        path = self._socket_path
        await asyncio.to_thread(_clear_socket_path, path)
        server = await asyncio.start_unix_server(self._serve_one, path=str(path))
        try:
            await asyncio.to_thread(_apply_permissions, path, mode=self._mode, gid=self._gid)
        except OSError as exc:
            server.close()
            raise StatusError(f"cannot set the permissions of {path}: {exc.strerror}") from None
        log.info("status socket at %s", path)
        return server

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One request, one answer: the whole document, then close. Nothing is read from the
        # client, so nothing it sends can affect the agent.
        try:
            writer.write(self._state.doc().dump().encode() + b"\n")
            async with asyncio.timeout(5.0):
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            log.debug("status client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _write_file(self) -> None:
        doc = self._state.doc()
        try:
            await self._run_blocking(
                lambda: write_status_file(self._state_file, doc, mode=self._mode, gid=self._gid)
            )
            self._file_error_logged = False
        except OSError as exc:
            if not self._file_error_logged:
                self._file_error_logged = True
                log.warning("cannot write status file %s: %s", self._state_file, exc.strerror)

    async def run(self, server: asyncio.Server | None = None) -> None:
        """Serve until cancelled; then remove the socket and leave a final `running: false` file."""
        server = server or await self.start()
        changed = self._state._changed
        try:
            while True:
                await self._write_file()
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    # Not wait_for: in 3.11 it can swallow a cancellation that races with the
                    # event (stopping touches the state just before it cancels this task).
                    async with asyncio.timeout(_FILE_REFRESH_S):
                        await changed.wait()
                await asyncio.sleep(_FILE_MIN_INTERVAL_S)  # coalesce bursts of changes
        finally:
            server.close()
            with contextlib.suppress(OSError):
                self._socket_path.unlink()
            self._state.running = False
            self._state.connected = False
            doc = self._state.doc()
            # Blocking, but at exit and small: the loop may already be closing its executors.
            try:
                write_status_file(self._state_file, doc, mode=self._mode, gid=self._gid)
            except OSError as exc:
                log.warning("cannot write final status file %s: %s", self._state_file, exc.strerror)


# --- Reading it (agentctl) ---------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReading:
    """What `agentctl status` found. `doc` is None when neither socket nor file could be read."""

    running: bool
    connected: bool
    source: Literal["socket", "file", "none"]
    doc: StatusDoc | None
    note: str | None = None


def _read_socket(path: Path, timeout: float) -> bytes:
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _pid_alive(pid: int, started_at: float | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if started_at is None:
        return True
    try:
        import psutil

        return abs(float(psutil.Process(pid).create_time()) - started_at) < 1.0
    except Exception:
        return True


def read_status(*, socket_path: Path, state_file: Path, timeout: float = 3.0) -> StatusReading:
    """Ask the running agent; fall back to the state file when the socket does not answer."""
    socket_problem: str | None = None
    try:
        raw = _read_socket(socket_path, timeout)
        doc = StatusDoc.model_validate_json(raw)
        return StatusReading(running=True, connected=doc.broker.connected, source="socket", doc=doc)
    except FileNotFoundError:
        socket_problem = None
    except PermissionError:
        socket_problem = f"permission denied on {socket_path} (are you in the agent's group?)"
    except ConnectionRefusedError:
        socket_problem = None
    except (OSError, ValidationError, ValueError) as exc:
        socket_problem = f"{socket_path} did not answer properly: {exc}"

    try:
        doc = StatusDoc.model_validate_json(state_file.read_bytes())
    except FileNotFoundError:
        return StatusReading(
            running=False,
            connected=False,
            source="none",
            doc=None,
            note=socket_problem or "no status socket and no status file: the agent is not running",
        )
    except PermissionError:
        return StatusReading(
            running=False,
            connected=False,
            source="none",
            doc=None,
            note=socket_problem
            or f"permission denied on {state_file} (are you in the agent's group?)",
        )
    except (OSError, ValidationError, ValueError) as exc:
        return StatusReading(
            running=False,
            connected=False,
            source="none",
            doc=None,
            note=f"{state_file} is unreadable: {exc}",
        )
    alive = doc.running and _pid_alive(doc.pid, doc.pid_started_at)
    if not alive:
        note = "the agent is not running"
        if doc.running:
            note += f" (it stopped without cleaning up; pid {doc.pid} is gone)"
        return StatusReading(running=False, connected=False, source="file", doc=doc, note=note)
    note = socket_problem or "the status socket did not answer; showing the status file"
    return StatusReading(
        running=True, connected=doc.broker.connected, source="file", doc=doc, note=note
    )


def as_json(reading: StatusReading) -> str:
    """`agentctl status --json`: the document plus how it was read."""
    data: dict[str, Any] = {
        "running": reading.running,
        "connected": reading.connected,
        "source": reading.source,
        "note": reading.note,
        "status": json.loads(reading.doc.dump()) if reading.doc is not None else None,
    }
    return json.dumps(data, indent=2)


__all__ = [
    "AgentState",
    "StatusDoc",
    "StatusError",
    "StatusReading",
    "StatusServer",
    "as_json",
    "read_status",
    "resolve_group",
    "write_status_file",
]
