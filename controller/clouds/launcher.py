"""The `launcher` aggregator provider: an operator's own command boots the aggregator machine.

For an operator whose aggregator machines come from something fedsky has no plug-in for (a
private OpenStack or Proxmox, a pool of bare-metal hosts, the evaluation testbed in
`benchmarks/testbed/`): the controller renders the very start-up script a cloud VM gets as its
user data (`VmBootstrap`: a fresh one-time enrolment token, the pinned artifact install, the
SuperLink under systemd) and hands it to `[clouds.launcher] command`, which boots a machine
that runs it. The rest is the cloud providers': the token is bound to the address the command
reports, the machine enrols itself, and the job waits until its SuperLink answers with a
certificate from fedsky's CA for that address.

The command's protocol (argv only: the script, which holds the token, goes on stdin, never on
a command line that `ps` shows):

- `COMMAND launch --job J --cloud C --region R --instance-type T [--allow CIDR]...`, the
  script on stdin (`--allow`: who may reach the SuperLink's port, for the machine's firewall):
  prints
  one JSON object `{"ref": str, "address": str, "console": str?}` (the machine's reference,
  the address hospitals and the controller reach it at, where its boot log is) and exits 0
  once the machine is booting;
- `COMMAND terminate --job J --ref REF`: ends the machine; exit 0 also when it is gone already;
- `COMMAND list`: prints `[{"job": str, "ref": str}, ...]`, the machines it runs, for the
  orphan sweep at start.

Any other exit is a failure whose reason is the last line of its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsky.controller.clouds.base import (
    AggregatorFiles,
    AggregatorHandle,
    AggregatorSpec,
    ProviderError,
)
from fedsky.controller.clouds.common import check_job_id
from fedsky.controller.clouds.settings import LauncherConfig
from fedsky.controller.security.bootstrap_tokens import TOKEN_PREFIX, VmBootstrap
from fedsky.controller.security.startup_script import VM_FILES

log = logging.getLogger(__name__)

_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,199}$")
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]+")
_MAX_OUTPUT = 64 * 1024
_TERMINATE_ATTEMPTS = 3


def _scrub(text: str) -> str:
    """A command's output as safe to log: any enrolment token it echoed is masked."""
    return _TOKEN.sub(TOKEN_PREFIX + "***", text)


def _reason(stderr: bytes, returncode: int | None) -> str:
    lines = [line for line in _scrub(stderr.decode(errors="replace")).splitlines() if line.strip()]
    return f"exit {returncode}: {lines[-1][:300]}" if lines else f"exit {returncode}"


@dataclass(frozen=True)
class BootedMachine:
    """What `launch` reported: the machine's reference, the address it is reached at (an IP
    address or a DNS name, as its certificate will name it) and where its boot log is."""

    ref: str
    host: str
    is_ip: bool
    console: str | None

    def address(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"


def parse_launch_output(text: str) -> BootedMachine:
    """The machine `launch` printed on its last line; ProviderError saying what is wrong."""
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ProviderError("the launcher's `launch` did not print a JSON object on its last line")
    ref, host, console = answer.get("ref"), answer.get("address"), answer.get("console")
    if not isinstance(ref, str) or not _REF.match(ref):
        raise ProviderError(f"the launcher printed an unusable ref {str(ref)[:80]!r}")
    if not isinstance(host, str) or not host:
        raise ProviderError("the launcher printed no address for the machine")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host):
            raise ProviderError(f"the launcher printed {host[:80]!r}, not an address") from None
        ip = None
    if ip is not None and (ip.is_unspecified or ip.is_multicast):
        raise ProviderError(f"the launcher printed {host}, which no one can connect to")
    if console is not None and not isinstance(console, str):
        raise ProviderError("the launcher's `console` must be a string")
    return BootedMachine(ref=ref, host=host, is_ip=ip is not None, console=console)


