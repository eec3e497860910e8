"""The `ssh` executor against a real sshd on loopback (its own host key, a key the test makes).

The "VM" is this machine reached over SSH (so the executor runs as in one-box mode, where the
agent's own host is allowed): the SuperNode it starts joins a real SuperLink with TLS and
SuperNode authentication, and stopping the task ends it there. The VM's host key is pinned the
operator's way, with `agentctl vm register`; an unpinned VM and a changed key are refused.
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
from fedsky.agent import cli
from fedsky.agent.executors.base import (
    HostKeyNotPinned,
    OnAgentHost,
    PayloadMissing,
    SshExecutorConfig,
    SuperNodeLaunch,
    VmSettings,
    VmUnreachable,
)
from fedsky.agent.executors.factory import make_executor
from fedsky.agent.executors.ssh import SshExecutor, SshSuperNode
from fedsky.agent.hostkeys import HostKey, parse_known_hosts, pin, pinned_keys
from fedsky.controller.clouds.base import AggregatorSpec
from fedsky.controller.clouds.local import LocalProvider, pki_tls_issuer
from fedsky.controller.security.pki import Pki
from fedsky.shared.datasets import BundledDatasetSpec, write_catalog
from fedsky.shared.supernode import generate_node_key

from tests.support import eventually, eventually_blocking, free_port
from tests.support.csr import node_certificate

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
    host_key: HostKey  # what the VM's console would show
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
    import pwd

    key_type, blob = host_pub.split()[:2]
    try:
        yield Sshd(
            port=port,
            client_key=d / "client_key",
            host_key=HostKey(key_type, blob),
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
            "known_hosts_file": str(tmp_path / "agent" / "ssh" / "known_hosts"),
            "remote_work_dir": str(tmp_path / "vm"),
            "remote_bin_dir": str(Path(sys.executable).parent),
            "runtime_port": free_port(),
            **overrides,
        }
    )


def _executor(
    sshd: Sshd, tmp_path: Path, *, port: int | None = None, **overrides: object
) -> SshExecutor:
    """The executor as a one-box agent builds it: vm-1 is this host's loopback sshd."""
    executor = make_executor(
        _config(sshd, tmp_path, **overrides),
        work_dir=tmp_path / "agent" / "tasks",
        vms={"vm-1": VmSettings(address="127.0.0.1", port=port or sshd.port)},
        one_box=True,
    )
    assert isinstance(executor, SshExecutor)
    return executor


