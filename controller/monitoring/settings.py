"""The `[metrics]` section of `controller.toml`."""

from __future__ import annotations

from fedsky.controller.settings import Section, check_bind_host
from fedsky.shared.net import parse_listen
from pydantic import field_validator


class MetricsConfig(Section):
    # "host:port" of the metrics listener (plain HTTP, no authentication); unset: none.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _ = parse_listen(value)
        check_bind_host(host)
        return value
