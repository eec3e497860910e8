"""The `local` executor: the SuperNode as a process on the agent's host.

Each task gets `<work_dir>/<task id>/` with the SuperNode's FLWR_HOME and log. The SuperNode
runs in its own process group (with the SuperExec and ClientApp processes it starts) so that
stopping the task ends all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from fedsky.agent.executors.base import (
    ExecutorError,
    ExitStatus,
    SuperNodeLaunch,
    describe_exit,
    files_of,
    record_pid,
)
from fedsky.shared.config import ConfigError
from fedsky.shared.datasets import load_catalog, scrub
from fedsky.shared.net import free_port
from fedsky.shared.procs import wait_group_gone
from fedsky.shared.supernode import (
    DEFAULT_MAX_WAIT_S,
    SUPERNODE_EXECUTABLE,
    SuperNodeConfigError,
    supernode_command,
)

log = logging.getLogger(__name__)


class LocalSuperNode:
    def __init__(
        self, task_id: str, proc: asyncio.subprocess.Process, log_file: Path, secrets: list[Path]
    ) -> None:
        self.task_id = task_id
        self.pid = proc.pid
        self.log_file = log_file
        self._proc = proc
        self._secrets = secrets
        self._stopping = False
        self._status: ExitStatus | None = None

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    def _finish(self, rc: int) -> ExitStatus:
        if self._status is None:
            code, sig = (rc, None) if rc >= 0 else (None, -rc)
            reason = scrub(
                describe_exit(code, sig, stopped=self._stopping, log_text=self.log_tail()),
                self._secrets,
            )
            self._status = ExitStatus(code=code, signal=sig, reason=reason[:1500])
            log.info("task %s: SuperNode ended: %s", self.task_id, self._status.reason)
        return self._status

    async def wait(self) -> ExitStatus:
        rc = await self._proc.wait()
        self._kill_group(signal.SIGKILL)  # leftover ClientApp processes of a crashed SuperNode
        await wait_group_gone(self.pid)
        return self._finish(rc)

    async def stop(self, *, timeout_s: float = 10.0) -> ExitStatus:
        if self._proc.returncode is None:
            self._stopping = True
            self._kill_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except TimeoutError:
                log.warning(
                    "task %s: SuperNode ignored SIGTERM for %.0f s; killing it",
                    self.task_id,
                    timeout_s,
                )
                self._kill_group(signal.SIGKILL)
                await self._proc.wait()
        self._kill_group(signal.SIGKILL)
        await wait_group_gone(self.pid)
        rc = self._proc.returncode
        assert rc is not None
        return self._finish(rc)

    def _kill_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def log_tail(self, max_bytes: int = 8192) -> str:
        """The end of the SuperNode's log (local use: it may name local paths)."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def _catalog_paths(catalog: Path) -> list[Path]:
    """The catalog and every dataset path in it: to scrub from what is reported."""
    try:
        return [catalog, *load_catalog(catalog).local_paths()]
    except ConfigError:
        return [catalog]


class LocalExecutor:
    kind = "local"
    on_agent_host = True  # allowed in one-box mode only (the config and the runner check)

    def __init__(
        self, *, work_dir: Path, bin_dir: Path | None = None, max_wait_s: float = DEFAULT_MAX_WAIT_S
    ) -> None:
        self.work_dir = Path(work_dir)
        self.bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.max_wait_s = max_wait_s

    async def start(
        self, launch: SuperNodeLaunch, *, vm_name: str = "", vm_addresses: tuple[str, ...] = ()
    ) -> LocalSuperNode:
        task_dir = self.work_dir / launch.task_id
        await asyncio.to_thread(task_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
        try:
            cmd = supernode_command(
                superlink=launch.superlink,
                root_ca=launch.root_ca,
                private_key=launch.private_key,
                site=launch.site,
                dataset_config=launch.dataset_config,
                runtime_port=free_port(),
                flwr_home=task_dir / "flwr-home",
                node_config=launch.node_config,
                executable=str(self.bin_dir / SUPERNODE_EXECUTABLE),
                bin_dir=str(self.bin_dir),
                max_wait_s=self.max_wait_s,
                node_cert=launch.node_cert,
            )
        except (SuperNodeConfigError, ValueError) as exc:
            raise ExecutorError(f"cannot start the SuperNode: {exc}") from None
        for needed in files_of(launch):
            if not needed.is_file():
                raise ExecutorError(
                    f"cannot start the SuperNode: a file it needs is missing ({needed.name})"
                )
        log_file = task_dir / "supernode.log"
        env = {**os.environ, **cmd.env}
        logf = await asyncio.to_thread(open, log_file, "ab")
        with logf:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    cwd=task_dir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ExecutorError(f"cannot start the SuperNode: {exc.strerror}") from None
        await asyncio.to_thread(record_pid, task_dir, proc.pid)
        log.info("task %s: SuperNode pid %s for %s", launch.task_id, proc.pid, launch.superlink)
        return LocalSuperNode(
            launch.task_id, proc, log_file, [task_dir, *_catalog_paths(launch.dataset_config)]
        )
