"""One-time enrolment tokens, the enrolment route, the VM's startup script and the readiness probe."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedsky.controller import bootstrap_tokens as bt
from fedsky.controller.api.app import Services, make_app
from fedsky.controller.api.clouds import make_enroll_app
from fedsky.controller.clouds import CloudService
from fedsky.controller.pki import Pki, PkiError
from fedsky.controller.store import Store

from tests.fakes.clouds import clouds_config, open_service
from tests.support.csr import make_csr


@pytest.fixture
def service(tmp_path: Path, pki: Pki) -> Any:
    svc, store = open_service(tmp_path / "state", pki, clouds_config())
    yield svc
    store.close()


def _issue(
    store: Store, job_id: str = "job-7", ttl_s: float = 600, now: datetime | None = None
) -> str:
    return store.call(lambda conn: bt.issue_token(conn, job_id=job_id, ttl_s=ttl_s, now=now))


def _bind(store: Store, job_id: str = "job-7", ip: str = "198.51.100.20") -> int:
    return store.call(lambda conn: bt.bind_addresses(conn, job_id=job_id, ip_addresses=[ip]))


async def test_a_token_buys_one_certificate_for_the_bound_address_only(
    service: CloudService, pki: Pki
) -> None:
    store = service.store
    token = _issue(store)
    _, csr = make_csr("agg-job-7")
    with pytest.raises(bt.TokenError) as caught:
        await service.enroll_aggregator(token=token, csr_pem=csr)
    assert caught.value.not_ready  # no address yet: not spent, the VM retries
    assert _bind(store) == 1

    enrolled = await service.enroll_aggregator(token=token, csr_pem=csr)

    assert enrolled.job_id == "job-7"
    assert enrolled.ca_pem == pki.ca_cert_pem
    cert = x509.load_pem_x509_certificate(enrolled.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agg-job-7"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)) == [
        "127.0.0.1",
        "198.51.100.20",
    ]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    pki.verify(enrolled.cert_pem)
    recorded = store.call(
        lambda conn: conn.execute("SELECT common_name, kind FROM certificates").fetchall()
    )
    assert [(r["common_name"], r["kind"]) for r in recorded] == [("agg-job-7", "server")]

    with pytest.raises(bt.TokenError, match="already used"):
        await service.enroll_aggregator(token=token, csr_pem=csr)


async def test_a_csr_asking_for_other_names_gets_only_the_bound_ones(service: CloudService) -> None:
    token = _issue(service.store)
    _bind(service.store)
    wants_broker = [
        x509.SubjectAlternativeName([x509.DNSName("broker.example"), x509.DNSName("controller")])
    ]
    _, csr = make_csr("agg-job-7", extensions=wants_broker)  # type: ignore[list-item]
    enrolled = await service.enroll_aggregator(token=token, csr_pem=csr)
    sans = x509.load_pem_x509_certificate(enrolled.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]


async def test_a_refused_csr_spends_nothing(service: CloudService) -> None:
    token = _issue(service.store)
    _bind(service.store)
    _, other_name = make_csr("controller")
    with pytest.raises(PkiError, match="is for 'controller', not 'agg-job-7'"):
        await service.enroll_aggregator(token=token, csr_pem=other_name)
    _, csr = make_csr("agg-job-7")
    assert (await service.enroll_aggregator(token=token, csr_pem=csr)).job_id == "job-7"


async def test_expired_revoked_and_unknown_tokens(service: CloudService) -> None:
    store = service.store
    _, csr = make_csr("agg-job-7")
    old = _issue(store, ttl_s=60, now=datetime.now(UTC) - timedelta(minutes=5))
    _bind(store)
    with pytest.raises(bt.TokenError, match="expired"):
        await service.enroll_aggregator(token=old, csr_pem=csr)
    revoked = _issue(store)
    _bind(store)
    store.call(lambda conn: bt.revoke_tokens(conn, job_id="job-7"))
    with pytest.raises(bt.TokenError, match="revoked"):
        await service.enroll_aggregator(token=revoked, csr_pem=csr)
    with pytest.raises(bt.TokenError, match="unknown token"):
        await service.enroll_aggregator(token=revoked[:-2] + "xx", csr_pem=csr)


def test_tokens_are_stored_hashed(service: CloudService) -> None:
    token = _issue(service.store)
    service.store.call(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    raw = b"".join(p.read_bytes() for p in service.store.path.parent.iterdir() if p.is_file())
    assert token.encode() not in raw
    assert token.split("_", 1)[1][:20].encode() not in raw
    assert bt.hash_token(token).encode() in raw


# -- the HTTP route ---------------------------------------------------------------------------------


@pytest.fixture
async def http(service: CloudService) -> AsyncIterator[tuple[str, str]]:
    """The operator's API and the enrolment-only app, each on a loopback port."""
    services = Services(config=None, store=service.store, parts={"clouds": service})
    runners = []
    urls = []
    for app in (make_app(services), make_enroll_app(services)):
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")  # type: ignore[union-attr]
    yield urls[0], urls[1]
    for runner in runners:
        await runner.cleanup()


async def test_the_enrol_route(http: tuple[str, str], service: CloudService) -> None:
    api, enroll_only = http
    token = _issue(service.store)
    _, csr = make_csr("agg-job-7")
    body = {"token": token, "csr_pem": csr.decode()}
    async with ClientSession() as session:
        async with session.post(f"{enroll_only}/v1/aggregators/enroll", json=body) as resp:
            assert resp.status == 409
            assert "retry" in (await resp.json())["error"]
        _bind(service.store)
        async with session.post(f"{enroll_only}/v1/aggregators/enroll", json=body) as resp:
            assert resp.status == 200
            got = await resp.json()
            assert got["job_id"] == "job-7"
            assert "BEGIN CERTIFICATE" in got["cert_pem"]
            assert "PRIVATE KEY" not in json.dumps(got)
        async with session.post(f"{api}/v1/aggregators/enroll", json=body) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "the enrolment token is invalid, used or expired"
        async with session.post(
            f"{enroll_only}/v1/aggregators/enroll", data=b'{"token": "' + token.encode()
        ) as resp:
            assert resp.status == 400
            assert token not in await resp.text()
        # The enrolment listener serves nothing else.
        async with session.get(f"{enroll_only}/v1/clouds") as resp:
            assert resp.status == 404


