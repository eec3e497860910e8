"""The round-time and cost model, and the validation of its inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedsky.controller.placement import (
    CostLimit,
    JobProfile,
    Limits,
    PlacementError,
    load_catalog,
    parse_cost_limit,
    place,
)
from fedsky.controller.placement.model import (
    DEFAULT_PARAMS,
    HOURS_PER_MONTH,
    aggregation_s,
    memory_needed_gib,
    transfer_s,
)

CASE = {"us": "aws:us-east-1", "asia": "aws:ap-northeast-2", "europe": "aws:eu-central-1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("85000 KRW/month", CostLimit(85000, "KRW", "month")),
        ("85,000 krw / Month", CostLimit(85000, "KRW", "month")),
        ("58.6 USD/job", CostLimit(58.6, "USD", "job")),
        (" .5 usd/job ", CostLimit(0.5, "USD", "job")),
    ],
)
def test_parse_cost_limit(text: str, expected: CostLimit) -> None:
    assert parse_cost_limit(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("85000", "is not 'AMOUNT CURRENCY/BASIS'"),
        ("85000 EUR/month", "currency 'EUR' is not supported"),
        ("85000 KRW/week", "'week' is not a basis"),
        ("0 USD/month", "must be a number > 0"),
        ("-5 USD/month", "is not 'AMOUNT CURRENCY/BASIS'"),
    ],
)
def test_bad_cost_limits_fail_clearly(text: str, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        parse_cost_limit(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_latency_ms": 0}, "max latency must be > 0 ms"),
        ({"max_latency_ms": math.inf}, "max latency must be > 0 ms"),
        ({"cost_weight": 1.5}, "cost weight must be between 0 and 1"),
        ({"cost_weight": -0.1}, "cost weight must be between 0 and 1"),
    ],
)
def test_bad_limits_fail_clearly(kwargs: dict[str, float], message: str) -> None:
    args = {"max_cost": CostLimit(10.0), "max_latency_ms": 250.0, "cost_weight": 0.5} | kwargs
    with pytest.raises(PlacementError, match=message):
        Limits(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_mb": 0}, "model size must be > 0 MB"),
        ({"rounds": 0}, "rounds must be a whole number >= 1"),
        ({"rounds": 2.5}, "rounds must be a whole number >= 1"),
        ({"train_s": -1}, "local training time must be >= 0 s"),
    ],
)
def test_bad_job_profiles_fail_clearly(kwargs: dict[str, float], message: str) -> None:
    args = {"model_mb": 26.0, "rounds": 20} | kwargs
    with pytest.raises(PlacementError, match=message):
        JobProfile(**args)  # type: ignore[arg-type]


def test_bad_participants_and_rate_fail_clearly() -> None:
    cat = load_catalog()
    job = JobProfile(model_mb=26, rounds=20)
    limits = Limits(max_cost=CostLimit(100.0), max_latency_ms=250)
    with pytest.raises(PlacementError, match="no participants"):
        place(participants={}, job=job, limits=limits, catalog=cat)
    with pytest.raises(PlacementError, match="participant 'x': location 'us-east-1' is invalid"):
        place(participants={"x": "us-east-1"}, job=job, limits=limits, catalog=cat)
    with pytest.raises(PlacementError, match="participant 'x': unknown location 'aws:mars-1'"):
        place(participants={"x": "aws:mars-1"}, job=job, limits=limits, catalog=cat)
    with pytest.raises(PlacementError, match="KRW per USD rate must be > 0"):
        place(participants=CASE, job=job, limits=limits, catalog=cat, krw_per_usd=0)
    with pytest.raises(PlacementError, match="method 'ga'"):
        place(participants=CASE, job=job, limits=limits, catalog=cat, method="ga")  # type: ignore[arg-type]


def test_transfer_time_follows_the_formula_and_grows_with_rtt() -> None:
    p = DEFAULT_PARAMS
    rtts = np.array([1.0, 10.0, 50.0, 100.0, 200.0, 300.0])
    t = transfer_s(26.0, rtts)
    assert np.all(np.diff(t) > 0)
    # 200 ms: window-limited at 4 MiB / 0.2 s; slow start up to the 4 MiB window
    r = 0.2
    expected = (
        r
        + r * math.log2(p.tcp_window_bytes / p.initial_window_bytes)
        + 26e6 / (p.tcp_window_bytes / r)
    )
    assert t[4] == pytest.approx(expected)
    # 1 ms: link-limited at 1 Gbit/s
    assert t[0] == pytest.approx(
        0.001 + 0.001 * math.log2(125e6 * 0.001 / p.initial_window_bytes) + 26e6 / 125e6
    )


def test_aggregation_and_memory() -> None:
    one, sixteen = aggregation_s(26.0, 3, np.array([1.0, 16.0]))
    assert one == pytest.approx(3 * 26 / 1000)
    assert sixteen == pytest.approx(3 * 26 / 1000 * (0.5 + 0.5 / 16))
    assert memory_needed_gib(26.0, 3) == pytest.approx(1.0 + 5 * 26 * 2 / 1024)


def test_point_figures_match_the_model_by_hand() -> None:
    cat = load_catalog()
    job = JobProfile(model_mb=26, rounds=20, train_s=60)
    month = Limits(max_cost=parse_cost_limit("85000 KRW/month"), max_latency_ms=250)
    res = place(participants=CASE, job=job, limits=month, catalog=cat, krw_per_usd=1450)
    b = res.baseline
    assert b is not None
    rtts = np.array(
        [
            1.0,
            cat.rtt("aws:us-east-1", "aws:ap-northeast-2") or 0,
            cat.rtt("aws:us-east-1", "aws:eu-central-1") or 0,
        ]
    )
    legs = transfer_s(26.0, rtts)
    # Train (weights down, 60 s, update up), aggregate, then evaluate (weights down, 6 s by
    # default, metrics back: one request).
    train = float(np.max(2 * legs + 60))
    evaluate = float(np.max(legs + 6 + rtts / 1000))
    time = train + aggregation_s(26.0, 3, np.array([4.0]))[0] + evaluate
    assert b.round_time_s == pytest.approx(time)
    # Per round the weights leave the cloud 3 times for training, 3 for evaluation, and once
    # to the controller, base64 over the bus (4/3 of the size).
    egress = 20 * (6 + 4 / 3) * 26 / 1000 * 0.09
    assert b.egress_usd == pytest.approx(egress)
    assert b.cost_usd == pytest.approx(0.192 * HOURS_PER_MONTH + egress)
    assert b.cost == pytest.approx((0.192 * HOURS_PER_MONTH + egress) * 1450)
    assert b.max_rtt_ms == pytest.approx(float(rtts.max()))
    assert b.farthest == "asia"
    assert b.violations == ("max_cost",)

    per_job = Limits(max_cost=parse_cost_limit("10 USD/job"), max_latency_ms=250)
    bj = place(participants=CASE, job=job, limits=per_job, catalog=cat).baseline
    assert bj is not None
    assert bj.cost == pytest.approx(0.192 * 20 * time / 3600 + egress)
    assert bj.currency == "USD"


def test_measured_rtt_replaces_the_table() -> None:
    cat = load_catalog()
    job = JobProfile(model_mb=26, rounds=20)
    limits = Limits(max_cost=CostLimit(1e6), max_latency_ms=250)
    measured = {"asia": {"aws:us-east-1": 120.0}}
    plain = place(participants=CASE, job=job, limits=limits, catalog=cat)
    meas = place(participants=CASE, job=job, limits=limits, catalog=cat, measured_rtt=measured)
    assert plain.baseline is not None
    assert meas.baseline is not None
    assert plain.baseline.max_rtt_ms == pytest.approx(194.44, abs=0.01)
    assert meas.baseline.max_rtt_ms == pytest.approx(120.0)
    assert meas.baseline.round_time_s < plain.baseline.round_time_s
    # a participant at a location the catalog does not know is fine when it measured
    odd = place(
        participants={"lab": "onprem:seoul", "us": "aws:us-east-1"},
        job=job,
        limits=limits,
        catalog=cat,
        measured_rtt={"lab": {"aws:ap-northeast-2": 3.0, "aws:us-east-1": 180.0}},
    )
    assert odd.choice is not None
    assert odd.choice.offer.region in {"ap-northeast-2", "us-east-1"}
    with pytest.raises(PlacementError, match="must be > 0 ms"):
        place(
            participants=CASE,
            job=job,
            limits=limits,
            catalog=cat,
            measured_rtt={"asia": {"aws:us-east-1": 0.0}},
        )


def test_the_aggregators_link_is_shared_by_its_participants() -> None:
    from fedsky.controller.placement.model import ModelParams

    params = ModelParams(link_mbps=1000.0, aggregator_link_mbps=200.0)
    rtt = np.array([1.0])
    alone = float(transfer_s(26.0, rtt, params, sharing=1)[0])
    three = float(transfer_s(26.0, rtt, params, sharing=3)[0])
    # 26 MB at the whole 200 Mbit/s, then at a third of it (the ramp differs by under 1 ms).
    assert alone == pytest.approx(26e6 / 25e6, abs=2e-3)
    assert three == pytest.approx(26e6 / (25e6 / 3), abs=2e-3)
    # Below the participant's own link, sharing changes nothing.
    assert float(transfer_s(26.0, rtt, DEFAULT_PARAMS, sharing=3)[0]) == pytest.approx(
        float(transfer_s(26.0, rtt, DEFAULT_PARAMS)[0])
    )
