"""The aggregator's front: the SuperLink on loopback, Fleet open to nodes, Control to the
controller's certificate only, Runtime to no one from outside.

A real `fedsky-aggregator` (the local provider's), a real SuperLink behind it, real TLS from a
test CA; the refusals are read from the wire (raw HTTPS) and from Flower's own CLI."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from fedsky.controller.clouds.base import AggregatorHandle, AggregatorSpec
from fedsky.controller.clouds.local import LocalProvider, pki_tls_issuer
from fedsky.controller.clouds.superlink import FlowerCliError, SuperLinkControl
from fedsky.controller.security.pki import Pki
from fedsky.shared.flower.aggregator_host import SECRET_FILE, Access, access_for
from fedsky.shared.procs import group_alive
from fedsky.shared.supernode import generate_node_key

from benchmarks.testbed.probe import all_refused, probe_control
from tests.support.csr import node_certificate
from tests.support.wait import eventually

pytestmark = pytest.mark.e2e


def test_each_caller_reaches_only_its_part() -> None:
    fleet = "/v1/fleet/pull-messages"
    control = "/v1/control/list-runs"
    assert access_for(fleet, peer_name="hospital-eu.node") is Access.FORWARD
    # Fleet is for hospitals' SuperNodes: not an agent's own (bus) certificate, nor any other.
    for peer in (None, "hospital-eu", "agg-job-1", "controller", "agg-job-1.node", ".node"):
        assert access_for(fleet, peer_name=peer) is Access.FORBIDDEN, peer
    assert access_for(control, peer_name="controller") is Access.FORWARD
    assert access_for("/health", peer_name="controller") is Access.FORWARD
    for peer in (None, "hospital-eu", "hospital-eu.node", "agg-job-1", "Controller", "controller "):
        assert access_for(control, peer_name=peer) is Access.FORBIDDEN
        assert access_for("/health", peer_name=peer) is Access.FORBIDDEN
    for path in (
        "/v1/runtime/acquire-task",
        "/docs",
        "/openapi.json",
        "/",
        "/v1/fleet",
        # A Fleet path that an HTTP stack could normalise into a Control or Runtime one.
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/fleet//pull-messages",
        "/v1/fleet/./pull-messages",
        "/v1/fleet/pull-messages/",
    ):
        assert access_for(path, peer_name="controller") is Access.NOT_FOUND, path


@dataclass
class Aggregator:
    provider: LocalProvider
    handle: AggregatorHandle
    pki: Pki
    root: Path

    @property
    def port(self) -> int:
        assert self.handle.address is not None
        return int(self.handle.address.rpartition(":")[2])

    def control(self, identity: tuple[Path, Path] | None) -> SuperLinkControl:
        assert self.handle.address is not None
        name = identity[0].stem if identity else "none"
        return SuperLinkControl(
            flwr_home=self.root / f"flwr-{name}",
            address=self.handle.address,
            root_ca=self.pki.ca_cert_path,
            client_identity=identity,
        )

    def node_identity(self, site: str) -> tuple[Path, Path]:
        """A SuperNode's certificate over a fresh node key, and that key as PEM."""
        keys = generate_node_key(self.root / f"{site}-keys")
        cert = node_certificate(self.pki, site, keys)
        key = serialization.load_ssh_private_key(keys.private_key.read_bytes(), password=None)
        pem = self.root / f"{site}-node.pem"
        pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert, pem

    def identity(self, name: str, kind: str) -> tuple[Path, Path]:
        issued = self.pki.issue(common_name=name, kind=kind)  # type: ignore[arg-type]
        assert issued.key_pem is not None
        cert, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        return cert, key


def _local_provider(tmp_path: Path) -> tuple[Pki, LocalProvider]:
    pki = Pki.init(tmp_path / "pki")
    pki.write_controller_identity()
    return pki, LocalProvider(
        work_dir=tmp_path / "aggregators",
        issue_tls=pki_tls_issuer(pki),
        control_identity=pki.controller_identity,
    )


@pytest_asyncio.fixture
async def aggregator(tmp_path: Path) -> AsyncIterator[Aggregator]:
    pki, provider = _local_provider(tmp_path)
    handle = await provider.launch(
        AggregatorSpec(job_id="front", cloud="local", region="local", instance_type="local")
    )
    try:
        yield Aggregator(provider, handle, pki, tmp_path)
    finally:
        await provider.terminate(handle)