# -- the VM's script --------------------------------------------------------------------------------


def _script(pki: Pki, tmp: Path, **changes: Any) -> str:
    values: dict[str, Any] = {
        "job_id": "job-7",
        "token": "fsk1_" + "t" * 43,
        "enroll_url": "https://127.0.0.1:1/v1/aggregators/enroll",
        "ca_pem": pki.ca_cert_pem.decode(),
        "port": 9092,
        "package": "https://packages.example/fedsky-0.1.0-py3-none-any.whl[aggregator]",
        "pip_index_url": None,
        "preinstalled": False,
        "directory": str(tmp / "etc"),
        "venv": str(tmp / "venv"),
        "unit_dir": str(tmp / "units"),
    }
    values.update(changes)
    return bt.render_startup_script(**values)


def test_the_script_is_valid_bash_and_holds_no_key(pki: Pki, tmp_path: Path) -> None:
    for preinstalled in (False, True):
        script = _script(
            pki, tmp_path, preinstalled=preinstalled, pip_index_url="https://pypi.example/simple"
        )
        subprocess.run(["bash", "-n"], input=script.encode(), check=True)
        assert "PRIVATE KEY" not in script
        assert script.count("fsk1_") == 1
    assert (
        "pip\" install --quiet --index-url https://pypi.example/simple 'https://packages.example"
        in _script(pki, tmp_path, pip_index_url="https://pypi.example/simple")
    )
    with pytest.raises(ValueError, match="does not make a valid aggregator id"):
        _script(pki, tmp_path, job_id="job; rm -rf /")


async def test_the_script_enrols_against_a_real_listener(
    service: CloudService, pki: Pki, tmp_path: Path
) -> None:
    """Run the startup script (minus the package install and systemd) against the enrolment app over TLS."""
    listener = pki.issue(common_name="127.0.0.1", kind="server", ip_addresses=["127.0.0.1"], days=1)
    (tmp_path / "tls.crt").write_bytes(listener.cert_pem)
    assert listener.key_pem is not None
    (tmp_path / "tls.key").write_bytes(listener.key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    seen: list[bytes] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(await request.read())
        return await handler(request)

    app = make_enroll_app(Services(config=None, store=service.store, parts={"clouds": service}))
    app.middlewares.append(record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        token = _issue(service.store)
        _bind(service.store, ip="198.51.100.20")
        venv_bin = tmp_path / "venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "flower-superlink").write_text("#!/bin/sh\n")
        (venv_bin / "flower-superlink").chmod(0o755)
        stubs = tmp_path / "stubs"
        stubs.mkdir()
        (stubs / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/systemctl.log\n')
        (stubs / "systemctl").chmod(0o755)
        (tmp_path / "units").mkdir()
        script = _script(
            pki,
            tmp_path,
            token=token,
            preinstalled=True,
            enroll_url=f"https://127.0.0.1:{port}/v1/aggregators/enroll",
        )
        env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-s",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _, err = await asyncio.wait_for(proc.communicate(script.encode()), 60)
        assert proc.returncode == 0, err.decode()
    finally:
        await runner.cleanup()

    etc = tmp_path / "etc"
    cert = x509.load_pem_x509_certificate((etc / "superlink.crt").read_bytes())
    pki.verify((etc / "superlink.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=agg-job-7"
    assert (etc / "superlink.key").stat().st_mode & 0o077 == 0
    assert not (etc / "token").exists()
    assert not (etc / "request.json").exists()
    # The key was made on the "VM" and never sent: the controller saw a CSR and the token only.
    (request,) = seen
    assert b"PRIVATE KEY" not in request
    assert json.loads(request)["token"] == token
    unit = (tmp_path / "units" / "fedsky-superlink.service").read_text()
    assert f"--ssl-certfile {etc}/superlink.crt" in unit
    assert "--enable-supernode-auth" in unit
    assert (tmp_path / "systemctl.log").read_text().splitlines() == [
        "daemon-reload",
        "enable --now fedsky-superlink.service",
    ]


# -- the readiness probe ----------------------------------------------------------------------------


async def test_the_probe_needs_our_ca_and_the_right_name(pki: Pki, tmp_path: Path) -> None:
    other = Pki.init(tmp_path / "other-ca")
    results = {}
    for label, ca, ip in (
        ("ours", pki, "127.0.0.1"),
        ("foreign", other, "127.0.0.1"),
        ("wrong-name", pki, "192.0.2.1"),
    ):
        issued = ca.issue(common_name="agg-job-7", kind="server", ip_addresses=[ip], days=1)
        assert issued.key_pem is not None
        (tmp_path / f"{label}.crt").write_bytes(issued.cert_pem)
        (tmp_path / f"{label}.key").write_bytes(issued.key_pem)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tmp_path / f"{label}.crt", tmp_path / f"{label}.key")
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            results[label] = await bt.tls_probe(pki.ca_cert_pem, timeout_s=5)(f"127.0.0.1:{port}")
    closed = await bt.tls_probe(pki.ca_cert_pem, timeout_s=2)(f"127.0.0.1:{port}")
    assert results == {"ours": True, "foreign": False, "wrong-name": False}
    assert closed is False
