"""How fedctl prints for people (tables) and for scripts (`--json`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
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


def api_client(args: Any) -> ApiClient:
    """The client for the controller named by `--socket`, or by the config file's API socket."""
    from fedsky.controller.cli.client import config_path
    from fedsky.controller.config import load_controller_config

    if getattr(args, "socket", None):
        return ApiClient(args.socket)
    cfg = load_controller_config(config_path(getattr(args, "config", None)))
    return ApiClient(str(cfg.api_socket))
