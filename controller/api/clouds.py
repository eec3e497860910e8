"""API views for linked cloud accounts, and the aggregator VMs' enrolment.

`POST /v1/clouds/{cloud}` takes the credential file's bytes as the body (query: `name`,
`profile`, `region`); nothing is stored unless the cloud accepts the credential. Responses
carry what `fedctl clouds list` shows, never a secret.

`POST /v1/aggregators/enroll` is what a cloud aggregator VM calls with its one-time token and
two CSRs (the SuperLink's and its bus identity's). It is in `enroll_routes` only: the controller
serves those alone on a listener the clouds can reach (`make_enroll_app`), so that the
operator's API never has to face the internet. The VM then
fetches its job's model file there, `GET /v1/aggregators/model`, with the bus certificate it
just got as its TLS client certificate; that route is in `enroll_routes` only (the operator's
API has no client certificates). The same listener serves the pinned artifacts
(`GET /v1/artifacts/...`, `api/artifacts.py`) that cloud VMs and hospital agents install from.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from aiohttp import web
from fedsky.controller.api.access import AUDIT_TARGET
from fedsky.controller.api.artifacts import SHELF, ArtifactShelf, artifact_routes
from fedsky.controller.api.responses import SERVICES, ApiProblem, domain_errors, json_error, json_ok
from fedsky.controller.clouds.plugin import MAX_FILE_BYTES
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.clouds.validation import ValidationResult
from fedsky.controller.clouds.vault import CloudRecord
from fedsky.controller.security.aggregators import AggregatorRefused
from fedsky.controller.security.bootstrap_tokens import MODEL_PATH, TokenError
from fedsky.controller.security.pki import PkiError
from fedsky.controller.services import Services
from fedsky.shared import exitcodes
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
enroll_routes = web.RouteTableDef()

ENROLL_MAX_BYTES = 32 * 1024


def _clouds(request: web.Request) -> CloudService:
    service = request.app[SERVICES].clouds
    if service is None:
        raise ApiProblem(
            503,
            "cloud accounts are not available on this controller",
            exit_code=exitcodes.UNAVAILABLE,
        )
    return service


def _with_result(record: CloudRecord, result: ValidationResult) -> dict[str, Any]:
    """A record together with the validation that produced it."""
    body = record.to_json()
    body["notes"] = list(result.notes)
    return body


@routes.get("/v1/clouds")
async def list_clouds(request: web.Request) -> web.Response:
    return json_ok([record.to_json() for record in await _clouds(request).records()])


@routes.post("/v1/clouds/{cloud}")
async def add_cloud(request: web.Request) -> web.Response:
    service = _clouds(request)
    if request.content_length is not None and request.content_length > MAX_FILE_BYTES:
        raise ApiProblem(413, f"credential files are under {MAX_FILE_BYTES // 1024} KiB")
    data = await request.read()
    request[AUDIT_TARGET] = f"{request.match_info['cloud']}:{request.query.get('name') or '-'}"
    record, result = await service.add(
        cloud=request.match_info["cloud"],
        data=data,
        name=request.query.get("name") or None,
        profile=request.query.get("profile") or None,
        region=request.query.get("region") or None,
    )
    request[AUDIT_TARGET] = f"{record.cloud}:{record.name}"
    return json_ok(_with_result(record, result), status=201)


@routes.post("/v1/clouds/{name}/verify")
async def verify_cloud(request: web.Request) -> web.Response:
    record, result = await _clouds(request).verify(request.match_info["name"])
    return json_ok(_with_result(record, result))


@routes.delete("/v1/clouds/{name}")
async def remove_cloud(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _clouds(request).remove(name)
    return json_ok({"removed": name})


class EnrollAggregatorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: Annotated[str, Field(min_length=16, max_length=256)]
    csr_pem: Annotated[str, Field(min_length=64, max_length=16384)]  # the SuperLink's key
    bus_csr_pem: Annotated[str, Field(min_length=64, max_length=16384)]  # agg-<job>'s key

    def __repr__(self) -> str:
        return "EnrollAggregatorRequest(token=***)"


async def _audit(request: web.Request, job_id: str, outcome: str) -> None:
    """The audit record of an aggregator's enrolment: its caller holds a one-time token, not a
    user's, so it is named by its address."""
    trail = request.app[SERVICES].audit
    if trail is not None:
        await trail.record_after_the_fact(
            actor=f"aggregator VM at {request.remote or '?'} (enrolment token)",
            action="aggregator.enrol",
            target=job_id,
            outcome=outcome,
        )


