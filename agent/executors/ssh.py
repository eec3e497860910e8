"""The `ssh` executor: the SuperNode inside the chosen VM, over the system `ssh` client.

Start: make the task directory on the VM (umask 077), copy in the aggregator's CA, the node key
and the dataset catalog through the SSH channel (`cat > file`), then run
`echo $$ > supernode.pid; exec env ... flower-supernode ...` in a session of its own. The local
`ssh` process lives as long as the SuperNode and exits with its exit status (255: SSH itself
failed). Stop: `kill -TERM` the SuperNode's process group on the VM through a second SSH
command, then `kill -KILL` if it lingers. Host keys are always checked (`known_hosts_file`);
`BatchMode` means no prompt can hang the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
from pathlib import Path

from fedsky.agent.executors.base import (
    ExecutorError,
    ExitStatus,
    SshExecutorConfig,
    SuperNodeLaunch,
    VmUnreachable,
    describe_exit,
    last_lines,
)
from fedsky.agent.executors.local import _catalog_paths
from fedsky.shared.datasets import scrub
from fedsky.shared.supernode import SuperNodeConfigError, supernode_command

log = logging.getLogger(__name__)

SSH_FAILED = 255


def _split_address(address: str, default_port: int) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and host and ":" not in host:
        return host, int(port)
    return address.strip("[]"), default_port


class SshSuperNode:
    def __init__(
        self,
        executor: SshExecutor,
        *,
        task_id: str,
        host: str,
        port: int,
        remote_dir: str,
        proc: asyncio.subprocess.Process,
        log_file: Path,
        secrets: list[Path],
    ) -> None:
        self.task_id = task_id
        self.host, self.port = host, port
        self.remote_dir = remote_dir
        self.log_file = log_file
        self._executor = executor
        self._proc = proc
        self._secrets = secrets
        self._stopping = False
        self._status: ExitStatus | None = None

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    def _finish(self, rc: int) -> ExitStatus:
        if self._status is None:
            if rc == SSH_FAILED and not self._stopping:
                reason = f"the SSH session to the VM failed ({scrub(last_lines(self.log_tail()), self._secrets)})"
                status = ExitStatus(code=rc, signal=None, reason=reason[:1500], unreachable=True)
            else:
                code: int | None = rc
                sig: int | None = None
                if rc < 0:
                    code, sig = None, -rc
                elif rc > 128 and rc - 128 in (signal.SIGTERM, signal.SIGKILL):
                    code, sig = None, rc - 128  # the remote shell reports a signal as 128 + n
                reason = scrub(
                    describe_exit(code, sig, stopped=self._stopping, log_text=self.log_tail()),
                    self._secrets,
                )
                status = ExitStatus(code=code, signal=sig, reason=reason[:1500])
            self._status = status
            log.info("task %s: remote SuperNode ended: %s", self.task_id, status.reason)
        return self._status

    async def wait(self) -> ExitStatus:
        return self._finish(await self._proc.wait())

    async def stop(self, *, timeout_s: float = 10.0) -> ExitStatus:
        if self._proc.returncode is None:
            self._stopping = True
            pidfile = shlex.quote(f"{self.remote_dir}/supernode.pid")
            kill = f"p=$(cat {pidfile} 2>/dev/null) && kill -s {{sig}} -- -$p 2>/dev/null; true"
            with contextlib.suppress(ExecutorError):
                await self._executor.run_remote(self.host, self.port, kill.format(sig="TERM"))
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("task %s: remote SuperNode ignored SIGTERM; killing it", self.task_id)
                with contextlib.suppress(ExecutorError):
                    await self._executor.run_remote(self.host, self.port, kill.format(sig="KILL"))
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
        rc = self._proc.returncode
        assert rc is not None
        return self._finish(rc)

    def log_tail(self, max_bytes: int = 8192) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class SshExecutor:
    kind = "ssh"

    def __init__(self, config: SshExecutorConfig, *, work_dir: Path) -> None:
        self.config = config
        self.work_dir = Path(work_dir)

    def address_for(self, vm_name: str, vm_addresses: tuple[str, ...]) -> tuple[str, int]:
        override = self.config.address_overrides.get(vm_name)
        if override:
            return _split_address(override, self.config.port)
        for addr in vm_addresses:
            if addr and not addr.startswith(("127.", "fe80:", "::1")):
                return _split_address(addr.split("/", 1)[0], self.config.port)
        raise VmUnreachable(f"VM {vm_name!r} has no address to reach it by SSH")

    def ssh_argv(self, host: str, port: int, remote_command: str) -> list[str]:
        c = self.config
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(port),
            "-i",
            str(c.identity_file),
            "-l",
            c.user,
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={c.known_hosts_file}",
            "-o",
            f"ConnectTimeout={int(c.connect_timeout_s)}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
            host,
            remote_command,
        ]

    async def run_remote(
        self,
        host: str,
        port: int,
        command: str,
        *,
        stdin: bytes | None = None,
        timeout_s: float = 60.0,
    ) -> str:
        """Run a short command on the VM; its stdout, or ExecutorError with its stderr."""
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_argv(host, port, command),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise VmUnreachable(
                f"SSH to {host}:{port} did not answer within {timeout_s:.0f} s"
            ) from None
        if proc.returncode != 0:
            detail = scrub(last_lines(err.decode(errors="replace")), [self.config.identity_file])
            if proc.returncode == SSH_FAILED:
                raise VmUnreachable(
                    f"SSH connection to {host}:{port} failed (exit {proc.returncode}): {detail}"
                )
            raise ExecutorError(
                f"remote command to {host}:{port} failed (exit {proc.returncode}): {detail}"
            )
        return out.decode(errors="replace")

    async def start(
        self, launch: SuperNodeLaunch, *, vm_name: str, vm_addresses: tuple[str, ...] = ()
    ) -> SshSuperNode:
        host, port = self.address_for(vm_name, vm_addresses)
        c = self.config
        for needed in (launch.root_ca, launch.private_key, launch.dataset_config):
            if not needed.is_file():
                raise ExecutorError(
                    f"cannot start the SuperNode: a file it needs is missing ({needed.name})"
                )
        rel = f"{c.remote_work_dir.rstrip('/')}/{launch.task_id}"
        remote_dir = (
            await self.run_remote(
                host,
                port,
                f"umask 077 && mkdir -p {shlex.quote(rel)} && cd {shlex.quote(rel)} && pwd",
            )
        ).strip()
        if not remote_dir.startswith("/"):
            raise ExecutorError(f"the VM gave no task directory (got {remote_dir[:80]!r})")
        for local, name in (
            (launch.root_ca, "ca.crt"),
            (launch.private_key, "node.key"),
            (launch.dataset_config, "datasets.json"),
        ):
            data = await asyncio.to_thread(local.read_bytes)
            await self.run_remote(
                host, port, f"umask 077 && cat > {shlex.quote(f'{remote_dir}/{name}')}", stdin=data
            )
        try:
            cmd = supernode_command(
                superlink=launch.superlink,
                root_ca=Path(f"{remote_dir}/ca.crt"),
                private_key=Path(f"{remote_dir}/node.key"),
                site=launch.site,
                dataset_config=Path(f"{remote_dir}/datasets.json"),
                runtime_port=c.runtime_port,
                flwr_home=Path(f"{remote_dir}/flwr-home"),
                node_config=launch.node_config,
                executable=f"{c.remote_bin_dir}/flower-supernode",
                bin_dir=c.remote_bin_dir,
                max_wait_s=c.give_up_after_s,
            )
        except (SuperNodeConfigError, ValueError) as exc:
            raise ExecutorError(f"cannot start the SuperNode: {exc}") from None
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cmd.env.items())
        argv = " ".join(shlex.quote(a) for a in cmd.argv)
        # The login shell leads its own session and process group (sshd calls setsid), so after
        # `exec` the SuperNode's pid is its group id: `kill -- -pid` reaches its children too.
        remote = f"cd {shlex.quote(remote_dir)} && echo $$ > supernode.pid && exec env {env} {argv}"
        task_dir = self.work_dir / launch.task_id
        await asyncio.to_thread(task_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
        log_file = task_dir / "supernode.log"
        logf = await asyncio.to_thread(open, log_file, "ab")
        with logf:
            proc = await asyncio.create_subprocess_exec(
                *self.ssh_argv(host, port, remote),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("task %s: SuperNode started on %s:%s over SSH", launch.task_id, host, port)
        return SshSuperNode(
            self,
            task_id=launch.task_id,
            host=host,
            port=port,
            remote_dir=remote_dir,
            proc=proc,
            log_file=log_file,
            secrets=[task_dir, Path(remote_dir), *_catalog_paths(launch.dataset_config)],
        )
