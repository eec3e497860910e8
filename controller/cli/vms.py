"""`fedctl vms`: every VM the agents report, with state and resources."""

from __future__ import annotations

import argparse

from fedsky.controller.cli.output import api_client, call_api, print_json, print_table
from fedsky.shared import exitcodes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vms = sub.add_parser("vms", help="VMs in the hospitals' private clouds")
    vms.add_argument("--agent", help="only this agent's VMs")
    vms.add_argument("--json", action="store_true", help="print JSON")
    vms.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    path = "/v1/vms" + (f"?agent={args.agent}" if args.agent else "")
    vms, code = call_api(lambda: api_client(args).get(path))
    if vms is None:
        return code
    if args.json:
        print_json(vms)
        return exitcodes.OK
    rows = [
        [
            v["agent_id"],
            v["name"],
            v["state"],
            v["vcpus"],
            f"{v['memory_mib'] / 1024:g}",
            f"{v['disk_gib']:g}",
            ",".join(v["addresses"]) or "-",
            "" if v["agent_online"] else "(agent offline)",
        ]
        for v in vms
    ]
    print_table(
        ["agent", "vm", "state", "vcpus", "mem GiB", "disk GiB", "addresses", ""],
        rows,
        empty="no VMs reported",
    )
    return exitcodes.OK
