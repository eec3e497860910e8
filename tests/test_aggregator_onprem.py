"""The SuperLink the controller runs itself (`local`, `onprem`): bound where `[aggregator]` says,
advertised under the name its certificate carries, and chosen by the job pipeline.

Real `flower-superlink` processes on loopback addresses other than 127.0.0.1 (127.0.0.2 is this
machine too), real TLS from a test CA; the listeners are read from /proc/net/tcp, not from the
provider's own account."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from fedsky.controller.clouds.base import AggregatorHandle, AggregatorSpec, ProviderError
from fedsky.controller.clouds.local import LocalProvider
from fedsky.controller.clouds.onprem import OnPremProvider, controller_aggregator
from fedsky.controller.clouds.settings import AggregatorConfig, OnPremConfig
from fedsky.controller.jobs.driver import JobManager
from fedsky.controller.security.pki import Pki
from fedsky.shared.messages import RunFinished
from fedsky.shared.procs import group_alive

from tests.fakes.jobs import MODEL_DIGEST, SPEC, Harness, make_harness
from tests.support import free_port
from tests.support.wait import eventually

HOST = "127.0.0.2"


def _spec(job_id: str) -> AggregatorSpec:
    return AggregatorSpec(job_id=job_id, cloud="onprem", region="hq", instance_type="-")


def _listening(host: str, port: int) -> bool:
    """Is there a TCP listener on exactly host:port (the kernel's table, IPv4)?"""
    want = f"{int.from_bytes(ipaddress.ip_address(host).packed, 'little'):08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return any(row[1] == want and row[3] == "0A" for row in rows)


def _server_names(address: tuple[str, int], name: str, ca: Path) -> list[str] | None:
    """Connect to `address` expecting `name`, checked against `ca`: the certificate's names,
    or None when the certificate does not verify for that name."""
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(address, timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError:
        return None
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return [str(v) for v in san.value.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.value.get_values_for_type(x509.IPAddress)
    ]


def _port(handle: AggregatorHandle) -> int:
    assert handle.address is not None
    return int(handle.address.rpartition(":")[2])


@pytest.fixture
async def onprem(tmp_path: Path) -> AsyncIterator[tuple[OnPremProvider, int]]:
    first = free_port(HOST)
    config = AggregatorConfig(
        bind_host=HOST,
        advertise_host=HOST,
        onprem=OnPremConfig(name="hq", ports=(first, first + 5)),
    )
    provider = controller_aggregator(config, work_dir=tmp_path / "jobs", pki=_pki(tmp_path))
    assert isinstance(provider, OnPremProvider)
    yield provider, first
    for job_id in list(provider._procs):
        await provider.terminate(
            AggregatorHandle("onprem", job_id, str(provider._procs[job_id].pid), "hq")
        )


def _pki(directory: Path) -> Pki:
    """A CA with the controller's identity written (the aggregator's front serves Control to
    that certificate only)."""
    pki = Pki.init(directory)
    pki.write_controller_identity()
    return pki


async def test_an_onprem_superlink_binds_the_configured_address_under_its_advertised_name(
    onprem: tuple[OnPremProvider, int],
) -> None:
    provider, first = onprem
    one = await provider.launch(_spec("job-1"))
    two = await provider.launch(_spec("job-2"))  # a second job takes the next free port
    for handle in (one, two):
        port = _port(handle)
        assert handle.provider == "onprem"
        assert handle.address == f"{HOST}:{port}"
        assert first <= port <= first + 5
        assert _listening(HOST, port)
        assert not _listening("127.0.0.1", port)
        assert not _listening("0.0.0.0", port)
        ca = provider.tls(handle.job_id).ca_file
        names = await asyncio.to_thread(_server_names, (HOST, port), HOST, ca)
        assert names is not None
        assert HOST in names
        assert await asyncio.to_thread(_server_names, (HOST, port), "other.test", ca) is None
        assert await provider.healthy(handle)
        # The controller's own Control API connection goes to the advertised address.
        assert await provider.control(handle).list_nodes() == []
    assert _port(one) != _port(two)
    for handle in (one, two):
        await provider.terminate(handle)
        assert not group_alive(int(handle.ref))
        assert not _listening(HOST, _port(handle))
        assert not await provider.healthy(handle)


async def test_a_local_superlink_is_advertised_by_the_configured_name(tmp_path: Path) -> None:
    config = AggregatorConfig(bind_host=HOST, advertise_host="Agg.HQ.test")
    provider = controller_aggregator(config, work_dir=tmp_path / "jobs", pki=_pki(tmp_path))
    assert type(provider) is LocalProvider
    assert provider.name == "local"
    handle = await provider.launch(_spec("job-1"))
    try:
        port = _port(handle)
        assert handle.address == f"agg.hq.test:{port}"  # what the hospitals' SuperNodes dial
        assert _listening(HOST, port)
        # A hospital resolving agg.hq.test to this address gets a certificate for that name.
        ca = provider.tls("job-1").ca_file
        names = await asyncio.to_thread(_server_names, (HOST, port), "agg.hq.test", ca)
        assert names is not None
        assert "agg.hq.test" in names
    finally:
        await provider.terminate(handle)
    assert not group_alive(int(handle.ref))


async def test_a_full_port_range_is_refused_with_the_key_to_change(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        provider = controller_aggregator(
            AggregatorConfig(bind_host=HOST, onprem=OnPremConfig(name="hq", ports=(port, port))),
            work_dir=tmp_path / "jobs",
            pki=_pki(tmp_path),
        )
        with pytest.raises(ProviderError, match=r"aggregator\.onprem\.ports"):
            await provider.launch(_spec("job-1"))


# --- the job pipeline --------------------------------------------------------------------------


def _manager(h: Harness, aggregator: AggregatorConfig) -> JobManager:
    manager = JobManager(
        config=h.ctx.config.model_copy(update={"aggregator": aggregator}),
        store=h.store,
        pki=h.ctx.pki,
        bus=h.agents,
        models=h.models,
        revocations=h.revocations,
        clouds=h.clouds,
        make_control=lambda **_: h.control,
    )
    h.agents._ctx = lambda: manager.ctx  # type: ignore[method-assign]
    h.ctx = manager.ctx
    return manager


def test_the_pipeline_runs_its_own_superlink_where_the_config_says(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    default = _manager(h, AggregatorConfig()).ctx.local
    assert type(default) is LocalProvider
    assert (default.bind_host, default.advertise_host) == ("127.0.0.1", "127.0.0.1")
    local = _manager(h, AggregatorConfig(bind_host="0.0.0.0", advertise_host="10.1.2.3")).ctx.local
    assert (local.name, local.bind_host, local.advertise_host) == ("local", "0.0.0.0", "10.1.2.3")
    assert "10.1.2.3" in local.certificate_names()
    assert "0.0.0.0" not in local.certificate_names()
    onprem = _manager(
        h, AggregatorConfig(bind_host=HOST, onprem=OnPremConfig(name="hq", ports=(9100, 9101)))
    ).ctx.local
    assert isinstance(onprem, OnPremProvider)
    assert (onprem.name, onprem.advertise_host, onprem.ports) == ("onprem", HOST, (9100, 9101))


async def test_a_job_without_a_linked_cloud_runs_on_the_operators_aggregator_host(
    tmp_path: Path,
) -> None:
    h = make_harness(tmp_path)
    h.clouds.linked = []
    first = free_port(HOST)
    manager = _manager(
        h,
        AggregatorConfig(bind_host=HOST, onprem=OnPremConfig(name="hq", ports=(first, first + 3))),
    )
    runner = asyncio.create_task(manager.run())
    try:
        await asyncio.sleep(0)
        job_id = await manager.submit(spec_data=SPEC, model_digest=MODEL_DIGEST)
        job = await eventually(
            lambda: h.job(job_id), until=lambda j: j["state"] == "training", timeout=90
        )
        assert job["placement"]["provider"] == "onprem"
        aggregator = job["aggregator"]
        assert aggregator["provider"] == "onprem"
        host, _, port = aggregator["address"].rpartition(":")
        assert host == HOST
        assert first <= int(port) <= first + 3
        assert _listening(HOST, int(port))
        ca = manager.ctx.local.tls(job_id).ca_file
        assert await asyncio.to_thread(_server_names, (HOST, int(port)), HOST, ca)
        log = await h.log_text(job_id)
        assert "the operator's aggregator host hq (127.0.0.2" in log
        assert f"aggregator up at {HOST}:{port} (onprem)" in log
        await eventually(lambda: _run_started(manager, job_id), until=bool, what="the run to start")
        manager._run_ended(
            RunFinished(job_id=job_id, status="completed", rounds_completed=2, num_rounds=2)
        )
        await eventually(
            lambda: h.job(job_id), until=lambda j: j["state"] == "completed", timeout=30
        )
        assert not group_alive(int(aggregator["ref"]))
        assert not _listening(HOST, int(port))
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def _run_started(manager: JobManager, job_id: str) -> bool:
    run = manager._runs.get(job_id)
    return run is not None and run.finished is not None
