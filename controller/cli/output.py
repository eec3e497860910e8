"""How fedctl prints for people (tables) and for scripts (`--json`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fedsky.controller.cli.client import ApiClient, ApiError, ControllerUnavailable
from fedsky.shared import exitcodes

T = TypeVar("T")


def _bound(x: float) -> str:
    return f"{int(x):,}" if x == int(x) else f"{x:g}"


def number_in(lo: float, hi: float, *, whole: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number (a whole one with `whole`) between `lo` and `hi`;
    anything else is a usage error naming the range (never a traceback)."""

    def parse(text: str) -> float:
        try:
            value: float = int(text) if whole else float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and lo <= value <= hi):
            kind = "a whole number" if whole else "a number"
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {kind} between {_bound(lo)} and {_bound(hi)}"
            )
        return value

    parse.__name__ = "whole number" if whole else "number"
    return parse


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str = "(none)"
) -> None:
    if not rows:
        print(empty)
        return
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    print("  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())


def fail(message: str, code: int = exitcodes.FAILED) -> int:
    print(f"fedctl: {message}", file=sys.stderr)
    return code


def call_api(fn: Callable[[], T]) -> tuple[T | None, int]:
    """Run an API call; on failure print a plain message and return the exit code to use."""
    try:
        return fn(), exitcodes.OK
    except ControllerUnavailable as exc:
        return None, fail(str(exc), exitcodes.UNAVAILABLE)
    except ApiError as exc:
        return None, fail(exc.message, exc.exit_code)


def _token(args: Any) -> str | None:
    """The user's token: `--token-file`, else $FEDSKY_TOKEN; never a command-line argument (it
    would show in `ps`)."""
    path = getattr(args, "token_file", None) or os.environ.get("FEDSKY_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise ControllerUnavailable(
                f"cannot read the token file {path}: {exc.strerror}"
            ) from None
    return os.environ.get("FEDSKY_TOKEN") or None


def api_client(args: Any) -> ApiClient:
    """The client for the controller named by `--socket` (a unix socket or an https URL with
    `--ca` and a token), or by the config file's API socket."""
    from fedsky.controller.cli.client import config_path
    from fedsky.controller.config import load_controller_config

    address = getattr(args, "socket", None) or os.environ.get("FEDSKY_API")
    if address:
        ca = getattr(args, "ca", None) or os.environ.get("FEDSKY_CA")
        return ApiClient(address, token=_token(args), ca_file=Path(ca) if ca else None)
    cfg = load_controller_config(config_path(getattr(args, "config", None)))
    return ApiClient(str(cfg.api_socket))
