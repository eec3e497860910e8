"""The `[placement]` section of `controller.toml`: the optimizer's figures that change with time.

The defaults are today's: edit them when they change (the dates are in docs/placement.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

from fedsky.controller.placement.defaults import (
    BASELINE_OFFER,
    DEFAULT_AGGREGATOR_LINK_MBPS,
    DEFAULT_KRW_PER_USD,
    DEFAULT_PARTICIPANT_LINK_MBPS,
)
from fedsky.controller.settings import Section
from pydantic import Field, field_validator

if TYPE_CHECKING:
    from fedsky.controller.placement.model import ModelParams


class PlacementConfig(Section):
    # Won per US dollar, for limits and reports in KRW (prices in the catalog are in USD).
    krw_per_usd: Annotated[float, Field(gt=0, le=1_000_000)] = DEFAULT_KRW_PER_USD
    # What an operator runs without the optimizer, every choice is compared with:
    # "cloud:region:instance_type".
    baseline: str = ":".join(BASELINE_OFFER)

    # The links the round-time model assumes, Mbit/s: a hospital's uplink and the aggregator's
    # (shared by its participants). Measure yours; the defaults are docs/placement.md's.
    participant_link_mbps: Annotated[float, Field(gt=0, le=1_000_000)] = (
        DEFAULT_PARTICIPANT_LINK_MBPS
    )
    aggregator_link_mbps: Annotated[float, Field(gt=0, le=1_000_000)] = DEFAULT_AGGREGATOR_LINK_MBPS

    @property
    def model_params(self) -> ModelParams:
        from fedsky.controller.placement.model import DEFAULT_PARAMS  # numpy: not for the CLI

        return replace(
            DEFAULT_PARAMS,
            link_mbps=self.participant_link_mbps,
            aggregator_link_mbps=self.aggregator_link_mbps,
        )

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
