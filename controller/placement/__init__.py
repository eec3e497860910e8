"""Aggregator Deployment Optimizer: where to run a job's aggregator, and on what.

The catalog (offers and RTTs), the round-time and cost model, the exact Pareto front with
NSGA-II for comparison and for hierarchical placement, and one choice by the user's limits
and cost weight. Everything here is a plain function over plain data.
"""

from fedsky.controller.placement.catalog import Catalog, CatalogError, Offer, load_catalog
from fedsky.controller.placement.model import (
    DEFAULT_KRW_PER_USD,
    DEFAULT_TRAIN_S,
    CostLimit,
    JobProfile,
    Limits,
    ModelParams,
    PlacementError,
    parse_cost_limit,
)
from fedsky.controller.placement.placer import BASELINE, PlacementResult, Point, place

__all__ = [
    "BASELINE",
    "DEFAULT_KRW_PER_USD",
    "DEFAULT_TRAIN_S",
    "Catalog",
    "CatalogError",
    "CostLimit",
    "JobProfile",
    "Limits",
    "ModelParams",
    "Offer",
    "PlacementError",
    "PlacementResult",
    "Point",
    "load_catalog",
    "parse_cost_limit",
    "place",
]
