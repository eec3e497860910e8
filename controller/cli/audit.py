"""`fedctl audit`: the audit log, and checking that nobody edited it.

`verify` asks the running controller, or with `--db PATH` checks a copy offline: the database,
its signed head (`--head`, default `audit-head.json` beside it) and the CA certificate (`--ca-cert`,
default `pki/ca.crt` beside it). Exit 0 when the chain holds, 1 when it does not.
"""

from __future__ import annotations

import argparse
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
from fedsky.controller.security import audit
from fedsky.shared import exitcodes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("audit", help="the audit log (admin only)")
    a_sub = parser.add_subparsers(dest="audit_command", metavar="ACTION")
    a_sub.required = True

    ls = a_sub.add_parser("list", help="records, oldest first")
    ls.add_argument("--after", type=number_in(0, 2**62, whole=True), default=0, help="after seq")
    ls.add_argument(
        "--limit", type=number_in(1, 10_000, whole=True), default=100, help="at most (100)"
    )
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    verify = a_sub.add_parser("verify", help="check the hash chain and the signed head")
    verify.add_argument("--db", type=Path, help="check this copy of controller.db offline")
    verify.add_argument("--head", type=Path, help="its signed head (default: beside --db)")
    verify.add_argument("--ca-cert", type=Path, help="the CA certificate (default: beside --db)")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=_verify)


def _list(args: argparse.Namespace) -> int:
    path = f"/v1/audit?after={int(args.after)}&limit={int(args.limit)}"
    records, code = call_api(lambda: api_client(args).get(path))
    if records is None:
        return code
    if args.json:
        print_json(records)
        return exitcodes.OK
    print_table(
        ["seq", "at", "actor", "action", "target", "outcome"],
        [
            [r["seq"], r["at"][:19], r["actor"], r["action"], r["target"], r["outcome"]]
            for r in records
        ],
    )
    return exitcodes.OK


def _offline(args: argparse.Namespace) -> dict[str, Any]:
    db: Path = args.db
    head = args.head or db.parent / audit.HEAD_FILE
    ca = args.ca_cert or db.parent / "pki" / "ca.crt"
    ca_pem = ca.read_bytes() if ca.is_file() else None
    if ca_pem is None and args.ca_cert is not None:
        raise audit.AuditError(f"no CA certificate at {ca}")
    verdict = audit.verify_file(db, head_path=head, ca_cert_pem=ca_pem)
    out = verdict.to_json()
    if ca_pem is None:
        out["warning"] = f"no CA certificate at {ca}: the head's signer was not checked"
    return out


def _verify(args: argparse.Namespace) -> int:
    if args.db is not None:
        try:
            result: dict[str, Any] | None = _offline(args)
        except audit.AuditError as exc:
            return fail(str(exc), exitcodes.USAGE)
        code = exitcodes.OK
    else:
        result, code = call_api(lambda: api_client(args).get("/v1/audit/verify"))
    if result is None:
        return code
    if args.json:
        print_json({k: result[k] for k in ("ok", "first_bad_seq", "reason") if k in result})
    elif result["ok"]:
        print(f"the audit log holds: {result['records']} record(s), chain and signed head intact")
    else:
        print(f"the audit log does NOT hold: {result['reason']}")
    if result.get("warning"):
        fail(str(result["warning"]), exitcodes.OK)
    return exitcodes.OK if result["ok"] else exitcodes.FAILED
