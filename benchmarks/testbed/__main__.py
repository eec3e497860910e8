"""The testbed from the command line (as root).

    python -m benchmarks.testbed --links [--json] [--count 10]
    python -m benchmarks.testbed --smoke [--failover] [--json] [--keep-dir] [--reuse-wheelhouse]
    python -m benchmarks.testbed --demo [--json] [--keep-dir] [--reuse-wheelhouse]
    python -m benchmarks.testbed --case-study [--rounds N] [--json] [--keep-dir] [--reuse-wheelhouse]
    python -m benchmarks.testbed --cleanup

--links builds the case study's testbed (three hospitals with two VMs each, the controller, and
region hosts), relays an echo port on every link, measures every link's RTT against its target,
prints the result and takes everything down. Exit 0 when every link is within tolerance (10% or
2 ms, whichever is larger), 1 otherwise, 2 when the testbed could not be built.
--smoke runs one federated job across the testbed (docs/testbed.md): exit 0 when it shows
what it must, 1 when not, 2 when it could not run. With --failover, the VM host of one
participant's SuperNode is cut off after the first round. It first builds the pinned
artifacts from this checkout (`make artifacts`, aggregator and client roles) into
dist/wheelhouse; --reuse-wheelhouse keeps one that is there.
--demo runs `make demo`'s case study (its three hospitals, the digits job and its placement
limits) across the testbed the same way and says which host did what (`make demo-hosts`).
--case-study runs the original study's case study (casestudy.py): the 26 MB CNN placed for
the baseline and the weightings 9:1, 5:5 and 1:9, each job run across the testbed with shaped
links, the controller's predicted round time and cost beside the measured ones. Exit 0 when
every row's errors are within 10%, 1 when not, 2 when it could not run.
--cleanup removes what a crashed run left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from typing import Any

from benchmarks.testbed.measure import (
    ECHO_PORT,
    PROBES,
    echo_services,
    measure_links,
    within_tolerance,
)
from benchmarks.testbed.netns import Testbed, TestbedError, cleanup
from benchmarks.testbed.relay import Relays, routes_for
from benchmarks.testbed.topology import HospitalSpec, Plan, build_plan

log = logging.getLogger("benchmarks.testbed")

CASE_STUDY = (
    HospitalSpec("hospital-us", "aws:us-east-1", ("vm1", "vm2")),
    HospitalSpec("hospital-asia", "aws:ap-northeast-2", ("vm1", "vm2")),
    HospitalSpec("hospital-eu", "aws:eu-central-1", ("vm1", "vm2")),
)
CASE_REGIONS = ("aws:us-east-1", "aws:eu-central-1", "aws:us-west-2")


def case_study_plan(regions: tuple[str, ...] = CASE_REGIONS) -> Plan:
    return build_plan(hospitals=CASE_STUDY, regions=regions)


def run_links(plan: Plan, *, count: int) -> dict[str, Any]:
    with Testbed(plan) as testbed, Relays(testbed) as relays:
        relays.add(routes_for(plan, echo_services(plan, ECHO_PORT)))
        links = measure_links(testbed, port=ECHO_PORT, count=count)
    return {"links": links, "hosts": [asdict(h) for h in plan.hosts]}


def _table(result: dict[str, Any]) -> str:
    rows = [f"{'from':<22} {'to':<22} {'target ms':>10} {'measured ms':>12}  ok"]
    for link in result["links"]:
        ok = within_tolerance(link["rtt_target_ms"], link["rtt_measured_ms"])
        rows.append(
            f"{link['from']:<22} {link['to']:<22} {link['rtt_target_ms']:>10.2f} "
            f"{link['rtt_measured_ms']:>12.2f}  {'yes' if ok else 'NO'}"
        )
    return "\n".join(rows)


def _smoke(
    *, as_json: bool, keep_dir: bool, failover: bool, reuse_wheelhouse: bool, demo: bool
) -> int:
    from benchmarks.testbed.smoke import CASE_STUDY, SMOKE, failures, run_smoke

    try:
        result = run_smoke(
            scenario=CASE_STUDY if demo else SMOKE,
            keep_dir=keep_dir,
            failover=failover,
            rebuild_wheelhouse=not reuse_wheelhouse,
        )
    except TestbedError as exc:
        log.error("%s", exc)
        return 2
    problems = failures(result)
    result["ok"] = not problems
    result["problems"] = problems
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(_who_did_what(result))
        if result.get("round_times"):
            print("\nRound time, placement's prediction against the run:")
            for r in result["round_times"]:
                print(
                    f"  round {r['round']}: predicted {r['predicted_s']} s, measured "
                    f"{r['measured_s']} s (error {r['error']})"
                )
        if result.get("rounds_table"):
            print("\nPer-round global metrics (fedctl models list):")
            print(result["rounds_table"])
        print("\nLinks (RTT measured before the job through the relays):")
        print(_table(result))
        print(f"\ntimings: {result['timings']}")
        for problem in problems:
            print(f"PROBLEM: {problem}")
    return 0 if not problems else 1


def _case_study(*, as_json: bool, keep_dir: bool, reuse_wheelhouse: bool, rounds: int) -> int:
    from benchmarks.testbed.casestudy import MAX_ERROR, run_case_study, table

    try:
        result = run_case_study(
            rounds=rounds, keep_dir=keep_dir, rebuild_wheelhouse=not reuse_wheelhouse
        )
    except TestbedError as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(result, indent=2) if as_json else table(result))
    worst = max(max(r["time_error"], r["cost_error"]) for r in result["rows"])
    return 0 if worst <= MAX_ERROR else 1


def _who_did_what(result: dict[str, Any]) -> str:
    """Which host ran what, as seen from outside (namespaces read with `ip netns identify`)."""
    at = result["addresses"]
    hosts, job, agg = result["hosts"], result["job"], result["aggregator"]
    rows = [
        f"job {job['id']}: {job['state']}, {job['rounds_completed']} rounds"
        + (f" ({job['error']})" if job.get("error") else ""),
        "",
        f"{'host':<28} {'address':<14} what ran there",
        f"{hosts['controller']:<28} {at[hosts['controller']]:<14} fedsky-controller, its "
        "Mosquitto (8883) and enrolment listener (8443, the pinned artifacts)",
    ]
    for netns in hosts["agents"]:
        rows.append(f"{netns:<28} {at[netns]:<14} fedsky-agent (libvirt test node of its VMs)")
    if agg["host"]:
        rows.append(
            f"{agg['host']:<28} {at[agg['host']]:<14} the aggregator ({agg['placed_on']}, "
            f"{agg['instance_type']}): SuperLink pid {agg['superlink_pid']}, started by its "
            f"{agg['started_by']} in {agg['user_data_s']} s"
        )
    ran: dict[str, list[str]] = {}
    for s in result["supernodes_seen"]:
        ran.setdefault(s["netns"], []).append(f"{s['site']}'s SuperNode (pid {s['pid']})")
    for netns in hosts["vms"]:
        what = ", ".join(ran.get(netns, [])) or "idle"
        rows.append(f"{netns:<28} {at[netns]:<14} sshd; {what}")
    for netns in hosts["regions"]:
        if netns != agg["host"]:
            rows.append(f"{netns:<28} {at[netns]:<14} nothing (a region placement did not pick)")
    if "failover" in result:
        f = result["failover"]
        rows.append(
            f"\nfailover: {f['participant']} cut off in {f['cut_host']} ({f['from_vm']}), "
            f"back on {f['to_vm']} ({f['to_host']}) after {f['out_s']} s"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--links", action="store_true", help="build, measure every link, tear down")
    parser.add_argument("--cleanup", action="store_true", help="remove leftovers of a crashed run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--count", type=int, default=PROBES, help="probes per link (median)")
    parser.add_argument(
        "--region",
        action="append",
        dest="regions",
        metavar="CLOUD:REGION",
        help=f"a region host (repeatable; default {', '.join(CASE_REGIONS)})",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="one federated job across the testbed (see smoke.py)"
    )
    parser.add_argument("--keep-dir", action="store_true", help="--smoke: keep the run's files")
    parser.add_argument(
        "--failover", action="store_true", help="--smoke: cut a SuperNode's VM host off mid-job"
    )
    parser.add_argument(
        "--reuse-wheelhouse",
        action="store_true",
        help="--smoke: install from dist/wheelhouse as it is instead of rebuilding it",
    )
    parser.add_argument(
        "--demo", action="store_true", help="`make demo`'s case study across the testbed"
    )
    parser.add_argument(
        "--case-study", action="store_true", help="the study's case study, measured (casestudy.py)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--case-study: rounds per job")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    if args.case_study:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        return _case_study(
            as_json=args.json,
            keep_dir=args.keep_dir,
            reuse_wheelhouse=args.reuse_wheelhouse,
            rounds=args.rounds,
        )
    if args.failover and not (args.smoke or args.demo):
        parser.error("--failover goes with --smoke or --demo")
    if args.smoke or args.demo:
        return _smoke(
            as_json=args.json,
            keep_dir=args.keep_dir,
            failover=args.failover,
            reuse_wheelhouse=args.reuse_wheelhouse,
            demo=args.demo,
        )
    try:
        if args.cleanup:
            removed = cleanup(case_study_plan())
            print(
                json.dumps({"removed": removed.describe()})
                if args.json
                else (f"removed: {removed.describe()}" if removed else "nothing to remove")
            )
            return 0
        if not args.links:
            parser.error("say what to do: --links, --smoke, --demo or --cleanup")
        plan = case_study_plan(tuple(args.regions) if args.regions else CASE_REGIONS)
        result = run_links(plan, count=args.count)
    except TestbedError as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(result, indent=2) if args.json else _table(result))
    within = (within_tolerance(x["rtt_target_ms"], x["rtt_measured_ms"]) for x in result["links"])
    return 0 if all(within) else 1


if __name__ == "__main__":
    sys.exit(main())