def _node_key(directory: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path = directory / "node.pub"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return path


def _post(
    agg: Aggregator, path: str, *, identity: tuple[Path, Path] | None = None
) -> tuple[int, bytes]:
    """One raw HTTPS request, the path sent exactly as given (no client-side normalising)."""
    ctx = ssl.create_default_context(cafile=str(agg.pki.ca_cert_path))
    if identity is not None:
        ctx.load_cert_chain(str(identity[0]), str(identity[1]))
    conn = http.client.HTTPSConnection("127.0.0.1", agg.port, context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def _superlink_child(agg: Aggregator) -> tuple[int, list[str]]:
    """The SuperLink process under the aggregator host, read from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if (
            any(Path(a).name == "flower-superlink" for a in argv[:2])
            and str(agg.provider.paths("front").database) in argv
        ):
            return int(entry.name), argv
    raise AssertionError("no SuperLink process under the aggregator host")


async def test_control_is_the_controllers_only(aggregator: Aggregator) -> None:
    agg = aggregator
    # The controller (its own certificate) lists and registers.
    controller = agg.control(agg.pki.controller_identity)
    assert await controller.list_nodes() == []
    node_id = await controller.register_node(_node_key(agg.root))
    assert [n.node_id for n in await controller.list_nodes()] == [node_id]
    # A hospital's certificate, an aggregator's, or none at all: refused, nothing changes.
    others: list[tuple[Path, Path] | None] = [
        agg.identity("hospital-eu", "agent"),
        agg.identity("agg-other-job", "aggregator"),
        None,
    ]
    for identity in others:
        control = agg.control(identity)
        with pytest.raises(FlowerCliError, match="403 Forbidden"):
            await control.list_nodes()
        with pytest.raises(FlowerCliError, match="403 Forbidden"):
            await control.register_node(_node_key(agg.root))
        with pytest.raises(FlowerCliError, match="403 Forbidden"):
            await control.unregister_node(node_id)
        with pytest.raises(FlowerCliError, match="403 Forbidden"):
            await control.stop_run(1)
    assert [n.node_id for n in await controller.list_nodes()] == [node_id]


async def test_runtime_and_docs_are_served_to_no_one_and_fleet_reaches_flower(
    aggregator: Aggregator,
) -> None:
    agg = aggregator
    controller = agg.pki.controller_identity
    for path in (
        "/v1/runtime/acquire-task",
        "/docs",
        "/openapi.json",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/runtime/acquire-task",
    ):
        status, body = _post(agg, path, identity=controller)
        assert status == 404, (path, body)
        assert json.loads(body) == {"error": "not found"}
    # Fleet needs a SuperNode's certificate: without one, or with a hospital's bus one, 403.
    for identity in (None, agg.identity("hospital-eu", "agent")):
        status, body = _post(agg, "/v1/fleet/register-node", identity=identity)
        assert status == 403, body
        assert "node certificate" in json.loads(body)["error"]
    # With it the call reaches Flower, which answers it itself: a node cannot register its own
    # key (SuperNode authentication is on), and an unsigned call is refused.
    status, body = _post(agg, "/v1/fleet/register-node", identity=agg.node_identity("hospital-eu"))
    assert status not in (403, 404), body
    assert "error" not in json.loads(body)  # Flower's answer, not the front's
    # The SuperLink itself listens on loopback only, with the SuperExec's secret set (0600).
    _, argv = _superlink_child(agg)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    secret = Path(argv[argv.index("--superexec-auth-secret-file") + 1])
    assert secret.name == SECRET_FILE
    assert secret.stat().st_mode & 0o077 == 0
    assert argv[argv.index("--isolation") + 1] == "process"


async def test_flowers_cli_from_a_hospital_is_refused_but_would_work_on_the_bare_superlink(
    aggregator: Aggregator,
) -> None:
    agg = aggregator
    assert agg.handle.address is not None
    probe = probe_control(
        address=agg.handle.address, ca_file=agg.pki.ca_cert_path, work=agg.root / "probe"
    )
    assert all_refused(probe), probe
    # The same CLI against the SuperLink's own (loopback) port, which only the front reaches:
    # listing runs works there, so the refusal above is the front's.
    _, argv = _superlink_child(agg)
    inner = f"127.0.0.1:{argv[argv.index('--port') + 1]}"
    bare = probe_control(address=inner, ca_file=agg.pki.ca_cert_path, work=agg.root / "bare")
    listing = next(a for a in bare["attempts"] if a["command"] == "flwr ls")
    assert listing["exit_code"] == 0, listing


async def test_the_host_stops_when_its_superlink_dies(aggregator: Aggregator) -> None:
    agg = aggregator
    pid, _ = _superlink_child(agg)
    os.kill(pid, 9)
    await eventually(
        lambda: not group_alive(int(agg.handle.ref)), timeout=30, what="the host to stop"
    )
    assert not await agg.provider.healthy(agg.handle)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", agg.port)) != 0


async def test_a_launch_cancelled_while_the_aggregator_starts_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """A job cancelled in its launching stage: the start goes on in its thread, so the provider
    waits for it and stops what it started before passing the cancel on."""
    _, provider = _local_provider(tmp_path)
    spec = AggregatorSpec(job_id="cancelled", cloud="local", region="local", instance_type="local")
    launching = asyncio.create_task(provider.launch(spec))
    spawned = await eventually(
        lambda: asyncio.to_thread(_aggregator_pids, tmp_path), until=bool, timeout=30
    )
    launching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await launching
    for pid in spawned:
        assert not group_alive(pid), f"aggregator {pid} still runs after the cancel"


def _aggregator_pids(root: Path) -> list[int]:
    """fedsky-aggregator processes whose command line names a directory under `root`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"fedsky-aggregator" in a for a in argv[:2]) and str(root).encode() in b" ".join(
            argv
        ):
            pids.append(int(entry.name))
    return pids
