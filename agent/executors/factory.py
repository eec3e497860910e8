"""The executor an agent's config section asks for."""

from __future__ import annotations

from pathlib import Path

from fedsky.agent.executors.base import Executor, LocalExecutorConfig, SshExecutorConfig
from fedsky.agent.executors.local import LocalExecutor
from fedsky.agent.executors.ssh import SshExecutor


def make_executor(config: LocalExecutorConfig | SshExecutorConfig, *, work_dir: Path) -> Executor:
    """The executor for a config section; `work_dir` is the agent's directory for task files."""
    if isinstance(config, SshExecutorConfig):
        return SshExecutor(config, work_dir=work_dir)
    return LocalExecutor(
        work_dir=work_dir, bin_dir=config.bin_dir, max_wait_s=config.give_up_after_s
    )
