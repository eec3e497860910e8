"""The Cloud Authenticator: link cloud accounts by uploading the credential file one has.

A file is read by its cloud's plug-in (never written anywhere as it came), checked by real
calls to the cloud, and only then sealed in the vault (`fedsky.controller.clouds.vault`). The
service knows the clouds only through a table of plug-ins (`catalog.CLOUD_PLUGINS`); what each
cloud accepts and how it is checked is in its folder (`aws/`, `gcp/`).

Endpoints come only from the controller's config, never from an uploaded file.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path

from fedsky.controller.clouds.base import ProviderError
from fedsky.controller.clouds.catalog import CLOUD_PLUGINS
from fedsky.controller.clouds.errors import (
    AccountExists,
    AccountNotFound,
    CloudError,
    CloudUnreachable,
    CloudUsageError,
    CredentialFormatError,
    CredentialRejected,
    SealedCredentialError,
    UnknownCloud,
)
from fedsky.controller.clouds.launcher import CommandLauncher, launcher_clouds, serves
from fedsky.controller.clouds.plugin import CloudCredential, CloudPlugin, CloudProvider
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.clouds.validation import (
    REGION_RE,
    STATUS_INVALID,
    STATUS_OK,
    STATUS_UNREACHABLE,
    ValidationResult,
)
from fedsky.controller.clouds.vault import (
    AccountAlreadyLinked,
    AccountNotLinked,
    CloudRecord,
    Vault,
    VaultError,
    load_vault_key,
    now_iso,
)
from fedsky.controller.config import ControllerConfig
from fedsky.controller.security import bootstrap_tokens
from fedsky.controller.security.bootstrap_tokens import HealthCheck, TokenIssuer, VmBootstrap
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def _default_name(cloud: str, account: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", f"{cloud}-{account}".lower()).strip("-")
    return name[:63].rstrip("-")


def check_name(name: str) -> str:
    """`name` if it can name a linked account; CloudUsageError otherwise."""
    if not _NAME_RE.fullmatch(name):
        raise CloudUsageError(
            f"invalid name {name!r}: use 1-63 characters from a-z, 0-9 and '-', starting with a letter or digit"
        )
    return name


class CloudService:
    """Link, list, verify and remove cloud accounts; make providers for linked ones.

    Every method is async; cloud calls run in threads. `plugins` is the table of clouds this
    service links (the catalog's by default).
    """

    def __init__(
        self,
        *,
        config: CloudsConfig,
        store: Store,
        vault: Vault,
        pki: Pki | None = None,
        health_check: HealthCheck | None = None,
        plugins: Mapping[str, CloudPlugin] = CLOUD_PLUGINS,
        artifacts_dir: Path | None = None,
        artifacts_url: str | None = None,
    ) -> None:
        self.config = config
        # The wheelhouse that pins what aggregator VMs install (`[artifacts]`), and its mirror.
        self.artifacts_dir = artifacts_dir
        self.artifacts_url = artifacts_url
        self.store = store
        self.vault = vault
        self.pki = pki
        self.plugins = plugins
        self._health_check = health_check
        self._uid: str | None = None

    @classmethod
    def open(
        cls,
        *,
        config: ControllerConfig,
        store: Store,
        pki: Pki | None = None,
        health_check: HealthCheck | None = None,
        plugins: Mapping[str, CloudPlugin] = CLOUD_PLUGINS,
    ) -> CloudService:
        """Load the vault key, declare the tables; fails with VaultError on a bad key."""
        Vault.ensure_schema(store)
        bootstrap_tokens.ensure_schema(store)  # the providers issue the VMs' enrolment tokens
        vault = Vault(store, load_vault_key(config.state_dir))
        return cls(
            config=config.clouds,
            store=store,
            vault=vault,
            pki=pki,
            health_check=health_check,
            plugins=plugins,
            artifacts_dir=config.artifacts_dir,
            artifacts_url=config.artifacts.url,
        )

    # -- parse and validate ---------------------------------------------------------------------

    def plugin(self, cloud: str) -> CloudPlugin:
        """The plug-in of `cloud`; UnknownCloud if this service links no such cloud."""
        try:
            return self.plugins[cloud]
        except KeyError:
            raise UnknownCloud(
                f"unknown cloud {cloud!r}: fedsky links {' and '.join(self.plugins)}"
            ) from None

    def parse(self, cloud: str, data: bytes, *, profile: str | None = None) -> CloudCredential:
        """The credential in an uploaded file; CredentialFormatError if it is not one."""
        return self.plugin(cloud).parse(data, profile=profile)

    async def validate(
        self, cloud: str, credential: CloudCredential, *, region: str | None = None
    ) -> ValidationResult:
        """Check `credential` of `cloud` by real calls to the cloud (in a thread)."""
        plugin = self.plugin(cloud)
        if region is not None and not REGION_RE.fullmatch(region):
            raise CloudUsageError(f"{region!r} is not a region name")
        result = await asyncio.to_thread(
            plugin.validate, credential, config=self.config, region=region
        )
        log.info(
            "validated %s credential %s: %s%s",
            result.cloud,
            credential.key_hint,
            result.status,
            f" (missing {', '.join(result.missing)})" if result.missing else "",
        )
        return result

    # -- the operator's commands ----------------------------------------------------------------

    async def add(
        self,
        *,
        cloud: str,
        data: bytes,
        name: str | None = None,
        profile: str | None = None,
        region: str | None = None,
    ) -> tuple[CloudRecord, ValidationResult]:
        """Parse, validate by real calls, then seal and store. Nothing is stored unless valid."""
        if name is not None:
            check_name(name)
            if self.config.launcher is not None and name == self.config.launcher.name:
                raise AccountExists(f"{name!r} names the operator's launcher ([clouds.launcher])")
            if await self.vault.exists(name):
                raise AccountExists(f"a cloud account named {name!r} is already linked")
        cred = self.parse(cloud, data, profile=profile)
        result = await self.validate(cloud, cred, region=region)
        if result.status == STATUS_UNREACHABLE:
            raise CloudUnreachable(result.message, result=result)
        if not result.ok:
            raise CredentialRejected(result.message, result=result)
        assert result.account is not None
        assert result.identity is not None
        name = name or _default_name(cloud, result.account)
        now = now_iso()
        record = CloudRecord(
            name=check_name(name),
            cloud=cloud,
            account=result.account,
            identity=result.identity,
            region=result.region,
            key_hint=cred.key_hint,
            status=result.status,
            missing=result.missing,
            message="; ".join(result.notes),
            created_at=now,
            validated_at=now,
        )
        try:
            await self.vault.add(record, cred.seal_bytes())
        except AccountAlreadyLinked as exc:
            raise AccountExists(str(exc)) from None
        log.info(
            "linked %s account %s as %r (%s)", cloud, record.account, record.name, record.identity
        )
        return record, result

    async def records(self) -> list[CloudRecord]:
        """Every linked account, as `fedctl clouds list` shows it."""
        return await self.vault.list()

    async def _credential(self, name: str) -> tuple[CloudRecord, CloudCredential]:
        try:
            record, secret = await self.vault.secret(name)
        except AccountNotLinked as exc:
            raise AccountNotFound(str(exc)) from None
        except VaultError as exc:
            raise SealedCredentialError(str(exc)) from None
        return record, self.plugin(record.cloud).unseal(secret)

    async def verify(
        self, name: str, *, region: str | None = None
    ) -> tuple[CloudRecord, ValidationResult]:
        """Validate a linked account again and store the outcome (status, missing, when)."""
        record, cred = await self._credential(name)
        try:
            result = await self.validate(record.cloud, cred, region=region or record.region)
        except CredentialFormatError as exc:  # e.g. a token_uri no longer allowed by the config
            result = ValidationResult(
                record.cloud,
                STATUS_INVALID,
                record.account,
                record.identity,
                record.region,
                message=exc.message,
            )
        message = result.message or "; ".join(result.notes)
        updated = await self.vault.update_status(
            name,
            status=result.status,
            missing=result.missing,
            message=message,
            account=result.account,
            identity=result.identity,
        )
        return updated, result

    async def remove(self, name: str) -> None:
        try:
            await self.vault.remove(name)
        except AccountNotLinked as exc:
            raise AccountNotFound(str(exc)) from None
        log.info("removed linked cloud account %r", name)

    # -- what the job pipeline calls --------------------------------------------------------------

    async def linked_clouds(self) -> list[str]:
        """Clouds with at least one account whose last validation passed, and the clouds the
        operator's launcher boots (`[clouds.launcher]`): where jobs may go."""
        linked = {r.cloud for r in await self.vault.list() if r.status == STATUS_OK}
        return sorted(linked | set(launcher_clouds(self.config.launcher)))

    async def controller_uid(self) -> str:
        """This controller's id in cloud tags: another controller's VMs are never swept."""
        if self._uid is None:
            self._uid = await self.vault.meta("controller_uid", uuid.uuid4().hex[:12])
        return self._uid

    async def _bootstrap(self) -> VmBootstrap:
        if self.pki is None:
            raise ProviderError("the controller has no CA loaded; cannot launch an aggregator VM")
        ca_pem = self.pki.ca_cert_pem
        return VmBootstrap(
            tokens=TokenIssuer(self.store, self.config.token_ttl_s),
            enroll_url=self.config.enroll_url,
            ca_pem=ca_pem,
            superlink_port=self.config.superlink_port,
            preinstalled=self.config.preinstalled,
            health_check=self._health_check or bootstrap_tokens.tls_probe(ca_pem),
            ready_timeout_s=self.config.ready_timeout_s,
            poll_interval_s=self.config.poll_interval_s,
            controller_uid=await self.controller_uid(),
            artifacts_dir=self.artifacts_dir,
            artifacts_url=self.artifacts_url,
        )

    async def launcher(self) -> CommandLauncher:
        """The operator's launcher (`[clouds.launcher]`); ProviderError when none is configured."""
        if self.config.launcher is None:
            raise ProviderError("no [clouds.launcher] is configured")
        return CommandLauncher(config=self.config.launcher, bootstrap=await self._bootstrap())

    async def provider(self, name: str) -> CloudProvider:
        """The provider for the linked account `name`, as stored (no validation), or the
        operator's launcher by its name."""
        if self.config.launcher is not None and name == self.config.launcher.name:
            return await self.launcher()
        record, cred = await self._credential(name)
        return self.plugin(record.cloud).provider(
            cred, config=self.config, bootstrap=await self._bootstrap(), account_name=record.name
        )

    async def provider_for_launch(
        self, cloud: str, *, region: str, name: str | None = None
    ) -> CloudProvider:
        """A provider for `cloud` whose credential validates now, in `region`; ProviderError if none.

        Tries the named account, or every account linked for `cloud` (last known good first);
        each check updates the stored status, so `fedctl clouds list` shows why a launch was refused.
        The operator's launcher, when it serves `cloud`, boots it instead (no account is used).
        """
        if name is None and serves(self.config.launcher, cloud):
            return await self.launcher()
        if cloud not in self.plugins:
            raise ProviderError(
                f"fedsky cannot launch on {cloud!r}: its cloud providers are {', '.join(self.plugins)}"
            )
        records = [r for r in await self.vault.list(cloud) if name is None or r.name == name]
        if not records:
            what = f"account {name!r}" if name else f"{cloud} account"
            raise ProviderError(
                f"no {what} is linked; link one with `fedctl clouds add {cloud} FILE`"
            )
        records.sort(key=lambda r: (r.status != STATUS_OK, r.name))
        refusals = []
        for record in records:
            try:
                updated, result = await self.verify(record.name, region=region)
            except CloudError as exc:
                refusals.append(f"{record.name}: {exc.message}")
                continue
            if result.ok:
                return await self.provider(updated.name)
            refusals.append(f"{record.name}: {result.status}: {result.message}")
        raise ProviderError(
            f"refusing to launch on {cloud} in {region}: no linked credential validates now ("
            + "; ".join(refusals)
            + ")"
        )

    async def sweep_orphans(self, active_job_ids: Collection[str]) -> list[str]:
        """Terminate fedsky's VMs (and firewall rules) on every linked account whose job is not active.

        Called once at start with the jobs that are still running. Returns the references of what
        was terminated ("aws:us-east-1/i-...", "gcp:europe-west1-b/fedsky-agg-..."). An account
        that cannot be reached is logged and skipped: the next start sweeps it again.
        """
        swept: list[str] = []
        if self.config.launcher is not None:
            try:
                swept.extend(await (await self.launcher()).sweep_orphans(active_job_ids))
            except ProviderError as exc:
                log.warning("orphan sweep skipped launcher %r: %s", self.config.launcher.name, exc)
        for record in await self.vault.list():
            try:
                provider = await self.provider(record.name)
                swept.extend(await provider.sweep_orphans(active_job_ids))
            except (CloudError, ProviderError, VaultError) as exc:
                log.warning("orphan sweep skipped account %r: %s", record.name, exc)
        return swept
