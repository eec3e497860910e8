"""The dashboard's pages: static files under `/ui/`, answered before any authentication.

They hold no data (every figure comes from the `/v1` routes, which a session cookie opens), so the
login page can load. Only files that exist in the package's static directory are served, looked
up by plain names: a path that is not one of them (`..`, a directory, anything hidden) is 404.
Every page goes out with a Content-Security-Policy that allows this origin's own scripts, styles
and connections only, so an injected script cannot run or send anything elsewhere.
"""

from __future__ import annotations

import asyncio
import mimetypes
import re
from pathlib import Path

from aiohttp import web
from fedsky.controller.dashboard import STATIC_DIR

routes = web.RouteTableDef()

UI_PREFIX = "/ui/"
# The routes `authorize` lets through without a caller: they serve no data.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {("GET", "/"), ("GET", "/ui/"), ("GET", "/ui/{path}")}
)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
}
_PLAIN_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def static_file(root: Path, relative: str) -> Path | None:
    """The file `relative` names under `root`, or None unless it is a plain, existing file."""
    parts = relative.split("/")
    if not relative or not all(_PLAIN_PART.match(p) and ".." not in p for p in parts):
        return None
    path = root.joinpath(*parts)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not resolved.is_file() or not resolved.is_relative_to(root.resolve()):
        return None
    return resolved


def page_response(path: Path, body: bytes) -> web.Response:
    content_type = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
    response = web.Response(body=body, content_type=content_type or "application/octet-stream")
    response.headers.update(SECURITY_HEADERS)
    # Pages change with the installed version; the browser asks again each time.
    response.headers["Cache-Control"] = "no-cache"
    return response


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound(UI_PREFIX, headers=SECURITY_HEADERS)


@routes.get("/ui/")
async def index(request: web.Request) -> web.Response:
    return await _file(request, "index.html")


@routes.get("/ui/{path:.+}")
async def asset(request: web.Request) -> web.Response:
    return await _file(request, request.match_info["path"])


def _read(relative: str) -> tuple[Path, bytes] | None:
    path = static_file(STATIC_DIR, relative)
    return None if path is None else (path, path.read_bytes())


async def _file(request: web.Request, relative: str) -> web.Response:
    found = await asyncio.to_thread(_read, relative)
    if found is None:
        raise web.HTTPNotFound()
    return page_response(*found)
