"""The `local` executor: a SuperNode process group that ends when told, and says why it ended."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
from fedsky.agent.executors.base import (
    ExecutorError,
    LocalExecutorConfig,
    SuperNodeLaunch,
)
from fedsky.agent.executors.factory import make_executor
from fedsky.agent.executors.local import LocalExecutor, LocalSuperNode
from fedsky.controller.security.pki import Pki
from fedsky.shared.datasets import BundledDatasetSpec, write_catalog
from fedsky.shared.procs import group_alive as _group_alive
from fedsky.shared.supernode import (
    SuperNodeConfigError,
    generate_node_key,
    node_config_arg,
    supernode_command,
)

from tests.support import eventually_blocking, free_port


def _launch(tmp_path: Path, pki: Pki, superlink: str) -> SuperNodeLaunch:
    keys = generate_node_key(tmp_path / "keys")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki.ca_cert_pem)
    catalog = write_catalog(
        tmp_path / "private-share" / "datasets.json", {"digits": BundledDatasetSpec(kind="digits")}
    )
    return SuperNodeLaunch(
        task_id="t1",
        site="hospital-a",
        superlink=superlink,
        root_ca=ca,
        private_key=keys.private_key,
        dataset_config=catalog,
    )


async def test_unreachable_aggregator_ends_the_task_with_a_reason(tmp_path: Path, pki: Pki) -> None:
    executor = LocalExecutor(work_dir=tmp_path / "tasks", max_wait_s=3)
    node = await executor.start(_launch(tmp_path, pki, f"127.0.0.1:{free_port()}"))
    t0 = time.monotonic()
    status = await node.wait()
    assert time.monotonic() - t0 < 60
    assert not status.ok
    assert (
        "failed with Flower exit code 305: it could not connect to the aggregator" in status.reason
    )
    assert "Connection refused" in status.reason
    assert str(tmp_path) not in status.reason
    assert not _group_alive(node.pid)


async def test_stop_ends_the_process_group(tmp_path: Path, pki: Pki) -> None:
    executor = make_executor(LocalExecutorConfig(give_up_after_s=600), work_dir=tmp_path / "tasks")
    node = await executor.start(_launch(tmp_path, pki, f"127.0.0.1:{free_port()}"), vm_name="host")
    assert node.running
    status = await node.stop(timeout_s=10)
    assert status.reason == "stopped"
    assert not node.running
    assert isinstance(node, LocalSuperNode)
    assert not _group_alive(node.pid)
    assert await node.stop() == status  # idempotent


async def test_missing_files_and_bad_settings(tmp_path: Path, pki: Pki) -> None:
    executor = LocalExecutor(work_dir=tmp_path / "tasks")
    launch = _launch(tmp_path, pki, "127.0.0.1:9")
    launch.private_key.unlink()
    with pytest.raises(ExecutorError) as err:
        await executor.start(launch)
    assert "a file it needs is missing (node)" in str(err.value)
    assert str(tmp_path) not in str(err.value)
    with pytest.raises(ExecutorError, match="not host:port"):
        await executor.start(dataclasses.replace(launch, superlink="nowhere"))


def test_supernode_command_line(tmp_path: Path) -> None:
    cmd = supernode_command(
        superlink="10.0.0.5:9092",
        root_ca=Path("/etc/ca.crt"),
        private_key=Path("/k/node"),
        site="hospital-a",
        dataset_config=Path("/var/lib/x/datasets.json"),
        runtime_port=9094,
        flwr_home=Path("/var/lib/x/flwr"),
        node_config={"torch-threads": 2},
        bin_dir="/opt/venv/bin",
    )
    argv = cmd.argv
    assert argv[argv.index("--superlink") + 1] == "10.0.0.5:9092"
    assert argv[argv.index("--auth-supernode-private-key") + 1] == "/k/node"
    assert (
        argv[argv.index("--node-config") + 1]
        == 'site="hospital-a" dataset-config="/var/lib/x/datasets.json" torch-threads=2'
    )
    assert "--insecure" not in argv
    assert cmd.env["FLWR_HOME"] == "/var/lib/x/flwr"
    assert cmd.env["PATH"].startswith("/opt/venv/bin:")
    for bad in ({"k": 'a"b'}, {"bad key": "x"}, {"k": " edge"}):
        with pytest.raises(SuperNodeConfigError, match="node config"):
            node_config_arg(bad)
    keys = generate_node_key(tmp_path / "keys")
    assert keys.private_key.stat().st_mode & 0o077 == 0
    assert keys.public_text().startswith("ecdsa-sha2-nistp384 ")


def test_an_agent_restarting_stops_what_its_killed_run_left(tmp_path: Path) -> None:
    """An agent killed mid-job (kill -9) left its SuperNode running for good: the next run
    finds it by the pid file in the task's directory and stops its whole process group; a pid
    the system has since given to another process is left alone."""
    import subprocess
    import sys

    from fedsky.agent.executors.base import PID_FILE, reap_leftovers, record_pid

    left = tmp_path / "job1-hospital-us-1"
    left.mkdir()
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(left / "ca.crt")],
        start_new_session=True,
    )
    record_pid(left, orphan.pid)
    # A SuperNode left by a killed agent has long been running: wait until this one's command
    # line is readable (right after the start it can still be empty).
    eventually_blocking(
        lambda: Path(f"/proc/{orphan.pid}/cmdline").read_bytes(),
        until=lambda cmdline: b"job1-hospital-us-1" in cmdline,
        timeout=10,
        interval=0.05,
        what="the stand-in SuperNode to start",
    )
    reused = tmp_path / "job2-hospital-us-1"
    reused.mkdir()
    record_pid(reused, os.getpid())  # this pid now belongs to someone else
    assert reap_leftovers(tmp_path) == ["job1-hospital-us-1"]
    assert orphan.wait(timeout=10) == -signal.SIGTERM
    assert not (left / PID_FILE).exists()
    assert not (reused / PID_FILE).exists()
    assert reap_leftovers(tmp_path) == []
