"""`fedctl users`: the people who use the API over the network, their roles and tokens."""

from __future__ import annotations

import argparse
import sys

from fedsky.controller.cli.output import api_client, call_api, print_json, print_table
from fedsky.shared import exitcodes

ROLES = ("viewer", "scientist", "operator", "admin")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = sub.add_parser("users", help="API users (admin only)")
    users.add_argument("--json", action="store_true", help="print JSON")
    users.set_defaults(func=_list)
    u_sub = users.add_subparsers(dest="users_command", metavar="ACTION")

    ls = u_sub.add_parser("list", help="list users (the default)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    add = u_sub.add_parser("add", help="add a user and print their token (shown once)")
    add.add_argument("name", help="a-z, 0-9, '.', '_', '-', starting with a letter")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(func=_add)

    revoke = u_sub.add_parser("revoke", help="stop a user's token at once")
    revoke.add_argument("name")
    revoke.set_defaults(func=_revoke)


def _list(args: argparse.Namespace) -> int:
    found, code = call_api(lambda: api_client(args).get("/v1/users"))
    if found is None:
        return code
    if args.json:
        print_json(found)
        return exitcodes.OK
    print_table(
        ["name", "role", "created", "by", "revoked"],
        [
            [u["name"], u["role"], u["created_at"][:19], u["created_by"], u["revoked_at"] or ""]
            for u in found
        ],
    )
    return exitcodes.OK


def _add(args: argparse.Namespace) -> int:
    added, code = call_api(
        lambda: api_client(args).post("/v1/users", {"name": args.name, "role": args.role})
    )
    if added is None:
        return code
    if args.json:
        print_json(added)
        return exitcodes.OK
    print(added["token"])
    print(
        f"user {added['name']} ({added['role']}) added; the token above is shown only now: "
        "give it to them for --token-file",
        file=sys.stderr,
    )
    return exitcodes.OK


def _revoke(args: argparse.Namespace) -> int:
    done, code = call_api(lambda: api_client(args).post(f"/v1/users/{args.name}/revoke"))
    if done is None:
        return code
    print(f"user {args.name} revoked")
    return exitcodes.OK
