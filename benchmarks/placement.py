"""The Aggregator Deployment Optimizer: time to the front, exact against NSGA-II.

    python -m benchmarks.placement [--repeat 20] [--seed 1] [--json]

Prints, from one run:
1. Loading the shipped catalog (parsing and validating the CSV files).
2. Time to the front, exact and NSGA-II side by side, with NSGA-II's hypervolume as a share of
   the exact front's, for: the shipped catalog (the case study's three participants, and ten
   participants on five continents), a synthetic catalog of 10,000 offers (the shipped
   regions and RTTs, offers drawn around each region's prices), and hierarchical placement
   (one aggregator per continent plus a global one) on the shipped catalog and on small
   instances the brute force can check.
3. The aggregation rate the model assumes, measured with Flower's own FedAvg aggregation.
Exact times are the median of `--repeat` runs; NSGA-II runs once per scenario (seeded) after
pymoo has been imported, and the import is timed on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fedsky.controller.placement.catalog import SHIPPED_DIR, _load, load_catalog
from fedsky.controller.placement.hierarchical import build_instance, place_hierarchical
from fedsky.controller.placement.model import CostLimit, JobProfile, Limits, parse_cost_limit
from fedsky.controller.placement.placer import place
from fedsky.controller.placement.search import hypervolume_ratio
from fedsky.controller.placement.synthetic import random_catalog, scaled_catalog

CASE = {"us": "aws:us-east-1", "asia": "aws:ap-northeast-2", "europe": "aws:eu-central-1"}
TEN = {
    "boston": "aws:us-east-1",
    "seattle": "gcp:us-west1",
    "toronto": "gcp:northamerica-northeast1",
    "saopaulo": "aws:sa-east-1",
    "frankfurt": "aws:eu-central-1",
    "london": "azure:uksouth",
    "seoul": "aws:ap-northeast-2",
    "tokyo": "gcp:asia-northeast1",
    "mumbai": "azure:centralindia",
    "sydney": "aws:ap-southeast-2",
}
HIER = {
    "boston": "aws:us-east-1",
    "seattle": "gcp:us-west1",
    "frankfurt": "aws:eu-central-1",
    "london": "azure:uksouth",
    "seoul": "aws:ap-northeast-2",
    "singapore": "gcp:asia-southeast1",
}
JOB = JobProfile(model_mb=26, rounds=20)


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1000.0


def single(
    name: str, catalog: Any, participants: dict[str, str], limits: Limits, repeat: int, seed: int
) -> dict[str, Any]:
    def run(method: Any) -> Any:
        return place(
            participants=participants,
            job=JOB,
            limits=limits,
            catalog=catalog,
            method=method,
            seed=seed,
        )

    exact = run("exact")
    exact_ms = median_ms(lambda: run("exact"), repeat)
    ga, ga_ms = timed(lambda: run("nsga2"))

    def pts(result: Any) -> Any:
        return np.array([[p.cost, p.round_time_s] for p in result.front]).reshape(-1, 2)

    return {
        "scenario": name,
        "space": len(catalog),
        "exact_ms": exact_ms,
        "exact_points": len(exact.front),
        "nsga2_ms": ga_ms,
        "nsga2_points": len(ga.front),
        "nsga2_evaluated": None,
        "hv_ratio": hypervolume_ratio(pts(ga), pts(exact)),
    }


def hierarchical(
    name: str,
    catalog: Any,
    participants: dict[str, str],
    limits: Limits,
    repeat: int,
    seed: int,
    brute: bool,
) -> dict[str, Any]:
    def run(method: Any) -> Any:
        return place_hierarchical(
            participants=participants,
            job=JOB,
            limits=limits,
            catalog=catalog,
            method=method,
            seed=seed,
        )

    exact = run("exact")
    exact_ms = median_ms(lambda: run("exact"), repeat)
    ga, ga_ms = timed(lambda: run("nsga2"))
    row = {
        "scenario": name,
        "space": exact.space_size,
        "exact_ms": exact_ms,
        "exact_points": len(exact.front),
        "nsga2_ms": ga_ms,
        "nsga2_points": len(ga.front),
        "nsga2_evaluated": ga.evaluated,
        "hv_ratio": hypervolume_ratio(ga.objectives, exact.objectives),
    }
    if brute:
        oracle, brute_ms = timed(lambda: run("brute"))
        same = sorted(map(tuple, np.round(oracle.objectives, 9).tolist())) == sorted(
            map(tuple, np.round(exact.objectives, 9).tolist())
        )
        row |= {"brute_ms": brute_ms, "exact_equals_brute": same}
    return row


def aggregation_rate() -> dict[str, Any] | None:
    """MB/s of Flower's FedAvg aggregation over three 26 MB models, one process."""
    try:
        from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    layers = 8
    per_layer = 26 * 1_000_000 // 4 // layers
    records = [
        RecordDict(
            {
                "arrays": ArrayRecord(
                    {f"l{i}": Array(rng.random(per_layer, dtype=np.float32)) for i in range(layers)}
                ),
                "metrics": MetricRecord({"num-examples": 100}),
            }
        )
        for _ in range(3)
    ]
    aggregate_arrayrecords(records, "num-examples")
    ms = median_ms(lambda: aggregate_arrayrecords(records, "num-examples"), 5)
    return {"models": 3, "model_mb": 26, "ms": ms, "mb_per_s": 3 * 26 / (ms / 1000.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.placement", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repeat", type=int, default=20, help="runs per exact timing (median)")
    parser.add_argument("--seed", type=int, default=1, help="NSGA-II seed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    load_ms = median_ms(lambda: _load(SHIPPED_DIR), 5)
    shipped = load_catalog()
    (_, synth_ms) = timed(lambda: scaled_catalog(shipped, n_offers=10_000, seed=args.seed))
    synthetic = scaled_catalog(shipped, n_offers=10_000, seed=args.seed)
    _, pymoo_ms = timed(lambda: __import__("pymoo.algorithms.moo.nsga2"))

    month = Limits(
        max_cost=parse_cost_limit("85000 KRW/month"), max_latency_ms=250, cost_weight=0.9
    )
    loose = Limits(max_cost=CostLimit(1e9, "USD", "month"), max_latency_ms=400, cost_weight=0.5)
    per_job = Limits(max_cost=CostLimit(5.0, "USD", "job"), max_latency_ms=400, cost_weight=0.5)
    rows = [
        single(
            "shipped, case study (3 participants, 85,000 KRW/month, 250 ms)",
            shipped,
            CASE,
            month,
            args.repeat,
            args.seed,
        ),
        single("shipped, case study, limits lifted", shipped, CASE, loose, args.repeat, args.seed),
        single(
            "shipped, 10 participants on 5 continents, per job",
            shipped,
            TEN,
            per_job,
            args.repeat,
            args.seed,
        ),
        single(
            "synthetic 10,000 offers, case study, limits lifted",
            synthetic,
            CASE,
            loose,
            args.repeat,
            args.seed,
        ),
        single(
            "synthetic 10,000 offers, 10 participants, per job",
            synthetic,
            TEN,
            per_job,
            args.repeat,
            args.seed,
        ),
        hierarchical(
            "hierarchical, shipped, 6 participants on 3 continents",
            shipped,
            HIER,
            Limits(max_cost=parse_cost_limit("400000 KRW/month"), max_latency_ms=250),
            args.repeat,
            args.seed,
            False,
        ),
        hierarchical(
            "hierarchical, shipped, 6 participants, per job",
            shipped,
            HIER,
            per_job,
            args.repeat,
            args.seed,
            False,
        ),
    ]
    small_rows = []
    for seed in range(4):
        cat = random_catalog(
            continents=3, locations_per_continent=3, offers_per_location=4, seed=seed
        )
        rng = np.random.default_rng(seed)
        parts = {
            f"p{i}": cat.locations[i] for i in rng.choice(len(cat.locations), size=6, replace=False)
        }
        lim = Limits(max_cost=CostLimit(400.0, "USD", "month"), max_latency_ms=400)
        inst = build_instance(participants=parts, job=JOB, limits=lim, catalog=cat)
        assert not isinstance(inst, str)
        small_rows.append(
            hierarchical(
                f"hierarchical, small random instance {seed}",
                cat,
                parts,
                lim,
                args.repeat,
                seed,
                True,
            )
        )
    agg = aggregation_rate()
    report = {
        "catalog_load_ms": load_ms,
        "shipped_offers": len(shipped),
        "synthetic_build_ms": synth_ms,
        "pymoo_import_ms": pymoo_ms,
        "scenarios": rows + small_rows,
        "aggregation": agg,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"shipped catalog: {len(shipped)} offers, loaded in {load_ms:.1f} ms (parse + validate, median of 5)"
    )
    print(
        f"synthetic catalog: 10,000 offers built in {synth_ms:.0f} ms; pymoo import {pymoo_ms:.0f} ms (not in the NSGA-II times)"
    )
    print()
    head = f"{'scenario':<62} {'space':>14} {'exact':>10} {'pts':>4} {'NSGA-II':>10} {'pts':>4} {'HV ratio':>9}"
    print(head)
    print("-" * len(head))
    for r in rows + small_rows:
        print(
            f"{r['scenario']:<62} {r['space']:>14,} {r['exact_ms']:>8.1f}ms {r['exact_points']:>4} "
            f"{r['nsga2_ms']:>8.0f}ms {r['nsga2_points']:>4} {r['hv_ratio']:>9.4f}"
        )
    print()
    for r in small_rows:
        print(
            f"{r['scenario']}: brute force {r['brute_ms']:.0f} ms over {r['space']:,} layouts; "
            f"exact sweep equals brute force: {r['exact_equals_brute']}"
        )
    if agg is not None:
        print()
        print(
            f"aggregation (Flower 1.42 aggregate_arrayrecords, 3 x 26 MB, median of 5): {agg['ms']:.0f} ms = "
            f"{agg['mb_per_s']:,.0f} MB/s (the model assumes 1,000 MB/s per aggregation on one vCPU)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