def _agent_toml(sshd: Sshd, tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""state_dir = "agent"
[executor]
kind = "ssh"
user = "{sshd.user}"
identity_file = "{sshd.client_key}"
[vms.vm-1]
address = "127.0.0.1"
port = {sshd.port}
"""
    )
    return path


def _register(config: Path, *args: str) -> int:
    return cli.main(["--config", str(config), "vm", "register", "vm-1", *args])


def _launch(tmp_path: Path) -> SuperNodeLaunch:
    keys = generate_node_key(tmp_path / "keys")
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    return SuperNodeLaunch(
        task_id="t",
        site="hospital-a",
        superlink="127.0.0.1:1",
        root_ca=ca,
        private_key=keys.private_key,
        dataset_config=write_catalog(tmp_path / "datasets.json", {}),
    )


@pytest_asyncio.fixture
async def aggregator(tmp_path: Path) -> AsyncIterator[tuple[LocalProvider, str, Pki]]:
    pki = Pki.init(tmp_path / "pki")
    pki.write_controller_identity()  # the front serves Control to the controller only
    provider = LocalProvider(
        work_dir=tmp_path / "aggregators",
        issue_tls=pki_tls_issuer(pki),
        control_identity=pki.controller_identity,
    )
    handle = await provider.launch(
        AggregatorSpec(job_id="sshjob", cloud="local", region="local", instance_type="x")
    )
    try:
        yield provider, str(handle.address), pki
    finally:
        await provider.terminate(handle)


async def test_supernode_in_the_vm_joins_and_stops(
    tmp_path: Path, sshd: Sshd, aggregator: tuple[LocalProvider, str, Pki]
) -> None:
    provider, address, pki = aggregator
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
    # The operator pins the VM's key once, having read its fingerprint on the VM's console.
    assert _register(_agent_toml(sshd, tmp_path), "--fingerprint", sshd.host_key.fingerprint) == 0
    executor = _executor(sshd, tmp_path)
    node = await executor.start(
        SuperNodeLaunch(
            task_id="t-ssh",
            site="hospital-a",
            superlink=address,
            root_ca=provider.tls("sshjob").ca_file,
            private_key=keys.private_key,
            dataset_config=catalog,
            node_cert=node_certificate(pki, "hospital-a", keys),
        ),
        vm_name="vm-1",
        vm_addresses=("192.0.2.10",),
    )
    assert isinstance(node, SshSuperNode)
    remote = tmp_path / "vm" / "t-ssh"
    assert (remote / "node.key").stat().st_mode & 0o077 == 0
    assert (remote / "node.key").read_bytes() == keys.private_key.read_bytes()
    assert (remote / "node.crt").read_bytes() == (keys.private_key.parent / "node.crt").read_bytes()
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


def test_register_pins_only_the_key_the_operator_confirmed(
    tmp_path: Path, sshd: Sshd, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _agent_toml(sshd, tmp_path)
    known_hosts = tmp_path / "agent" / "ssh" / "known_hosts"
    fingerprint = sshd.host_key.fingerprint
    # Not this VM's key: refused, nothing pinned.
    other = _ed25519(tmp_path / "other").split()
    assert _register(config, "--fingerprint", HostKey(other[0], other[1]).fingerprint) == 1
    assert "refused: none of these is" in capsys.readouterr().err
    assert not known_hosts.exists()
    # No fingerprint and nobody to ask (stdin is not a terminal): refused.
    assert _register(config) == 1
    out = capsys.readouterr()
    assert fingerprint in out.out
    assert "not pinned" in out.err
    assert not known_hosts.exists()
    # The right fingerprint: pinned under the VM's name, owner-only.
    assert _register(config, "--fingerprint", fingerprint.removeprefix("SHA256:")) == 0
    assert f"pinned ssh-ed25519 {fingerprint} for vm-1" in capsys.readouterr().out
    assert parse_known_hosts(known_hosts.read_text()) == {"vm-1": [sshd.host_key]}
    assert known_hosts.stat().st_mode & 0o077 == 0
    assert _register(config, "--fingerprint", fingerprint) == 0
    assert "already pinned" in capsys.readouterr().out
    # Another key pinned for the VM (as if it had been re-installed): kept unless --replace.
    stale = HostKey(other[0], other[1])
    pin(known_hosts, "vm-1", stale)
    assert _register(config, "--fingerprint", fingerprint) == 1
    assert "already has a different pinned key" in capsys.readouterr().err
    assert pinned_keys(known_hosts, "vm-1") == [stale]
    assert _register(config, "--fingerprint", fingerprint, "--replace") == 0
    assert pinned_keys(known_hosts, "vm-1") == [sshd.host_key]
    # Bad input is refused before anything is fetched.
    assert _register(config, "--fingerprint", "MD5:aa:bb") == 2
    assert cli.main(["--config", str(config), "vm", "register", "vm-1", "--address", "a b"]) == 2


async def test_ssh_failures_are_clear(tmp_path: Path, sshd: Sshd) -> None:
    launch = _launch(tmp_path)
    known_hosts = tmp_path / "agent" / "ssh" / "known_hosts"
    # Never registered: refused before any connection, with the command that fixes it.
    with pytest.raises(HostKeyNotPinned, match=r"no pinned SSH host key.*agentctl vm register"):
        await _executor(sshd, tmp_path).start(launch, vm_name="vm-1")
    assert issubclass(HostKeyNotPinned, VmUnreachable)  # the task fails as vm_unreachable
    # A key that is not the VM's pinned for it (the VM's key changed, or another machine
    # answers at its address): SSH refuses it, and the agent says so.
    other = _ed25519(tmp_path / "other").split()
    pin(known_hosts, "vm-1", HostKey(other[0], other[1]))
    with pytest.raises(VmUnreachable, match=r"is not the key pinned for it: refused"):
        await _executor(sshd, tmp_path).start(launch, vm_name="vm-1")
    pin(known_hosts, "vm-1", sshd.host_key)
    # Nothing listens there.
    with pytest.raises(VmUnreachable, match=r"SSH connection to vm-1 \(127\.0\.0\.1:\d+\) failed"):
        await _executor(sshd, tmp_path, port=free_port()).start(launch, vm_name="vm-1")
    # The VM has no client payload where the config says.
    with pytest.raises(PayloadMissing, match="client payload is not installed in VM 'vm-1'"):
        await _executor(sshd, tmp_path, remote_bin_dir=str(tmp_path / "no-venv" / "bin")).start(
            launch, vm_name="vm-1"
        )
    # Outside one-box mode, an address of the agent's own host is refused.
    hosts_mode = SshExecutor(
        _config(sshd, tmp_path),
        work_dir=tmp_path / "t",
        vms={"vm-1": VmSettings(address="127.0.0.1", port=sshd.port)},
    )
    with pytest.raises(OnAgentHost, match="never runs on the hypervisor host"):
        await hosts_mode.start(launch, vm_name="vm-1")
    # No [vms] address and nothing usable from libvirt.
    with pytest.raises(VmUnreachable, match="no address"):
        await _executor(sshd, tmp_path).start(launch, vm_name="vm-2", vm_addresses=("127.0.0.1",))
    assert not (tmp_path / "vm" / "t").exists()  # nothing reached the VM on any refusal
