"""`fedctl`: the operator's CLI.

Each command group lives in its own module with a `register(subparsers)` function that adds its
parsers and sets `func` (a callable taking the parsed args and returning an exit code).
Commands that need the daemon talk to it over its HTTP API (`fedsky.controller.cli.client`);
`ca init`, `place` and `backup` run alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from fedsky.shared import exitcodes
from fedsky.shared.config import ConfigError

# One entry per command-group module under fedsky.controller.cli.
COMMAND_MODULES = (
    "ca",
    "agents",
    "vms",
    "place",
    "job",
    "bench",
    "models",
    "clouds",
    "users",
    "audit",
    "backup",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedctl", description="Operate a fedsky controller.")
    parser.add_argument(
        "--config",
        default=None,
        help="controller config file (default: $FEDSKY_CONTROLLER_CONFIG or /etc/fedsky/controller.toml)",
    )
    parser.add_argument(
        "--socket",
        default=None,
        help="controller API: a unix socket path, or https://host:port with --ca and a token "
        "(default: $FEDSKY_API, else the config's socket)",
    )
    parser.add_argument(
        "--ca",
        default=None,
        help="CA certificate that signed the API's (https only; default: $FEDSKY_CA)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="file holding your API token (https only; default: $FEDSKY_TOKEN_FILE, or the "
        "token itself in $FEDSKY_TOKEN)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        import_module(f"fedsky.controller.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"fedctl: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code if code is not None else exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
