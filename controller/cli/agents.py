"""`fedctl agents`: list, enrol, revoke and ping hospitals' agents."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fedsky.controller.cli.output import (
    api_client,
    call_api,
    fail,
    number_in,
    print_json,
    print_table,
)
from fedsky.shared import exitcodes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agents = sub.add_parser("agents", help="enrolled agents (one per hospital)")
    agents.add_argument("--json", action="store_true", help="print JSON")
    agents.set_defaults(func=_list)
    a_sub = agents.add_subparsers(dest="agents_command", metavar="ACTION")

    ls = a_sub.add_parser("list", help="list agents (the default)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    enroll = a_sub.add_parser(
        "enroll", help="sign an agent's certificate request and write its bundle"
    )
    enroll.add_argument("name", help="agent id: 1-63 of a-z, 0-9, '-'")
    enroll.add_argument("--location", required=True, help="nearest cloud region, as cloud:region")
    group = enroll.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--csr", type=Path, help="the request made by `agentctl enroll request NAME`"
    )
    group.add_argument(
        "--with-key", action="store_true", help="make the private key here too (one-machine setups)"
    )
    enroll.add_argument("-o", "--out", type=Path, help="bundle file (default: NAME.bundle.json)")
    enroll.set_defaults(func=_enroll)

    revoke = a_sub.add_parser(
        "revoke", help="revoke an agent's certificate; the broker refuses it from then on"
    )
    revoke.add_argument("name")
    revoke.set_defaults(func=_revoke)

    ping = a_sub.add_parser("ping", help="send a ping command and wait for the agent's answer")
    ping.add_argument("name")
    ping.add_argument(
        "--timeout", type=number_in(0.1, 60), default=10.0, help="seconds (default 10)"
    )
    ping.set_defaults(func=_ping)


def _list(args: argparse.Namespace) -> int:
    agents, code = call_api(lambda: api_client(args).get("/v1/agents"))
    if agents is None:
        return code
    if args.json:
        print_json(agents)
        return exitcodes.OK
    rows = []
    for a in agents:
        host = a.get("host") or {}
        rows.append(
            [
                a["id"],
                a["location"],
                a["state"],
                a["vms"],
                f"{host.get('cpu_percent', 0):.0f}%" if host else "",
                f"{host.get('memory_available_mib', 0) / 1024:.1f}" if host else "",
                a.get("last_report_at") or "never",
            ]
        )
    print_table(
        ["agent", "location", "state", "vms", "host cpu", "free GiB", "last report"],
        rows,
        empty="no agents enrolled",
    )
    return exitcodes.OK


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _can_write(path: Path) -> bool:
    import os

    parent = path.parent if str(path.parent) else Path(".")
    if path.exists():
        return os.access(path, os.W_OK)
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def _enroll(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "name": args.name,
        "location": args.location,
        "with_key": bool(args.with_key),
    }
    if args.csr is not None:
        try:
            body["csr_pem"] = args.csr.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            return fail(f"cannot read {args.csr}: {exc}", exitcodes.USAGE)
    out: Path = args.out or Path(f"{args.name}.bundle.json")
    # Checked before enrolling: a bundle (and a key) the controller made but that could not be
    # written would be lost, and the name taken.
    for path in (out, out.with_name(f"{args.name}.key")) if args.with_key else (out,):
        if not _can_write(path):
            return fail(f"cannot write {path}: permission denied or no such directory")
    result, code = call_api(lambda: api_client(args).post("/v1/agents", body))
    if result is None:
        return code
    import json

    out.write_text(json.dumps(result["bundle"], indent=2))
    print(f"enrolled {args.name} at {args.location}; bundle written to {out}")
    if "key_pem" in result:
        key_path = out.with_name(f"{args.name}.key")
        _write_private(key_path, result["key_pem"].encode())
        print(f"private key written to {key_path} (0600): move it to the hospital with care")
        print(f"install with: agentctl enroll {out} --key {key_path}")
    else:
        print(f"install at the hospital with: agentctl enroll {out}")
    return exitcodes.OK


def _revoke(args: argparse.Namespace) -> int:
    result, code = call_api(lambda: api_client(args).post(f"/v1/agents/{args.name}/revoke"))
    if result is None:
        return code
    print(f"revoked {result['revoked_certificates']} certificate(s) of {args.name}")
    print(result["enforcement"])
    return exitcodes.OK


def _ping(args: argparse.Namespace) -> int:
    result, code = call_api(
        lambda: api_client(args).post(f"/v1/agents/{args.name}/ping?timeout={args.timeout}")
    )
    if result is None:
        return code
    print(f"{args.name} answered ({result['kind']}) in {result['rtt_ms']} ms")
    return exitcodes.OK
