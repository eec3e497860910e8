"""What a cloud plug-in provides to the Cloud Authenticator, and what the plug-ins share.

A plug-in reads the credential files its cloud hands out, checks a credential by real calls,
and makes the aggregator provider for a linked account. `CloudService` knows clouds only
through a table of plug-ins (`fedsky.controller.clouds.catalog`): a new cloud is a folder
beside `aws/` and `gcp/` with a plug-in, a row in that table, and its `[clouds.<name>]`
settings.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from fedsky.controller.clouds.base import AggregatorProvider
from fedsky.controller.clouds.errors import CredentialFormatError
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.clouds.validation import ValidationResult
from fedsky.controller.clouds.vault import Secret
from fedsky.controller.security.bootstrap_tokens import VmBootstrap

# Credential files are small; anything bigger is not one, and is refused before it is read.
MAX_FILE_BYTES = 64 * 1024


class CloudCredential(Protocol):
    """A parsed credential: what the service stores and shows of it, never the secret itself."""

    @property
    def key_hint(self) -> str:
        """A few characters that tell keys apart in a listing ("...WXYZ")."""
        ...

    def secrets(self) -> tuple[str | Secret | None, ...]:
        """Every value an error message must not quote (see `errors.scrub`)."""
        ...

    def seal_bytes(self) -> Secret:
        """What the vault seals: enough for the plug-in's `unseal` to rebuild the credential."""
        ...


class CloudProvider(AggregatorProvider, Protocol):
    """An aggregator provider on a linked cloud account."""

    account_name: str

    async def sweep_orphans(self, active_job_ids: Collection[str]) -> list[str]:
        """Remove this controller's VMs (and what goes with them) whose job is not active.

        Returns a reference per VM removed ("aws:us-east-1/i-...").
        """
        ...


class CloudPlugin(Protocol):
    """One cloud: reading its credential files, validating them, launching on it."""

    @property
    def name(self) -> str:
        """The cloud's name in commands, records and offers ("aws")."""
        ...

    @property
    def credential_files(self) -> str:
        """Which files `fedctl clouds add <cloud> FILE` takes, for its help."""
        ...

    @property
    def holder(self) -> str:
        """What a credential belongs to in this cloud's words ("account", "project")."""
        ...

    def parse(self, data: bytes, *, profile: str | None = None) -> CloudCredential:
        """The credential in an uploaded file; CredentialFormatError if it is not one."""
        ...

    def unseal(self, secret: Secret) -> CloudCredential:
        """The credential from what `seal_bytes` gave the vault."""
        ...

    def validate(
        self, credential: CloudCredential, *, config: CloudsConfig, region: str | None
    ) -> ValidationResult:
        """Check `credential` by real calls to the cloud (blocking: run it in a thread)."""
        ...

    def provider(
        self,
        credential: CloudCredential,
        *,
        config: CloudsConfig,
        bootstrap: VmBootstrap,
        account_name: str,
    ) -> CloudProvider:
        """The aggregator provider acting with `credential` (no cloud call is made here)."""
        ...


def decode_credential_file(data: bytes, what: str) -> str:
    """An uploaded file's text; CredentialFormatError if it is empty, too big or not UTF-8."""
    if not data.strip():
        raise CredentialFormatError(f"the {what} file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise CredentialFormatError(
            f"the {what} file is {len(data)} bytes; credential files are under {MAX_FILE_BYTES // 1024} KiB"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CredentialFormatError(f"the {what} file is not UTF-8 text") from None
