"""`fedctl place`: where to run a job's aggregator, without a daemon.

    fedctl place --participant us=aws:us-east-1 --participant asia=aws:ap-northeast-2 \\
        --participant eu=aws:eu-central-1 --model-mb 26 --rounds 20 \\
        --max-cost "85000 KRW/month" --max-latency-ms 250 --cost-weight 0.9

Prints the feasible Pareto front of cost vs round time with the choice (*) and the baseline (B)
marked; `--json` prints one object instead; `--plot FILE` draws the front. Exit code 3 when
nothing is feasible, 2 for bad arguments, 78 for a bad catalog.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsky.controller.cli.output import number_in
from fedsky.controller.placement.defaults import DEFAULT_KRW_PER_USD, DEFAULT_TRAIN_S, METHODS
from fedsky.controller.placement.settings import PlacementConfig
from fedsky.shared import exitcodes

if TYPE_CHECKING:
    from fedsky.controller.placement.hierarchical import HierarchicalResult
    from fedsky.controller.placement.placer import PlacementResult, Point

# The optimizer (numpy, pymoo, matplotlib) is imported when `place` runs, not when fedctl
# builds its parser for another command.


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "place",
        help="find where to run a job's aggregator (cost vs round time)",
        description="Find the Pareto front of aggregator offers (cost vs round time) for a job and "
        "choose one by the cost weight, under a max cost and a max latency. Runs without a daemon.",
    )
    p.add_argument(
        "--participant",
        action="append",
        required=True,
        metavar="NAME=LOC",
        help="a participant and its nearest cloud region, e.g. seoul=aws:ap-northeast-2 (repeat per participant)",
    )
    p.add_argument("--model-mb", type=number_in(0.001, 1e6), required=True, help="model size in MB")
    p.add_argument(
        "--rounds",
        type=number_in(1, 10_000, whole=True),
        required=True,
        help="federated rounds of the job",
    )
    p.add_argument(
        "--max-cost",
        required=True,
        metavar="'AMOUNT USD|KRW/month|job'",
        help="maximum cost, e.g. '85000 KRW/month' (730 h of the aggregator plus one job's egress) or '40 USD/job'",
    )
    p.add_argument(
        "--max-latency-ms",
        type=number_in(1e-3, 1e6),
        required=True,
        help="maximum RTT to every participant",
    )
    p.add_argument(
        "--cost-weight",
        type=number_in(0, 1),
        default=0.5,
        help="w in w*cost + (1-w)*time over the normalised front: 0.9 = cost first, 0.1 = time first (default 0.5)",
    )
    p.add_argument(
        "--train-s",
        type=number_in(0, 1e6),
        default=DEFAULT_TRAIN_S,
        help=f"local training time per round (default {DEFAULT_TRAIN_S:g} s)",
    )
    p.add_argument(
        "--krw-per-usd",
        type=number_in(0.0001, 1e9),
        default=None,
        help="exchange rate (default: the controller config's placement.krw_per_usd, "
        f"else {DEFAULT_KRW_PER_USD:g})",
    )
    p.add_argument(
        "--catalog",
        type=Path,
        default=None,
        metavar="DIR",
        help="a catalog directory (offers.csv, rtt.csv) instead of the shipped one",
    )
    p.add_argument(
        "--clouds",
        default=None,
        metavar="LIST",
        help="only offers on these clouds, comma-separated (default: all)",
    )
    p.add_argument(
        "--method", choices=METHODS, default="exact", help="exact enumeration (default) or NSGA-II"
    )
    p.add_argument(
        "--hierarchical",
        action="store_true",
        help="plan one aggregator per continent plus a global one",
    )
    p.add_argument(
        "--seed",
        type=number_in(0, 2**32 - 1, whole=True),
        default=1,
        help="NSGA-II seed (default 1)",
    )
    p.add_argument(
        "--all", action="store_true", help="also list every offer evaluated, feasible or not"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE",
        help="draw the front (cost vs round time) to FILE (.png, .svg, .pdf)",
    )
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> PlacementConfig:
    """`[placement]` of the controller's config (the exchange rate, the baseline) when there is
    one to read; the defaults when no config file exists (placement needs no controller)."""
    from fedsky.controller.cli.client import config_path
    from fedsky.controller.config import load_controller_config

    path = config_path(getattr(args, "config", None))
    if not path.exists():
        return PlacementConfig()
    return load_controller_config(path).placement


def _participants(values: list[str]) -> dict[str, str]:
    from fedsky.controller.placement.model import PlacementError

    out: dict[str, str] = {}
    for value in values:
        name, sep, loc = value.partition("=")
        name, loc = name.strip(), loc.strip()
        if not sep or not name or not loc:
            raise PlacementError(
                f"--participant {value!r}: expected NAME=cloud:region, e.g. seoul=aws:ap-northeast-2"
            )
        if name in out:
            raise PlacementError(f"--participant {name!r} is given twice")
        out[name] = loc
    return out


def _err(message: str) -> None:
    print(f"fedctl place: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from fedsky.controller.placement.catalog import CatalogError, load_catalog
    from fedsky.controller.placement.hierarchical import place_hierarchical
    from fedsky.controller.placement.model import (
        JobProfile,
        Limits,
        PlacementError,
        parse_cost_limit,
    )
    from fedsky.controller.placement.placer import place

    try:
        settings = _settings(args)
        krw_per_usd = args.krw_per_usd or settings.krw_per_usd
        participants = _participants(args.participant)
        limits = Limits(
            max_cost=parse_cost_limit(args.max_cost),
            max_latency_ms=args.max_latency_ms,
            cost_weight=args.cost_weight,
        )
        job = JobProfile(model_mb=args.model_mb, rounds=args.rounds, train_s=args.train_s)
        clouds = None
        if args.clouds is not None:
            clouds = {c.strip() for c in args.clouds.split(",") if c.strip()}
        catalog = load_catalog(args.catalog)
        if args.hierarchical:
            hier = place_hierarchical(
                participants=participants,
                job=job,
                limits=limits,
                catalog=catalog,
                clouds=clouds,
                method=args.method,
                krw_per_usd=krw_per_usd,
                seed=args.seed,
            )
            return _show_hierarchical(hier, args)
        result = place(
            participants=participants,
            job=job,
            limits=limits,
            catalog=catalog,
            clouds=clouds,
            method=args.method,
            krw_per_usd=krw_per_usd,
            seed=args.seed,
            baseline_offer=settings.baseline_offer,
        )
    except CatalogError as exc:
        _err(str(exc))
        return exitcodes.CONFIG
    except PlacementError as exc:
        _err(str(exc))
        return exitcodes.USAGE
    if args.plot is not None:
        try:
            plot(result, args.plot)
        except (OSError, ValueError) as exc:
            _err(f"cannot write the plot to {args.plot}: {exc}")
            return exitcodes.FAILED
    if args.json:
        print(json.dumps(result.to_json(include_candidates=args.all), indent=2))
    else:
        print(render(result, show_all=args.all))
    if not result.feasible:
        if not args.json:
            _err(f"no feasible placement: {result.reason}")
        return exitcodes.INFEASIBLE
    return exitcodes.OK


# --- for people ---------------------------------------------------------------------------------


def _money(value: float, currency: str) -> str:
    return f"{value:,.0f}" if currency == "KRW" else f"{value:,.2f}"


def _row(mark: str, p: Point, *, status: bool = False) -> str:
    o = p.offer
    rtt = f"{p.max_rtt_ms:.0f}" if p.max_rtt_ms != float("inf") else "?"
    line = (
        f"{mark:<2} {o.cloud:<6} {o.region:<24} {o.instance_type:<17} {o.vcpus:>4} {o.memory_gib:>6g} "
        f"{_money(p.cost, p.currency):>14} {p.round_time_s:>9.2f} {rtt:>7}"
    )
    if status:
        line += "  " + ("feasible" if p.feasible else "exceeds " + ", ".join(p.violations))
    return line


def render(result: PlacementResult, *, show_all: bool = False) -> str:
    lim, job = result.limits, result.job
    cur, basis = lim.max_cost.currency, lim.max_cost.basis
    who = ", ".join(f"{n}={loc}" for n, loc in result.participants.items())
    header = (
        f"{'':<2} {'cloud':<6} {'region':<24} {'instance':<17} {'vCPU':>4} {'GiB':>6} "
        f"{cur + '/' + basis:>14} {'round s':>9} {'max RTT':>7}"
    )
    out = [
        f"participants: {who}",
        f"job: {job.model_mb:g} MB model, {job.rounds} rounds, {job.train_s:g} s local training; "
        f"limits: max cost {lim.max_cost}, max latency {lim.max_latency_ms:g} ms, cost weight {lim.cost_weight:g}",
        f"front ({result.method}): {len(result.front)} points of {len(result.candidates)} offers"
        f" ({sum(p.feasible for p in result.candidates)} feasible)",
        "",
        header,
    ]
    on_front = {p.key for p in result.front}
    for p in result.front:
        mark = "*" if result.choice is not None and p.key == result.choice.key else ""
        if result.baseline is not None and p.key == result.baseline.key:
            mark += "B"
        out.append(_row(mark, p))
    if not result.front:
        out.append("   (empty: nothing meets the limits)")
    b = result.baseline
    if b is not None and b.key not in on_front:
        out.append(_row("B", b, status=True))
    out.append("")
    if result.choice is not None:
        c = result.choice
        line = (
            f"* choice: {c.label}: {_money(c.cost, cur)} {cur}/{basis}, round {c.round_time_s:.2f} s, "
            f"max RTT {c.max_rtt_ms:.0f} ms (to {c.farthest})"
        )
        change = result.change_vs_baseline(c)
        if change is not None:
            line += f"; vs the baseline: cost {change[0]:+.1f}%, round time {change[1]:+.1f}%"
        out.append(line)
    else:
        out.append(f"no choice: {result.reason}")
    if b is not None:
        out.append(
            f"B baseline: {b.label} on demand ({_money(b.cost, cur)} {cur}/{basis}, round {b.round_time_s:.2f} s)"
            + ("" if b.feasible else f": exceeds {', '.join(b.violations)}")
        )
    else:
        from fedsky.controller.placement.placer import BASELINE

        out.append(f"B baseline: {':'.join(BASELINE[:2])} {BASELINE[2]} is not in this catalog")
    if show_all:
        out += ["", "every offer evaluated:", header + "  status"]
        for p in sorted(result.candidates, key=lambda p: (p.cost, p.round_time_s, p.key)):
            out.append(_row("", p, status=True))
    return "\n".join(out)


def _show_hierarchical(result: HierarchicalResult, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        groups = "; ".join(f"{c}: {', '.join(p)}" for c, p in result.groups.items())
        print(f"hierarchical ({result.method}): groups {groups}; {result.space_size:,} layouts")
        for lay in result.front:
            mark = "*" if lay is result.choice else " "
            regional = ", ".join(f"{c}={o.location} {o.instance_type}" for c, o in lay.regional)
            print(
                f"{mark} {_money(lay.cost, lay.currency):>12} {lay.currency}  {lay.round_time_s:8.2f} s  "
                f"global={lay.global_offer.location} {lay.global_offer.instance_type}; {regional}"
            )
        if result.choice is None:
            _err(f"no feasible placement: {result.reason}")
    return exitcodes.OK if result.choice is not None else exitcodes.INFEASIBLE


def plot(result: PlacementResult, path: Path) -> None:
    """Cost vs round time: every offer, the front, the choice, the baseline and the max cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cur, basis = result.limits.max_cost.currency, result.limits.max_cost.basis
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        cands = [p for p in result.candidates if p.round_time_s != float("inf")]
        ok = [p for p in cands if p.feasible]
        bad = [p for p in cands if not p.feasible]
        ax.scatter(
            [p.round_time_s for p in bad],
            [p.cost for p in bad],
            s=8,
            c="#cccccc",
            label="infeasible offers",
        )
        ax.scatter(
            [p.round_time_s for p in ok],
            [p.cost for p in ok],
            s=10,
            c="#7fa7d9",
            label="feasible offers",
        )
        if result.front:
            ax.plot(
                [p.round_time_s for p in result.front],
                [p.cost for p in result.front],
                "o-",
                c="#1f4e9c",
                ms=4,
                label=f"Pareto front ({result.method})",
            )
        if result.choice is not None:
            c = result.choice
            ax.scatter(
                [c.round_time_s],
                [c.cost],
                marker="*",
                s=220,
                c="#d62728",
                zorder=5,
                label=f"choice (w={result.limits.cost_weight:g}): {c.label}",
            )
        if result.baseline is not None:
            b = result.baseline
            ax.scatter(
                [b.round_time_s],
                [b.cost],
                marker="X",
                s=90,
                c="black",
                zorder=5,
                label=f"baseline: {b.label}",
            )
        ax.axhline(
            result.limits.max_cost.amount,
            ls="--",
            c="#d62728",
            lw=1,
            label=f"max cost {result.limits.max_cost}",
        )
        ax.set_xlabel("round time (s)")
        ax.set_ylabel(f"cost ({cur}/{basis})")
        ax.set_yscale("log")
        ax.set_title("Aggregator placement: cost vs round time")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
