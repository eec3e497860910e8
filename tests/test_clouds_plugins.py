"""The Cloud Authenticator knows clouds only through its table of plug-ins.

A third cloud, registered in a test's own table, is parsed, validated, sealed, verified and
launched on without any change to the service; a cloud missing from the table is refused.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fedsky.controller.clouds.base import (
    AggregatorFiles,
    AggregatorHandle,
    AggregatorSpec,
    ProviderError,
)
from fedsky.controller.clouds.catalog import CLOUD_PLUGINS
from fedsky.controller.clouds.errors import (
    CredentialFormatError,
    CredentialRejected,
    UnknownCloud,
)
from fedsky.controller.clouds.plugin import CloudCredential, CloudPlugin
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.clouds.validation import STATUS_MISSING, STATUS_OK, ValidationResult
from fedsky.controller.clouds.vault import Secret
from fedsky.controller.security.bootstrap_tokens import VmBootstrap
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store

from tests.fakes.clouds import ENROLL_URL, clouds_config, open_service

TOKEN = "moon-token-0123456789"


@dataclass(frozen=True)
class MoonCredential:
    account: str
    token: Secret

    @property
    def key_hint(self) -> str:
        return f"...{self.token.reveal_str()[-4:]}"

    def secrets(self) -> tuple[str | Secret | None, ...]:
        return (self.token,)

    def seal_bytes(self) -> Secret:
        return Secret(json.dumps({"account": self.account, "token": self.token.reveal_str()}))


@dataclass
class MoonProvider:
    account_name: str
    bootstrap: VmBootstrap
    name: str = "moon"
    swept: list[Collection[str]] = field(default_factory=list)

    def aggregator_files(self, job_id: str, *, model_file: Path) -> AggregatorFiles:
        return AggregatorFiles(model_file, Path("ca"), Path("cert"), Path("key"))

    async def launch(self, spec: AggregatorSpec) -> AggregatorHandle:
        return AggregatorHandle(self.name, spec.job_id, f"crater-{spec.job_id}", spec.region)

    async def healthy(self, handle: AggregatorHandle) -> bool:
        return True

    async def address(self, handle: AggregatorHandle) -> str:
        return "192.0.2.9:9092"

    async def terminate(self, handle: AggregatorHandle) -> None:
        return None

    async def sweep_orphans(self, active_job_ids: Collection[str]) -> list[str]:
        self.swept.append(active_job_ids)
        return [f"moon:{self.account_name}/crater-old"]


@dataclass
class MoonPlugin:
    """A cloud whose credential file is `moon:<account>:<token>`; account `denied` lacks rights."""

    name: str = "moon"
    calls: list[str] = field(default_factory=list)

    def parse(self, data: bytes, *, profile: str | None = None) -> MoonCredential:
        self.calls.append("parse")
        kind, _, rest = data.decode(errors="replace").strip().partition(":")
        account, _, token = rest.partition(":")
        if kind != "moon" or not account or not token:
            raise CredentialFormatError("not a moon credential")
        return MoonCredential(account, Secret(token))

    def unseal(self, secret: Secret) -> MoonCredential:
        self.calls.append("unseal")
        body = json.loads(secret.reveal())
        return MoonCredential(body["account"], Secret(body["token"]))

    def validate(
        self, credential: CloudCredential, *, config: CloudsConfig, region: str | None
    ) -> ValidationResult:
        assert isinstance(credential, MoonCredential)
        self.calls.append(f"validate {credential.account} in {region}")
        denied = credential.account == "denied"
        return ValidationResult(
            "moon",
            STATUS_MISSING if denied else STATUS_OK,
            credential.account,
            f"robot@{credential.account}",
            region or "sea-of-tranquility",
            missing=("moon:Launch",) if denied else (),
            message="lacks moon:Launch" if denied else "",
        )

    def provider(
        self,
        credential: CloudCredential,
        *,
        config: CloudsConfig,
        bootstrap: VmBootstrap,
        account_name: str,
    ) -> MoonProvider:
        self.calls.append(f"provider {account_name}")
        return MoonProvider(account_name=account_name, bootstrap=bootstrap)


@pytest.fixture
def moon() -> MoonPlugin:
    return MoonPlugin()


@pytest.fixture
def service(tmp_path: Path, pki: Pki, moon: MoonPlugin) -> Iterator[CloudService]:
    plugins: dict[str, CloudPlugin] = {"moon": moon}
    linked, store = open_service(tmp_path / "state", pki, clouds_config(), plugins=plugins)
    yield linked
    store.close()


def _sealed(store: Store) -> bytes:
    return b"".join(
        bytes(row["sealed"])
        for row in store.call(lambda conn: conn.execute("SELECT sealed FROM clouds").fetchall())
    )


async def test_a_cloud_in_the_table_is_linked_verified_and_launched_on(
    service: CloudService, moon: MoonPlugin
) -> None:
    record, result = await service.add(
        cloud="moon", data=f"moon:apollo:{TOKEN}".encode(), region="mare-imbrium"
    )
    assert (record.name, record.cloud, record.account, record.key_hint) == (
        "moon-apollo",
        "moon",
        "apollo",
        "...6789",
    )
    assert result.region == "mare-imbrium"
    assert moon.calls == ["parse", "validate apollo in mare-imbrium"]
    assert TOKEN.encode() not in _sealed(service.store)  # sealed by the vault, whatever the cloud
    assert await service.linked_clouds() == ["moon"]

    moon.calls.clear()
    updated, _ = await service.verify("moon-apollo")
    assert updated.status == STATUS_OK
    assert moon.calls == ["unseal", "validate apollo in mare-imbrium"]

    moon.calls.clear()
    provider = await service.provider_for_launch("moon", region="mare-serenitatis")
    assert isinstance(provider, MoonProvider)
    assert moon.calls == [
        "unseal",
        "validate apollo in mare-serenitatis",
        "unseal",
        "provider moon-apollo",
    ]
    assert provider.account_name == "moon-apollo"
    assert provider.bootstrap.enroll_url == ENROLL_URL
    assert provider.bootstrap.controller_uid == await service.controller_uid()

    assert await service.sweep_orphans(["job-1"]) == ["moon:moon-apollo/crater-old"]


async def test_the_plugins_answer_decides_what_is_stored(
    service: CloudService, moon: MoonPlugin
) -> None:
    with pytest.raises(CredentialFormatError, match="not a moon credential"):
        await service.add(cloud="moon", data=b"sun:apollo:x")
    with pytest.raises(CredentialRejected, match="lacks moon:Launch") as caught:
        await service.add(cloud="moon", data=f"moon:denied:{TOKEN}".encode())
    assert caught.value.result is not None
    assert caught.value.result.missing == ("moon:Launch",)
    assert await service.records() == []


async def test_a_cloud_missing_from_the_table_is_refused(
    service: CloudService, moon: MoonPlugin
) -> None:
    with pytest.raises(UnknownCloud, match="unknown cloud 'aws': fedsky links moon"):
        await service.add(cloud="aws", data=b"Access key ID,Secret access key\n")
    with pytest.raises(ProviderError, match="its cloud providers are moon"):
        await service.provider_for_launch("aws", region="us-east-1")
    assert moon.calls == []


def test_the_catalog_lists_aws_then_gcp() -> None:
    assert list(CLOUD_PLUGINS) == ["aws", "gcp"]
    assert all(name == plugin.name for name, plugin in CLOUD_PLUGINS.items())
