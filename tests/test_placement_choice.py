"""The choice on the front (weights, ties) and the reason when nothing is feasible."""

from __future__ import annotations

import numpy as np
import pytest
from fedsky.controller.placement import (
    CostLimit,
    JobProfile,
    Limits,
    PlacementError,
    PlacementResult,
    load_catalog,
    parse_cost_limit,
    place,
)
from fedsky.controller.placement.choice import choose, scores
from hypothesis import given, settings
from hypothesis import strategies as st

CASE = {"us": "aws:us-east-1", "asia": "aws:ap-northeast-2", "europe": "aws:eu-central-1"}
WEIGHTS = [i / 10 for i in range(11)]


def keys(n: int) -> list[tuple[str, ...]]:
    return [("c", "r", f"t{i}") for i in range(n)]


def test_choice_follows_the_weighted_normalised_sum() -> None:
    cost, time = [0.0, 5.0, 10.0], [10.0, 4.0, 0.0]
    assert scores(np.array(cost), np.array(time), 0.9).tolist() == pytest.approx([0.1, 0.49, 0.9])
    assert choose(cost, time, keys(3), 0.9) == 0
    assert choose(cost, time, keys(3), 0.5) == 1
    assert choose(cost, time, keys(3), 0.1) == 2


def test_one_point_front_normalises_to_zero() -> None:
    assert scores(np.array([7.0]), np.array([3.0]), 0.3).tolist() == [0.0]
    assert choose([7.0], [3.0], keys(1), 0.3) == 0


def test_ties_go_to_lower_cost_then_lower_time_then_cloud_region_type() -> None:
    # a two-point front at w = 0.5 scores 0.5 for both: the cheaper wins
    assert choose([10.0, 0.0], [0.0, 10.0], keys(2), 0.5) == 1
    # equal cost and time: cloud, then region, then instance type
    k = [("gcp", "a", "x"), ("aws", "z", "y"), ("aws", "z", "b"), ("aws", "b", "z")]
    assert choose([1.0] * 4, [2.0] * 4, k, 0.5) == 3
    assert choose([1.0] * 3, [2.0] * 3, k[:3], 0.5) == 2
    # with w = 1 time does not count, but a tie on cost still goes to the lower time
    assert choose([1.0, 1.0, 5.0], [9.0, 3.0, 0.0], keys(3), 1.0) == 1


fronts = st.lists(st.integers(0, 10_000), min_size=1, max_size=30, unique=True).map(
    lambda costs: (sorted(costs), sorted(costs, reverse=True))
)


@given(fronts, st.lists(st.sampled_from(WEIGHTS), min_size=2, max_size=2, unique=True))
@settings(max_examples=300, deadline=None)
def test_choice_moves_toward_cheaper_as_the_weight_rises(
    front: tuple[list[int], list[int]], ws: list[float]
) -> None:
    cost = [float(c) for c in front[0]]
    time = [float(t) * 0.37 for t in front[1]]  # a strict front: cost up, time down
    lo, hi = sorted(ws)
    a, b = choose(cost, time, keys(len(cost)), lo), choose(cost, time, keys(len(cost)), hi)
    assert cost[b] <= cost[a]
    assert time[b] >= time[a]


@pytest.mark.parametrize(
    "participants",
    [
        CASE,
        {"sp": "aws:sa-east-1", "jp": "gcp:asia-northeast1"},
        {"in": "azure:centralindia", "de": "azure:germanywestcentral"},
    ],
)
def test_choice_on_the_shipped_catalog_gets_cheaper_as_w_rises(
    participants: dict[str, str],
) -> None:
    cat = load_catalog()
    chosen = []
    for w in WEIGHTS:
        res = place(
            participants=participants,
            job=JobProfile(model_mb=26, rounds=20),
            limits=Limits(
                max_cost=parse_cost_limit("400000 KRW/month"), max_latency_ms=400, cost_weight=w
            ),
            catalog=cat,
        )
        assert res.choice is not None
        chosen.append(res.choice)
    costs = [c.cost for c in chosen]
    times = [c.round_time_s for c in chosen]
    assert costs == sorted(costs, reverse=True)
    assert times == sorted(times)
    assert costs[0] > costs[-1]  # the weight matters on these fronts


