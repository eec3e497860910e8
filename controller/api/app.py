"""The controller's HTTP API (aiohttp): thin views over the same service functions the CLI uses.

Each route module under `fedsky.controller.api` exposes `routes: web.RouteTableDef`; the views
take what they need from `request.app[SERVICES]`. Errors are JSON `{"error": "...",
"exit_code": N}` so that `fedctl` can print them and exit with a meaningful code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import import_module
from typing import Any

from aiohttp import web
from fedsky.controller.services import PartUnavailable, Services
from fedsky.shared import exitcodes
from pydantic import ValidationError

log = logging.getLogger(__name__)

# Route modules under fedsky.controller.api, in registration order.
ROUTE_MODULES: tuple[str, ...] = ("agents", "jobs", "models", "clouds")

MAX_BODY_BYTES = 64 << 20  # uploads (model files, credential files) stay well under this


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


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiProblem as exc:
        return json_error(exc.status, exc.message, exit_code=exc.exit_code)
    except PartUnavailable as exc:
        return json_error(503, str(exc), exit_code=exitcodes.UNAVAILABLE)
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
    except Exception:
        # Never leak internals (paths, secrets) to the client; the log has the traceback.
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return json_error(500, "internal error; see the controller's log")


def make_app(services: Services) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[SERVICES] = services
    for name in ROUTE_MODULES:
        app.add_routes(import_module(f"fedsky.controller.api.{name}").routes)
    return app
