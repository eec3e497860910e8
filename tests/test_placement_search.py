"""The front: exact enumeration equals the non-dominated feasible set; NSGA-II gets close."""

from __future__ import annotations

import numpy as np
import pytest
from fedsky.controller.placement import CostLimit, JobProfile, Limits, load_catalog, place
from fedsky.controller.placement.placer import Point
from fedsky.controller.placement.search import (
    exact_front,
    hypervolume_2d,
    hypervolume_ratio,
    naive_pareto_mask,
    pareto_mask,
)
from fedsky.controller.placement.synthetic import random_catalog
from hypothesis import given, settings
from hypothesis import strategies as st

points = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=0, max_size=60)


@given(points)
@settings(max_examples=200, deadline=None)
def test_pareto_mask_equals_the_definition_with_ties(pts: list[tuple[int, int]]) -> None:
    arr = np.array(pts, dtype=np.float64).reshape(-1, 2)
    assert np.array_equal(
        pareto_mask(arr[:, 0], arr[:, 1]), naive_pareto_mask(arr[:, 0], arr[:, 1])
    )


def test_exact_front_orders_by_cost_and_keeps_only_feasible() -> None:
    cost = np.array([3.0, 1.0, 2.0, 1.0, 0.5])
    time = np.array([1.0, 3.0, 2.0, 3.0, 0.1])
    feasible = np.array([True, True, True, True, False])
    assert exact_front(cost, time, feasible).tolist() == [1, 3, 2, 0]


def oracle(candidates: tuple[Point, ...]) -> set[tuple[str, str, str]]:
    """The non-dominated feasible set, by the definition."""
    ok = [p for p in candidates if p.feasible]
    return {
        p.key
        for p in ok
        if not any(
            q.cost <= p.cost
            and q.round_time_s <= p.round_time_s
            and (q.cost < p.cost or q.round_time_s < p.round_time_s)
            for q in ok
        )
    }


@pytest.mark.parametrize("seed", range(6))
def test_exact_front_is_the_non_dominated_feasible_set_on_random_catalogs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cat = random_catalog(continents=3, locations_per_continent=3, offers_per_location=6, seed=seed)
    names = rng.choice(len(cat.locations), size=int(rng.integers(1, 6)), replace=False)
    participants = {f"p{i}": cat.locations[i] for i in names}
    for basis in ("month", "job"):
        amount = float(rng.uniform(30, 300)) if basis == "month" else float(rng.uniform(0.05, 2))
        limits = Limits(
            max_cost=CostLimit(amount, "USD", basis),  # type: ignore[arg-type]
            max_latency_ms=float(rng.uniform(150, 450)),
            cost_weight=float(rng.uniform(0, 1)),
        )
        res = place(
            participants=participants,
            job=JobProfile(model_mb=float(rng.uniform(5, 500)), rounds=10),
            limits=limits,
            catalog=cat,
        )
        assert {p.key for p in res.front} == oracle(res.candidates)
        assert all(p.feasible for p in res.front)
        assert [p.cost for p in res.front] == sorted(p.cost for p in res.front)


@pytest.mark.parametrize(
    "participants",
    [
        {"us": "aws:us-east-1", "asia": "aws:ap-northeast-2", "europe": "aws:eu-central-1"},
        {
            "a": "gcp:asia-south1",
            "b": "azure:brazilsouth",
            "c": "aws:af-south-1",
            "d": "gcp:australia-southeast1",
        },
        {"solo": "azure:koreacentral"},
    ],
)
def test_exact_front_on_the_shipped_catalog_equals_the_oracle(participants: dict[str, str]) -> None:
    cat = load_catalog()
    for limit in (
        CostLimit(150000, "KRW", "month"),
        CostLimit(1e9, "USD", "month"),
        CostLimit(2.0, "USD", "job"),
    ):
        res = place(
            participants=participants,
            job=JobProfile(model_mb=26, rounds=20),
            limits=Limits(max_cost=limit, max_latency_ms=400, cost_weight=0.5),
            catalog=cat,
        )
        assert {p.key for p in res.front} == oracle(res.candidates)
        assert res.front


def test_clouds_restrict_the_candidates() -> None:
    cat = load_catalog()
    res = place(
        participants={"us": "aws:us-east-1", "eu": "aws:eu-central-1"},
        job=JobProfile(model_mb=26, rounds=20),
        limits=Limits(max_cost=CostLimit(1e9), max_latency_ms=250),
        catalog=cat,
        clouds={"gcp"},
    )
    assert res.front
    assert {p.offer.cloud for p in res.front} == {"gcp"}
    assert {p.offer.cloud for p in res.candidates} == {"gcp"}
    assert res.baseline is not None
    assert res.baseline.offer.cloud == "aws"
    none = place(
        participants={"us": "aws:us-east-1"},
        job=JobProfile(model_mb=26, rounds=20),
        limits=Limits(max_cost=CostLimit(1e9), max_latency_ms=250),
        catalog=cat,
        clouds={"oracle"},
    )
    assert none.choice is None
    assert none.binding == ("clouds",)


def test_hypervolume() -> None:
    assert hypervolume_2d(np.array([[0.0, 0.0]]), (1.0, 1.0)) == pytest.approx(1.0)
    assert hypervolume_2d(np.array([[0.0, 0.5], [0.5, 0.0]]), (1.0, 1.0)) == pytest.approx(0.75)
    assert hypervolume_2d(np.array([[2.0, 0.0]]), (1.0, 1.0)) == 0.0
    exact = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    assert hypervolume_ratio(exact, exact) == pytest.approx(1.0)
    # reference (1.1, 1.1): 0.1 + 0.1 * 1.1 of 0.05 + 0.3 + 0.11
    assert hypervolume_ratio(exact[[0, 2]], exact) == pytest.approx(0.21 / 0.46)
    assert hypervolume_ratio(exact[:1], exact[:1]) == pytest.approx(1.0)


def test_nsga2_on_the_single_aggregator_space_reaches_the_exact_front() -> None:
    cat = load_catalog()
    kwargs = {
        "participants": {
            "us": "aws:us-east-1",
            "asia": "aws:ap-northeast-2",
            "europe": "aws:eu-central-1",
        },
        "job": JobProfile(model_mb=26, rounds=20),
        "limits": Limits(
            max_cost=CostLimit(300000, "KRW", "month"), max_latency_ms=250, cost_weight=0.5
        ),
        "catalog": cat,
    }
    exact = place(**kwargs)  # type: ignore[arg-type]
    ga = place(**kwargs, method="nsga2", seed=3)  # type: ignore[arg-type]
    ratio = hypervolume_ratio(
        np.array([[p.cost, p.round_time_s] for p in ga.front]),
        np.array([[p.cost, p.round_time_s] for p in exact.front]),
    )
    assert ratio >= 0.99
    assert {p.key for p in ga.front} <= {p.key for p in ga.candidates if p.feasible}
    assert ga.method == "nsga2"
    assert ga.choice is not None
