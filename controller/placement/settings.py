"""The `[placement]` section of `controller.toml`: the optimizer's figures that change with time.

The defaults are today's: edit them when they change (the dates are in docs/placement.md).
"""

from __future__ import annotations

from typing import Annotated

from fedsky.controller.placement.defaults import BASELINE_OFFER, DEFAULT_KRW_PER_USD
from fedsky.controller.settings import Section
from pydantic import Field, field_validator


class PlacementConfig(Section):
    # Won per US dollar, for limits and reports in KRW (prices in the catalog are in USD).
    krw_per_usd: Annotated[float, Field(gt=0, le=1_000_000)] = DEFAULT_KRW_PER_USD
    # What an operator runs without the optimizer, every choice is compared with:
    # "cloud:region:instance_type".
    baseline: str = ":".join(BASELINE_OFFER)

    @field_validator("baseline")
    @classmethod
    def _offer(cls, value: str) -> str:
        parts = value.split(":")
        if len(parts) != 3 or not all(parts):
            raise ValueError(
                f"expected 'cloud:region:instance_type' (e.g. 'aws:us-east-1:m5.xlarge'), "
                f"not {value!r}"
            )
        return value

    @property
    def baseline_offer(self) -> tuple[str, str, str]:
        cloud, region, instance_type = self.baseline.split(":")
        return cloud, region, instance_type
