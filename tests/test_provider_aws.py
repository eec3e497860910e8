"""The aws provider against moto's server with IAM on: launch, terminate, failures, orphans."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.clouds.aws.provider import AwsProvider
from fedsky.controller.clouds.base import AggregatorSpec, ProviderError
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store

from tests.fakes.aws import MotoAws, shared_moto
from tests.fakes.clouds import (
    ENROLL_URL,
    HealthSwitch,
    assert_pinned_install,
    clouds_config,
    open_service,
)
from tests.support import eventually

SOURCES = ("198.51.100.7/32", "203.0.113.0/28", "2001:db8::/64")


@pytest.fixture
def moto() -> Any:
    server = shared_moto()
    yield server
    server.auth(False)


@pytest.fixture
async def linked(
    tmp_path: Path, pki: Pki, moto: MotoAws
) -> AsyncIterator[tuple[CloudService, HealthSwitch, Store]]:
    health = HealthSwitch()
    config = clouds_config(moto_endpoint=moto.endpoint, ready_timeout_s=1.5)
    service, store = open_service(tmp_path / "state", pki, config, health)
    key = moto.user("fedsky")
    await service.add(cloud="aws", data=key.console_csv(), name="prod")
    yield service, health, store
    store.close()


async def _provider(service: CloudService) -> AwsProvider:
    provider = await service.provider("prod")
    assert isinstance(provider, AwsProvider)
    return provider


def _instances(moto: MotoAws, job_id: str, region: str = "us-east-1") -> list[dict[str, Any]]:
    found = moto.client("ec2", region).describe_instances(
        Filters=[{"Name": "tag:fedsky:job", "Values": [job_id]}]
    )
    return [i for r in found["Reservations"] for i in r["Instances"]]


def _groups(moto: MotoAws, job_id: str, region: str = "us-east-1") -> list[dict[str, Any]]:
    found = moto.client("ec2", region).describe_security_groups(
        Filters=[{"Name": "tag:fedsky:job", "Values": [job_id]}]
    )
    return list(found["SecurityGroups"])


async def test_launch_makes_the_instance_asked_for_and_terminate_removes_it(
    linked: Any, moto: MotoAws, pki: Pki, tmp_path: Path
) -> None:
    service, health, _ = linked
    provider = await service.provider_for_launch("aws", region="us-east-1")
    assert isinstance(provider, AwsProvider)
    spec = AggregatorSpec(
        job_id="job-launch-1",
        cloud="aws",
        region="us-east-1",
        instance_type="m5.xlarge",
        allowed_sources=SOURCES,
        labels={"owner": "radiology"},
    )
    handle = await provider.launch(spec)

    assert handle.provider == "aws"
    assert handle.region == "us-east-1"
    (instance,) = _instances(moto, "job-launch-1")
    assert instance["InstanceId"] == handle.ref
    assert instance["InstanceType"] == "m5.xlarge"
    assert instance["Placement"]["AvailabilityZone"].startswith("us-east-1")
    assert instance["State"]["Name"] == "running"
    assert handle.address == f"{instance['PublicIpAddress']}:9092"
    assert health.calls[-1] == handle.address
    assert await provider.healthy(handle)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["fedsky:job"] == "job-launch-1"
    assert tags["fedsky:managed"] == "true"
    assert tags["fedsky:controller"] == await service.controller_uid()
    assert tags["owner"] == "radiology"
    assert "KeyName" not in instance  # no SSH key pair

    ec2 = moto.client("ec2")
    encoded = ec2.describe_instance_attribute(InstanceId=handle.ref, Attribute="userData")[
        "UserData"
    ]["Value"]
    user_data = base64.b64decode(encoded).decode()
    assert user_data.startswith("#!/bin/bash")
    assert "PRIVATE KEY" not in user_data
    assert pki.ca_cert_pem.decode().strip() in user_data
    assert ENROLL_URL in user_data
    assert "fsk1_" in user_data  # the one-time token
    assert_pinned_install(user_data, tmp_path / "state")
    assert "openssl genpkey" in user_data
    assert "--listen 0.0.0.0:9092" in user_data
    assert "/bin/fedsky-aggregator --listen" in user_data  # node auth behind the front

    (group,) = _groups(moto, "job-launch-1")
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group["GroupId"]]
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 9092, 9092)
    assert sorted(r["CidrIp"] for r in rule["IpRanges"]) == ["198.51.100.7/32", "203.0.113.0/28"]
    assert [r["CidrIpv6"] for r in rule["Ipv6Ranges"]] == ["2001:db8::/64"]

    await provider.terminate(handle)
    (gone,) = _instances(moto, "job-launch-1")
    assert gone["State"]["Name"] == "terminated"
    assert _groups(moto, "job-launch-1") == []
    await provider.terminate(handle)  # again: nothing left to do, no error


async def test_a_bad_instance_type_fails_clearly_and_leaves_nothing(
    linked: Any, moto: MotoAws
) -> None:
    service, _, _ = linked
    provider = await _provider(service)
    spec = AggregatorSpec(
        job_id="job-badtype",
        cloud="aws",
        region="us-east-1",
        instance_type="m5.huge",
        allowed_sources=SOURCES,
    )
    with pytest.raises(ProviderError, match=r"InvalidInstanceType.*m5\.huge"):
        await provider.launch(spec)
    assert _instances(moto, "job-badtype") == []
    assert _groups(moto, "job-badtype") == []


async def test_an_unknown_region_is_refused_before_anything_is_made(
    linked: Any, moto: MotoAws
) -> None:
    service, _, _ = linked
    provider = await _provider(service)
    spec = AggregatorSpec(
        job_id="job-mars",
        cloud="aws",
        region="mars-north-1",
        instance_type="t3.small",
        allowed_sources=SOURCES,
    )
    with pytest.raises(ProviderError, match="unknown AWS region 'mars-north-1'"):
        await provider.launch(spec)
    with pytest.raises(ProviderError, match="unknown AWS region"):
        await service.provider_for_launch("aws", region="mars-north-1")


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ((), "no allowed sources"),
        (("0.0.0.0/0",), "whole internet"),
        (("hospital-a",), "not an address"),
    ],
)
async def test_sources_must_be_named_addresses(
    linked: Any, sources: tuple[str, ...], message: str
) -> None:
    service, _, _ = linked
    provider = await _provider(service)
    spec = AggregatorSpec(
        job_id="job-src",
        cloud="aws",
        region="us-east-1",
        instance_type="t3.small",
        allowed_sources=sources,
    )
    with pytest.raises(ProviderError, match=message):
        await provider.launch(spec)


async def test_an_aggregator_that_never_answers_is_terminated(linked: Any, moto: MotoAws) -> None:
    service, health, _ = linked
    health.ok = False
    provider = await _provider(service)
    spec = AggregatorSpec(
        job_id="job-silent",
        cloud="aws",
        region="us-east-1",
        instance_type="t3.small",
        allowed_sources=SOURCES,
    )
    with pytest.raises(ProviderError, match=r"timed out .* to answer"):
        await provider.launch(spec)
    assert [i["State"]["Name"] for i in _instances(moto, "job-silent")] == ["terminated"]
    assert _groups(moto, "job-silent") == []


async def test_a_launch_cancelled_midway_cleans_up(linked: Any, moto: MotoAws) -> None:
    service, health, _ = linked
    health.ok = False
    provider = await _provider(service)
    spec = AggregatorSpec(
        job_id="job-cancel",
        cloud="aws",
        region="us-east-1",
        instance_type="t3.small",
        allowed_sources=SOURCES,
    )
    task = asyncio.create_task(provider.launch(spec))
    await eventually(  # the instance runs; the launch waits for it to answer
        lambda: health.calls or task.done(),
        timeout=60,
        interval=0.02,
        what="the launch to probe its instance",
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [i["State"]["Name"] for i in _instances(moto, "job-cancel")] == ["terminated"]
    assert _groups(moto, "job-cancel") == []


async def test_sweep_terminates_only_ended_jobs_of_this_controller(
    linked: Any, moto: MotoAws, tmp_path: Path, pki: Pki
) -> None:
    service, _, _ = linked
    provider = await _provider(service)
    spec = AggregatorSpec(
        job_id="job-live",
        cloud="aws",
        region="us-east-1",
        instance_type="t3.small",
        allowed_sources=SOURCES,
    )
    live = await provider.launch(spec)
    ended = await provider.launch(AggregatorSpec(**{**spec.__dict__, "job_id": "job-ended"}))
    # Another controller's aggregator in the same account must survive our sweep.
    other, other_store = open_service(
        tmp_path / "other", pki, clouds_config(moto_endpoint=moto.endpoint)
    )
    try:
        await other.add(cloud="aws", data=moto.user("other").console_csv(), name="other")
        foreign = await (await other.provider("other")).launch(
            AggregatorSpec(**{**spec.__dict__, "job_id": "job-foreign"})
        )

        swept = await service.sweep_orphans({"job-live"})

        assert swept == [f"aws:us-east-1/{ended.ref}"]
        assert [i["State"]["Name"] for i in _instances(moto, "job-ended")] == ["terminated"]
        assert _groups(moto, "job-ended") == []
        assert [i["State"]["Name"] for i in _instances(moto, "job-live")] == ["running"]
        assert [i["State"]["Name"] for i in _instances(moto, "job-foreign")] == ["running"]
        assert await service.sweep_orphans({"job-live"}) == []
        await provider.terminate(live)
        await (await other.provider("other")).terminate(foreign)
    finally:
        other_store.close()


async def test_launch_is_refused_when_the_credential_no_longer_validates(
    linked: Any, moto: MotoAws
) -> None:
    service, _, _ = linked
    key = moto.user("revoked")
    await service.add(cloud="aws", data=key.console_csv(), name="second")
    moto.set_actions(key.user, ["ec2:Describe*"])  # someone trimmed the policy after linking
    with pytest.raises(ProviderError, match=r"second: missing-permissions: .*ec2:RunInstances"):
        await service.provider_for_launch("aws", region="us-east-1", name="second")
    record = next(r for r in await service.records() if r.name == "second")
    assert record.status == "missing-permissions"
    assert "ec2:RunInstances" in record.missing

    moto.delete_key(key)
    with pytest.raises(ProviderError, match="InvalidClientTokenId"):
        await service.provider_for_launch("aws", region="us-east-1", name="second")
    # The other linked account still validates and is used when no name is given.
    provider = await service.provider_for_launch("aws", region="us-east-1")
    assert isinstance(provider, AwsProvider)
    assert provider.account_name == "prod"


async def test_the_image_is_looked_up_where_none_is_configured(
    tmp_path: Path, pki: Pki, moto: MotoAws
) -> None:
    from fedsky.controller.clouds.settings import AwsCloudConfig

    def config(name: str) -> Any:
        aws = AwsCloudConfig(
            endpoint_url=moto.endpoint,
            image_owner="099720109477",  # Canonical, as moto ships its images
            image_name=name,
            sweep_regions=("us-east-1",),
        )
        return clouds_config(moto_endpoint=moto.endpoint, aws=aws)

    service, store = open_service(
        tmp_path / "a", pki, config("ubuntu/images/hvm-ssd/ubuntu-*-amd64-server-*")
    )
    try:
        await service.add(cloud="aws", data=moto.user("fl").console_csv(), name="prod")
        provider = await _provider(service)
        handle = await provider.launch(
            AggregatorSpec(
                job_id="job-image",
                cloud="aws",
                region="us-east-1",
                instance_type="t3.small",
                allowed_sources=SOURCES,
            )
        )
        (instance,) = _instances(moto, "job-image")
        assert (
            instance["ImageId"] == "ami-785db401"
        )  # the newest of moto's two Ubuntu server images
        await provider.terminate(handle)
    finally:
        store.close()
    service, store = open_service(tmp_path / "b", pki, config("no-such-image-*"))
    try:
        record, result = await service.add(
            cloud="aws", data=moto.user("fl").console_csv(), name="prod"
        )
        assert "no image named 'no-such-image-*'" in record.message
        assert "ec2:RunInstances not checked" in " ".join(result.notes)
        with pytest.raises(
            ProviderError, match=r"no aggregator image in us-east-1: .*set clouds.aws.images"
        ):
            await (await _provider(service)).launch(
                AggregatorSpec(
                    job_id="job-noimage",
                    cloud="aws",
                    region="us-east-1",
                    instance_type="t3.small",
                    allowed_sources=SOURCES,
                )
            )
        assert _instances(moto, "job-noimage") == []
    finally:
        store.close()
