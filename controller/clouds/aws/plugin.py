"""The aws plug-in: AWS access keys, validated against STS and EC2, aggregators on EC2."""

from __future__ import annotations

from fedsky.controller.clouds.aws.credential import AwsCredential, parse_aws
from fedsky.controller.clouds.aws.provider import AwsProvider
from fedsky.controller.clouds.aws.validate import validate_aws
from fedsky.controller.clouds.plugin import CloudCredential
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.clouds.validation import ValidationResult
from fedsky.controller.clouds.vault import Secret
from fedsky.controller.security.bootstrap_tokens import VmBootstrap


def _own(credential: CloudCredential) -> AwsCredential:
    # The service pairs each credential with the plug-in that made it; anything else is a bug.
    if not isinstance(credential, AwsCredential):
        raise TypeError(f"the aws plug-in was given {credential!r}")
    return credential


class AwsPlugin:
    name = "aws"
    credential_files = "the console's access-key CSV, a JSON key pair or a credentials ini file"
    holder = "account"

    def parse(self, data: bytes, *, profile: str | None = None) -> AwsCredential:
        return parse_aws(data, profile=profile)

    def unseal(self, secret: Secret) -> AwsCredential:
        return AwsCredential.from_sealed(secret)

    def validate(
        self, credential: CloudCredential, *, config: CloudsConfig, region: str | None
    ) -> ValidationResult:
        return validate_aws(_own(credential), config=config.aws, region=region)

    def provider(
        self,
        credential: CloudCredential,
        *,
        config: CloudsConfig,
        bootstrap: VmBootstrap,
        account_name: str,
    ) -> AwsProvider:
        return AwsProvider(
            credential=_own(credential),
            config=config.aws,
            bootstrap=bootstrap,
            account_name=account_name,
        )


AWS_PLUGIN = AwsPlugin()
