"""HTTP routes of the Model Manager: rounds, recommendation, weights and signed metadata.

GET  /v1/models                                 jobs known to the registry, store usage
GET  /v1/models/best?job=J|all_jobs=1&metric=M|score=S&min=NAME=V&max=NAME=V&runners_up=N
GET  /v1/models/signing-key                     the controller's Ed25519 public key (PEM)
GET  /v1/jobs/{job}/models                      every round of a job (metrics, checkpoints)
GET  /v1/jobs/{job}/models/{round}              one round
GET  /v1/jobs/{job}/models/{round}/weights      the weights (safetensors)
GET  /v1/jobs/{job}/models/{round}/metadata     the signed metadata file for those weights
POST /v1/jobs/{job}/models/{round}/pin          {"pinned": true|false}

Verification happens in the client against the key from `/v1/models/signing-key` (or a key file
exported from it): the weights never need to travel back to the controller to be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from fedsky.controller.api.responses import (
    SERVICES,
    ApiProblem,
    json_ok,
    whole_number,
)
from fedsky.controller.models.criteria import (
    Criteria,
    Threshold,
    parse_metric,
    parse_score,
    parse_thresholds,
)
from fedsky.controller.models.errors import (
    CheckpointCorrupted,
    Infeasible,
    ModelManagerError,
    NotFound,
)
from fedsky.controller.models.service import ModelManager
from fedsky.shared import exitcodes
from multidict import MultiMapping

routes = web.RouteTableDef()

MAX_RUNNERS_UP = 50


def _registry(request: web.Request) -> ModelManager:
    registry = request.app[SERVICES].models
    if registry is None:
        raise ApiProblem(503, "the model registry is not running", exit_code=exitcodes.UNAVAILABLE)
    return registry


def _problem(exc: ModelManagerError) -> ApiProblem:
    if isinstance(exc, NotFound):
        return ApiProblem(404, str(exc))
    if isinstance(exc, Infeasible):
        return ApiProblem(422, str(exc), exit_code=exitcodes.INFEASIBLE)
    if isinstance(exc, CheckpointCorrupted):
        return ApiProblem(500, str(exc))
    return ApiProblem(400, str(exc), exit_code=exitcodes.USAGE)


# Job specs allow at most 10,000 rounds (`shared.jobspec`).
MAX_ROUND = 10_000


def _round_no(request: web.Request) -> int:
    return whole_number(request.match_info["round"], "round", default=0, lo=1, hi=MAX_ROUND)


@dataclass(frozen=True)
class BestQuery:
    criteria: Criteria | None  # None: each job's own selection metric
    thresholds: tuple[Threshold, ...]  # used with the job's own metric
    jobs: list[str] | None  # None: every job
    runners_up: int


def best_query(query: MultiMapping[str]) -> BestQuery:
    """Parse `/v1/models/best`'s query (ApiProblem 400 names what is wrong)."""
    getall = query.getall
    try:
        thresholds = parse_thresholds(getall("min", []), getall("max", []))
        metric, score = query.get("metric"), query.get("score")
        if metric and score:
            raise ValueError("give either metric or score, not both")
        criteria: Criteria | None = None
        if score:
            criteria = Criteria(metric=None, weights=parse_score(score), thresholds=thresholds)
        elif metric:
            criteria = Criteria(metric=parse_metric(metric), thresholds=thresholds)
    except ValueError as exc:
        raise ApiProblem(400, str(exc), exit_code=exitcodes.USAGE) from None
    runners_up = whole_number(
        query.get("runners_up"), "runners_up", default=3, lo=0, hi=MAX_RUNNERS_UP
    )
    all_jobs = query.get("all_jobs", "").lower() in ("1", "true", "yes")
    jobs = list(getall("job", []))
    if all_jobs and jobs:
        raise ApiProblem(400, "give jobs or all_jobs, not both", exit_code=exitcodes.USAGE)
    if not all_jobs and not jobs:
        what = "name a job (job=ID) or ask across all jobs (all_jobs=1)"
        raise ApiProblem(400, what, exit_code=exitcodes.USAGE)
    return BestQuery(criteria, thresholds, None if all_jobs else jobs, runners_up)


