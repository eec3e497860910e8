"""The executor an agent's `[executor]` section asks for."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from fedsky.agent.executors.base import (
    Executor,
    LocalExecutorConfig,
    SshExecutorConfig,
    VmSettings,
)
from fedsky.agent.executors.local import LocalExecutor
from fedsky.agent.executors.ssh import SshExecutor
from fedsky.agent.payload import PayloadSource


def make_executor(
    config: LocalExecutorConfig | SshExecutorConfig,
    *,
    work_dir: Path,
    known_hosts_file: Path | None = None,
    vms: Mapping[str, VmSettings] | None = None,
    one_box: bool = False,
    payload: PayloadSource | None = None,
    blocking: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
) -> Executor:
    """The executor for a config section; `work_dir` is the agent's directory for task files.

    `known_hosts_file` and `vms` are the agent's pinned host keys and `[vms.<name>]` tables (the
    ssh executor's); `one_box` lets an SSH "VM" be this very host; `payload` is where the ssh
    executor gets the client payload it installs (`[payload]`), `blocking` the agent's seam for
    blocking calls. The `local` executor is built
    as asked: refusing it outside one-box mode is the config's and the runner's job.
    """
    if isinstance(config, SshExecutorConfig):
        return SshExecutor(
            config,
            work_dir=work_dir,
            known_hosts_file=known_hosts_file,
            vms=vms,
            allow_agent_host=one_box,
            payload=payload,
            blocking=blocking,
        )
    return LocalExecutor(
        work_dir=work_dir, bin_dir=config.bin_dir, max_wait_s=config.give_up_after_s
    )
