"""The gcp provider through google-cloud-compute against the local GCP fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.clouds.base import AggregatorSpec, ProviderError
from fedsky.controller.clouds.gcp.provider import GcpProvider
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store

from tests.fakes.clouds import (
    ENROLL_URL,
    HealthSwitch,
    assert_pinned_install,
    clouds_config,
    open_service,
)
from tests.fakes.gcp_server import FakeGcp, running_fake
from tests.support import eventually

SOURCES = ("198.51.100.7/32", "203.0.113.0/28")


@pytest.fixture
def fake() -> Iterator[FakeGcp]:
    with running_fake() as server:
        yield server


@pytest.fixture
async def linked(
    tmp_path: Path, pki: Pki, fake: FakeGcp
) -> AsyncIterator[tuple[CloudService, HealthSwitch, Store]]:
    health = HealthSwitch()
    service, store = open_service(
        tmp_path / "state", pki, clouds_config(gcp=fake, ready_timeout_s=1.5), health
    )
    await service.add(cloud="gcp", data=json.dumps(fake.new_key()).encode(), name="research")
    yield service, health, store
    store.close()


async def _provider(service: CloudService) -> GcpProvider:
    provider = await service.provider("research")
    assert isinstance(provider, GcpProvider)
    return provider


def _spec(job_id: str, **changes: Any) -> AggregatorSpec:
    values: dict[str, Any] = {
        "job_id": job_id,
        "cloud": "gcp",
        "region": "europe-west1",
        "instance_type": "n2-standard-4",
        "allowed_sources": SOURCES,
    }
    values.update(changes)
    return AggregatorSpec(**values)


async def test_launch_makes_the_vm_asked_for_and_terminate_removes_it(
    linked: Any, fake: FakeGcp, pki: Pki, tmp_path: Path
) -> None:
    service, health, _ = linked
    provider = await service.provider_for_launch("gcp", region="europe-west1")
    assert isinstance(provider, GcpProvider)
    handle = await provider.launch(_spec("job-g1", labels={"Owner": "Radiology"}))

    assert handle.ref == "europe-west1-b/fedsky-agg-job-g1"
    vm = fake.instances[("europe-west1-b", "fedsky-agg-job-g1")]
    assert vm["status"] == "RUNNING"
    assert vm["machineType"].endswith("/zones/europe-west1-b/machineTypes/n2-standard-4")
    assert vm["labels"] == {
        "fedsky-job": "job-g1",
        "fedsky-controller": await service.controller_uid(),
        "fedsky-managed": "true",
        "owner": "radiology",
    }
    assert vm["tags"]["items"] == ["fedsky-agg-job-g1"]
    nat_ip = vm["networkInterfaces"][0]["accessConfigs"][0]["natIP"]
    assert handle.address == f"{nat_ip}:9092"
    assert health.calls[-1] == handle.address
    assert (
        vm["disks"][0]["initializeParams"]["sourceImage"]
        == "projects/debian-cloud/global/images/family/debian-12"
    )
    (item,) = vm["metadata"]["items"]
    assert item["key"] == "startup-script"
    script = item["value"]
    assert "PRIVATE KEY" not in script
    assert pki.ca_cert_pem.decode().strip() in script
    assert ENROLL_URL in script
    assert "fsk1_" in script
    assert_pinned_install(script, tmp_path / "state")

    rule = fake.firewalls["fedsky-agg-job-g1"]
    assert rule["direction"] == "INGRESS"
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["9092"]}]
    assert sorted(rule["sourceRanges"]) == sorted(SOURCES)
    assert rule["targetTags"] == ["fedsky-agg-job-g1"]
    # The operations had to be waited for: each was read more than once.
    assert any(path.endswith("/wait") for _, path in fake.requests)

    await provider.terminate(handle)
    assert fake.instances == {}
    assert fake.firewalls == {}
    await provider.terminate(handle)


async def test_a_failed_insert_operation_is_reported_and_cleaned_up(
    linked: Any, fake: FakeGcp
) -> None:
    service, _, _ = linked
    provider = await _provider(service)
    fake.fail_next_insert = "ZONE_RESOURCE_POOL_EXHAUSTED"
    with pytest.raises(
        ProviderError, match=r"instances\.insert failed: ZONE_RESOURCE_POOL_EXHAUSTED"
    ):
        await provider.launch(_spec("job-g2"))
    assert fake.instances == {}
    assert fake.firewalls == {}


async def test_a_bad_machine_type_and_an_unknown_region_fail_clearly(
    linked: Any, fake: FakeGcp
) -> None:
    service, _, _ = linked
    provider = await _provider(service)
    with pytest.raises(ProviderError, match="Machine type does not exist"):
        await provider.launch(_spec("job-g3", instance_type="n2-huge-999x"))
    assert fake.firewalls == {}
    with pytest.raises(ProviderError, match="unknown GCP region 'mars-north1'"):
        await provider.launch(_spec("job-g4", region="mars-north1"))
    with pytest.raises(ProviderError, match="unknown GCP region"):
        await service.provider_for_launch("gcp", region="mars-north1")
    with pytest.raises(ProviderError, match="cannot launch on 'azure'"):
        await service.provider_for_launch("azure", region="eastus")
    with pytest.raises(
        ProviderError, match="no aws account is linked; link one with `fedctl clouds add aws FILE`"
    ):
        await service.provider_for_launch("aws", region="us-east-1")


async def test_a_cancelled_launch_deletes_what_it_made(linked: Any, fake: FakeGcp) -> None:
    service, health, _ = linked
    health.ok = False
    provider = await _provider(service)
    task = asyncio.create_task(provider.launch(_spec("job-g5")))
    await eventually(  # the instance runs; the launch waits for it to answer
        lambda: health.calls or task.done(),
        timeout=60,
        interval=0.02,
        what="the launch to probe its instance",
    )
    assert fake.instances
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.instances == {}
    assert fake.firewalls == {}


async def test_sweep_deletes_only_ended_jobs_of_this_controller(
    linked: Any, fake: FakeGcp, tmp_path: Path, pki: Pki
) -> None:
    service, _, _ = linked
    provider = await _provider(service)
    live = await provider.launch(_spec("job-live"))
    await provider.launch(_spec("job-ended", region="us-central1"))
    other, other_store = open_service(tmp_path / "other", pki, clouds_config(gcp=fake))
    try:
        await other.add(cloud="gcp", data=json.dumps(fake.new_key("other")).encode(), name="other")
        await (await other.provider("other")).launch(_spec("job-foreign"))

        swept = await service.sweep_orphans({"job-live"})

        assert swept == ["gcp:us-central1-a/fedsky-agg-job-ended"]
        assert sorted(name for _, name in fake.instances) == [
            "fedsky-agg-job-foreign",
            "fedsky-agg-job-live",
        ]
        assert sorted(fake.firewalls) == ["fedsky-agg-job-foreign", "fedsky-agg-job-live"]
        assert await service.sweep_orphans({"job-live"}) == []
        await provider.terminate(live)
    finally:
        other_store.close()


async def test_launch_is_refused_when_the_key_lost_its_permissions(
    linked: Any, fake: FakeGcp
) -> None:
    service, _, _ = linked
    account = fake.accounts[next(iter(fake.accounts))]
    account.permissions.discard("compute.instances.create")
    with pytest.raises(
        ProviderError, match=r"research: missing-permissions: .*compute\.instances\.create"
    ):
        await service.provider_for_launch("gcp", region="europe-west1")
    (record,) = await service.records()
    assert record.status == "missing-permissions"
    assert record.missing == ("compute.instances.create",)


async def test_without_an_enrolment_url_nothing_is_launched(
    tmp_path: Path, pki: Pki, fake: FakeGcp
) -> None:
    service, store = open_service(tmp_path / "s", pki, clouds_config(gcp=fake, enroll_url=None))
    try:
        await service.add(cloud="gcp", data=json.dumps(fake.new_key()).encode(), name="research")
        with pytest.raises(ProviderError, match=r"clouds\.enroll_url is not set"):
            await (await _provider(service)).launch(_spec("job-g6"))
        assert (fake.instances, fake.firewalls) == ({}, {})
        tokens = store.call(
            lambda conn: conn.execute("SELECT COUNT(*) FROM bootstrap_tokens").fetchone()[0]
        )
        assert tokens == 0
    finally:
        store.close()
