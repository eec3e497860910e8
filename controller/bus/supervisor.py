"""The supervisor of the managed Mosquitto: start it, keep it running, restart it on request.

`prepare_broker_files` (in `fedsky.controller.bus.broker_config`) writes what Mosquitto reads;
`ManagedBroker` runs `mosquitto -c <conf>` on those files as a child process. The child's pid
is written beside its config, so that a controller killed outright (no chance to stop its
child) finds and stops the broker it left behind on its next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from fedsky.controller.bus.broker_config import BrokerError, BrokerFiles
from fedsky.shared.retry import Backoff

log = logging.getLogger(__name__)


class BrokerTimeout(BrokerError, TimeoutError):
    """The broker did not become ready in time."""


def _log_line(line: str) -> None:
    """Relay one Mosquitto log line at a level that matches what it says."""
    if line.startswith(("Error", "Warning")):
        log.warning("mosquitto: %s", line)
    elif line.startswith(("mosquitto version", "Opening ", "OpenSSL Error")) or (
        "disconnected by administrative action" in line
    ):
        # Start and stop, refused certificates (revoked, foreign, missing), cut sessions.
        log.info("mosquitto: %s", line)
    else:
        # Connections, refusals of bad certificates, denials: one per client event.
        log.debug("mosquitto: %s", line)


def _kill_stale(pid_file: Path, conf_file: Path, grace_s: float) -> None:
    """Stop a Mosquitto left running on our config by a controller that was killed outright."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    if str(conf_file).encode() not in cmdline:
        # Not ours (or gone): the pid may have been reused by something else.
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        return
    log.warning("stopping a Mosquitto (pid %d) left over from an earlier run", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if _gone(pid):
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat_line.rpartition(")")[2].split()[:1] == ["Z"]


def _raise_fd_limit(pid: int) -> None:
    """Let the child hold thousands of connections even if our soft limit is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft >= want:
        return
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        log.debug("could not raise mosquitto's open-file limit: %s", exc)


class ManagedBroker:
    """Runs `mosquitto -c <conf>` as a child process and keeps it running.

    `run()` starts it, restarts it after an unexpected exit (exponential backoff with full
    jitter, reset after a stable run), and stops it on cancellation: SIGTERM, then SIGKILL after
    `stop_grace_s`. A broker that fails before it ever became ready (bad config, port taken)
    fails `run()` with the broker's own reason. Its log lines go to this module's logger.
    """

    def __init__(
        self,
        *,
        files: BrokerFiles,
        mosquitto_bin: str = "mosquitto",
        backoff: Backoff | None = None,
        stop_grace_s: float = 5.0,
        stable_after_s: float = 30.0,
    ) -> None:
        self._files = files
        self._bin = mosquitto_bin
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=30.0)
        self._grace = stop_grace_s
        self._stable_after = stable_after_s
        self._proc: asyncio.subprocess.Process | None = None
        self._running = False
        self._ended = False  # run() returned or raised (not: never started)
        self._ready = False
        self._generation = 0  # counts the starts that became ready
        self._restarts = 0  # unexpected exits that were restarted
        self._failure: BaseException | None = None
        self._restart_requested = asyncio.Event()
        self._changed = asyncio.Condition()
        self._recent: deque[str] = deque(maxlen=20)

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None between runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def restarts(self) -> int:
        """How many times the broker died unexpectedly and was started again."""
        return self._restarts

    @property
    def files(self) -> BrokerFiles:
        return self._files

    async def run(self) -> None:
        if self._running:
            raise BrokerError("this broker is already running")
        self._running = True
        self._ended = False
        self._failure = None
        self._restart_requested.clear()
        try:
            await self._run()
        except BaseException as exc:
            self._failure = exc
            raise
        finally:
            self._running = False
            self._ended = True
            if self._files.runtime_copy:
                # A copy of the server key must not outlive the broker; the next start makes
                # the directory again from the PKI.
                await asyncio.to_thread(shutil.rmtree, self._files.directory, True)
            await self._notify()

    async def wait_ready(self, timeout: float) -> None:
        """Return once the broker accepts connections.

        May be called before `run()` has started. BrokerTimeout after `timeout` seconds,
        BrokerError if `run()` failed or ended.
        """
        await self._wait_for(lambda: self._ready, timeout, "become ready")

    async def restart(self, *, timeout: float = 30.0) -> None:
        """Stop and start the broker now (no backoff), e.g. to load a new CRL; wait until ready.

        Connected clients are disconnected and reconnect on their own.
        """
        if not self._running:
            raise BrokerError("the managed broker is not running")
        generation = self._generation
        self._restart_requested.set()
        await self._wait_for(
            lambda: self._ready and self._generation > generation, timeout, "restart"
        )

    @property
    def can_cut_sessions(self) -> bool:
        """The dynamic-security plugin is loaded: a revoked session can be cut, no restart."""
        return self._files.dynsec

    async def reload_crl(self) -> None:
        """Copy the current CRL in and have Mosquitto reload it (SIGHUP): new connections are
        checked against it; connected clients stay (see `security.revocation`)."""
        await asyncio.to_thread(self._files.install_crl)
        self._hangup()

    async def reload_certificates(self) -> None:
        """Have Mosquitto load its renewed server certificate and key (SIGHUP; 2.0 rereads
        them): new connections get the new one, connected clients stay."""
        self._hangup()

    def _hangup(self) -> None:
        proc = self._proc
        if not self._running or proc is None or proc.returncode is not None:
            raise BrokerError("the managed broker is not running")
        proc.send_signal(signal.SIGHUP)

    # --- internals ------------------------------------------------------------------------

    async def _wait_for(self, predicate: Callable[[], bool], limit_s: float, what: str) -> None:
        def done() -> bool:
            return predicate() or self._failure is not None or self._ended

        try:
            async with asyncio.timeout(limit_s):
                async with self._changed:
                    await self._changed.wait_for(done)
        except TimeoutError:
            raise BrokerTimeout(
                f"mosquitto did not {what} within {limit_s:.0f} s; its last lines: {self._tail()}"
            ) from None
        if predicate():
            return
        if self._failure is not None and not isinstance(self._failure, asyncio.CancelledError):
            raise BrokerError(f"the managed broker failed: {self._failure}") from self._failure
        raise BrokerError("the managed broker is not running")

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _tail(self) -> str:
        return " | ".join(self._recent) or "(none)"

    async def _run(self) -> None:
        files = self._files
        await asyncio.to_thread(_kill_stale, files.pid_file, files.conf_file, self._grace)
        loop = asyncio.get_running_loop()
        delays = self._backoff.delays()
        while True:
            await asyncio.to_thread(files.install_crl)
            self._recent.clear()
            proc = await self._spawn()
            started = loop.time()
            generation = self._generation
            outcome = await self._supervise(proc)
            if outcome == "restart":
                log.info("mosquitto restarted on request")
                delays = self._backoff.delays()
                continue
            if self._generation == generation == 0:
                raise BrokerError(
                    f"mosquitto exited with status {proc.returncode} before it was ready: "
                    f"{self._tail()}"
                )
            if loop.time() - started >= self._stable_after:
                delays = self._backoff.delays()
            delay = next(delays, None)
            if delay is None:
                raise BrokerError(f"mosquitto keeps exiting; giving up. Last lines: {self._tail()}")
            self._restarts += 1
            log.warning(
                "mosquitto exited unexpectedly (status %s); restarting in %.1f s",
                proc.returncode,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._restart_requested.wait()
            self._restart_requested.clear()

    async def _spawn(self) -> asyncio.subprocess.Process:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._bin,
                "-c",
                str(self._files.conf_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # Its own session: a Ctrl-C meant for the controller must not reach the broker
                # before the controller stops it in order.
                start_new_session=True,
            )
        except OSError as exc:
            raise BrokerError(
                f"cannot run {self._bin!r}: {exc.strerror}; install mosquitto or set "
                "broker.mosquitto_bin"
            ) from None
        self._proc = proc
        try:
            _raise_fd_limit(proc.pid)
            # For the next run, should this process be killed before it can stop the child.
            await asyncio.to_thread(self._files.pid_file.write_text, f"{proc.pid}\n")
        except BaseException:
            await self._stop(proc)
            raise
        log.debug("started mosquitto (pid %d)", proc.pid)
        return proc

    async def _supervise(self, proc: asyncio.subprocess.Process) -> str:
        """Wait until the child exits ("exited") or a restart is asked for ("restart")."""
        reader = asyncio.create_task(self._read_stderr(proc), name="mosquitto-stderr")
        exited = asyncio.create_task(proc.wait(), name="mosquitto-wait")
        restart = asyncio.create_task(self._restart_requested.wait(), name="mosquitto-restart")
        outcome = "exited"
        try:
            await asyncio.wait({exited, restart}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                outcome = "restart"
                self._restart_requested.clear()
        finally:
            restart.cancel()
            exited.cancel()
            await self._stop(proc)
            self._ready = False
            # The rest of its log, up to EOF; an outer cancellation still goes through.
            await asyncio.wait({reader}, timeout=1.0)
            reader.cancel()
            with contextlib.suppress(FileNotFoundError):
                self._files.pid_file.unlink()
            self._proc = None
            await self._notify()
        return outcome

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            raw = await proc.stderr.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self._recent.append(line)
            _log_line(line)
            if line.startswith("mosquitto version") and line.endswith(" running"):
                self._ready = True
                self._generation += 1
                await self._notify()

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM, then SIGKILL after the grace period; the child is reaped either way."""
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(self._grace):
                await proc.wait()
        except TimeoutError:
            log.warning("mosquitto did not stop within %.0f s of SIGTERM: killing it", self._grace)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
