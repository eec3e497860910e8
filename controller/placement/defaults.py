"""The optimizer's documented defaults, importable without numpy (the CLI parser needs them)."""

from __future__ import annotations

from typing import Literal

DEFAULT_KRW_PER_USD = 1450.0  # 2025 average 1,412; early 2026 1,440-1,480 ([placement] krw_per_usd)
# The study's baseline: what an operator runs without the optimizer ([placement] baseline).
BASELINE_OFFER = ("aws", "us-east-1", "m5.xlarge")
DEFAULT_TRAIN_S = 60.0  # local training per round when the job does not say
# Local evaluation per round as a share of local training when the job does not say: a
# forward pass over a validation split, against epochs of forward and backward passes.
DEFAULT_EVAL_SHARE = 0.1
HOURS_PER_MONTH = 730.0  # 365 * 24 / 12
# The links the round-time model assumes, Mbit/s ([placement] participant_link_mbps and
# aggregator_link_mbps): a hospital's uplink, and a cloud VM's network (up to 10 Gbit/s).
DEFAULT_PARTICIPANT_LINK_MBPS = 1000.0
DEFAULT_AGGREGATOR_LINK_MBPS = 10_000.0

Method = Literal["exact", "nsga2"]
METHODS: tuple[Method, ...] = ("exact", "nsga2")
