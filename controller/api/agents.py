"""API views for agents and VMs: enrol, revoke, ping, list."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated

from aiohttp import web
from fedsky.controller.api.responses import (
    SERVICES,
    ApiProblem,
    finite_number,
    json_ok,
    whole_number,
)
from fedsky.controller.bus.consumer import BusUnavailable
from fedsky.controller.inventory import store as inventory
from fedsky.controller.orchestrator.eligibility import annotate_eligibility
from fedsky.controller.orchestrator.policy import MinResources, Policy
from fedsky.controller.security import enrollment
from fedsky.controller.services import Services
from fedsky.shared import exitcodes
from fedsky.shared.ids import InvalidIdError
from fedsky.shared.messages import Event, make_ping
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


class EnrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(max_length=63)]
    location: Annotated[str, Field(max_length=100)]
    csr_pem: Annotated[str, Field(max_length=16384)] | None = None
    with_key: bool = False


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    svc = _services(request)
    bus = svc.bus
    return json_ok(
        {
            "status": "ok",
            "bus_connected": bool(bus and bus.connected),
            "bus_connected_since": bus.stats.connected_since if bus else None,
            "broker_managed": svc.need_config().broker.managed,
            "broker_pid": getattr(svc.broker, "pid", None),
            "received": bus.stats.received if bus else 0,
            "reports_stored": bus.stats.reports_stored if bus else 0,
            "rejected": bus.stats.rejects.by_reason() if bus else {},
            "ingest_backlog": bus.ingest_backlog if bus else 0,
        }
    )


@routes.get("/v1/agents")
async def list_agents(request: web.Request) -> web.Response:
    return json_ok(await _services(request).store.run(inventory.list_agents))


@routes.get("/v1/agents/{agent_id}")
async def get_agent(request: web.Request) -> web.Response:
    agent_id = request.match_info["agent_id"]
    agent = await _services(request).store.run(inventory.get_agent, agent_id)
    if agent is None:
        raise ApiProblem(404, f"no agent {agent_id!r} is enrolled")
    return json_ok(agent)


@routes.get("/v1/agents/{agent_id}/history")
async def agent_history(request: web.Request) -> web.Response:
    agent_id = request.match_info["agent_id"]
    limit = whole_number(request.query.get("limit"), "limit", default=50, lo=1, hi=1000)
    return json_ok(await _services(request).store.run(inventory.history, agent_id, limit))


_MINIMUM_KEYS = ("min_vcpus", "min_memory_gib", "min_disk_gib")


@routes.get("/v1/vms")
async def list_vms(request: web.Request) -> web.Response:
    """Every VM; with a job's minimums (`min_vcpus`, `min_memory_gib`, `min_disk_gib`), each
    also says whether the orchestrator could give it a task now and, if not, why."""
    svc = _services(request)
    agent_id = request.query.get("agent")
    rows = await svc.store.run(inventory.list_vms, agent_id)
    if not any(key in request.query for key in _MINIMUM_KEYS):
        return json_ok(rows)
    q = request.query
    minimum = MinResources(
        vcpus=whole_number(q.get("min_vcpus"), "min_vcpus", default=0, lo=0, hi=4096),
        memory_gib=finite_number(
            q.get("min_memory_gib"), "min_memory_gib", default=0, lo=0, hi=1e6
        ),
        disk_gib=finite_number(q.get("min_disk_gib"), "min_disk_gib", default=0, lo=0, hi=1e7),
    )
    tasks, rests = {}, {}
    if svc.jobs is not None:
        tasks = await svc.jobs.active_tasks()
        rests = await svc.jobs.rests(sorted({str(row["agent_id"]) for row in rows}))
    policy = svc.config.orchestrator if svc.config is not None else Policy()
    return json_ok(
        annotate_eligibility(
            rows, minimum=minimum, policy=policy, now=datetime.now(UTC), tasks=tasks, rests=rests
        )
    )


@routes.post("/v1/agents")
async def enrol(request: web.Request) -> web.Response:
    svc = _services(request)
    body = EnrolRequest.model_validate(await request.json())
    if body.csr_pem is None and not body.with_key:
        raise ApiProblem(
            400,
            "give the agent's certificate request (--csr FILE), or --with-key",
            exit_code=exitcodes.USAGE,
        )
    if body.csr_pem is not None and body.with_key:
        raise ApiProblem(400, "--csr and --with-key exclude each other", exit_code=exitcodes.USAGE)
    cfg = svc.need_config()
    try:
        result = await svc.store.run(
            enrollment.enroll_agent,
            svc.need_pki(),
            agent_id=body.name,
            location=body.location,
            csr_pem=body.csr_pem.encode() if body.csr_pem else None,
            broker_host=cfg.broker_public_host,
            broker_port=cfg.broker.port,
            topic_prefix=cfg.bus.topic_prefix,
            days=cfg.pki.agent_cert_days,
        )
    except InvalidIdError as exc:
        raise ApiProblem(400, str(exc), exit_code=exitcodes.USAGE) from None
    except enrollment.EnrolmentError as exc:
        raise ApiProblem(409 if exc.conflict else 400, str(exc)) from None
    log.info("enrolled agent %s at %s", body.name, body.location)
    out: dict[str, object] = {"bundle": result.bundle.model_dump(mode="json", by_alias=True)}
    if result.key_pem is not None:
        out["key_pem"] = result.key_pem.decode()
    return json_ok(out, status=201)


@routes.post("/v1/agents/{agent_id}/revoke")
async def revoke(request: web.Request) -> web.Response:
    svc = _services(request)
    agent_id = request.match_info["agent_id"]
    try:
        count = await svc.store.run(enrollment.revoke_agent, svc.need_pki(), agent_id)
    except enrollment.EnrolmentError as exc:
        raise ApiProblem(404 if exc.not_found else 409, str(exc)) from None
    log.info("revoked %d certificate(s) of agent %s", count, agent_id)
    enforcement = await svc.need_revocations().agent_revoked(agent_id)
    return json_ok(
        {"agent_id": agent_id, "revoked_certificates": count, "enforcement": enforcement}
    )


@routes.post("/v1/agents/{agent_id}/ping")
async def ping(request: web.Request) -> web.Response:
    svc = _services(request)
    agent_id = request.match_info["agent_id"]
    timeout = finite_number(request.query.get("timeout"), "timeout", default=10.0, lo=0.1, hi=60.0)
    agent = await svc.store.run(inventory.get_agent, agent_id)
    if agent is None or agent["state"] == "revoked":
        raise ApiProblem(404, f"no enrolled agent {agent_id!r}")
    bus = svc.need_bus()
    command = make_ping(ttl=timedelta(seconds=timeout))
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[Event] = loop.create_future()

    async def on_event(event: Event) -> None:
        if (
            event.command_id == command.command_id
            and event.agent_id == agent_id
            and not answered.done()
        ):
            answered.set_result(event)

    bus.add_event_listener(on_event)
    started = loop.time()
    try:
        await bus.send_command(agent_id, command)
        event = await asyncio.wait_for(answered, timeout)
    except BusUnavailable as exc:
        raise ApiProblem(503, str(exc), exit_code=exitcodes.UNAVAILABLE) from None
    except TimeoutError:
        raise ApiProblem(504, f"agent {agent_id!r} did not answer within {timeout:g} s") from None
    finally:
        bus.remove_event_listener(on_event)
    return json_ok(
        {
            "agent_id": agent_id,
            "kind": event.kind,
            "rtt_ms": round((loop.time() - started) * 1000, 1),
        }
    )