def infeasible(**overrides: object) -> PlacementResult:
    args: dict[str, object] = {
        "participants": CASE,
        "job": JobProfile(model_mb=26, rounds=20),
        "limits": Limits(
            max_cost=parse_cost_limit("85000 KRW/month"), max_latency_ms=250, cost_weight=0.5
        ),
        "catalog": load_catalog(),
    }
    res = place(**(args | overrides))  # type: ignore[arg-type]
    assert res.choice is None
    assert res.front == ()
    assert res.reason
    return res


def test_latency_binds_names_the_limit_and_the_offers_with_the_lowest_max_rtt() -> None:
    res = infeasible(limits=Limits(max_cost=CostLimit(1e9), max_latency_ms=100))
    assert res.binding == ("max_latency",)
    assert res.reason.startswith("max latency 100 ms binds")
    closest = res.closest
    assert len(closest) == 3
    lowest = min(p.max_rtt_ms for p in res.candidates)
    assert closest[0].max_rtt_ms == pytest.approx(lowest)
    assert len({p.offer.location for p in closest}) == 3  # one per location, nearest first
    assert [p.max_rtt_ms for p in closest] == sorted(p.max_rtt_ms for p in closest)
    assert f"{lowest:.0f} ms" in res.reason
    assert closest[0].label in res.reason


def test_cost_binds_names_the_limit_and_the_cheapest_offers_within_latency() -> None:
    res = infeasible(
        limits=Limits(max_cost=parse_cost_limit("10000 KRW/month"), max_latency_ms=250)
    )
    assert res.binding == ("max_cost",)
    assert res.reason.startswith("max cost 10,000 KRW/month binds")
    within = [p for p in res.candidates if p.max_rtt_ms <= 250]
    assert res.closest[0].cost == pytest.approx(min(p.cost for p in within))
    assert "aws:us-east-1 t3.small" in res.reason


def test_both_limits_and_memory() -> None:
    both = infeasible(limits=Limits(max_cost=parse_cost_limit("1 KRW/month"), max_latency_ms=50))
    assert both.binding == ("max_latency", "max_cost")
    mem = infeasible(job=JobProfile(model_mb=200_000, rounds=1))
    assert mem.binding == ("memory",)
    assert "GiB of memory the aggregation needs" in mem.reason
    assert mem.closest[0].offer.memory_gib == max(o.memory_gib for o in load_catalog().offers)


def test_a_pinned_offer_is_the_choice_when_it_could_be_chosen() -> None:
    args: dict[str, object] = {
        "participants": CASE,
        "job": JobProfile(model_mb=26, rounds=20),
        "limits": Limits(max_cost=parse_cost_limit("1000000 USD/month"), max_latency_ms=60_000),
        "catalog": load_catalog(),
    }
    pinned = ("aws", "us-east-1", "m5.xlarge")
    res = place(**args, offer=pinned)  # type: ignore[arg-type]
    assert res.choice is not None
    assert res.baseline is not None
    assert res.choice.key == pinned
    # Predicted as any candidate: the same figures as the baseline it is.
    assert res.choice.round_time_s == res.baseline.round_time_s
    assert res.front  # the search still ran, for the record
    with pytest.raises(PlacementError, match="not in the catalog"):
        place(**args, offer=("aws", "us-east-1", "m9.huge"))  # type: ignore[arg-type]
    with pytest.raises(PlacementError, match=r"not on a cloud the job may use \(gcp\)"):
        place(**args, offer=pinned, clouds=("gcp",))  # type: ignore[arg-type]
    tight = Limits(max_cost=parse_cost_limit("1000000 USD/month"), max_latency_ms=50)
    with pytest.raises(PlacementError, match="breaks the job's limits"):
        place(**(args | {"limits": tight}), offer=pinned)  # type: ignore[arg-type]
