"""The ways linking or using a cloud account fails, and scrubbing secrets from SDK messages.

Each kind says what went wrong, not how a transport answers it: the API maps kinds to HTTP
statuses and exit codes in one table (`fedsky.controller.api.errors`). Every message is safe to
show: none quotes a secret.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedsky.controller.clouds.validation import ValidationResult
from fedsky.controller.clouds.vault import Secret


class CloudError(Exception):
    """A cloud account that cannot be linked, verified or used as asked; safe to show.

    `result` is the cloud's answer when a validation ran (shown with the error).
    """

    def __init__(self, message: str, *, result: ValidationResult | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


class CredentialFormatError(CloudError):
    """The uploaded file is not a credential we can read; nothing was sent anywhere."""


class CloudUsageError(CloudError):
    """An argument that cannot be right whatever the cloud says (a region or account name)."""


class UnknownCloud(CloudError):
    """A cloud fedsky has no plug-in for."""


class AccountExists(CloudError):
    """An account of that name is already linked."""


class AccountNotFound(CloudError):
    """No account of that name is linked."""


class CredentialRejected(CloudError):
    """The cloud answered, and refused the credential or found permissions missing."""


class CloudUnreachable(CloudError):
    """The cloud could not be asked (network, endpoint); nothing is known about the credential."""


class SealedCredentialError(CloudError):
    """A linked account's stored credential cannot be opened (another vault key, damaged)."""


def scrub(text: str, secrets: Iterable[str | Secret | None]) -> str:
    """`text` with every secret value replaced: for messages built from SDK errors."""
    for item in secrets:
        value = item.reveal_str() if isinstance(item, Secret) else item
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text[:500]
