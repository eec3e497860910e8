"""The `ssh` executor: the SuperNode inside the chosen VM, over the system `ssh` client.

Start: make the task directory on the VM (umask 077), copy in the aggregator's CA, the node key
and the dataset catalog through the SSH channel (`cat > file`), then run
`echo $$ > supernode.pid; exec env ... fedsky-flower-supernode ...` in a session of its own. The local
`ssh` process lives as long as the SuperNode and exits with its exit status (255: SSH itself
failed). Stop: `kill -TERM` the SuperNode's process group on the VM through a second SSH
command, then `kill -KILL` if it lingers. `BatchMode` means no prompt can hang the agent.

Where: the VM's `[vms.<name>] address` (and `port`) from the agent's config, else the first
usable address libvirt reports for it (DHCP lease, guest agent, ARP; loopback and link-local
skipped). Who: the VM's host key must have been pinned by `agentctl vm register`; SSH checks it
against the agent's known-hosts file only (`HostKeyAlias=<vm name>`, `StrictHostKeyChecking=yes`,
no global file, never updated), so a VM with no pin, or with a key other than its pin, is refused
before anything is sent. Outside one-box mode an address of the agent's own host is refused too:
the SuperNode never runs on the hypervisor host. What: the client payload's Flower scripts in
`remote_bin_dir`. With `[payload]` configured, `ensure_payload` installs them there from the
pinned artifacts (fetched and checked by `fedsky.agent.payload`, copied over the same pinned SSH
connection, installed with `pip --no-index --require-hashes`), once per release: a marker in
the venv records the digest of the installed requirement file. Without it, it only checks
that they are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shlex
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
from fedsky.agent.executors.base import (
    ExecutorError,
    ExitStatus,
    HostKeyNotPinned,
    OnAgentHost,
    PayloadMissing,
    SshExecutorConfig,
    SuperNodeLaunch,
    VmSettings,
    VmUnreachable,
    describe_exit,
    files_of,
    last_lines,
    record_pid,
)
from fedsky.agent.executors.local import _catalog_paths
from fedsky.agent.hostkeys import HostKeyError, check_vm_name, pinned_keys
from fedsky.agent.payload import (
    MARKER_NAME,
    REQUIREMENTS,
    LocalPayload,
    PayloadCache,
    PayloadInstallFailed,
    PayloadSource,
    fetch_payload,
)
from fedsky.shared.datasets import scrub
from fedsky.shared.supernode import SUPERNODE_EXECUTABLE, SuperNodeConfigError, supernode_command

log = logging.getLogger(__name__)

T = TypeVar("T")
SSH_FAILED = 255


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


_KEY_CHANGED = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED")


@dataclass(frozen=True)
class VmTarget:
    """Where one VM's sshd is, and the name its host key is pinned under."""

    vm: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.vm} ({self.host}:{self.port})"


def usable_addresses(addresses: Iterable[str]) -> list[str]:
    """libvirt's addresses a SuperNode could be reached at: IPv4 first; loopback, link-local,
    unspecified and multicast addresses dropped (a `/prefix` is stripped)."""
    out = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text.split("/", 1)[0].strip())
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            continue
        out.append(ip)
    return [str(ip) for ip in sorted(set(out), key=lambda ip: (ip.version, ip))]


def resolve_vm_address(
    vm_name: str,
    vm_addresses: Iterable[str],
    settings: VmSettings | None,
    *,
    default_port: int,
) -> tuple[str, int]:
    """The VM's `[vms.<name>]` address if configured, else the first usable one from libvirt."""
    port = (settings.port if settings else None) or default_port
    if settings is not None and settings.address:
        return settings.address, port
    usable = usable_addresses(vm_addresses)
    if usable:
        return usable[0], port
    raise VmUnreachable(
        f"VM {vm_name!r} has no address to reach it by SSH: libvirt reports none (no DHCP "
        f"lease or guest agent) and the agent's config has no [vms.{vm_name}] address"
    )


def _own_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this host's interfaces (in the agent's network namespace)."""
    own: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    own.add(ipaddress.ip_address(addr.address.split("%", 1)[0]))
    return own


def agent_host_address(host: str) -> str | None:
    """The address `host` resolves to if that is this host's own (loopback included)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return None  # SSH will say that the name does not resolve
    own = _own_addresses()
    for info in infos:
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if ip.is_loopback or ip.is_unspecified or ip in own:
                return str(ip)
    return None


