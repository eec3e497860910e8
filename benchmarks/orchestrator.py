"""The Dynamic Task Orchestrator against the original study's scenario, with and without faults.

    python -m benchmarks.orchestrator [--runs 20] [--seed 1] [--levels 0,0.1,0.3,0.5] [--json]

Three participants with five VMs each (vm-001 and vm-002 running and fit, vm-003 and vm-004 shut
off, vm-005 running but below the job minimum of 2 vCPUs, 4 GiB, 20 GiB), 20 FL runs, fedsky's
policy against the study's random choice. Each fault level sets `fail_prob` (the chance an
attempt fails mid-task) on the eligible VMs. Every figure comes from the real command,
`fedctl bench orchestrator ... --json`, run as a separate process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedsky.controller.orchestrator.eligibility import eligible
from fedsky.controller.orchestrator.policy import MinResources, Policy
from fedsky.controller.orchestrator.simulator import Scenario, parse_scenario

STUDY = Path(__file__).resolve().parent / "scenarios" / "study.json"
POLICIES = ("fedsky", "random")


def with_faults(data: dict[str, Any], fail_prob: float) -> dict[str, Any]:
    """The scenario with `fail_prob` on every VM the orchestrator may choose."""
    scenario: Scenario = parse_scenario(data)
    minimum: MinResources = scenario.min.resources()
    policy: Policy = scenario.policy
    out: dict[str, Any] = json.loads(json.dumps(data))
    for name, vms in out["participants"].items():
        for raw, vm in zip(vms, scenario.participants[name], strict=True):
            if eligible(vm.candidate(name), minimum=minimum, policy=policy, now=0.0):
                raw["fail_prob"] = fail_prob
    return out


def run_command(scenario: Path, policy: str, runs: int, seed: int) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "fedsky.controller.cli.main",
        "bench",
        "orchestrator",
        "--scenario",
        str(scenario),
        "--policy",
        policy,
        "--runs",
        str(runs),
        "--seed",
        str(seed),
        "--json",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(
            f"fedctl bench orchestrator failed ({done.returncode}): {done.stderr.strip()}"
        )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=STUDY)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--levels", default="0,0.1,0.3,0.5", help="fail_prob levels, comma-separated"
    )
    parser.add_argument("--json", action="store_true", help="print every result as one JSON list")
    args = parser.parse_args(argv)
    levels = [float(x) for x in args.levels.split(",") if x.strip()]
    base = json.loads(args.scenario.read_text(encoding="utf-8"))

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedsky-bench-") as tmp:
        for level in levels:
            path = Path(tmp) / f"faults-{level:g}.json"
            path.write_text(json.dumps(with_faults(base, level)), encoding="utf-8")
            for policy in POLICIES:
                result = run_command(path, policy, args.runs, args.seed)
                result["fail_prob"] = level
                rows.append(result)

    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"scenario {args.scenario.name}: {len(base['participants'])} participants, "
        f"{args.runs} runs, seed {args.seed}; fail_prob on the eligible VMs"
    )
    headers = (
        "fail_prob",
        "policy",
        "tasks",
        "dropout",
        "success",
        "attempts",
        "failovers",
        "mean_failover_s",
    )
    table = [
        (
            f"{r['fail_prob']:g}",
            r["policy"],
            str(r["tasks"]),
            f"{r['dropout_rate']:.2%}",
            f"{r['success_rate']:.2%}",
            str(r["attempts"]),
            str(r["failovers"]),
            "-" if r["mean_failover_s"] is None else f"{r['mean_failover_s']:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip())
    for row in table:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
