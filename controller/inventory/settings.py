"""The `[inventory]` section of `controller.toml`."""

from __future__ import annotations

from typing import Annotated

from fedsky.controller.settings import Section
from pydantic import Field


class InventoryConfig(Section):
    offline_after_s: Annotated[float, Field(gt=0)] = 90.0
    history_per_agent: Annotated[int, Field(ge=1, le=100000)] = 200
    # ... and at most this many bytes of it: a hospital sending reports of thousands of VMs
    # keeps a short history, not hundreds of megabytes.
    history_bytes_per_agent: Annotated[int, Field(ge=1 << 20, le=1 << 30)] = 4 << 20
    # Reports an agent may send: a burst, then one per `60 / reports_per_minute` s. Agents
    # report every few seconds and on each change; more is refused and counted.
    reports_per_minute: Annotated[float, Field(gt=0, le=6000)] = 60.0
    report_burst: Annotated[int, Field(ge=1, le=1000)] = 10
    sweep_interval_s: Annotated[float, Field(gt=0)] = 5.0
