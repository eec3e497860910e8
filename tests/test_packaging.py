"""What each side imports: the agent daemon runs without torch, flwr or numpy (its extra does
not install them), and fedctl's light commands do not pay for the heavy ones."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is not installed on this side")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str, blocked: set[str]) -> subprocess.CompletedProcess[str]:
    script = BLOCKER.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


def test_agent_daemon_and_agentctl_need_no_torch_flwr_or_numpy() -> None:
    done = _run(
        """
        import fedsky.agent.daemon, fedsky.agent.cli, fedsky.agent.runner
        import fedsky.agent.executors.local, fedsky.agent.executors.ssh
        from fedsky.agent.cli import main
        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "flwr", "numpy", "sklearn"))
        assert not heavy, heavy
        print("ok")
        """,
        {"torch", "flwr", "numpy", "sklearn", "boto3", "pymoo", "aiohttp"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_fedctl_agents_and_vms_do_not_import_torch_or_flwr() -> None:
    done = _run(
        """
        from fedsky.controller.cli.main import build_parser
        build_parser()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "flwr"))
        assert not heavy, heavy
        print("ok")
        """,
        {"torch", "flwr"},
    )
    assert done.returncode == 0, done.stderr
