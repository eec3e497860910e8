"""`POST /v1/placement`: the optimizer's Pareto front and choice for limits a person gives.

The same `place` the job pipeline and `fedctl place` run, over the shipped catalog and the
controller's `[placement]` settings; a participant named like an enrolled agent brings the RTTs
that agent measured, as in a job. Nothing is stored: the answer is the plan, every offer
evaluated included, for the dashboard to draw.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from aiohttp import web
from fedsky.controller.api.responses import SERVICES, ApiProblem, json_ok
from fedsky.controller.inventory import store as inventory
from fedsky.controller.placement.defaults import Method
from fedsky.controller.placement.settings import PlacementConfig
from fedsky.shared import exitcodes
from pydantic import BaseModel, ConfigDict, Field

routes = web.RouteTableDef()

ParticipantName = Annotated[str, Field(min_length=1, max_length=63)]
Location = Annotated[str, Field(min_length=1, max_length=100)]


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    participants: Annotated[dict[ParticipantName, Location], Field(min_length=1, max_length=64)]
    model_mb: Annotated[float, Field(gt=0, le=1e6)]
    rounds: Annotated[int, Field(ge=1, le=10_000)]
    max_cost: Annotated[str, Field(min_length=1, max_length=40)]
    max_latency_ms: Annotated[float, Field(gt=0, le=1e6)]
    cost_weight: Annotated[float, Field(ge=0, le=1)] = 0.5
    train_s: Annotated[float, Field(ge=0, le=1e6)] | None = None
    clouds: Annotated[list[Annotated[str, Field(max_length=20)]], Field(max_length=10)] | None = (
        None
    )
    method: Method = "exact"


def plan(
    body: PlanRequest,
    *,
    settings: PlacementConfig,
    measured_rtt: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """The placement for `body` as JSON (every candidate included); ApiProblem 400 for limits
    or participants the optimizer cannot read."""
    # numpy and pymoo: imported when a plan is asked for, not when the API starts.
    from fedsky.controller.placement import (
        JobProfile,
        Limits,
        PlacementError,
        load_catalog,
        parse_cost_limit,
        place,
    )

    try:
        limits = Limits(
            max_cost=parse_cost_limit(body.max_cost),
            max_latency_ms=body.max_latency_ms,
            cost_weight=body.cost_weight,
        )
        extra = {"train_s": body.train_s} if body.train_s is not None else {}
        result = place(
            participants=body.participants,
            job=JobProfile(model_mb=body.model_mb, rounds=body.rounds, **extra),
            limits=limits,
            catalog=load_catalog(),
            measured_rtt=measured_rtt or None,
            clouds=set(body.clouds) if body.clouds else None,
            method=body.method,
            krw_per_usd=settings.krw_per_usd,
            baseline_offer=settings.baseline_offer,
            params=settings.model_params,
        )
    except PlacementError as exc:
        raise ApiProblem(400, str(exc), exit_code=exitcodes.USAGE) from None
    return result.to_json(include_candidates=True)


@routes.post("/v1/placement")
async def plan_placement(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    body = PlanRequest.model_validate(await request.json())
    agents = {a["id"]: a for a in await svc.store.run(inventory.list_agents)}
    measured = {
        name: agents[name]["rtt_ms"]
        for name in body.participants
        if name in agents and agents[name].get("rtt_ms")
    }
    settings = svc.config.placement if svc.config is not None else PlacementConfig()
    result = await asyncio.to_thread(plan, body, settings=settings, measured_rtt=measured)
    return json_ok(result)
