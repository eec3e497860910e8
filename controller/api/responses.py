"""What every view answers with: JSON bodies, `ApiProblem`, and the error middleware.

Errors are JSON `{"error": "...", "exit_code": N}` so that `fedctl` can print them and exit with
a meaningful code; the status and exit code of the domain's errors come from one table
(`fedsky.controller.api.errors`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from fedsky.controller.api.errors import problem_for
from fedsky.controller.services import Services
from fedsky.shared import exitcodes
from pydantic import ValidationError

log = logging.getLogger(__name__)

SERVICES = web.AppKey("services", Services)


_HTTP_MESSAGES = {
    404: "no such route",
    405: "method not allowed on this route",
    413: "request body too large",
}


def json_error(
    status: int, message: str, *, exit_code: int = exitcodes.FAILED, **extra: Any
) -> web.Response:
    body = {"error": message, "exit_code": exit_code, **extra}
    return web.json_response(body, status=status)


def json_ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda obj: json.dumps(obj, default=str))


class ApiProblem(Exception):
    """Raised by service functions for a request that cannot be served as asked."""

    def __init__(self, status: int, message: str, *, exit_code: int = exitcodes.FAILED) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.exit_code = exit_code


def whole_number(text: str | None, what: str, *, default: int, lo: int, hi: int) -> int:
    """A whole number from a query or path (`default` when absent); ApiProblem 400 unless it is
    one between `lo` and `hi`."""
    if text is None:
        return default
    if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 19):
        raise ApiProblem(
            400, f"{what} must be a whole number, got {text[:40]!r}", exit_code=exitcodes.USAGE
        )
    value = int(text)
    if not lo <= value <= hi:
        raise ApiProblem(
            400, f"{what} must be between {lo} and {hi}, got {value}", exit_code=exitcodes.USAGE
        )
    return value


def finite_number(text: str | None, what: str, *, default: float, lo: float, hi: float) -> float:
    """A number from a query (`default` when absent); ApiProblem 400 unless finite, in range."""
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiProblem(
            400,
            f"{what} must be a number between {lo:g} and {hi:g}, got {text[:40]!r}",
            exit_code=exitcodes.USAGE,
        )
    return value


def problem_response(exc: BaseException) -> web.Response | None:
    """The answer to a domain error (see `api.errors`); None for one no row answers."""
    problem = problem_for(exc)
    if problem is None:
        return None
    return json_error(problem.status, problem.message, exit_code=problem.exit_code, **problem.extra)


@web.middleware
async def domain_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answers the domain's errors by the table and lets every other exception through."""
    try:
        return await handler(request)
    except Exception as exc:
        response = problem_response(exc)
        if response is None:
            raise
        return response


@web.middleware
async def answer_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiProblem as exc:
        return json_error(exc.status, exc.message, exit_code=exc.exit_code)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        return json_error(
            400,
            f"invalid request: {where}: {first.get('msg', 'invalid')}",
            exit_code=exitcodes.USAGE,
        )
    except json.JSONDecodeError:
        return json_error(400, "invalid request: body is not JSON", exit_code=exitcodes.USAGE)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (a body over client_max_size, an unknown route) in the same
        # JSON form as every other error.
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        return json_error(exc.status, message, exit_code=exitcodes.USAGE)
    except Exception as exc:
        response = problem_response(exc)
        if response is not None:
            return response
        # Never leak internals (paths, secrets) to the client; the log has the traceback.
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return json_error(500, "internal error; see the controller's log")