class SshSuperNode:
    def __init__(
        self,
        executor: SshExecutor,
        *,
        task_id: str,
        target: VmTarget,
        remote_dir: str,
        proc: asyncio.subprocess.Process,
        log_file: Path,
        secrets: list[Path],
    ) -> None:
        self.task_id = task_id
        self.target = target
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
                await self._executor.run_remote(self.target, kill.format(sig="TERM"))
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("task %s: remote SuperNode ignored SIGTERM; killing it", self.task_id)
                with contextlib.suppress(ExecutorError):
                    await self._executor.run_remote(self.target, kill.format(sig="KILL"))
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
    on_agent_host = False

    def __init__(
        self,
        config: SshExecutorConfig,
        *,
        work_dir: Path,
        known_hosts_file: Path | None = None,
        vms: Mapping[str, VmSettings] | None = None,
        allow_agent_host: bool = False,
        agent_host_check: Callable[[str], str | None] = agent_host_address,
        payload: PayloadSource | None = None,
        blocking: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
    ) -> None:
        """`known_hosts_file`: the pinned keys (the config's own setting wins); `vms`: the
        `[vms.<name>]` tables; `allow_agent_host`: one-box mode, where the "VM" may be this
        host (tests reach a loopback sshd so); `payload`: where the client payload comes from
        (None: the VMs must have it already); `blocking`: the agent's seam for blocking calls
        (the payload's downloads and digests)."""
        self.config = config
        self.work_dir = Path(work_dir)
        known = config.known_hosts_file or known_hosts_file
        if known is None:
            raise ValueError("the ssh executor needs the file of pinned host keys")
        self.known_hosts_file = known
        self.vms = dict(vms or {})
        self.allow_agent_host = allow_agent_host
        self._agent_host_check = agent_host_check
        self.payload = payload
        self._payload_cache = PayloadCache(payload) if payload is not None else None
        self._blocking = blocking or _in_thread
        self._fetching = asyncio.Lock()  # one download into the cache at a time
        self._installing: dict[str, asyncio.Lock] = {}  # per VM

    def target_for(self, vm_name: str, vm_addresses: tuple[str, ...]) -> VmTarget:
        host, port = resolve_vm_address(
            vm_name, vm_addresses, self.vms.get(vm_name), default_port=self.config.port
        )
        return VmTarget(vm=vm_name, host=host, port=port)

    async def check_target(self, target: VmTarget) -> None:
        """Refuse a VM with no pinned host key, and (outside one-box mode) the agent's host."""
        try:
            check_vm_name(target.vm)
            pinned = await asyncio.to_thread(pinned_keys, self.known_hosts_file, target.vm)
        except (ValueError, HostKeyError) as exc:
            raise HostKeyNotPinned(str(exc)) from None
        if not pinned:
            raise HostKeyNotPinned(
                f"VM {target.vm!r} has no pinned SSH host key: the agent does not trust a key on "
                f"first use; register it once with `agentctl vm register {target.vm}`"
            )
        if not self.allow_agent_host:
            own = await asyncio.to_thread(self._agent_host_check, target.host)
            if own is not None:
                raise OnAgentHost(
                    f"VM {target.vm!r} resolves to {own}, an address of the agent's own host: "
                    "outside one-box mode the SuperNode never runs on the hypervisor host "
                    f"(check [vms.{target.vm}] address)"
                )

    def ssh_argv(self, target: VmTarget, remote_command: str) -> list[str]:
        c = self.config
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(target.port),
            "-i",
            str(c.identity_file),
            "-l",
            c.user,
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            # Only the key pinned for this VM's name, wherever the VM's address is now.
            "-o",
            f"HostKeyAlias={target.vm}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts_file}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "UpdateHostKeys=no",
            "-o",
            "CheckHostIP=no",
            "-o",
            f"ConnectTimeout={int(c.connect_timeout_s)}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
            "--",
            target.host,
            remote_command,
        ]

    async def run_remote(
        self,
        target: VmTarget,
        command: str,
        *,
        stdin: bytes | None = None,
        stdin_file: Path | None = None,
        timeout_s: float = 60.0,
    ) -> str:
        """Run a short command on the VM; its stdout, or ExecutorError with its stderr.

        `stdin` is sent as the command's input; `stdin_file` is streamed from that file."""
        source: Any = asyncio.subprocess.DEVNULL
        if stdin is not None:
            source = asyncio.subprocess.PIPE
        elif stdin_file is not None:
            source = await asyncio.to_thread(open, stdin_file, "rb")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.ssh_argv(target, command),
                stdin=source,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            if stdin_file is not None and stdin is None:
                source.close()
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise VmUnreachable(
                f"SSH to {target} did not answer within {timeout_s:.0f} s"
            ) from None
        if proc.returncode != 0:
            text = err.decode(errors="replace")
            detail = scrub(last_lines(text), [self.config.identity_file, self.known_hosts_file])
            if proc.returncode == SSH_FAILED and any(m in text for m in _KEY_CHANGED):
                raise VmUnreachable(
                    f"the SSH host key of VM {target} is not the key pinned for it: refused. "
                    "If the VM's key changed on purpose, pin the new one with `agentctl vm "
                    f"register {target.vm} --replace`"
                )
            if proc.returncode == SSH_FAILED:
                raise VmUnreachable(
                    f"SSH connection to {target} failed (exit {proc.returncode}): {detail}"
                )
            raise ExecutorError(
                f"remote command on {target} failed (exit {proc.returncode}): {detail}"
            )
        return out.decode(errors="replace")

    @property
    def remote_venv(self) -> str:
        """The venv in the VM: `remote_bin_dir`'s parent (the config checks it ends in /bin)."""
        return self.config.remote_bin_dir.rstrip("/").removesuffix("/bin") or "/"

    async def ensure_payload(self, target: VmTarget) -> None:
        """Make sure the VM holds the client payload in `remote_bin_dir`.

        Without a payload source: check that fedsky's SuperNode is there. With one: read the
        digest of the release's requirement file (pinned, or from the trusted manifest), and
        unless the VM's marker already records it, fetch and check the payload here, copy it
        into the VM and install it there (`install_payload`). Failures: `PayloadUnavailable`
        (fetch or digest; nothing copied), `PayloadInstallFailed` (in the VM),
        `VmUnreachable` (SSH).
        """
        exe = f"{self.config.remote_bin_dir}/{SUPERNODE_EXECUTABLE}"
        if self.payload is None or self._payload_cache is None:
            answer = await self.run_remote(
                target, f"test -x {shlex.quote(exe)} && echo ok || echo missing"
            )
            if answer.strip() != "ok":
                raise PayloadMissing(
                    f"the client payload is not installed in VM {target.vm!r}: no "
                    f"{SUPERNODE_EXECUTABLE} in the configured remote_bin_dir"
                )
            return
        cache = self._payload_cache
        lock = self._installing.setdefault(target.vm, asyncio.Lock())
        async with lock:
            installed = await self.installed_payload(target)
            if installed is not None and installed == self.payload.requirements_sha256:
                log.debug("VM %s already holds the pinned client payload", target)
                return  # the pin alone decides: no request to the artifacts server
            manifest = await self._blocking(cache.manifest)
            expected = cache.expected_digest(manifest)
            if installed == expected:
                log.debug("VM %s already holds the client payload %s", target, expected[:12])
                return
            started = asyncio.get_running_loop().time()
            async with self._fetching:
                local = await fetch_payload(cache, manifest, expected, self._blocking)
            await self.copy_payload(target, local)
            await self.install_payload(target, local)
            log.info(
                "installed the client payload %s in VM %s in %.1f s",
                expected[:12],
                target,
                asyncio.get_running_loop().time() - started,
            )

    async def prestage(self, vm_name: str, vm_addresses: tuple[str, ...]) -> bool:
        """Install the client payload into a VM ahead of any task there (see `[payload]
        prestage`), with the same checks as a start (pinned host key, not the agent's host).
        False when there is nothing to install from (no `[payload]`)."""
        if self.payload is None or not self.payload.prestage:
            return False
        target = self.target_for(vm_name, vm_addresses)
        await self.check_target(target)
        await self.ensure_payload(target)
        return True

    async def installed_payload(self, target: VmTarget) -> str | None:
        """The requirement digest the VM's marker records, if the payload's scripts are there."""
        marker = shlex.quote(f"{self.remote_venv}/{MARKER_NAME}")
        exe = shlex.quote(f"{self.config.remote_bin_dir}/{SUPERNODE_EXECUTABLE}")
        answer = await self.run_remote(target, f"test -x {exe} && cat {marker} 2>/dev/null; true")
        digest = answer.strip()
        return digest if len(digest) == 64 else None

    async def copy_payload(self, target: VmTarget, local: LocalPayload) -> None:
        """Copy the checked files into the VM's wheel directory; files already there with the
        same digest (an interrupted earlier copy) are kept."""
        assert self.payload is not None
        wheel_dir = shlex.quote(self.payload.remote_wheel_dir)
        names = " ".join(shlex.quote(f) for f in local.files)
        listing = await self.run_remote(
            target,
            f"umask 022 && mkdir -p {wheel_dir} && cd {wheel_dir} && "
            f"sha256sum -- {names} 2>/dev/null; true",
        )
        present = set()
        for line in listing.splitlines():
            digest, _, name = line.partition("  ")
            present.add((name.strip(), digest.strip()))
        for file, digest in local.files.items():
            if (file, digest) in present:
                continue
            dest = shlex.quote(file)
            await self.run_remote(
                target,
                f"cd {wheel_dir} && cat > .{dest}.part && mv -f .{dest}.part {dest}",
                stdin_file=local.directory / file,
                timeout_s=self.payload.install_timeout_s,
            )

    async def install_payload(self, target: VmTarget, local: LocalPayload) -> None:
        """In the VM: make the venv if missing, check its Python and the requirement file's
        digest, `pip install --no-index --find-links DIR --require-hashes`, write the marker,
        remove the wheels. pip ignores the VM's PIP_* variables and configuration files."""
        assert self.payload is not None
        q = shlex.quote
        venv = self.remote_venv
        script = f"""set -eu
umask 022
venv={q(venv)}
cd {q(self.payload.remote_wheel_dir)}
if ! echo {q(local.requirements_sha256)}'  '{q(REQUIREMENTS)} | sha256sum -c --status; then
  echo "the copied {REQUIREMENTS} does not have its pinned SHA-256" >&2; exit 3
fi
if [ ! -x "$venv/bin/python" ]; then {q(self.payload.remote_python)} -m venv "$venv"; fi
tag=$("$venv/bin/python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
if [ "$tag" != {q(local.python)} ]; then
  echo "the VM's Python is $tag but the payload's wheels are for {local.python}" >&2; exit 3
fi
rm -f "$venv/{MARKER_NAME}"
if ! PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip --isolated install --quiet \
  --disable-pip-version-check --no-input --no-cache-dir --no-index --find-links "$PWD" \
  --require-hashes -r {q(REQUIREMENTS)} 2> .pip.log; then
  {{ grep -m1 '^ERROR' .pip.log | cut -d. -f1; grep -v '^ *$' .pip.log | tail -n 2; }} >&2; exit 4
fi
test -x "$venv/bin/{SUPERNODE_EXECUTABLE}" || {{
  echo "the payload installed no {SUPERNODE_EXECUTABLE} in $venv/bin" >&2; exit 3; }}
echo {q(local.requirements_sha256)} > "$venv/{MARKER_NAME}"
rm -f -- .pip.log {" ".join(q(f) for f in local.files)}
"""
        try:
            await self.run_remote(
                target, f"sh -c {q(script)}", timeout_s=self.payload.install_timeout_s
            )
        except VmUnreachable:
            raise
        except ExecutorError as exc:
            raise PayloadInstallFailed(
                f"installing the client payload in VM {target.vm!r} failed: {exc}"
            ) from None

    async def start(
        self, launch: SuperNodeLaunch, *, vm_name: str, vm_addresses: tuple[str, ...] = ()
    ) -> SshSuperNode:
        target = self.target_for(vm_name, vm_addresses)
        c = self.config
        await self.check_target(target)
        for needed in files_of(launch):
            if not needed.is_file():
                raise ExecutorError(
                    f"cannot start the SuperNode: a file it needs is missing ({needed.name})"
                )
        await self.ensure_payload(target)
        rel = f"{c.remote_work_dir.rstrip('/')}/{launch.task_id}"
        remote_dir = (
            await self.run_remote(
                target,
                f"umask 077 && mkdir -p {shlex.quote(rel)} && cd {shlex.quote(rel)} && pwd",
            )
        ).strip()
        if not remote_dir.startswith("/"):
            raise ExecutorError(f"the VM gave no task directory (got {remote_dir[:80]!r})")
        files = [
            (launch.root_ca, "ca.crt"),
            (launch.private_key, "node.key"),
            (launch.dataset_config, "datasets.json"),
        ]
        if launch.node_cert is not None:
            files.append((launch.node_cert, "node.crt"))
        for local, name in files:
            data = await asyncio.to_thread(local.read_bytes)
            await self.run_remote(
                target, f"umask 077 && cat > {shlex.quote(f'{remote_dir}/{name}')}", stdin=data
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
                executable=f"{c.remote_bin_dir}/{SUPERNODE_EXECUTABLE}",
                bin_dir=c.remote_bin_dir,
                max_wait_s=c.give_up_after_s,
                node_cert=None if launch.node_cert is None else Path(f"{remote_dir}/node.crt"),
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
                *self.ssh_argv(target, remote),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        await asyncio.to_thread(record_pid, task_dir, proc.pid)
        log.info("task %s: SuperNode started in VM %s over SSH", launch.task_id, target)
        return SshSuperNode(
            self,
            task_id=launch.task_id,
            target=target,
            remote_dir=remote_dir,
            proc=proc,
            log_file=log_file,
            secrets=[task_dir, Path(remote_dir), *_catalog_paths(launch.dataset_config)],
        )
