"""The original study's case study, reproducible: `python -m fedsky.controller.placement.casestudy`.

Three hospitals in the US, Asia and Europe (nearest regions AWS us-east-1, ap-northeast-2 and
eu-central-1), a 26 MB CNN, 20 rounds, max latency 250 ms, max cost 85,000 KRW per month,
cost:latency weights 9:1, 5:5 and 1:9. Each choice is compared with the baseline (what an
operator does without the tool: us-east-1, m5.xlarge, on demand), side by side with the
changes the original study reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsky.controller.placement.catalog import CatalogError, load_catalog
from fedsky.controller.placement.defaults import METHODS, Method
from fedsky.controller.placement.model import (
    DEFAULT_KRW_PER_USD,
    DEFAULT_TRAIN_S,
    CostLimit,
    JobProfile,
    Limits,
    PlacementError,
    parse_cost_limit,
)
from fedsky.controller.placement.placer import place

PARTICIPANTS = {"us": "aws:us-east-1", "asia": "aws:ap-northeast-2", "europe": "aws:eu-central-1"}
MODEL_MB = 26.0
ROUNDS = 20
MAX_LATENCY_MS = 250.0
MAX_COST = "85000 KRW/month"
# weight -> (cost change %, round-time change %) the original study reports (None: not reported)
STUDY = {0.9: (-41.0, None), 0.5: (None, None), 0.1: (-19.0, -7.0)}


def run(
    *,
    train_s: float = DEFAULT_TRAIN_S,
    krw_per_usd: float = DEFAULT_KRW_PER_USD,
    catalog_dir: Path | None = None,
    method: Method = "exact",
    baseline_size_only: bool = False,
) -> list[dict[str, Any]]:
    """One row per weight: the choice, its figures and the changes vs the baseline and the study.

    `baseline_size_only` keeps only offers of the baseline's size (4 vCPU / 16 GiB) and lifts the
    max cost (no such offer meets it), so that the change comes from the choice of cloud and
    region alone.
    """
    catalog = load_catalog(catalog_dir)
    if baseline_size_only:
        catalog = catalog.subset(lambda o: o.vcpus == 4 and o.memory_gib == 16)
    job = JobProfile(model_mb=MODEL_MB, rounds=ROUNDS, train_s=train_s)
    rows = []
    for weight, (study_cost, study_time) in STUDY.items():
        max_cost = parse_cost_limit(MAX_COST)
        if baseline_size_only:
            max_cost = CostLimit(amount=1e12, currency=max_cost.currency, basis=max_cost.basis)
        limits = Limits(max_cost=max_cost, max_latency_ms=MAX_LATENCY_MS, cost_weight=weight)
        result = place(
            participants=PARTICIPANTS,
            job=job,
            limits=limits,
            catalog=catalog,
            method=method,
            krw_per_usd=krw_per_usd,
        )
        row: dict[str, Any] = {
            "weight": weight,
            "front_points": len(result.front),
            "baseline": result.baseline.to_json() if result.baseline else None,
            "study_cost_change_pct": study_cost,
            "study_round_time_change_pct": study_time,
        }
        if result.choice is None:
            row["reason"] = result.reason
        else:
            row["choice"] = result.choice.to_json()
            change = result.change_vs_baseline(result.choice)
            if change is not None:
                row["cost_change_pct"], row["round_time_change_pct"] = change
        rows.append(row)
    return rows


def _pct(value: float | None) -> str:
    return "n/r" if value is None else f"{value:+.0f}%"


def render(rows: list[dict[str, Any]], *, title: str) -> str:
    base = rows[0]["baseline"]
    out = [title]
    if base:
        out.append(
            f"baseline (no optimisation): {base['cloud']}:{base['region']} {base['instance_type']} on demand: "
            f"{base['cost']:,.0f} KRW/month, round {base['round_time_s']:.2f} s, max RTT {base['max_rtt_ms']:.0f} ms"
            + ("" if base["feasible"] else f" (exceeds {', '.join(base['violations'])})")
        )
    out += [
        "",
        f"{'weight':<16} {'choice':<36} {'KRW/month':>10} {'round s':>8}   {'cost vs base':>12} {'time vs base':>12}"
        f"   {'study cost':>10} {'study time':>10}",
    ]
    for r in rows:
        w = r["weight"]
        label = f"{w:g} ({round(w * 10):d}:{round((1 - w) * 10):d})"
        if "choice" in r:
            c = r["choice"]
            what = f"{c['cloud']}:{c['region']} {c['instance_type']}"
            figures = f"{c['cost']:>10,.0f} {c['round_time_s']:>8.2f}"
            change = (
                f"{_pct(r.get('cost_change_pct')):>12} {r.get('round_time_change_pct', 0):>+11.1f}%"
            )
        else:
            what, figures, change = "(infeasible)", f"{'-':>10} {'-':>8}", f"{'-':>12} {'-':>12}"
        out.append(
            f"{label:<16} {what:<36} {figures}   {change}   "
            f"{_pct(r['study_cost_change_pct']):>10} {_pct(r['study_round_time_change_pct']):>10}"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsky.controller.placement.casestudy",
        description="Run the original study's aggregator-placement case study against fedsky's catalog.",
    )
    parser.add_argument(
        "--train-s",
        type=float,
        default=DEFAULT_TRAIN_S,
        help=f"local training per round (default {DEFAULT_TRAIN_S:g} s)",
    )
    parser.add_argument("--krw-per-usd", type=float, default=DEFAULT_KRW_PER_USD)
    parser.add_argument("--catalog", type=Path, default=None, metavar="DIR")
    parser.add_argument("--method", choices=METHODS, default="exact")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    common: dict[str, Any] = {
        "train_s": args.train_s,
        "krw_per_usd": args.krw_per_usd,
        "catalog_dir": args.catalog,
        "method": args.method,
    }
    try:
        every = run(**common)
        same = run(**common, baseline_size_only=True)
    except (CatalogError, PlacementError) as exc:
        print(f"casestudy: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"all_offers": every, "baseline_size_only": same}, indent=2))
        return 0
    print("Case study: participants " + ", ".join(f"{k}={v}" for k, v in PARTICIPANTS.items()))
    print(
        f"{MODEL_MB:g} MB model, {ROUNDS} rounds, {args.train_s:g} s local training per round; "
        f"max latency {MAX_LATENCY_MS:g} ms, max cost {parse_cost_limit(MAX_COST)} at "
        f"{args.krw_per_usd:,.0f} KRW/USD; method {args.method}"
    )
    print()
    print(render(every, title="Every offer in the catalog (cloud, region and size chosen):"))
    print()
    print(
        render(
            same,
            title=(
                "Offers of the baseline's size only, 4 vCPU / 16 GiB, max cost lifted (none meets it): "
                "cloud and region chosen:"
            ),
        )
    )
    print()
    print(
        "n/r: not reported by the study. Changes are against the baseline's cost and round time under the same model."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
