"""The `[broker]` and `[bus]` sections of `controller.toml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fedsky.controller.settings import Port, Section
from fedsky.shared.topics import DEFAULT_PREFIX
from pydantic import Field


class BrokerConfig(Section):
    managed: bool = True
    host: str = "127.0.0.1"
    port: Port = 8883
    # Name agents use to reach the broker (written into enrolment bundles); default: `host`.
    public_host: str | None = None
    mosquitto_bin: str = "mosquitto"
    # External broker only: the CA that signed its server certificate (default: fedsky's CA).
    ca_file: Path | None = None


class BusConfig(Section):
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")] = (
        DEFAULT_PREFIX
    )
    command_ttl_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