@routes.get("/v1/models")
async def list_jobs(request: web.Request) -> web.Response:
    registry = _registry(request)
    jobs = await registry.jobs()
    usage = await registry.usage()
    return json_ok({"jobs": [j.to_dict() for j in jobs], "usage": usage.to_dict()})


@routes.get("/v1/models/best")
async def best(request: web.Request) -> web.Response:
    registry = _registry(request)
    q = best_query(request.query)
    try:
        rec = await registry.best(
            job_ids=q.jobs, criteria=q.criteria, thresholds=q.thresholds, runners_up=q.runners_up
        )
    except ModelManagerError as exc:
        raise _problem(exc) from None
    # 200 even when nothing qualifies: the body says why and what is closest (`feasible: false`).
    return json_ok(rec.to_dict())


@routes.get("/v1/models/signing-key")
async def signing_key(request: web.Request) -> web.Response:
    registry = _registry(request)
    pem = registry.public_key_pem()
    key_id = registry.signing_key.key_id
    return json_ok({"algorithm": "ed25519", "key_id": key_id, "public_key_pem": pem})


async def job_rounds(registry: ModelManager, job_id: str) -> dict[str, Any]:
    """A job's rounds, the policy keeping them and the recommended round (also streamed by
    `/v1/events?job=ID`)."""
    try:
        job = await registry.job(job_id)
        rounds = await registry.rounds(job_id)
        rec = await registry.best(job_ids=[job_id], runners_up=0)
    except ModelManagerError as exc:
        raise _problem(exc) from None
    shown = job.to_dict()
    # The policy in force: the job's own, or the controller's default.
    shown["retention"] = (job.retention or registry.config.default_policy).describe()
    return {
        "job": shown,
        "rounds": [r.to_dict() for r in rounds],
        "recommended": rec.best.round if rec.best else None,
    }


@routes.get("/v1/jobs/{job}/models")
async def list_rounds(request: web.Request) -> web.Response:
    return json_ok(await job_rounds(_registry(request), request.match_info["job"]))


@routes.get(r"/v1/jobs/{job}/models/{round:\d+}")
async def get_round(request: web.Request) -> web.Response:
    registry = _registry(request)
    try:
        record = await registry.round(request.match_info["job"], _round_no(request))
    except ModelManagerError as exc:
        raise _problem(exc) from None
    return json_ok(record.to_dict())


@routes.get(r"/v1/jobs/{job}/models/{round:\d+}/weights")
async def weights(request: web.Request) -> web.Response:
    registry = _registry(request)
    job_id, round_no = request.match_info["job"], _round_no(request)
    try:
        data, record = await registry.weights(job_id, round_no)
    except ModelManagerError as exc:
        raise _problem(exc) from None
    return web.Response(
        body=data,
        content_type="application/octet-stream",
        headers={
            "X-Fedsky-Weights-Sha256": record.weights_sha256 or "",
            "Content-Disposition": f'attachment; filename="{job_id}-round{round_no}.safetensors"',
        },
    )


@routes.get(r"/v1/jobs/{job}/models/{round:\d+}/metadata")
async def metadata(request: web.Request) -> web.Response:
    registry = _registry(request)
    try:
        data = await registry.signed_metadata(request.match_info["job"], _round_no(request))
    except ModelManagerError as exc:
        raise _problem(exc) from None
    return web.Response(body=data, content_type="application/json")


@routes.post(r"/v1/jobs/{job}/models/{round:\d+}/pin")
async def pin(request: web.Request) -> web.Response:
    registry = _registry(request)
    body = await request.json() if request.can_read_body else {}
    pinned = body.get("pinned", True) if isinstance(body, dict) else True
    if not isinstance(pinned, bool):
        raise ApiProblem(400, "pinned must be true or false", exit_code=exitcodes.USAGE)
    try:
        record = await registry.pin(
            job_id=request.match_info["job"], round=_round_no(request), pinned=pinned
        )
    except ModelManagerError as exc:
        raise _problem(exc) from None
    return json_ok(record.to_dict())
