"""A full run through the HTTP API and `fedctl clouds`: link, list, verify, launch, enrol, remove.

Then the secrets are searched for in everything the run left: every log record (DEBUG and up,
every library), every API response, everything the CLI printed and the database files. None
may be there.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from fedsky.controller.api.app import make_app
from fedsky.controller.api.clouds import make_enroll_app
from fedsky.controller.cli.main import main as fedctl
from fedsky.controller.clouds.base import AggregatorSpec
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.security.audit import AuditTrail, list_records
from fedsky.controller.security.pki import Pki
from fedsky.controller.services import Services

from tests.fakes.aws import MotoAws, shared_moto
from tests.fakes.clouds import clouds_config, open_enrolment, open_service
from tests.fakes.gcp_server import FakeGcp, running_fake
from tests.support.csr import make_csr


@pytest.fixture
def moto() -> Any:
    server = shared_moto()
    yield server
    server.auth(False)


@pytest.fixture
def fake() -> Any:
    with running_fake() as server:
        yield server


class Recorder:
    """Keeps the body of every response the API sends."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if isinstance(response, web.Response) and response.body is not None:
            self.bodies.append(bytes(response.body))  # type: ignore[arg-type]
        return response


@pytest.fixture
async def api(
    tmp_path: Path, pki: Pki, moto: MotoAws, fake: FakeGcp
) -> AsyncIterator[tuple[str, str, CloudService, Recorder]]:
    service, store = open_service(
        tmp_path / "state", pki, clouds_config(moto_endpoint=moto.endpoint, gcp=fake)
    )
    aggregators, _ = open_enrolment(tmp_path / "state", pki, store)
    recorder = Recorder()
    # The audit log is in the database the secrets are searched for too.
    services = Services(
        store=store,
        pki=pki,
        clouds=service,
        aggregators=aggregators,
        audit=AuditTrail(store=store, signer=None, ca_cert_pem=None),
    )
    # The operator's API on its unix socket; the VMs' enrolment route on its own listener.
    operator_app, enroll_app = make_app(services), make_enroll_app(services)
    runners = []
    for app in (operator_app, enroll_app):
        app.middlewares.insert(0, recorder.middleware)  # outermost: sees error responses too
        runners.append(web.AppRunner(app))
        await runners[-1].setup()
    socket = tmp_path / "api.sock"
    await web.UnixSite(runners[0], str(socket)).start()
    site = web.TCPSite(runners[1], "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield str(socket), f"http://127.0.0.1:{port}", service, recorder
    for runner in runners:
        await runner.cleanup()
    store.close()


async def _fedctl(url: str, *args: str) -> int:
    # The CLI is blocking (http.client); the API runs on this loop.
    return await asyncio.to_thread(fedctl, ["--socket", url, "clouds", *args])


async def test_a_full_run_leaks_no_secret(
    api: tuple[str, str, CloudService, Recorder],
    moto: MotoAws,
    fake: FakeGcp,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, enroll_url, service, recorder = api
    aws_key = moto.user("fl")
    (tmp_path / "credentials.csv").write_bytes(aws_key.console_csv(with_user=True))
    gcp_info = fake.new_key()
    (tmp_path / "key.json").write_text(json.dumps(gcp_info))
    wrong = tmp_path / "wrong.csv"
    wrong.write_bytes(aws_key.console_csv().replace(aws_key.secret_access_key.encode(), b"x" * 40))
    user_cred = tmp_path / "adc.json"
    user_cred.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "c",
                "client_secret": "user-client-secret-1",
                "refresh_token": "1//refresh-token-secret",
            }
        )
    )
    # From here on, fedsky's work only (making the test's IAM key above logs it, in boto's debug).
    caplog.clear()
    caplog.set_level(logging.DEBUG)

    # Link, refuse, list, verify -- through the CLI and the API.
    assert (
        await _fedctl(url, "add", "aws", str(tmp_path / "credentials.csv"), "--name", "prod") == 0
    )
    assert await _fedctl(url, "add", "aws", str(wrong), "--name", "wrong") == 1
    assert (
        await _fedctl(url, "add", "gcp", str(tmp_path / "key.json"), "--name", "research", "--json")
        == 0
    )
    assert await _fedctl(url, "add", "gcp", str(user_cred)) == 1
    assert await _fedctl(url, "list") == 0
    assert await _fedctl(url, "list", "--json") == 0
    assert await _fedctl(url, "verify", "prod") == 0
    out = capsys.readouterr()
    assert "linked prod: ok (aws account" in out.out
    assert "not linked: AWS refused the secret access key (SignatureDoesNotMatch)" in out.err
    assert "not a service-account key" in out.err
    listing = [
        line.split() for line in out.out.splitlines() if line.startswith(("prod ", "research "))
    ]
    assert [(row[0], row[1], row[-1]) for row in listing] == [
        ("prod", "aws", "ok"),
        ("research", "gcp", "ok"),
    ]

    # Launch on both clouds and enrol each VM with the token from its startup script.
    tokens = []
    async with ClientSession() as session:
        for cloud, region, instance_type in (
            ("aws", "us-east-1", "t3.small"),
            ("gcp", "europe-west1", "e2-standard-2"),
        ):
            provider = await service.provider_for_launch(cloud, region=region)
            job = f"job-{cloud}"
            handle = await provider.launch(
                AggregatorSpec(
                    job_id=job,
                    cloud=cloud,
                    region=region,
                    instance_type=instance_type,
                    allowed_sources=("198.51.100.7/32",),
                )
            )
            if cloud == "aws":
                data = moto.client("ec2").describe_instance_attribute(
                    InstanceId=handle.ref, Attribute="userData"
                )
                script = base64.b64decode(data["UserData"]["Value"]).decode()
            else:
                script = fake.instances[("europe-west1-b", f"fedsky-agg-{job}")]["metadata"][
                    "items"
                ][0]["value"]
            token = next(word for word in script.split() if word.startswith("fsk1_")).strip("'")
            tokens.append(token)
            _, csr = make_csr(f"agg-{job}")
            _, bus_csr = make_csr(f"agg-{job}")
            body = {"token": token, "csr_pem": csr.decode(), "bus_csr_pem": bus_csr.decode()}
            async with session.post(f"{enroll_url}/v1/aggregators/enroll", json=body) as resp:
                assert resp.status == 200, await resp.text()
            await provider.terminate(handle)
    assert await _fedctl(url, "remove", "research") == 0
    assert await _fedctl(url, "verify", "research") == 1
    out = capsys.readouterr()

    secrets = {
        "aws secret access key": aws_key.secret_access_key,
        "aws console password": "Hunter2-console-pw",
        "user client secret": "user-client-secret-1",
        "user refresh token": "1//refresh-token-secret",
        "vault key": (tmp_path / "state" / "secrets" / "vault.key").read_text().strip(),
        **{f"bootstrap token {i}": t for i, t in enumerate(tokens)},
    }
    pem_lines = [
        line for line in str(gcp_info["private_key"]).splitlines() if "PRIVATE KEY" not in line
    ]
    secrets.update({f"gcp private key line {i}": line for i, line in enumerate(pem_lines)})
    identifiers = {
        "aws access key id": aws_key.access_key_id,
        "gcp private key id": str(gcp_info["private_key_id"]),
    }

    logs = "\n".join([r.getMessage() for r in caplog.records] + [caplog.text])
    responses = b"\n".join(recorder.bodies).decode()
    printed = out.out + out.err
    service.store.call(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)"))
    db_dir = tmp_path / "state"
    database = b"".join(
        p.read_bytes()
        for p in db_dir.iterdir()
        if p.is_file() and p.name.startswith("controller.db")
    )
    assert len(recorder.bodies) == 11  # every request above, answered
    assert len(caplog.records) > 50  # the libraries' debug logs are in there too
    assert b"CREATE TABLE clouds" in database
    # The admin's actions are in the audit log, by the socket's uid, with their outcomes.
    records = service.store.call(list_records)
    enrolments = [r for r in records if r["action"] == "aggregator.enrol"]
    assert [r["outcome"] for r in enrolments] == ["ok"] * len(tokens)
    assert all(r["actor"].startswith("aggregator VM at 127.0.0.1") for r in enrolments)
    records = [r for r in records if r["action"].startswith("cloud.")]
    assert [(r["action"], r["target"], r["outcome"].split(":")[0]) for r in records] == [
        ("cloud.link", "aws:prod", "ok"),
        ("cloud.link", "aws:wrong", "refused 422"),
        ("cloud.link", "gcp:research", "ok"),
        ("cloud.link", "gcp:-", "refused 400"),
        ("cloud.verify", "prod", "ok"),
        ("cloud.remove", "research", "ok"),
        ("cloud.verify", "research", "refused 404"),
    ], [(r["action"], r["target"], r["outcome"]) for r in records]
    assert all(r["actor"].startswith(f"uid:{os.getuid()}(") for r in records)

    for label, value in secrets.items():
        assert value not in logs, f"{label} in the logs"
        assert value not in responses, f"{label} in an API response"
        assert value not in printed, f"{label} printed by fedctl"
        assert value.encode() not in database, f"{label} in the database"
    for label, value in identifiers.items():
        assert value not in responses, f"{label} in an API response"
        assert value.encode() not in database, f"{label} in the database"
