"""API views for jobs: upload a model file, submit, list, status, cancel, logs, explain."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from fedsky.controller.api.access import AUDIT_TARGET, caller_of
from fedsky.controller.api.responses import (
    SERVICES,
    ApiProblem,
    json_ok,
    whole_number,
)
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.driver import JobManager
from fedsky.controller.jobs.forecast import round_times
from fedsky.controller.jobs.model_files import store_model_file
from fedsky.controller.jobs.records import JobRejected
from fedsky.controller.models.errors import NotFound
from fedsky.controller.services import Services
from fedsky.shared import exitcodes
from fedsky.shared.config import ConfigError
from fedsky.shared.jobspec import load_job_spec_data, parse_job_spec
from fedsky.shared.modelfile import MAX_MODEL_FILE_BYTES, ModelFileError
from pydantic import BaseModel, ConfigDict, Field

routes = web.RouteTableDef()

MAX_SPEC_BYTES = 256 << 10


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any]
    model_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _svc(request: web.Request) -> Services:
    return request.app[SERVICES]


def _jobs(request: web.Request) -> JobManager:
    manager = _svc(request).jobs
    if manager is None:
        raise ApiProblem(503, "the job manager is not running", exit_code=exitcodes.UNAVAILABLE)
    return manager


async def _job(request: web.Request) -> dict[str, Any]:
    job_id = request.match_info["job_id"]
    try:
        job: dict[str, Any] = await _svc(request).store.run(jobstore.get_job, job_id)
    except jobstore.JobNotFound:
        raise ApiProblem(404, f"no job {job_id!r}") from None
    return job


@routes.post("/v1/model-files")
async def upload_model_file(request: web.Request) -> web.Response:
    data = await request.read()
    if not data:
        raise ApiProblem(400, "empty model file", exit_code=exitcodes.USAGE)
    if len(data) > MAX_MODEL_FILE_BYTES:
        raise ApiProblem(413, f"model file larger than {MAX_MODEL_FILE_BYTES >> 20} MiB")
    try:
        stored = await asyncio.to_thread(
            store_model_file, _svc(request).need_config().state_dir, data
        )
    except ModelFileError as exc:
        raise ApiProblem(
            400, f"the model file does not load: {exc}", exit_code=exitcodes.USAGE
        ) from None
    request[AUDIT_TARGET] = stored.digest
    return json_ok(stored.to_json(), status=201)


# A spec sent with its model file names that file alone: the file itself comes as an upload.
_MODEL_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def checked_spec(text: str, fmt: Literal["toml", "yaml"]) -> dict[str, Any]:
    """A spec file's text as the JSON `POST /v1/jobs` takes; ConfigError naming what is wrong.

    Nothing of the controller's own file system is consulted or shown: `model` must be a plain
    file name, and it is returned as given.
    """
    name = Path(f"job.{fmt}")
    data = load_job_spec_data(text, path=name, fmt=fmt)
    model = data.get("model")
    if not isinstance(model, str) or not _MODEL_FILE_NAME.fullmatch(model) or ".." in model:
        raise ConfigError(
            f"{name}: key 'model': give the model file's name alone (e.g. model.safetensors); "
            "the file itself is uploaded beside the spec"
        )
    spec = parse_job_spec(data, path=_NO_DIRECTORY / name)
    out: dict[str, Any] = spec.model_dump(mode="json")
    out["model"] = model
    return out


# Where a received spec's relative paths would point: nowhere on this host.
_NO_DIRECTORY = Path("/nonexistent/fedsky-upload")


async def read_at_most(request: web.Request, limit: int, what: str) -> bytes:
    """The request's body, refused with 413 as soon as it passes `limit` bytes (not after
    reading up to the server's own, far larger, limit)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiProblem(413, f"{what} is at most {limit >> 10} KiB")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 << 10):
        body += chunk
        if len(body) > limit:
            raise ApiProblem(413, f"{what} is at most {limit >> 10} KiB")
    return bytes(body)


@routes.post("/v1/job-specs")
async def check_spec(request: web.Request) -> web.Response:
    """A job spec file's text (TOML, or YAML with `?format=yaml`) checked and returned as the
    JSON `POST /v1/jobs` takes: the dashboard submits a spec file the way `fedctl` reads one."""
    fmt = request.query.get("format", "toml")
    if fmt not in ("toml", "yaml"):
        raise ApiProblem(400, "format must be toml or yaml", exit_code=exitcodes.USAGE)
    raw = await read_at_most(request, MAX_SPEC_BYTES, "a job spec")
    if not raw.strip():
        raise ApiProblem(400, "empty job spec", exit_code=exitcodes.USAGE)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiProblem(400, "a job spec must be UTF-8 text", exit_code=exitcodes.USAGE) from None
    try:
        spec = await asyncio.to_thread(checked_spec, text, "yaml" if fmt == "yaml" else "toml")
    except ConfigError as exc:
        raise ApiProblem(400, str(exc), exit_code=exitcodes.USAGE) from None
    return json_ok({"spec": spec})


@routes.post("/v1/jobs")
async def submit(request: web.Request) -> web.Response:
    body = SubmitRequest.model_validate(await request.json())
    try:
        job_id = await _jobs(request).submit(
            spec_data=body.spec,
            model_digest=body.model_digest,
            owner=caller.name if (caller := caller_of(request)) else None,
        )
    except JobRejected as exc:
        raise ApiProblem(
            422, str(exc), exit_code=exitcodes.INFEASIBLE if exc.infeasible else exitcodes.FAILED
        ) from None
    request[AUDIT_TARGET] = job_id
    job = await _svc(request).store.run(jobstore.get_job, job_id)
    return json_ok(job, status=201)


@routes.get("/v1/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    return json_ok(await _svc(request).store.run(jobstore.list_jobs))


async def job_detail(svc: Services, job_id: str) -> dict[str, Any]:
    """A job with its tasks and each round's predicted and measured time (also streamed by
    `/v1/events?job=ID`)."""
    try:
        job: dict[str, Any] = await svc.store.run(jobstore.get_job, job_id)
    except jobstore.JobNotFound:
        raise ApiProblem(404, f"no job {job_id!r}") from None
    rounds = []
    if svc.models is not None:
        try:
            rounds = await svc.models.rounds(job["id"])
        except NotFound:
            rounds = []  # not recorded yet
    # The placement's predicted round time beside each round's measured one.
    job["round_times"] = round_times(job.get("placement"), rounds)
    return job


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    return json_ok(await job_detail(_svc(request), request.match_info["job_id"]))


@routes.post("/v1/jobs/{job_id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    job = await _job(request)
    if job["state"] in jobstore.END_STATES:
        raise ApiProblem(409, f"job {job['id']} already ended: {job['state']}")
    await _jobs(request).cancel(job["id"])
    return json_ok(await _job(request))


@routes.get("/v1/jobs/{job_id}/logs")
async def logs(request: web.Request) -> web.Response:
    after = whole_number(request.query.get("after"), "after", default=0, lo=0, hi=2**63 - 1)
    job = await _job(request)
    return json_ok(await _svc(request).store.run(jobstore.job_log, job["id"], after_id=after))


@routes.get("/v1/jobs/{job_id}/explain")
async def explain(request: web.Request) -> web.Response:
    job = await _job(request)
    return json_ok(await _jobs(request).explain(job["id"]))
