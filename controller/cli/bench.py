"""`fedctl bench`: measure fedsky's decisions on simulated input; needs no daemon."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedsky.controller.cli.output import fail, number_in, print_json, print_table
from fedsky.controller.orchestrator.simulator import ScenarioError, load_scenario, simulate
from fedsky.shared import exitcodes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure fedsky's decisions on simulated input (no daemon)"
    )
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    orch = sub.add_parser(
        "orchestrator",
        help="simulate FL runs against a scenario of participants' VMs",
        description=(
            "Run the Dynamic Task Orchestrator (or the random baseline) against simulated agents "
            "and print dropout, success, attempts and failover figures. Same seed, same output."
        ),
    )
    orch.add_argument("--scenario", required=True, type=Path, help="scenario JSON file")
    orch.add_argument("--policy", choices=("fedsky", "random"), default="fedsky")
    orch.add_argument(
        "--runs", type=_positive_int, default=20, help="FL runs (jobs) to simulate (default 20)"
    )
    orch.add_argument(
        "--seed",
        type=number_in(0, 2**32 - 1, whole=True),
        default=0,
        help="random seed (default 0)",
    )
    orch.add_argument("--json", action="store_true", help="print one JSON object")
    orch.set_defaults(func=_orchestrator)


def _orchestrator(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        return fail(exc.message, exitcodes.INFEASIBLE if exc.infeasible else exitcodes.CONFIG)
    result = simulate(scenario, policy=args.policy, runs=args.runs, seed=args.seed).to_dict()
    result["scenario"] = str(args.scenario)
    if args.json:
        print_json(result)
        return exitcodes.OK
    mean = result["mean_failover_s"]
    rows = [
        ("scenario", result["scenario"]),
        ("policy", result["policy"]),
        ("runs (seed)", f"{result['runs']} ({result['seed']})"),
        ("tasks", result["tasks"]),
        ("dropouts", f"{result['dropouts']} ({result['dropout_rate']:.1%})"),
        ("success", f"{result['completed']} ({result['success_rate']:.1%})"),
        (
            "jobs with every participant",
            f"{result['jobs_completed']} ({result['job_success_rate']:.1%})",
        ),
        ("attempts", result["attempts"]),
        ("failures", result["failures"]),
        ("failovers", result["failovers"]),
        ("mean failover (simulated s)", "-" if mean is None else f"{mean:.1f}"),
    ]
    print_table(("measure", "value"), rows)
    print()
    vm_rows = [
        (participant, vm, n)
        for participant, counts in result["assignments"].items()
        for vm, n in counts.items()
    ]
    print_table(("participant", "vm", "attempts"), vm_rows)
    causes = result["dropout_causes"]
    if causes:
        print()
        print_table(("dropout cause", "tasks"), sorted(causes.items()))
    return exitcodes.OK
