"""`fedctl ca init`: create the controller's certificate authority (no daemon needed);
`fedctl ca status`: what expires when (the running controller's view)."""

from __future__ import annotations

import argparse

from fedsky.controller.cli.client import config_path
from fedsky.controller.cli.output import api_client, call_api, fail, print_json, print_table
from fedsky.controller.config import load_controller_config
from fedsky.controller.security.pki import Pki, PkiError
from fedsky.controller.store import secure_state_dir
from fedsky.shared import exitcodes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="the certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION")
    ca_sub.required = True
    init = ca_sub.add_parser("init", help="create the CA in the controller's state directory")
    init.add_argument("--name", default="fedsky CA", help="the CA's common name")
    init.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (every certificate becomes invalid)",
    )
    init.set_defaults(func=_init)
    status = ca_sub.add_parser(
        "status", help="expiries of the CA, its CRL and every certificate in use, soonest first"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_status)


def _init(args: argparse.Namespace) -> int:
    config = load_controller_config(config_path(args.config))
    try:
        secure_state_dir(config.state_dir)
        pki = Pki.init(config.pki_dir, common_name=args.name, force=args.force)
    except (PkiError, OSError) as exc:
        return fail(str(exc))
    print(f"CA created in {config.pki_dir}")
    print(f"CA certificate: {pki.ca_cert_path}")
    return exitcodes.OK


def _status(args: argparse.Namespace) -> int:
    """Exit 0 when nothing has expired (some may expire within 30 days: shown), 1 otherwise."""
    status, code = call_api(lambda: api_client(args).get("/v1/ca"))
    if status is None:
        return code
    if args.json:
        print_json(status)
    else:
        print_table(
            ["what", "name", "expires", "days left", "state"],
            [
                [e["what"], e["name"], e["not_after"][:19], e["days_left"], e["state"]]
                for e in status["certificates"]
            ],
        )
        if status["expired"] or status["soon"]:
            print(f"{status['expired']} expired, {status['soon']} within 30 days")
    return exitcodes.FAILED if status["expired"] else exitcodes.OK
