"""The enrolment bundle the controller hands a hospital: never a private key.

`fedctl agents enroll NAME --location L --csr FILE` writes one; `agentctl enroll BUNDLE`
installs it next to the key that `agentctl enroll request NAME` made.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

from fedsky.shared.ids import AGENT_ID_PATTERN, check_location
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

BUNDLE_SCHEMA = "1.0"


class BundleError(ValueError):
    """A bundle file that cannot be used."""


class EnrolmentBundle(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_: str = Field(default=BUNDLE_SCHEMA, alias="schema", pattern=r"^1\.\d+$")
    agent_id: Annotated[str, Field(pattern=AGENT_ID_PATTERN)]
    location: str
    ca_pem: Annotated[str, Field(max_length=65536)]
    cert_pem: Annotated[str, Field(max_length=65536)]
    broker_host: Annotated[str, Field(min_length=1, max_length=253)]
    broker_port: Annotated[int, Field(ge=1, le=65535)]
    topic_prefix: str
    not_after: datetime

    @field_validator("location")
    @classmethod
    def _location(cls, value: str) -> str:
        return check_location(value)

    @field_validator("ca_pem", "cert_pem")
    @classmethod
    def _no_keys(cls, value: str) -> str:
        if "PRIVATE KEY" in value:
            raise ValueError("a bundle must not carry a private key")
        if "BEGIN CERTIFICATE" not in value:
            raise ValueError("expected a PEM certificate")
        return value

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def read_bundle(path: Path) -> EnrolmentBundle:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read bundle: {exc}") from None
    try:
        return EnrolmentBundle.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "bundle"
        raise BundleError(
            f"{path}: not a fedsky enrolment bundle: {where}: {first.get('msg')}"
        ) from None
