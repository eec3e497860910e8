"""The `ssh` executor against a real sshd on loopback (its own host key, a key the test makes).

The "VM" is this machine reached over SSH: the SuperNode it starts joins a real SuperLink with
TLS and SuperNode authentication, and stopping the task ends it there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fedsky.agent.executors.base import (
    ExecutorError,
    SshExecutorConfig,
    SuperNodeLaunch,
    VmUnreachable,
)
from fedsky.agent.executors.factory import make_executor
from fedsky.agent.executors.ssh import SshExecutor, SshSuperNode
from fedsky.controller.clouds.base import AggregatorSpec
from fedsky.controller.clouds.local import LocalProvider, pki_tls_issuer
from fedsky.controller.security.pki import Pki
from fedsky.shared.datasets import BundledDatasetSpec, write_catalog
from fedsky.shared.supernode import generate_node_key

from tests.support import eventually, eventually_blocking, free_port

pytestmark = pytest.mark.timeout(300)


def _ed25519(path: Path) -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


@dataclass
class Sshd:
    port: int
    client_key: Path
    known_hosts: Path
    proc: subprocess.Popen[bytes]
    user: str


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    d = tmp_path / "sshd"
    d.mkdir()
    host_pub = _ed25519(d / "host_key")
    client_pub = _ed25519(d / "client_key")
    (d / "authorized_keys").write_text(client_pub + "\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    for _ in range(5):
        port = free_port()
        (d / "sshd_config").write_text(f"""
Port {port}
ListenAddress 127.0.0.1
HostKey {d / "host_key"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {d / "authorized_keys"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
""")
        with open(d / "sshd.log", "wb") as log:
            proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        eventually_blocking(
            lambda started=proc: (
                started.poll() is not None
                or "Server listening" in (d / "sshd.log").read_text(errors="replace")
            ),
            timeout=10,
            what="sshd to listen or exit",
            details=lambda: (d / "sshd.log").read_text(errors="replace"),
        )
        if proc.poll() is None:
            break
    else:
        raise RuntimeError((d / "sshd.log").read_text())
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    import pwd

    try:
        yield Sshd(
            port=port,
            client_key=d / "client_key",
            known_hosts=d / "known_hosts",
            proc=proc,
            user=pwd.getpwuid(os.getuid()).pw_name,
        )
    finally:
        proc.terminate()
        proc.wait(10)


def _config(sshd: Sshd, tmp_path: Path, **overrides: object) -> SshExecutorConfig:
    return SshExecutorConfig.model_validate(
        {
            "kind": "ssh",
            "user": sshd.user,
            "identity_file": str(sshd.client_key),
            "known_hosts_file": str(sshd.known_hosts),
            "remote_work_dir": str(tmp_path / "vm"),
            "remote_bin_dir": str(Path(sys.executable).parent),
            "runtime_port": free_port(),
            "address_overrides": {"vm-1": f"127.0.0.1:{sshd.port}"},
            **overrides,
        }
    )


@pytest_asyncio.fixture
async def aggregator(tmp_path: Path) -> AsyncIterator[tuple[LocalProvider, str]]:
    pki = Pki.init(tmp_path / "pki")
    provider = LocalProvider(work_dir=tmp_path / "aggregators", issue_tls=pki_tls_issuer(pki))
    handle = await provider.launch(
        AggregatorSpec(job_id="sshjob", cloud="local", region="local", instance_type="x")
    )
    try:
        yield provider, str(handle.address)
    finally:
        await provider.terminate(handle)


async def test_supernode_in_the_vm_joins_and_stops(
    tmp_path: Path, sshd: Sshd, aggregator: tuple[LocalProvider, str]
) -> None:
    provider, address = aggregator
    from fedsky.controller.clouds.base import AggregatorHandle

    handle = AggregatorHandle(
        provider="local", job_id="sshjob", ref="0", region="local", address=address
    )
    control = provider.control(handle)
    keys = generate_node_key(tmp_path / "agent" / "keys")
    await control.register_node(keys.public_key, name="hospital-a")
    catalog = write_catalog(
        tmp_path / "agent" / "vm-datasets.json", {"digits": BundledDatasetSpec(kind="digits")}
    )
    executor = make_executor(_config(sshd, tmp_path), work_dir=tmp_path / "agent" / "tasks")
    assert isinstance(executor, SshExecutor)
    node = await executor.start(
        SuperNodeLaunch(
            task_id="t-ssh",
            site="hospital-a",
            superlink=address,
            root_ca=provider.tls("sshjob").ca_file,
            private_key=keys.private_key,
            dataset_config=catalog,
        ),
        vm_name="vm-1",
        vm_addresses=("192.0.2.10",),
    )
    assert isinstance(node, SshSuperNode)
    remote = tmp_path / "vm" / "t-ssh"
    assert (remote / "node.key").stat().st_mode & 0o077 == 0
    assert (remote / "node.key").read_bytes() == keys.private_key.read_bytes()
    await eventually(
        control.list_nodes,
        until=lambda nodes: [n.status for n in nodes] == ["online"],
        timeout=60,
        interval=0.5,
        what="the SuperNode online",
        details=node.log_tail,
    )
    pid = int((remote / "supernode.pid").read_text())
    assert Path(f"/proc/{pid}").exists()
    ended = await node.stop(timeout_s=15)
    assert ended.reason == "stopped"
    assert not node.running
    await eventually(
        lambda: not Path(f"/proc/{pid}").exists(),
        timeout=5,
        interval=0.1,
        what=f"the SuperNode's process {pid} to end",
    )


async def test_ssh_failures_are_clear(tmp_path: Path, sshd: Sshd) -> None:
    keys = generate_node_key(tmp_path / "keys")
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    catalog = write_catalog(tmp_path / "datasets.json", {})
    launch = SuperNodeLaunch(
        task_id="t",
        site="hospital-a",
        superlink="127.0.0.1:1",
        root_ca=ca,
        private_key=keys.private_key,
        dataset_config=catalog,
    )
    # Nothing listens there.
    closed = SshExecutor(
        _config(sshd, tmp_path, address_overrides={"vm-1": f"127.0.0.1:{free_port()}"}),
        work_dir=tmp_path / "t",
    )
    with pytest.raises(VmUnreachable, match=r"SSH connection to 127\.0\.0\.1:\d+ failed"):
        await closed.start(launch, vm_name="vm-1")
    # A host key that is not the one on record is refused, not accepted.
    (tmp_path / "other_known_hosts").write_text(
        f"[127.0.0.1]:{sshd.port} {_ed25519(tmp_path / 'other')}\n"
    )
    spoofed = SshExecutor(
        _config(sshd, tmp_path, known_hosts_file=str(tmp_path / "other_known_hosts")),
        work_dir=tmp_path / "t",
    )
    with pytest.raises(ExecutorError, match=r"(?i)host key"):
        await spoofed.start(launch, vm_name="vm-1")
    # No override and no usable address.
    with pytest.raises(VmUnreachable, match="no address"):
        await SshExecutor(
            _config(sshd, tmp_path, address_overrides={}), work_dir=tmp_path / "t"
        ).start(launch, vm_name="vm-2", vm_addresses=("127.0.0.1",))
