"""Hosts mode: a SuperNode is never started on the hypervisor host outside one-box mode.

Three layers refuse it: the config (a `local` executor needs `one_box = true`), the daemon (no
executor at all outside one-box mode: it does not start), and the runner (an executor that runs
on the agent's host, or an SSH "VM" that is the agent's host, fails the task before any process
starts). Also: where a VM's address comes from, and the VM's own dataset paths.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from fedsky.agent.config import load_agent_config
from fedsky.agent.executors.base import (
    LocalExecutorConfig,
    SshExecutorConfig,
    VmSettings,
)
from fedsky.agent.executors.local import LocalExecutor
from fedsky.agent.executors.ssh import resolve_vm_address, usable_addresses
from fedsky.agent.hostkeys import HostKey, pin
from fedsky.agent.inventory import LibvirtInventory
from fedsky.agent.runner import TaskRunner
from fedsky.agent.testnode import write_test_node
from fedsky.controller.security.pki import Pki
from fedsky.shared.config import ConfigError
from fedsky.shared.datasets import BundledDatasetSpec, ImageFolderSpec, load_catalog
from fedsky.shared.messages import (
    Event,
    FailureKind,
    PrepareTaskCommand,
    StartTaskCommand,
    VmInfo,
    utcnow,
)

from tests.agent_support import enrol

T = TypeVar("T")
AGENT = "hospital-a"
UUID = "7" * 32
# An ed25519 public key blob (any key will do: the refusals come before SSH is reached).
BLOB = "AAAAC3NzaC1lZDI1NTE5AAAAIMLvXOFbG3NIBDDxRsJ+dQWxGd1P56vuCgnP4rj3+oMh"


def _cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


# --- the config ----------------------------------------------------------------------------------


def test_the_local_executor_needs_one_box_mode(tmp_path: Path) -> None:
    path = _cfg(tmp_path, '[executor]\nkind = "local"\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    message = str(info.value)
    assert f"{path}: key 'executor'" in message
    assert "one_box = true" in message
    assert 'kind "ssh"' in message

    one_box = load_agent_config(_cfg(tmp_path, 'one_box = true\n[executor]\nkind = "local"\n'))
    assert isinstance(one_box.task_executor, LocalExecutorConfig)
    # One-box mode with no [executor]: the local one, as the demo has always run.
    assert isinstance(
        load_agent_config(_cfg(tmp_path, "one_box = true\n")).task_executor, LocalExecutorConfig
    )
    # Hosts mode with no [executor]: loads (agentctl works), but no executor runs tasks.
    hosts = load_agent_config(_cfg(tmp_path, 'state_dir = "st"\n'))
    assert hosts.one_box is False
    assert hosts.task_executor is None
    assert hosts.known_hosts_file == tmp_path / "st" / "ssh" / "known_hosts"


def test_the_daemon_will_not_start_without_a_vm_executor(tmp_path: Path) -> None:
    enrol(pki=Pki.init(tmp_path / "ca"), state_dir=tmp_path / "state", agent_id=AGENT)
    path = _cfg(tmp_path, 'state_dir = "state"\n[libvirt]\nuri = "test:///default"\n')
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "fedsky-agent"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert proc.returncode == 78, proc.stderr
    assert f"{path}: key 'executor': missing: outside one-box mode" in proc.stderr


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ('[vms.vm-1]\naddress = "10.0.0.1:22"\n', "vms.vm-1.address", "IP address or a host name"),
        ('[vms.vm-1]\naddress = "0.0.0.0"\n', "vms.vm-1.address", "not the address of one"),
        ('[vms.vm-1]\naddress = "a b"\n', "vms.vm-1.address", "host name"),
        ("[vms.vm-1]\nport = 0\n", "vms.vm-1.port", "greater than or equal to 1"),
        ('[vms."vm 1"]\naddress = "10.0.0.1"\n', "vms.vm 1.[key]", "should match pattern"),
        (
            '[vms.vm-1.datasets.xray]\nkind = "image-folder"\nroot = "data/xray"\n',
            "vms.vm-1.datasets",
            "must be absolute",
        ),
        (
            '[executor]\nkind = "ssh"\nuser = "fedsky"\nidentity_file = "k"\n'
            'remote_bin_dir = "/opt/$(x)"\n',
            "executor.ssh.remote_bin_dir",
            "shell characters",
        ),
    ],
)
def test_bad_vm_settings_name_file_and_key(tmp_path: Path, text: str, key: str, what: str) -> None:
    path = _cfg(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert f"{path}: key '{key}'" in str(info.value)
    assert what in str(info.value)


def test_vm_settings_load(tmp_path: Path) -> None:
    cfg = load_agent_config(
        _cfg(
            tmp_path,
            '[executor]\nkind = "ssh"\nuser = "fedsky"\nidentity_file = "id"\n'
            '[vms.vm-001]\naddress = "VM-001.Hospital.example."\nport = 2222\n'
            '[vms.vm-001.datasets.xray]\nkind = "image-folder"\nroot = "/srv/xray"\n',
        )
    )
    vm = cfg.vms["vm-001"]
    assert (vm.address, vm.port) == ("vm-001.hospital.example", 2222)
    xray = vm.datasets["xray"]
    assert isinstance(xray, ImageFolderSpec)
    assert xray.root == Path("/srv/xray")  # the VM's path, not resolved on this host
    assert isinstance(cfg.executor, SshExecutorConfig)
    assert cfg.executor.identity_file == tmp_path / "id"


# --- the VM's address ----------------------------------------------------------------------------


def test_the_address_comes_from_the_config_else_from_libvirt(tmp_path: Path) -> None:
    uri = write_test_node(tmp_path / "node.xml", hospital="hospital-a")
    inventory = LibvirtInventory(uri=uri)
    try:
        vms = {vm.name: vm for vm in inventory.snapshot()}
    finally:
        inventory.close()
    # libvirt's test driver reports a lease for a running VM (an address nothing here reaches).
    from_libvirt = vms["vm-001"].addresses
    assert from_libvirt
    host, port = resolve_vm_address("vm-001", from_libvirt, None, default_port=22)
    assert (host, port) == (usable_addresses(from_libvirt)[0], 22)
    # The config wins, port included.
    configured = VmSettings(address="10.1.2.3", port=2222)
    assert resolve_vm_address("vm-001", from_libvirt, configured, default_port=22) == (
        "10.1.2.3",
        2222,
    )
    # Only a port configured: libvirt's address on that port.
    only_port = resolve_vm_address("vm-001", from_libvirt, VmSettings(port=2222), default_port=22)
    assert only_port == (host, 2222)
    assert usable_addresses(["127.0.0.1", "fe80::1/64", "::1", "fd00::5/64", "10.0.0.9/24"]) == [
        "10.0.0.9",
        "fd00::5",
    ]


# --- the runner ----------------------------------------------------------------------------------


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def _runner(
    tmp_path: Path,
    events: asyncio.Queue[Event],
    executor: Any,
    *,
    one_box: bool = False,
    vms: dict[str, VmSettings] | None = None,
    datasets: dict[str, Any] | None = None,
) -> TaskRunner:
    vm = VmInfo(name="vm-001", uuid=UUID, state="running", vcpus=4, memory_mib=8192, disk_gib=40)
    return TaskRunner(
        agent_id=AGENT,
        work_dir=tmp_path / "state" / "tasks",
        datasets=datasets or {"digits": BundledDatasetSpec(kind="digits")},
        executor_config=executor,
        one_box=one_box,
        vms=vms,
        known_hosts_file=tmp_path / "state" / "ssh" / "known_hosts",
        blocking=_in_thread,
        snapshot=lambda: [vm],
        emit=events.put_nowait,
        on_change=lambda summary: None,
    )


def _prepare(task_id: str = "t1", dataset: str = "digits") -> PrepareTaskCommand:
    return PrepareTaskCommand(
        task_id=task_id,
        job_id="job-1",
        vm="vm-001",
        dataset=dataset,
        expires_at=utcnow() + timedelta(minutes=1),
    )


def _start(pki: Pki, task_id: str = "t1", dataset: str = "digits") -> StartTaskCommand:
    return StartTaskCommand(
        task_id=task_id,
        job_id="job-1",
        vm="vm-001",
        dataset=dataset,
        superlink="127.0.0.1:1",
        ca_pem=pki.ca_cert_pem.decode(),
        expires_at=utcnow() + timedelta(minutes=1),
    )


async def _answer(events: asyncio.Queue[Event]) -> Event:
    async with asyncio.timeout(30):
        while True:
            event = await events.get()
            if event.kind in ("task_failed", "task_acknowledged", "task_running"):
                return event


def _supernodes_of_this_process() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "flower-supernode" in " ".join(p.cmdline())
    ]


async def test_the_runner_never_starts_a_supernode_on_the_agent_host(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    real_start = LocalExecutor.start

    async def spy(self: LocalExecutor, *args: Any, **kwargs: Any) -> Any:
        started.append("local")
        return await real_start(self, *args, **kwargs)

    monkeypatch.setattr(LocalExecutor, "start", spy)
    events: asyncio.Queue[Event] = asyncio.Queue()

    # A runner handed the local executor outside one-box mode (the config would have refused
    # it): every task fails before a process starts.
    hosts = _runner(tmp_path, events, LocalExecutorConfig(give_up_after_s=5))
    await hosts.handle(_prepare())
    refused = await _answer(events)
    assert refused.failure_kind is FailureKind.START_FAILED
    assert "never runs on the agent's (hypervisor) host" in refused.detail
    await hosts.handle(_start(pki))
    assert (await _answer(events)).failure_kind in (
        FailureKind.NOT_PREPARED,
        FailureKind.START_FAILED,
    )
    # No executor at all (hosts mode with no [executor]): the same, with what to configure.
    none = _runner(tmp_path, events, None)
    await none.handle(_prepare("t2"))
    assert 'kind = "ssh"' in (await _answer(events)).detail

    # The ssh executor pointed at an address of this host: refused (the key is pinned, so that
    # check is the one that stops it).
    pin(tmp_path / "state" / "ssh" / "known_hosts", "vm-001", HostKey("ssh-ed25519", BLOB))
    ssh = SshExecutorConfig(kind="ssh", user="fedsky", identity_file=tmp_path / "id")
    own = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family.name == "AF_INET"
    ]
    for address in {"127.0.0.1", *own}:
        runner = _runner(tmp_path, events, ssh, vms={"vm-001": VmSettings(address=address)})
        await runner.handle(_prepare("t3"))
        assert (await _answer(events)).kind == "task_acknowledged"
        await runner.handle(_start(pki, "t3"))
        failed = await _answer(events)
        assert failed.failure_kind is FailureKind.START_FAILED, failed
        assert "an address of the agent's own host" in failed.detail
        await runner.close()
    assert started == []
    assert _supernodes_of_this_process() == []

    # In one-box mode the same local executor starts (the demo's way).
    box = _runner(tmp_path, events, LocalExecutorConfig(give_up_after_s=5), one_box=True)
    await box.handle(_prepare("t4"))
    assert (await _answer(events)).kind == "task_acknowledged"
    await box.handle(_start(pki, "t4"))
    assert (await _answer(events)).kind == "task_running"
    await box.close()
    assert started == ["local"]


async def test_an_unpinned_vm_fails_the_task_as_unreachable(tmp_path: Path, pki: Pki) -> None:
    events: asyncio.Queue[Event] = asyncio.Queue()
    ssh = SshExecutorConfig(kind="ssh", user="fedsky", identity_file=tmp_path / "id")
    # 192.0.2.0/24 is TEST-NET-1: the refusal comes before any connection is tried.
    runner = _runner(tmp_path, events, ssh, vms={"vm-001": VmSettings(address="192.0.2.10")})
    await runner.handle(_prepare())
    assert (await _answer(events)).kind == "task_acknowledged"
    await runner.handle(_start(pki))
    failed = await _answer(events)
    assert failed.failure_kind is FailureKind.VM_UNREACHABLE
    assert "vm-001" in failed.detail
    assert "agentctl vm register vm-001" in failed.detail
    await runner.close()


async def test_datasets_resolve_to_the_vms_own_paths(tmp_path: Path, pki: Pki) -> None:
    events: asyncio.Queue[Event] = asyncio.Queue()
    ssh = SshExecutorConfig(kind="ssh", user="fedsky", identity_file=tmp_path / "id")
    host_path = ImageFolderSpec(kind="image-folder", root=tmp_path / "on-the-agent-host")
    vm_path = ImageFolderSpec(kind="image-folder", root=Path("/srv/data/xray"))
    runner = _runner(
        tmp_path,
        events,
        ssh,
        vms={"vm-001": VmSettings(address="192.0.2.10", datasets={"xray": vm_path})},
        datasets={"digits": BundledDatasetSpec(kind="digits"), "scans": host_path},
    )
    # A path on the agent's host means nothing in the VM.
    await runner.handle(_prepare("t1", dataset="scans"))
    missing = await _answer(events)
    assert missing.failure_kind is FailureKind.DATASET_MISSING
    assert (
        missing.detail == "dataset 'scans' has no path in vm-001 (set [vms.vm-001.datasets.scans])"
    )
    assert str(tmp_path) not in missing.detail
    # The VM's own path goes into the catalog the SuperNode reads in the VM.
    await runner.handle(_prepare("t2", dataset="xray"))
    assert (await _answer(events)).kind == "task_acknowledged"
    await runner.handle(_start(pki, "t2", dataset="xray"))
    assert (await _answer(events)).failure_kind is FailureKind.VM_UNREACHABLE  # not pinned
    catalog = load_catalog(tmp_path / "state" / "tasks" / "t2" / "datasets.json")
    assert catalog.datasets == {"xray": vm_path}
    # A bundled dataset has no path: it works in any VM.
    await runner.handle(_prepare("t3", dataset="digits"))
    assert (await _answer(events)).kind == "task_acknowledged"
    await runner.close()
