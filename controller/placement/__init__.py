"""Aggregator Deployment Optimizer: where to run a job's aggregator, and on what.

The catalog (offers and RTTs), the round-time and cost model, the exact Pareto front with
NSGA-II for comparison and for hierarchical placement, and one choice by the user's limits
and cost weight. Everything here is a plain function over plain data.

The names below are imported on first use: `fedctl` builds its parser from every command
module, and most commands need no numpy.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsky.controller.placement.catalog import Catalog, CatalogError, Offer, load_catalog
    from fedsky.controller.placement.defaults import DEFAULT_KRW_PER_USD, DEFAULT_TRAIN_S
    from fedsky.controller.placement.hierarchical import HierarchicalResult, place_hierarchical
    from fedsky.controller.placement.model import (
        CostLimit,
        JobProfile,
        Limits,
        ModelParams,
        PlacementError,
        parse_cost_limit,
    )
    from fedsky.controller.placement.placer import BASELINE, PlacementResult, Point, place

_WHERE = {
    "Catalog": "catalog",
    "CatalogError": "catalog",
    "Offer": "catalog",
    "load_catalog": "catalog",
    "DEFAULT_KRW_PER_USD": "defaults",
    "DEFAULT_TRAIN_S": "defaults",
    "HierarchicalResult": "hierarchical",
    "place_hierarchical": "hierarchical",
    "CostLimit": "model",
    "JobProfile": "model",
    "Limits": "model",
    "ModelParams": "model",
    "PlacementError": "model",
    "parse_cost_limit": "model",
    "BASELINE": "placer",
    "PlacementResult": "placer",
    "Point": "placer",
    "place": "placer",
}
__all__ = [
    "BASELINE",
    "DEFAULT_KRW_PER_USD",
    "DEFAULT_TRAIN_S",
    "Catalog",
    "CatalogError",
    "CostLimit",
    "HierarchicalResult",
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
    "place_hierarchical",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
