"""The `[broker]` and `[bus]` sections of `controller.toml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fedsky.controller.settings import (
    Port,
    Section,
    advertised_for,
    check_bind_host,
    is_wildcard,
)
from fedsky.shared.topics import DEFAULT_PREFIX
from pydantic import Field, ValidationInfo, field_validator


class BrokerConfig(Section):
    managed: bool = True
    # A managed broker: the address Mosquitto binds (an IP address, 0.0.0.0 / :: for every
    # address, or localhost). An external broker: the address the controller connects to.
    host: str = "127.0.0.1"
    port: Port = 8883
    # The name agents reach the broker at: written into enrolment bundles and into the managed
    # broker's certificate. Default: `host`; required when `host` is a wildcard.
    public_host: str | None = Field(default=None, validate_default=True)
    mosquitto_bin: str = "mosquitto"
    # External broker only: the CA that signed its server certificate (default: fedsky's CA).
    ca_file: Path | None = None

    @field_validator("host")
    @classmethod
    def _bind(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("managed", True):
            return check_bind_host(value)
        if not value.strip() or is_wildcard(value):
            raise ValueError("an external broker's host must be the address to connect to")
        return value

    @field_validator("public_host")
    @classmethod
    def _advertised(cls, value: str | None, info: ValidationInfo) -> str | None:
        host = info.data.get("host")
        if host is None:  # `host` itself was refused: that error says enough
            return value
        return advertised_for("broker.host", host, value, "broker.public_host")

    @property
    def connect_host(self) -> str:
        """Where the controller itself reaches the broker (loopback for a wildcard bind)."""
        if self.host == "::":
            return "::1"
        return "127.0.0.1" if is_wildcard(self.host) else self.host


class BusConfig(Section):
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")] = (
        DEFAULT_PREFIX
    )
    command_ttl_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
