"""API views for linked cloud accounts, and the aggregator VMs' enrolment.

`POST /v1/clouds/{cloud}` takes the credential file's bytes as the body (query: `name`,
`profile`, `region`); nothing is stored unless the cloud accepts the credential. Responses
carry what `fedctl clouds list` shows, never a secret.

`POST /v1/aggregators/enroll` is what a cloud aggregator VM calls with its one-time token and
CSR. It is in `routes` (the operator's API) and in `enroll_routes`: the controller serves the
latter alone on a listener the clouds can reach (`make_enroll_app`), so that the operator's API
never has to face the internet.
"""

from __future__ import annotations

import logging
from typing import Annotated

from aiohttp import web
from fedsky.controller.api.app import SERVICES, ApiProblem, Services, json_error, json_ok
from fedsky.controller.bootstrap_tokens import TokenError
from fedsky.controller.clouds import MAX_FILE_BYTES, CloudError, CloudService, with_result
from fedsky.controller.pki import PkiError
from fedsky.shared import exitcodes
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
enroll_routes = web.RouteTableDef()

ENROLL_MAX_BYTES = 32 * 1024


def _clouds(request: web.Request) -> CloudService:
    service = request.app[SERVICES].parts.get("clouds")
    if service is None:
        raise ApiProblem(
            503,
            "cloud accounts are not available on this controller",
            exit_code=exitcodes.UNAVAILABLE,
        )
    assert isinstance(service, CloudService)
    return service


def _problem(exc: CloudError) -> web.Response:
    extra = {"validation": exc.result.to_json()} if exc.result is not None else {}
    return json_error(exc.http_status, exc.message, exit_code=exc.exit_code, **extra)


@routes.get("/v1/clouds")
async def list_clouds(request: web.Request) -> web.Response:
    return json_ok([record.to_json() for record in await _clouds(request).records()])


@routes.post("/v1/clouds/{cloud}")
async def add_cloud(request: web.Request) -> web.Response:
    service = _clouds(request)
    if request.content_length is not None and request.content_length > MAX_FILE_BYTES:
        raise ApiProblem(413, f"credential files are under {MAX_FILE_BYTES // 1024} KiB")
    data = await request.read()
    try:
        record, result = await service.add(
            cloud=request.match_info["cloud"],
            data=data,
            name=request.query.get("name") or None,
            profile=request.query.get("profile") or None,
            region=request.query.get("region") or None,
        )
    except CloudError as exc:
        return _problem(exc)
    return json_ok(with_result(record, result), status=201)


@routes.post("/v1/clouds/{name}/verify")
async def verify_cloud(request: web.Request) -> web.Response:
    try:
        record, result = await _clouds(request).verify(request.match_info["name"])
    except CloudError as exc:
        return _problem(exc)
    return json_ok(with_result(record, result))


@routes.delete("/v1/clouds/{name}")
async def remove_cloud(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        await _clouds(request).remove(name)
    except CloudError as exc:
        return _problem(exc)
    return json_ok({"removed": name})


class EnrollAggregatorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: Annotated[str, Field(min_length=16, max_length=256)]
    csr_pem: Annotated[str, Field(min_length=64, max_length=16384)]

    def __repr__(self) -> str:
        return "EnrollAggregatorRequest(token=***)"


async def enroll_aggregator(request: web.Request) -> web.Response:
    """Redeem a one-time token and a CSR for the aggregator's server certificate."""
    raw = await request.read()
    if len(raw) > ENROLL_MAX_BYTES:
        return json_error(413, "request too large")
    try:
        body = EnrollAggregatorRequest.model_validate_json(raw)
    except ValidationError:
        # pydantic's message would quote the input, which holds the token.
        return json_error(
            400, "expected a JSON object with 'token' and 'csr_pem'", exit_code=exitcodes.USAGE
        )
    service = request.app[SERVICES].parts.get("clouds")
    if not isinstance(service, CloudService):
        return json_error(503, "enrolment is not available", exit_code=exitcodes.UNAVAILABLE)
    try:
        enrolled = await service.enroll_aggregator(token=body.token, csr_pem=body.csr_pem.encode())
    except TokenError as exc:
        if exc.not_ready:
            return json_error(
                409, "not ready: the controller has not recorded this VM's address yet; retry"
            )
        log.warning("aggregator enrolment refused from %s: %s", request.remote, exc.reason)
        # One answer for unknown, used, expired and revoked: a caller learns nothing about tokens.
        return json_error(403, "the enrolment token is invalid, used or expired")
    except PkiError as exc:
        return json_error(400, f"cannot sign the request: {exc}")
    except CloudError as exc:
        return _problem(exc)
    return json_ok(
        {
            "job_id": enrolled.job_id,
            "cert_pem": enrolled.cert_pem.decode(),
            "ca_pem": enrolled.ca_pem.decode(),
        }
    )


routes.post("/v1/aggregators/enroll")(enroll_aggregator)
enroll_routes.post("/v1/aggregators/enroll")(enroll_aggregator)


def make_enroll_app(services: Services) -> web.Application:
    """An application with the enrolment route only, for the listener the clouds reach."""
    app = web.Application(client_max_size=ENROLL_MAX_BYTES)
    app[SERVICES] = services
    app.add_routes(enroll_routes)
    return app
