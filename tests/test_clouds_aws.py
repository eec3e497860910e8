"""Linking AWS accounts, validated by real calls to moto's server with IAM authentication on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.clouds.aws.validate import AWS_ACTIONS
from fedsky.controller.clouds.errors import (
    AccountExists,
    AccountNotFound,
    CloudUnreachable,
    CloudUsageError,
    CredentialFormatError,
    CredentialRejected,
    UnknownCloud,
)
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store

from tests.fakes.aws import PROVIDER_ACTIONS, AwsKey, MotoAws, shared_moto
from tests.fakes.clouds import clouds_config, open_service
from tests.support import free_port


@pytest.fixture
def moto() -> Iterator[MotoAws]:
    server = shared_moto()
    yield server
    server.auth(False)


@pytest.fixture
def service(tmp_path: Path, pki: Pki, moto: MotoAws) -> Iterator[CloudService]:
    svc, store = open_service(tmp_path / "state", pki, clouds_config(moto_endpoint=moto.endpoint))
    yield svc
    store.close()


def _rows(service: CloudService) -> Any:
    store: Store = service.store
    return store.call(lambda conn: conn.execute("SELECT name FROM clouds").fetchall())


def test_the_test_policy_is_what_the_provider_needs() -> None:
    assert set(PROVIDER_ACTIONS) == set(AWS_ACTIONS)


async def test_a_console_csv_links_the_account(service: CloudService, moto: MotoAws) -> None:
    key = moto.user("fl")
    record, result = await service.add(cloud="aws", data=key.console_csv(with_user=True))
    assert record.name == f"aws-{moto.account}"
    assert record.account == moto.account
    assert record.identity == f"arn:aws:iam::{moto.account}:user/{key.user}"
    assert (record.status, record.missing, record.region) == ("ok", (), "us-east-1")
    assert record.key_hint == f"...{key.access_key_id[-4:]}"
    assert result.ok
    listed = await service.records()
    assert [(r.name, r.cloud, r.status) for r in listed] == [(record.name, "aws", "ok")]
    assert await service.linked_clouds() == ["aws"]


async def test_json_and_profile_files_link_too(service: CloudService, moto: MotoAws) -> None:
    key = moto.user("fl")
    doc = {
        "AccessKey": {
            "UserName": key.user,
            "AccessKeyId": key.access_key_id,
            "SecretAccessKey": key.secret_access_key,
        }
    }
    await service.add(cloud="aws", data=json.dumps(doc).encode(), name="from-json")
    ini = (
        "[default]\naws_access_key_id = AKIAUNUSEDUNUSED0000\naws_secret_access_key = "
        + "u" * 40
        + "\n"
        f"[research]\naws_access_key_id = {key.access_key_id}\naws_secret_access_key = {key.secret_access_key}\n"
        "region = us-east-1\n"
    )
    record, _ = await service.add(
        cloud="aws", data=ini.encode(), name="from-ini", profile="research"
    )
    assert record.identity.endswith(f"user/{key.user}")


async def test_a_wrong_secret_fails_as_aws_fails_it_and_nothing_is_stored(
    service: CloudService, moto: MotoAws
) -> None:
    key = moto.user("fl")
    wrong = AwsKey(key.user, key.access_key_id, key.secret_access_key[::-1])
    with pytest.raises(CredentialRejected, match="SignatureDoesNotMatch") as caught:
        await service.add(cloud="aws", data=wrong.console_csv())
    assert caught.value.result is not None
    assert caught.value.result.status == "invalid"
    assert _rows(service) == []


async def test_an_unknown_key_fails_as_aws_fails_it(service: CloudService, moto: MotoAws) -> None:
    unknown = AwsKey("nobody", "AKIA" + "Z" * 16, "S" * 40)
    with pytest.raises(CredentialRejected, match="InvalidClientTokenId"):
        await service.add(cloud="aws", data=unknown.console_csv())
    deleted = moto.user("gone")
    moto.delete_key(deleted)
    with pytest.raises(CredentialRejected, match="InvalidClientTokenId"):
        await service.add(cloud="aws", data=deleted.console_csv())
    assert _rows(service) == []


async def test_a_key_without_the_needed_permissions_names_them(
    service: CloudService, moto: MotoAws
) -> None:
    actions = [
        a for a in PROVIDER_ACTIONS if a not in ("ec2:RunInstances", "ec2:CreateSecurityGroup")
    ]
    key = moto.user("readonly", actions)
    with pytest.raises(CredentialRejected) as caught:
        await service.add(cloud="aws", data=key.console_csv())
    result = caught.value.result
    assert result is not None
    assert result.status == "missing-permissions"
    assert result.missing == ("ec2:RunInstances", "ec2:CreateSecurityGroup")
    assert result.account == moto.account
    assert result.identity == f"arn:aws:iam::{moto.account}:user/{key.user}"
    assert (
        f"user/{key.user} in account {moto.account} lacks ec2:RunInstances, ec2:CreateSecurityGroup"
        in caught.value.message
    )
    assert _rows(service) == []

    no_policy = moto.user("bare", [])
    with pytest.raises(CredentialRejected) as caught:
        await service.add(cloud="aws", data=no_policy.console_csv())
    assert caught.value.result is not None
    # DescribeImages is not needed (nor checked) where the config names the region's image.
    assert caught.value.result.missing == tuple(a for a in AWS_ACTIONS if a != "ec2:DescribeImages")


async def test_an_unknown_region_is_a_clear_error(service: CloudService, moto: MotoAws) -> None:
    key = moto.user("fl")
    with pytest.raises(CredentialRejected, match="unknown AWS region 'xx-nowhere-1'") as caught:
        await service.add(cloud="aws", data=key.console_csv(), region="xx-nowhere-1")
    assert caught.value.result is not None
    assert caught.value.result.status == "unknown-region"
    with pytest.raises(CloudUsageError, match="is not a region name"):
        await service.add(cloud="aws", data=key.console_csv(), region="us east 1; rm")
    assert _rows(service) == []


async def test_malformed_files_and_bad_names_store_nothing(
    service: CloudService, moto: MotoAws
) -> None:
    key = moto.user("fl")
    with pytest.raises(CredentialFormatError, match=r"looks truncated|truncated or edited"):
        await service.add(cloud="aws", data=key.console_csv()[:40])
    with pytest.raises(CloudUsageError, match="invalid name 'Prod Account'"):
        await service.add(cloud="aws", data=key.console_csv(), name="Prod Account")
    with pytest.raises(UnknownCloud, match="unknown cloud 'azure': fedsky links aws and gcp"):
        await service.add(cloud="azure", data=key.console_csv())
    assert _rows(service) == []
    await service.add(cloud="aws", data=key.console_csv(), name="prod")
    with pytest.raises(AccountExists, match="already linked"):
        await service.add(cloud="aws", data=key.console_csv(), name="prod")


async def test_verify_follows_what_aws_says_now(service: CloudService, moto: MotoAws) -> None:
    key = moto.user("fl")
    await service.add(cloud="aws", data=key.console_csv(), name="prod")
    moto.set_actions(key.user, [a for a in PROVIDER_ACTIONS if a != "ec2:TerminateInstances"])
    record, result = await service.verify("prod")
    assert result.missing == ("ec2:TerminateInstances",)
    assert (record.status, record.missing) == ("missing-permissions", ("ec2:TerminateInstances",))
    assert await service.linked_clouds() == []
    moto.set_actions(key.user, PROVIDER_ACTIONS)
    record, _ = await service.verify("prod")
    assert record.status == "ok"
    moto.delete_key(key)
    record, _ = await service.verify("prod")
    assert record.status == "invalid"
    assert "InvalidClientTokenId" in record.message
    await service.remove("prod")
    assert await service.records() == []
    with pytest.raises(AccountNotFound, match="no cloud account named 'prod'"):
        await service.verify("prod")
    with pytest.raises(AccountNotFound, match="no cloud account named 'prod'"):
        await service.remove("prod")


async def test_an_unreachable_endpoint_is_not_an_invalid_key(
    tmp_path: Path, pki: Pki, moto: MotoAws
) -> None:
    service, store = open_service(
        tmp_path / "s", pki, clouds_config(moto_endpoint=f"http://127.0.0.1:{free_port()}")
    )
    try:
        with pytest.raises(CloudUnreachable, match="cannot reach AWS") as caught:
            await service.add(cloud="aws", data=moto.user("fl").console_csv())
        assert caught.value.result is not None
        assert caught.value.result.status == "unreachable"
        assert _rows(service) == []
    finally:
        store.close()
