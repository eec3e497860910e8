"""The `[api]` section of `controller.toml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fedsky.controller.settings import Section
from pydantic import Field


class ApiConfig(Section):
    # Unix socket (default: <state_dir>/controller.sock) and/or a TCP listener (host:port).
    socket: Path | None = None
    socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    tcp: Annotated[str, Field(pattern=r"^[^:]+:\d{1,5}$")] | None = None
