"""`fedctl clouds`: link, list, verify and remove cloud accounts (AWS, GCP).

    fedctl clouds add aws FILE [--name NAME] [--profile P] [--region R]
    fedctl clouds add gcp FILE [--name NAME] [--region R]
    fedctl clouds list [--json]
    fedctl clouds verify NAME [--json]
    fedctl clouds remove NAME

`add` uploads the file to the controller, which checks it with the cloud before storing it
encrypted; the file itself stays where it is (delete it once linked).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import quote, urlencode

from fedsky.controller.cli.client import ApiError, ControllerUnavailable
from fedsky.controller.cli.output import api_client, call_api, fail, print_json, print_table
from fedsky.controller.clouds.catalog import CLOUD_PLUGINS
from fedsky.controller.clouds.plugin import MAX_FILE_BYTES
from fedsky.shared import exitcodes


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("clouds", help="link cloud accounts where aggregators may run")
    sub = parser.add_subparsers(dest="clouds_command", metavar="SUBCOMMAND")
    sub.required = True

    add = sub.add_parser(
        "add", help="link an account: upload a credential file, checked by the cloud"
    )
    add.add_argument("cloud", choices=list(CLOUD_PLUGINS))
    add.add_argument(
        "file",
        help="; ".join(f"{p.name}: {p.credential_files}" for p in CLOUD_PLUGINS.values())
        + " ('-' reads stdin)",
    )
    add.add_argument("--name", help="name for the account (default: <cloud>-<account or project>)")
    add.add_argument(
        "--profile", help="aws: the profile to take from a credentials ini file (default: default)"
    )
    add.add_argument(
        "--region", help="region to validate in (aws default: the profile's or us-east-1)"
    )
    add.add_argument("--json", action="store_true", help="print the result as JSON")
    add.set_defaults(func=_add)

    ls = sub.add_parser("list", help="linked accounts and their last validation")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    verify = sub.add_parser("verify", help="check a linked account with the cloud again")
    verify.add_argument("name")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_verify)

    remove = sub.add_parser("remove", help="forget a linked account (its secret is deleted)")
    remove.add_argument("name")
    remove.set_defaults(func=_remove)


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    with open(path, "rb") as fh:
        return fh.read(MAX_FILE_BYTES + 1)


def _describe(record: dict[str, Any]) -> str:
    plugin = CLOUD_PLUGINS.get(str(record.get("cloud")))
    where = plugin.holder if plugin is not None else "account"
    line = f"{record['name']}: {record['status']} ({record['cloud']} {where} {record['account']}, {record['identity']})"
    for note in record.get("notes") or []:
        line += f"\n  note: {note}"
    if record.get("status") != "ok" and record.get("message"):
        line += f"\n  {record['message']}"
    return line


def _add(args: argparse.Namespace) -> int:
    try:
        data = _read(args.file)
    except OSError as exc:
        return fail(f"cannot read {args.file}: {exc.strerror}", exitcodes.USAGE)
    if len(data) > MAX_FILE_BYTES:
        return fail(
            f"{args.file} is larger than {MAX_FILE_BYTES // 1024} KiB: not a credential file",
            exitcodes.USAGE,
        )
    query = {
        k: v
        for k, v in (("name", args.name), ("profile", args.profile), ("region", args.region))
        if v
    }
    path = f"/v1/clouds/{quote(args.cloud)}" + (f"?{urlencode(query)}" if query else "")
    client = api_client(args)
    try:
        record = client.upload(path, data)
    except ControllerUnavailable as exc:
        return fail(str(exc), exitcodes.UNAVAILABLE)
    except ApiError as exc:
        if args.json and exc.body:
            print_json(exc.body)
        return fail(f"not linked: {exc.message}", exc.exit_code)
    if args.json:
        print_json(record)
    else:
        print(f"linked {_describe(record)}")
    return exitcodes.OK


def _list(args: argparse.Namespace) -> int:
    records, code = call_api(lambda: api_client(args).get("/v1/clouds"))
    if records is None:
        return code
    if args.json:
        print_json(records)
        return exitcodes.OK
    rows = [
        (r["name"], r["cloud"], r["account"], r["identity"], r["validated_at"], r["status"])
        for r in records
    ]
    print_table(
        ["name", "cloud", "account/project", "identity", "validated at", "status"],
        rows,
        empty="no cloud account is linked",
    )
    return exitcodes.OK


def _verify(args: argparse.Namespace) -> int:
    record, code = call_api(lambda: api_client(args).post(f"/v1/clouds/{quote(args.name)}/verify"))
    if record is None:
        return code
    if args.json:
        print_json(record)
    else:
        print(_describe(record))
    return exitcodes.OK if record.get("status") == "ok" else exitcodes.FAILED


def _remove(args: argparse.Namespace) -> int:
    result, code = call_api(lambda: api_client(args).delete(f"/v1/clouds/{quote(args.name)}"))
    if result is None:
        return code
    print(f"removed {args.name}")
    return exitcodes.OK
