"""Linking GCP projects through google-auth and google-cloud-compute, against the local fake."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedsky.controller.clouds.errors import CredentialFormatError, CredentialRejected
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.security.pki import Pki

from tests.fakes.clouds import clouds_config, open_service
from tests.fakes.gcp_server import ALL_PERMISSIONS, FakeGcp, make_service_account_key, running_fake


@pytest.fixture
def fake() -> Iterator[FakeGcp]:
    with running_fake() as server:
        yield server


@pytest.fixture
def service(tmp_path: Path, pki: Pki, fake: FakeGcp) -> Iterator[CloudService]:
    svc, store = open_service(tmp_path / "state", pki, clouds_config(gcp=fake))
    yield svc
    store.close()


def _key_bytes(info: dict[str, object]) -> bytes:
    return json.dumps(info, indent=2).encode()


async def _stored(service: CloudService) -> list[str]:
    return [r.name for r in await service.records()]


async def test_a_service_account_key_links_the_project(
    service: CloudService, fake: FakeGcp
) -> None:
    info = fake.new_key()
    record, result = await service.add(cloud="gcp", data=_key_bytes(info), region="europe-west1")
    assert (record.name, record.cloud, record.account) == ("gcp-fedsky-test", "gcp", "fedsky-test")
    assert record.identity == "fedsky@fedsky-test.iam.gserviceaccount.com"
    assert (record.status, record.missing, record.region) == ("ok", (), "europe-west1")
    assert result.ok
    assert fake.token_requests >= 1  # the token exchange really happened
    paths = [path for _, path in fake.requests]
    assert "/compute/v1/projects/fedsky-test/zones" in paths
    assert "/v1/projects/fedsky-test:testIamPermissions" in paths
    assert await service.linked_clouds() == ["gcp"]


async def test_a_key_the_token_endpoint_refuses_is_invalid_grant(
    service: CloudService, fake: FakeGcp
) -> None:
    registered = fake.new_key()
    # Same account and key id, another private key: as if the key had been deleted and re-made.
    forged, _ = make_service_account_key(
        project=fake.project, email=str(registered["client_email"]), token_uri=fake.token_uri
    )
    with pytest.raises(
        CredentialRejected,
        match=r"Google refused the key \(invalid_grant: Invalid JWT Signature.\)",
    ):
        await service.add(cloud="gcp", data=_key_bytes(forged))
    unknown, _ = make_service_account_key(
        project=fake.project, email="ghost@x.iam.gserviceaccount.com", token_uri=fake.token_uri
    )
    with pytest.raises(CredentialRejected, match="invalid_grant: Invalid grant: account not found"):
        await service.add(cloud="gcp", data=_key_bytes(unknown))
    assert await _stored(service) == []


async def test_a_key_without_instances_insert_permission_names_it(
    service: CloudService, fake: FakeGcp
) -> None:
    info = fake.new_key(
        "viewer",
        permissions=ALL_PERMISSIONS - {"compute.instances.create", "compute.firewalls.create"},
    )
    with pytest.raises(CredentialRejected) as caught:
        await service.add(cloud="gcp", data=_key_bytes(info))
    result = caught.value.result
    assert result is not None
    assert result.status == "missing-permissions"
    assert result.missing == ("compute.instances.create", "compute.firewalls.create")
    assert (result.account, result.identity) == (
        "fedsky-test",
        "viewer@fedsky-test.iam.gserviceaccount.com",
    )
    assert (
        "in project fedsky-test lacks compute.instances.create, compute.firewalls.create"
        in caught.value.message
    )
    no_zones = fake.new_key("nozones", permissions={"compute.instances.create"})
    with pytest.raises(CredentialRejected, match=r"lacks compute\.zones\.list"):
        await service.add(cloud="gcp", data=_key_bytes(no_zones))
    assert await _stored(service) == []


async def test_wrong_file_types_unknown_regions_and_truncation(
    service: CloudService, fake: FakeGcp
) -> None:
    authorized_user = {
        "type": "authorized_user",
        "client_id": "1",
        "client_secret": "s",
        "refresh_token": "r",
    }
    with pytest.raises(
        CredentialFormatError, match=r"a user's credential .* not a service-account key"
    ):
        await service.add(cloud="gcp", data=_key_bytes(authorized_user))
    info = fake.new_key()
    with pytest.raises(CredentialRejected, match="unknown GCP region 'mars-north1'"):
        await service.add(cloud="gcp", data=_key_bytes(info), region="mars-north1")
    with pytest.raises(CredentialFormatError, match="truncated"):
        await service.add(cloud="gcp", data=_key_bytes(info)[:-200])
    other_project = {**info, "project_id": "elsewhere"}
    with pytest.raises(CredentialRejected, match="project 'elsewhere' does not exist"):
        await service.add(cloud="gcp", data=_key_bytes(other_project))
    assert await _stored(service) == []


async def test_a_foreign_token_uri_is_never_contacted(
    tmp_path: Path, pki: Pki, fake: FakeGcp
) -> None:
    """A key whose token_uri points elsewhere would hand that place an assertion it can replay at Google."""
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(1)
    trap.setblocking(False)
    trap_uri = f"http://127.0.0.1:{trap.getsockname()[1]}/token"
    try:
        # The config names the fake's endpoints but does not set `token_uri`: the key's is judged.
        config = clouds_config(gcp=fake)
        service, store = open_service(tmp_path / "s", pki, config)
        info = fake.new_key()
        info["token_uri"] = trap_uri
        with pytest.raises(CredentialFormatError, match="token_uri is not a Google token endpoint"):
            await service.add(cloud="gcp", data=_key_bytes(info))
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody knocked
        assert fake.token_requests == 0
        assert await _stored(service) == []
        store.close()
        # With the fake named as *the* token endpoint in the config, the same key links.
        named = config.gcp.model_copy(
            update={"token_uri": fake.token_uri, "allowed_token_uris": ()}
        )
        service, store = open_service(tmp_path / "t", pki, config.model_copy(update={"gcp": named}))
        record, _ = await service.add(cloud="gcp", data=_key_bytes(info))
        assert record.status == "ok"
        with pytest.raises(BlockingIOError):
            trap.accept()
        store.close()
    finally:
        trap.close()


async def test_verify_follows_what_gcp_says_now(service: CloudService, fake: FakeGcp) -> None:
    info = fake.new_key()
    await service.add(cloud="gcp", data=_key_bytes(info), name="research")
    fake.accounts[str(info["client_email"])].permissions.discard("compute.instances.delete")
    record, _ = await service.verify("research")
    assert (record.status, record.missing) == ("missing-permissions", ("compute.instances.delete",))
    del fake.accounts[str(info["client_email"])]  # the key was deleted in the console
    record, _ = await service.verify("research")
    assert record.status == "invalid"
    assert "invalid_grant" in record.message