async def enroll_aggregator(request: web.Request) -> web.Response:
    """Redeem a one-time token and two CSRs for the aggregator's server and bus certificates."""
    raw = await request.read()
    if len(raw) > ENROLL_MAX_BYTES:
        return json_error(413, "request too large")
    try:
        body = EnrollAggregatorRequest.model_validate_json(raw)
    except ValidationError:
        # pydantic's message would quote the input, which holds the token.
        return json_error(
            400,
            "expected a JSON object with 'token', 'csr_pem' and 'bus_csr_pem'",
            exit_code=exitcodes.USAGE,
        )
    service = request.app[SERVICES].aggregators
    if service is None:
        return json_error(503, "enrolment is not available", exit_code=exitcodes.UNAVAILABLE)
    try:
        enrolled = await service.enroll(
            token=body.token, csr_pem=body.csr_pem.encode(), bus_csr_pem=body.bus_csr_pem.encode()
        )
    except TokenError as exc:
        if exc.not_ready:
            return json_error(
                409, "not ready: the controller has not recorded this VM's address yet; retry"
            )
        log.warning("aggregator enrolment refused from %s: %s", request.remote, exc.reason)
        await _audit(request, "?", f"refused 403: {exc.reason}")
        # One answer for unknown, used, expired and revoked: a caller learns nothing about tokens.
        return json_error(403, "the enrolment token is invalid, used or expired")
    except PkiError as exc:
        return json_error(400, f"cannot sign the request: {exc}")
    await _audit(request, enrolled.job_id, "ok")
    return json_ok(
        {
            "job_id": enrolled.job_id,
            "cert_pem": enrolled.cert_pem.decode(),
            "ca_pem": enrolled.ca_pem.decode(),
            "bus_cert_pem": enrolled.bus_cert_pem.decode(),
            "broker": {
                "host": enrolled.broker.host,
                "port": enrolled.broker.port,
                "topic_prefix": enrolled.broker.topic_prefix,
            },
            "model_sha256": enrolled.model_sha256,
        }
    )


async def aggregator_model(request: web.Request) -> web.StreamResponse:
    """The job's model file, to the aggregator whose bus certificate the TLS client presented."""
    service = request.app[SERVICES].aggregators
    if service is None:
        return json_error(503, "enrolment is not available", exit_code=exitcodes.UNAVAILABLE)
    transport = request.transport
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    peer = tls.getpeercert(binary_form=True) if tls is not None else None
    try:
        path, digest = await service.model_file(peer)
    except AggregatorRefused as exc:
        log.warning("model file refused to %s: %s", request.remote, exc)
        raise
    return web.FileResponse(
        path,
        headers={"Content-Type": "application/octet-stream", "X-Fedsky-Model-Sha256": digest},
    )


enroll_routes.post("/v1/aggregators/enroll")(enroll_aggregator)
enroll_routes.get(MODEL_PATH)(aggregator_model)


def make_enroll_app(
    services: Services, *, artifacts: ArtifactShelf | None = None
) -> web.Application:
    """An application with the enrolment routes only, for the listener the clouds reach.

    It also serves the pinned artifacts (`api/artifacts.py`): `artifacts`, or by default the
    wheelhouse of the controller's config (`[artifacts] dir`); without either they answer 503.
    """
    app = web.Application(middlewares=[domain_errors], client_max_size=ENROLL_MAX_BYTES)
    app[SERVICES] = services
    if artifacts is None and services.config is not None:
        artifacts = ArtifactShelf(services.config.artifacts_dir)
    if artifacts is not None:
        app[SHELF] = artifacts
    app.add_routes(enroll_routes)
    app.add_routes(artifact_routes)
    return app
