"""Hierarchical placement: the exact sweep and NSGA-II against a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pytest
from fedsky.controller.placement import CostLimit, JobProfile, Limits, PlacementError, load_catalog
from fedsky.controller.placement.catalog import Catalog
from fedsky.controller.placement.hierarchical import (
    HierarchicalResult,
    build_instance,
    place_hierarchical,
)
from fedsky.controller.placement.search import hypervolume_ratio
from fedsky.controller.placement.synthetic import random_catalog

JOB = JobProfile(model_mb=40, rounds=10, train_s=30)


def small(seed: int, basis: str) -> tuple[Catalog, dict[str, str], Limits]:
    """An instance small enough to enumerate, with limits that bind on some combinations."""
    rng = np.random.default_rng(seed)
    cat = random_catalog(continents=3, locations_per_continent=3, offers_per_location=4, seed=seed)
    chosen = rng.choice(len(cat.locations), size=6, replace=False)
    participants = {f"p{i}": cat.locations[i] for i in chosen}
    amount = 400.0 if basis == "month" else 0.5
    limits = Limits(max_cost=CostLimit(amount, "USD", basis), max_latency_ms=400, cost_weight=0.5)  # type: ignore[arg-type]
    return cat, participants, limits


def objectives(res: HierarchicalResult) -> list[tuple[float, float]]:
    return sorted((round(c, 9), round(t, 9)) for c, t in res.objectives.tolist())


@pytest.mark.parametrize("basis", ["month", "job"])
@pytest.mark.parametrize("seed", range(4))
def test_exact_sweep_equals_brute_force(seed: int, basis: str) -> None:
    cat, participants, limits = small(seed, basis)
    inst = build_instance(participants=participants, job=JOB, limits=limits, catalog=cat)
    assert not isinstance(inst, str)
    assert 1_000 < inst.space_size < 1_000_000
    brute = place_hierarchical(
        participants=participants, job=JOB, limits=limits, catalog=cat, method="brute"
    )
    exact = place_hierarchical(
        participants=participants, job=JOB, limits=limits, catalog=cat, method="exact"
    )
    assert brute.front, "the instance should have feasible layouts"
    assert objectives(exact) == objectives(brute)
    assert exact.evaluated < inst.space_size / 10  # the sweep does not enumerate
    assert all(lay.cost <= limits.max_cost.amount and lay.max_rtt_ms <= 400 for lay in exact.front)
    assert exact.choice is not None
    assert brute.choice is not None
    assert (exact.choice.cost, exact.choice.round_time_s) == pytest.approx(
        (brute.choice.cost, brute.choice.round_time_s)
    )


@pytest.mark.parametrize(("seed", "basis"), [(0, "month"), (1, "job"), (2, "month"), (3, "job")])
def test_nsga2_reaches_099_of_the_exact_hypervolume(seed: int, basis: str) -> None:
    cat, participants, limits = small(seed, basis)
    exact = place_hierarchical(
        participants=participants, job=JOB, limits=limits, catalog=cat, method="brute"
    )
    ga = place_hierarchical(
        participants=participants, job=JOB, limits=limits, catalog=cat, method="nsga2", seed=seed
    )
    assert ga.front
    ratio = hypervolume_ratio(ga.objectives, exact.objectives)
    assert ratio >= 0.99, ratio
    assert ga.evaluated < ga.space_size  # it searched, it did not enumerate


def test_shipped_catalog_hierarchical_layout() -> None:
    participants = {
        "boston": "aws:us-east-1",
        "seattle": "gcp:us-west1",
        "seoul": "aws:ap-northeast-2",
        "singapore": "gcp:asia-southeast1",
        "frankfurt": "aws:eu-central-1",
    }
    limits = Limits(max_cost=CostLimit(400000, "KRW", "month"), max_latency_ms=250, cost_weight=0.5)
    res = place_hierarchical(
        participants=participants,
        job=JobProfile(model_mb=26, rounds=20),
        limits=limits,
        catalog=load_catalog(),
    )
    assert res.space_size > 10**9
    assert res.groups == {
        "asia": ("seoul", "singapore"),
        "europe": ("frankfurt",),
        "north-america": ("boston", "seattle"),
    }
    assert res.choice is not None
    for cont, offer in res.choice.regional:
        assert load_catalog().continent(offer.location) == cont
    body = res.to_json()
    assert set(body["choice"]["regional"]) == {"asia", "europe", "north-america"}
    assert body["front"]
    assert body["choice"]["feasible"] is True


def test_hierarchical_infeasible_and_unknown_continent() -> None:
    cat = load_catalog()
    tight = Limits(max_cost=CostLimit(1e9), max_latency_ms=0.5)
    res = place_hierarchical(
        participants={"a": "aws:us-east-1"}, job=JOB, limits=tight, catalog=cat
    )
    assert res.choice is None
    assert res.front == ()
    assert res.reason is not None
    assert "no offer can serve the participants in north-america" in res.reason
    cheap = Limits(max_cost=CostLimit(1.0, "USD", "month"), max_latency_ms=250)
    res = place_hierarchical(
        participants={"a": "aws:us-east-1"}, job=JOB, limits=cheap, catalog=cat
    )
    assert res.choice is None
    assert res.reason is not None
    assert "max cost" in res.reason
    with pytest.raises(PlacementError, match="the continent of 'lab:x' is unknown"):
        place_hierarchical(
            participants={"a": "lab:x"},
            job=JOB,
            limits=cheap,
            catalog=cat,
            measured_rtt={"a": {"aws:us-east-1": 5.0}},
        )