class CommandLauncher:
    """Aggregator machines booted by `[clouds.launcher] command` with the start-up script."""

    def __init__(self, *, config: LauncherConfig, bootstrap: VmBootstrap) -> None:
        self.config = config
        self.name = config.name
        self.account_name = config.name
        self._bootstrap = bootstrap

    def __repr__(self) -> str:
        return f"CommandLauncher(name={self.name!r})"

    async def _run(
        self, action: str, *args: str, stdin: bytes | None = None, timeout_s: float | None = None
    ) -> str:
        """Run the command for `action`; its stdout. ProviderError on failure or timeout."""
        argv = [*self.config.command, action, *args]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ProviderError(
                f"cannot run the launcher {self.config.command[0]}: {exc.strerror}"
            ) from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin), timeout_s or self.config.timeout_s
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ProviderError(
                f"the launcher's `{action}` did not finish within "
                f"{timeout_s or self.config.timeout_s:g} s"
            ) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise ProviderError(
                f"the launcher's `{action}` failed ({_reason(err, proc.returncode)})"
            )
        if err.strip():
            log.info(
                "launcher %s %s: %s",
                self.name,
                action,
                _scrub(err.decode(errors="replace"))[-2000:],
            )
        return out[:_MAX_OUTPUT].decode(errors="replace")

    def aggregator_files(self, job_id: str, *, model_file: Path) -> AggregatorFiles:
        return VM_FILES  # where the start-up script puts them on the machine

    async def launch(self, spec: AggregatorSpec) -> AggregatorHandle:
        job_id = check_job_id(spec.job_id)
        try:
            script = await self._bootstrap.startup_script(job_id)
        except ValueError as exc:
            raise ProviderError(str(exc)) from None
        try:
            out = await self._run(
                "launch",
                "--job", job_id,
                "--cloud", spec.cloud,
                "--region", spec.region,
                "--instance-type", spec.instance_type,
                *(arg for source in spec.allowed_sources for arg in ("--allow", source)),
                stdin=script.encode(),
            )  # fmt: skip
            machine = parse_launch_output(out)
        except BaseException:
            await asyncio.shield(self._bootstrap.tokens.revoke(job_id))
            raise
        ref = machine.ref
        handle = AggregatorHandle(
            provider=self.name,
            job_id=job_id,
            ref=ref,
            region=spec.region,
            address=machine.address(self._bootstrap.superlink_port),
        )
        log.info("launcher %s booted %s for job %s at %s", self.name, ref, job_id, machine.host)
        try:
            await self._bootstrap.tokens.bind(
                job_id,
                ip_addresses=[machine.host] if machine.is_ip else [],
                dns_names=[] if machine.is_ip else [machine.host],
            )
            assert handle.address is not None
            await self._bootstrap.wait_answers(
                handle.address,
                ref=ref,
                console_hint=machine.console or f"{self.config.command[0]} (its boot log of {ref})",
            )
        except BaseException:
            await asyncio.shield(self._cleanup(handle))
            raise
        return handle

    async def _cleanup(self, handle: AggregatorHandle) -> None:
        try:
            await self.terminate(handle)
        except ProviderError as exc:
            log.error("launcher %s: could not end %s: %s", self.name, handle.ref, exc)

    async def healthy(self, handle: AggregatorHandle) -> bool:
        return await self._bootstrap.health_check(await self.address(handle))

    async def address(self, handle: AggregatorHandle) -> str:
        if handle.address is None:
            raise ProviderError(f"the launcher reported no address for {handle.ref}")
        return handle.address

    async def terminate(self, handle: AggregatorHandle) -> None:
        await self._bootstrap.tokens.revoke(handle.job_id)
        failure: ProviderError | None = None
        for attempt in range(_TERMINATE_ATTEMPTS):
            try:
                await self._run("terminate", "--job", handle.job_id, "--ref", handle.ref)
                return
            except ProviderError as exc:
                failure = exc
                await asyncio.sleep(min(2.0**attempt, 5.0))
        assert failure is not None
        raise failure

    async def running(self) -> list[tuple[str, str]]:
        """`(job, ref)` of every machine the launcher runs."""
        out = await self._run("list")
        try:
            listed: Any = json.loads(out or "[]")
        except ValueError:
            raise ProviderError("the launcher's `list` did not print a JSON list") from None
        if not isinstance(listed, list):
            raise ProviderError("the launcher's `list` did not print a JSON list")
        machines = []
        for item in listed:
            if (
                isinstance(item, dict)
                and isinstance(item.get("job"), str)
                and isinstance(item.get("ref"), str)
                and _REF.match(item["ref"])
            ):
                machines.append((item["job"], item["ref"]))
            else:
                raise ProviderError(
                    f"the launcher's `list` printed an unusable entry {str(item)[:80]}"
                )
        return machines

    async def sweep_orphans(self, active_job_ids: Collection[str]) -> list[str]:
        swept = []
        for job_id, ref in await self.running():
            if job_id in active_job_ids:
                continue
            await self.terminate(
                AggregatorHandle(provider=self.name, job_id=job_id, ref=ref, region="")
            )
            swept.append(f"{self.name}:{ref}")
        return swept


def serves(config: LauncherConfig | None, cloud: str) -> bool:
    """Does the launcher of `config` boot aggregators for `cloud`'s offers?"""
    return config is not None and cloud in config.clouds


def launcher_clouds(config: LauncherConfig | None) -> Sequence[str]:
    return config.clouds if config is not None else ()
