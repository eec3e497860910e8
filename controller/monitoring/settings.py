"""The `[metrics]` section of `controller.toml`."""

from __future__ import annotations

from fedsky.controller.settings import Section, check_bind_host
from pydantic import field_validator


class MetricsConfig(Section):
    # "host:port" of the metrics listener (plain HTTP, no authentication); unset: none.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port (e.g. 127.0.0.1:9464), not {value[:80]!r}")
        check_bind_host(host.strip("[]"))
        return value
