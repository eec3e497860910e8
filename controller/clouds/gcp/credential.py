"""GCP credentials: a service-account key file; any other Google credential file is refused.

`authorized_user`, `external_account` and the other Google credential types are refused with
what to make instead. The key's `token_uri` is kept but used only as `validate.gcp_token_uri`
allows: a key file must not choose where the controller sends its signed assertions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fedsky.controller.clouds.errors import CredentialFormatError
from fedsky.controller.clouds.plugin import decode_credential_file
from fedsky.controller.clouds.vault import Secret

GOOGLE_UNIVERSE = "googleapis.com"

_GCP_OTHER_TYPES = {
    "authorized_user": "a user's credential (from `gcloud auth application-default login`), not a "
    "service-account key",
    "external_account": "a workload identity federation configuration, not a service-account key",
    "impersonated_service_account": "an impersonation configuration, not a service-account key",
    "external_account_authorized_user": "a workforce identity user credential, not a service-account key",
    "gdch_service_account": "a Google Distributed Cloud Hosted credential, not a service-account key",
}


@dataclass(frozen=True)
class GcpCredential:
    """A service-account key: who it is, and the key file itself (sealed, never shown)."""

    project_id: str
    client_email: str
    private_key_id: str
    token_uri: str
    info: Secret  # the key file's JSON (holds the private key)

    def __repr__(self) -> str:
        return f"GcpCredential(project={self.project_id!r}, email={self.client_email!r})"

    @property
    def key_hint(self) -> str:
        return f"...{self.private_key_id[-6:]}"

    def secrets(self) -> tuple[str | Secret | None, ...]:
        doc = json.loads(self.info.reveal())
        key = str(doc.get("private_key", ""))
        # The PEM's base64 lines each identify the key; scrub any that an error might quote.
        return (self.info, key, *[line for line in key.splitlines() if len(line) > 20])

    def seal_bytes(self) -> Secret:
        return self.info

    @classmethod
    def from_sealed(cls, secret: Secret) -> GcpCredential:
        return parse_gcp(secret.reveal())


def parse_gcp(data: bytes) -> GcpCredential:
    """A GCP service-account key; any other Google credential file is refused, saying what it is."""
    text = decode_credential_file(data, "GCP key")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CredentialFormatError(
            f"the GCP key file does not parse as JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}; "
            "is it truncated?"
        ) from None
    if not isinstance(doc, dict):
        raise CredentialFormatError("the GCP key file must hold a JSON object")
    kind = doc.get("type")
    if kind is not None and not isinstance(kind, str):
        raise CredentialFormatError("not a GCP service-account key (its 'type' is not a string)")
    if kind in _GCP_OTHER_TYPES:
        raise CredentialFormatError(
            f"this file is {_GCP_OTHER_TYPES[kind]}; fedsky needs a service-account key: "
            "`gcloud iam service-accounts keys create key.json --iam-account NAME@PROJECT.iam.gserviceaccount.com`"
        )
    if kind != "service_account":
        raise CredentialFormatError(
            f"not a GCP service-account key (its type is {kind!r}, expected 'service_account')"
            if kind is not None
            else "not a GCP service-account key (no 'type' field)"
        )
    required = ("project_id", "private_key_id", "private_key", "client_email", "token_uri")
    missing = [f for f in required if not isinstance(doc.get(f), str) or not doc[f].strip()]
    if missing:
        raise CredentialFormatError(
            f"the service-account key lacks {', '.join(missing)}; the file may be truncated"
        )
    try:
        key = serialization.load_pem_private_key(doc["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise CredentialFormatError(
            "the service-account key's private_key does not load (truncated or edited?)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialFormatError("the service-account key's private_key is not an RSA key")
    universe = doc.get("universe_domain", GOOGLE_UNIVERSE)
    if universe != GOOGLE_UNIVERSE:
        raise CredentialFormatError(
            f"the key belongs to universe {universe!r}; fedsky links keys of {GOOGLE_UNIVERSE} only"
        )
    return GcpCredential(
        project_id=doc["project_id"].strip(),
        client_email=doc["client_email"].strip(),
        private_key_id=doc["private_key_id"].strip(),
        token_uri=doc["token_uri"].strip(),
        info=Secret(json.dumps(doc).encode()),
    )
