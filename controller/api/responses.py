"""What every view answers with: JSON bodies, `ApiProblem`, and the error middleware.

Errors are JSON `{"error": "...", "exit_code": N}` so that `fedctl` can print them and exit with
a meaningful code; the status and exit code of the domain's errors come from one table
(`fedsky.controller.api.errors`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from fedsky.controller.api.errors import problem_for
from fedsky.controller.services import Services
from fedsky.shared import exitcodes
from pydantic import ValidationError

log = logging.getLogger(__name__)

SERVICES = web.AppKey("services", Services)


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
    except web.HTTPException:
        raise
    except Exception as exc:
        response = problem_response(exc)
        if response is not None:
            return response
        # Never leak internals (paths, secrets) to the client; the log has the traceback.
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return json_error(500, "internal error; see the controller's log")
