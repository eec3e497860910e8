"""`GET /v1/events`: what the dashboard shows, streamed as server-sent events.

Each named event carries the JSON of the route it mirrors and is sent once when the stream opens
and again whenever that JSON changes: `agents` (GET /v1/agents), `vms` (GET /v1/vms), `jobs`
(GET /v1/jobs); with `?job=ID` also `job` (GET /v1/jobs/ID), `rounds` (GET /v1/jobs/ID/models)
and `explain` (GET /v1/jobs/ID/explain). The stream reads the same store functions the routes
do, every `[api] events_interval_s`; it checks the caller again before each look, so a revoked
user or an expired session stops receiving at once (the browser reconnects and is told 401).
A comment line every 15 s keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from fedsky.controller.api.access import caller_of, identify
from fedsky.controller.api.jobs import job_detail
from fedsky.controller.api.models import job_rounds
from fedsky.controller.api.responses import SERVICES, ApiProblem
from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.services import Services
from fedsky.shared import exitcodes

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

KEEPALIVE_S = 15.0


# Streams one caller may hold at once (a few tabs): one user cannot take every slot.
MAX_STREAMS_PER_CALLER = 4
# A browser that stops reading for this long loses its stream (and its slot).
WRITE_TIMEOUT_S = 30.0


class StreamCount:
    """The streams open now (one per dashboard tab), held to `[api] max_event_streams` in all
    and to MAX_STREAMS_PER_CALLER each."""

    def __init__(self) -> None:
        self.open = 0
        self.by_caller: dict[str, int] = {}

    def refusal(self, caller: str, limit: int) -> str | None:
        if self.open >= limit:
            return f"too many live streams open ({limit}); close a dashboard tab"
        if self.by_caller.get(caller, 0) >= MAX_STREAMS_PER_CALLER:
            return (
                f"{caller} already follows {MAX_STREAMS_PER_CALLER} live streams; "
                "close a dashboard tab"
            )
        return None

    def opened(self, caller: str) -> None:
        self.open += 1
        self.by_caller[caller] = self.by_caller.get(caller, 0) + 1

    def closed(self, caller: str) -> None:
        self.open -= 1
        left = self.by_caller.get(caller, 1) - 1
        if left:
            self.by_caller[caller] = left
        else:
            self.by_caller.pop(caller, None)


EVENT_STREAMS = web.AppKey("event_streams", StreamCount)

Source = Callable[[], Awaitable[Any]]


def sources(svc: Services, job_id: str | None) -> dict[str, Source]:
    """The named snapshots a stream follows."""

    async def agents() -> Any:
        return await svc.store.run(inventory.list_agents)

    async def vms() -> Any:
        return await svc.store.run(inventory.list_vms, None)

    async def jobs() -> Any:
        return await svc.store.run(jobstore.list_jobs)

    named: dict[str, Source] = {"agents": agents, "vms": vms, "jobs": jobs}
    if job_id is None:
        return named

    async def job() -> Any:
        return await job_detail(svc, job_id)

    named["job"] = job
    if svc.models is not None:
        registry = svc.models

        async def rounds() -> Any:
            return await job_rounds(registry, job_id)

        named["rounds"] = rounds
    if svc.jobs is not None:
        manager = svc.jobs

        async def explain() -> Any:
            return await manager.explain(job_id)

        named["explain"] = explain
    return named


def event_text(name: str, data: str) -> bytes:
    """One server-sent event; `data` is single-line JSON, so one `data:` line holds it."""
    return f"event: {name}\ndata: {data}\n\n".encode()


class Changes:
    """Which snapshots differ from the last ones sent."""

    def __init__(self) -> None:
        self._sent: dict[str, str] = {}

    def changed(self, name: str, value: Any) -> str | None:
        text = json.dumps(value, default=str, sort_keys=True, separators=(",", ":"))
        if self._sent.get(name) == text:
            return None
        self._sent[name] = text
        return text


# No HEAD: a stream has no end for a HEAD answer's empty body to stand for.
@routes.get("/v1/events", allow_head=False)
async def events(request: web.Request) -> web.StreamResponse:
    svc: Services = request.app[SERVICES]
    job_id = request.query.get("job")
    if job_id is not None:
        try:
            await svc.store.run(jobstore.get_job, job_id)
        except jobstore.JobNotFound:
            raise ApiProblem(404, f"no job {job_id!r}") from None
    settings = svc.config.api if svc.config is not None else None
    interval = settings.events_interval_s if settings is not None else 1.0
    limit = settings.max_event_streams if settings is not None else 32
    streams = request.app[EVENT_STREAMS]
    caller = caller_of(request)
    who = caller.name if caller is not None else "?"
    refusal = streams.refusal(who, limit)
    if refusal is not None:
        raise ApiProblem(503, refusal, exit_code=exitcodes.UNAVAILABLE)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    streams.opened(who)
    try:
        await response.prepare(request)
        await follow(request, response, sources(svc, job_id), interval=interval)
    except (ConnectionResetError, TimeoutError):
        pass  # the browser went away, or stopped reading
    finally:
        streams.closed(who)
    return response


async def follow(
    request: web.Request,
    response: web.StreamResponse,
    named: dict[str, Source],
    *,
    interval: float,
) -> None:
    """Send each snapshot when it changes until the caller is no longer allowed or goes away."""
    changes = Changes()
    last_write = time.monotonic()
    while True:
        if await identify(request) is None:
            log.info("event stream of %s ended: its caller is no longer valid", request.remote)
            return
        for name, fetch in named.items():
            try:
                value = await fetch()
            except ApiProblem as exc:
                value = {"error": exc.message}
            except Exception:
                # The answer has begun: no error response can follow it. End the stream (the
                # browser reconnects) and keep the reason in the log.
                log.exception("event stream of %s: reading %s failed", request.remote, name)
                return
            text = changes.changed(name, value)
            if text is not None:
                await _write(response, event_text(name, text))
                last_write = time.monotonic()
        if time.monotonic() - last_write >= KEEPALIVE_S:
            await _write(response, b": keepalive\n\n")
            last_write = time.monotonic()
        await asyncio.sleep(interval)


async def _write(response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await response.write(data)
