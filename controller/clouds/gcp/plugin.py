"""The gcp plug-in: service-account keys, validated against OAuth, Compute Engine and Cloud
Resource Manager, aggregators on Compute Engine."""

from __future__ import annotations

from fedsky.controller.clouds.errors import CredentialFormatError
from fedsky.controller.clouds.gcp.credential import GcpCredential, parse_gcp
from fedsky.controller.clouds.gcp.provider import GcpProvider
from fedsky.controller.clouds.gcp.validate import gcp_token_uri, validate_gcp
from fedsky.controller.clouds.plugin import CloudCredential
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.clouds.validation import ValidationResult
from fedsky.controller.clouds.vault import Secret
from fedsky.controller.security.bootstrap_tokens import VmBootstrap


def _own(credential: CloudCredential) -> GcpCredential:
    # The service pairs each credential with the plug-in that made it; anything else is a bug.
    if not isinstance(credential, GcpCredential):
        raise TypeError(f"the gcp plug-in was given {credential!r}")
    return credential


class GcpPlugin:
    name = "gcp"
    credential_files = "a service-account JSON key"
    holder = "project"

    def parse(self, data: bytes, *, profile: str | None = None) -> GcpCredential:
        if profile is not None:
            raise CredentialFormatError("--profile applies to AWS credentials ini files only")
        return parse_gcp(data)

    def unseal(self, secret: Secret) -> GcpCredential:
        return GcpCredential.from_sealed(secret)

    def validate(
        self, credential: CloudCredential, *, config: CloudsConfig, region: str | None
    ) -> ValidationResult:
        cred = _own(credential)
        gcp_token_uri(cred, config.gcp)  # refuse a key's own endpoint before anything is sent
        return validate_gcp(cred, config=config.gcp, region=region)

    def provider(
        self,
        credential: CloudCredential,
        *,
        config: CloudsConfig,
        bootstrap: VmBootstrap,
        account_name: str,
    ) -> GcpProvider:
        return GcpProvider(
            credential=_own(credential),
            config=config.gcp,
            bootstrap=bootstrap,
            account_name=account_name,
        )


GCP_PLUGIN = GcpPlugin()
