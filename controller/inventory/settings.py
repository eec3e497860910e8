"""The `[inventory]` section of `controller.toml`."""

from __future__ import annotations

from typing import Annotated

from fedsky.controller.settings import Section
from pydantic import Field


class InventoryConfig(Section):
    offline_after_s: Annotated[float, Field(gt=0)] = 90.0
    history_per_agent: Annotated[int, Field(ge=1, le=100000)] = 200
    sweep_interval_s: Annotated[float, Field(gt=0)] = 5.0
