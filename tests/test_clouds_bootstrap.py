"""One-time enrolment tokens, the enrolment route, the VM's startup script and the readiness probe."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientError, ClientSession, TCPConnector, web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedsky.controller.api.app import make_app
from fedsky.controller.api.artifacts import ArtifactShelf
from fedsky.controller.api.clouds import make_enroll_app
from fedsky.controller.api.enroll_listener import listener_tls
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.model_files import model_file_path
from fedsky.controller.security import bootstrap_tokens as bt
from fedsky.controller.security import startup_script
from fedsky.controller.security.aggregators import AggregatorEnrolment
from fedsky.controller.security.enrollment import record_certificate, revoke_common_name
from fedsky.controller.security.pki import IssuedCertificate, Pki, PkiError
from fedsky.controller.services import Services
from fedsky.controller.store import Store
from fedsky.shared.artifacts import MANIFEST_FILE, build_manifest, read_manifest

from tests.fakes.clouds import open_enrolment
from tests.support import free_port, make_csr
from tests.support.wheels import write_wheelhouse

# The bus identity's CSR (agg-job-7, a key of its own) that goes with every enrolment here.
BUS_KEY, BUS_CSR = make_csr("agg-job-7")


@pytest.fixture
def enrolment(tmp_path: Path, pki: Pki) -> Any:
    service, store = open_enrolment(tmp_path / "state", pki)
    yield service
    store.close()


def _issue(
    store: Store, job_id: str = "job-7", ttl_s: float = 600, now: datetime | None = None
) -> str:
    return store.call(lambda conn: bt.issue_token(conn, job_id=job_id, ttl_s=ttl_s, now=now))


def _bind(store: Store, job_id: str = "job-7", ip: str = "198.51.100.20") -> int:
    return store.call(lambda conn: bt.bind_addresses(conn, job_id=job_id, ip_addresses=[ip]))


MODEL = b"the model file of job 7 (the route serves bytes; it does not parse them)"


def _job(enrolment: AggregatorEnrolment, job_id: str = "job-7", data: bytes = MODEL) -> str:
    """A job record and its model file, as the job pipeline leaves them; returns the digest."""
    digest = hashlib.sha256(data).hexdigest()
    path = model_file_path(enrolment.state_dir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    assert enrolment.model_path(digest) == path
    enrolment.store.call(
        lambda conn: jobstore.create_job(
            conn, job_id=job_id, name=job_id, spec={}, model_digest=digest
        )
    )
    return digest


async def test_a_token_buys_one_certificate_for_the_bound_address_only(
    enrolment: AggregatorEnrolment, pki: Pki
) -> None:
    store = enrolment.store
    token = _issue(store)
    _, csr = make_csr("agg-job-7")
    with pytest.raises(bt.TokenError) as caught:
        await enrolment.enroll(token=token, csr_pem=csr, bus_csr_pem=BUS_CSR)
    assert caught.value.not_ready  # no address yet: not spent, the VM retries
    assert _bind(store) == 1

    enrolled = await enrolment.enroll(token=token, csr_pem=csr, bus_csr_pem=BUS_CSR)

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
    assert sorted((r["common_name"], r["kind"]) for r in recorded) == [
        ("agg-job-7", "aggregator"),
        ("agg-job-7", "server"),
    ]

    with pytest.raises(bt.TokenError, match="already used"):
        await enrolment.enroll(token=token, csr_pem=csr, bus_csr_pem=BUS_CSR)


async def test_a_csr_asking_for_other_names_gets_only_the_bound_ones(
    enrolment: AggregatorEnrolment,
) -> None:
    token = _issue(enrolment.store)
    _bind(enrolment.store)
    wants_broker: list[x509.ExtensionType] = [
        x509.SubjectAlternativeName([x509.DNSName("broker.example"), x509.DNSName("controller")])
    ]
    _, csr = make_csr("agg-job-7", extensions=wants_broker)
    enrolled = await enrolment.enroll(token=token, csr_pem=csr, bus_csr_pem=BUS_CSR)
    sans = x509.load_pem_x509_certificate(enrolled.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]


async def test_a_refused_csr_spends_nothing(enrolment: AggregatorEnrolment) -> None:
    token = _issue(enrolment.store)
    _bind(enrolment.store)
    _, other_name = make_csr("controller")
    with pytest.raises(PkiError, match="is for 'controller', not 'agg-job-7'"):
        await enrolment.enroll(token=token, csr_pem=other_name, bus_csr_pem=BUS_CSR)
    _, csr = make_csr("agg-job-7")
    assert (await enrolment.enroll(token=token, csr_pem=csr, bus_csr_pem=BUS_CSR)).job_id == "job-7"


async def test_expired_revoked_and_unknown_tokens(enrolment: AggregatorEnrolment) -> None:
    store = enrolment.store
    _, csr = make_csr("agg-job-7")
    old = _issue(store, ttl_s=60, now=datetime.now(UTC) - timedelta(minutes=5))
    _bind(store)
    with pytest.raises(bt.TokenError, match="expired"):
        await enrolment.enroll(token=old, csr_pem=csr, bus_csr_pem=BUS_CSR)
    revoked = _issue(store)
    _bind(store)
    store.call(lambda conn: bt.revoke_tokens(conn, job_id="job-7"))
    with pytest.raises(bt.TokenError, match="revoked"):
        await enrolment.enroll(token=revoked, csr_pem=csr, bus_csr_pem=BUS_CSR)
    with pytest.raises(bt.TokenError, match="unknown token"):
        await enrolment.enroll(token=revoked[:-2] + "xx", csr_pem=csr, bus_csr_pem=BUS_CSR)


async def test_the_bus_certificate_is_the_jobs_aggregator_on_a_key_of_its_own(
    enrolment: AggregatorEnrolment, pki: Pki
) -> None:
    digest = _job(enrolment)
    token = _issue(enrolment.store)
    _bind(enrolment.store)
    _, csr = make_csr("agg-job-7")
    key = ec.generate_private_key(ec.SECP256R1())
    _, same_a = make_csr("agg-job-7", key=key)
    _, same_b = make_csr("agg-job-7", key=key)
    with pytest.raises(PkiError, match="a key of its own"):
        await enrolment.enroll(token=token, csr_pem=same_a, bus_csr_pem=same_b)
    _, controller = make_csr("controller")
    with pytest.raises(PkiError, match="is for 'controller', not 'agg-job-7'"):
        await enrolment.enroll(token=token, csr_pem=csr, bus_csr_pem=controller)

    enrolled = await enrolment.enroll(token=token, csr_pem=csr, bus_csr_pem=BUS_CSR)

    bus = x509.load_pem_x509_certificate(enrolled.bus_cert_pem)
    pki.verify(enrolled.bus_cert_pem)
    assert bus.subject.rfc4514_string() == "CN=agg-job-7"
    assert bus.public_key() == x509.load_pem_x509_csr(BUS_CSR).public_key()
    assert bus.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(x509.ExtensionNotFound):  # a bus client, never a server
        bus.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert enrolled.model_sha256 == digest
    assert enrolled.broker == bt.BrokerEndpoint(
        host="127.0.0.1", port=8883, topic_prefix="fedsky/v1"
    )
    # The job's end revokes both by name, as it does the local aggregator's.
    assert enrolment.store.call(revoke_common_name, pki, "agg-job-7") == 2
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(bus.serial_number) is not None


def test_tokens_are_stored_hashed(enrolment: AggregatorEnrolment) -> None:
    token = _issue(enrolment.store)
    enrolment.store.call(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    raw = b"".join(p.read_bytes() for p in enrolment.store.path.parent.iterdir() if p.is_file())
    assert token.encode() not in raw
    assert token.split("_", 1)[1][:20].encode() not in raw
    assert bt.hash_token(token).encode() in raw


# -- the HTTP route ---------------------------------------------------------------------------------


@pytest.fixture
async def http(enrolment: AggregatorEnrolment) -> AsyncIterator[tuple[str, str]]:
    """The operator's API and the enrolment-only app, each on a loopback port."""
    services = Services(store=enrolment.store, aggregators=enrolment)
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


async def test_the_enrol_route(http: tuple[str, str], enrolment: AggregatorEnrolment) -> None:
    api, enroll_only = http
    token = _issue(enrolment.store)
    _, csr = make_csr("agg-job-7")
    body = {"token": token, "csr_pem": csr.decode(), "bus_csr_pem": BUS_CSR.decode()}
    async with ClientSession() as session:
        async with session.post(f"{enroll_only}/v1/aggregators/enroll", json=body) as resp:
            assert resp.status == 409
            assert "retry" in (await resp.json())["error"]
        _bind(enrolment.store)
        async with session.post(f"{enroll_only}/v1/aggregators/enroll", json=body) as resp:
            assert resp.status == 200
            got = await resp.json()
            assert got["job_id"] == "job-7"
            assert "BEGIN CERTIFICATE" in got["cert_pem"]
            assert "PRIVATE KEY" not in json.dumps(got)
        # The operator's API (here on a plain port: the network listener's rules without its
        # TLS) answers nothing without a user's token, and has no enrolment route at all.
        async with session.post(f"{api}/v1/aggregators/enroll", json=body) as resp:
            assert resp.status == 401
        async with session.post(
            f"{enroll_only}/v1/aggregators/enroll", data=b'{"token": "' + token.encode()
        ) as resp:
            assert resp.status == 400
            assert token not in await resp.text()
        assert got["bus_cert_pem"].count("BEGIN CERTIFICATE") == 1
        assert got["broker"] == {"host": "127.0.0.1", "port": 8883, "topic_prefix": "fedsky/v1"}
        assert got["model_sha256"] is None  # job-7 has no record here
        # The model file needs the bus certificate over TLS; the operator's API has no such route.
        async with session.get(f"{enroll_only}/v1/aggregators/model") as resp:
            assert resp.status == 403
        async with session.get(f"{api}/v1/aggregators/model") as resp:
            assert resp.status == 401
        # The enrolment listener serves nothing else.
        async with session.get(f"{enroll_only}/v1/clouds") as resp:
            assert resp.status == 404


# -- the enrolment listener: the model file over mutual TLS ----------------------------------------


@contextlib.asynccontextmanager
async def _listener(
    enrolment: AggregatorEnrolment,
    pki: Pki,
    *,
    middlewares: Sequence[Any] = (),
    artifacts: Path | None = None,
) -> AsyncIterator[str]:
    """The enrolment app behind the daemon's own listener TLS (`listener_tls`); yields its URL."""
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    tls = listener_tls(
        pki=pki,
        store=enrolment.store,
        clouds=CloudsConfig(enroll_url=f"{base}/v1/aggregators/enroll"),
    )
    app = make_enroll_app(
        Services(store=enrolment.store, aggregators=enrolment),
        artifacts=ArtifactShelf(artifacts) if artifacts is not None else None,
    )
    app.middlewares.extend(middlewares)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        yield base
    finally:
        await runner.cleanup()


def _client_tls(
    pki: Pki, tmp: Path, name: str, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pki.ca_cert_pem.decode())
    if cert_pem is not None and key_pem is not None:
        (tmp / f"{name}.crt").write_bytes(cert_pem)
        (tmp / f"{name}.key").write_bytes(key_pem)
        ctx.load_cert_chain(tmp / f"{name}.crt", tmp / f"{name}.key")
    return ctx


async def _get_model(base: str, ctx: ssl.SSLContext) -> tuple[int, bytes, str]:
    async with (
        ClientSession(connector=TCPConnector(ssl=ctx)) as http,
        http.get(f"{base}/v1/aggregators/model") as resp,
    ):
        return resp.status, await resp.read(), resp.headers.get("X-Fedsky-Model-Sha256", "")


def _issued_key(issued: IssuedCertificate) -> bytes:
    assert issued.key_pem is not None
    return issued.key_pem


async def test_the_model_file_goes_only_to_a_live_aggregator_certificate_of_an_active_job(
    enrolment: AggregatorEnrolment, pki: Pki, tmp_path: Path
) -> None:
    digest = _job(enrolment)
    other_model = b"job 8's model"
    _job(enrolment, "job-8", other_model)
    token = _issue(enrolment.store)
    _bind(enrolment.store)
    superlink_key, csr = make_csr("agg-job-7")
    enrolled = await enrolment.enroll(token=token, csr_pem=csr, bus_csr_pem=BUS_CSR)
    bus = _client_tls(pki, tmp_path, "bus", enrolled.bus_cert_pem, BUS_KEY)
    job8 = pki.issue(common_name="agg-job-8", kind="aggregator", days=1)
    enrolment.store.call(record_certificate, job8)
    unrecorded = pki.issue(common_name="agg-job-7", kind="aggregator", days=1)
    agent = pki.issue(common_name="hospital-a", kind="agent", days=1)
    enrolment.store.call(record_certificate, agent)
    foreign = Pki.init(tmp_path / "foreign-ca").issue(
        common_name="agg-job-7", kind="aggregator", days=1
    )

    async with _listener(enrolment, pki) as base:
        assert await _get_model(base, bus) == (200, MODEL, digest)
        # The certificate names the job: another aggregator gets its own job's model.
        job8_tls = _client_tls(pki, tmp_path, "job8", job8.cert_pem, _issued_key(job8))
        status, body, _ = await _get_model(base, job8_tls)
        assert (status, body) == (200, other_model)
        refused = {
            "no client certificate": _client_tls(pki, tmp_path, "none"),
            "an agent's": _client_tls(pki, tmp_path, "agent", agent.cert_pem, _issued_key(agent)),
            "one the controller never recorded": _client_tls(
                pki, tmp_path, "unrecorded", unrecorded.cert_pem, _issued_key(unrecorded)
            ),
        }
        for what, ctx in refused.items():
            status, body, _ = await _get_model(base, ctx)
            assert status == 403, what
            assert MODEL not in body
        # The SuperLink's server certificate (serverAuth only) and another CA's: the listener's TLS
        # drops them before any HTTP.
        server_tls = _client_tls(pki, tmp_path, "server", enrolled.cert_pem, superlink_key)
        for ctx in (
            _client_tls(pki, tmp_path, "foreign", foreign.cert_pem, _issued_key(foreign)),
            server_tls,
        ):
            with pytest.raises((ClientError, ssl.SSLError)):
                await _get_model(base, ctx)

        # Once the job has ended, or the certificate is revoked, nothing more.
        enrolment.store.call(lambda conn: jobstore.set_state(conn, "job-8", "completed"))
        assert (await _get_model(base, job8_tls))[0] == 404
        enrolment.store.call(revoke_common_name, pki, "agg-job-7")
        assert (await _get_model(base, bus))[0] == 403


# -- the VM's script --------------------------------------------------------------------------------


def _script(pki: Pki, tmp: Path, **changes: Any) -> str:
    values: dict[str, Any] = {
        "job_id": "job-7",
        "token": "fsk1_" + "t" * 43,
        "enroll_url": "https://127.0.0.1:1/v1/aggregators/enroll",
        "ca_pem": pki.ca_cert_pem.decode(),
        "port": 9092,
        "artifacts": startup_script.AggregatorArtifacts(
            url="https://127.0.0.1:1/v1/artifacts/", requirements_sha256="ab" * 32, pinned_ca=True
        ),
        "preinstalled": False,
        "directory": str(tmp / "etc"),
        "data_dir": str(tmp / "data"),
        "venv": str(tmp / "venv"),
        "unit_dir": str(tmp / "units"),
    }
    values.update(changes)
    return startup_script.render_startup_script(**values)


def test_the_script_is_valid_bash_and_holds_no_key(pki: Pki, tmp_path: Path) -> None:
    for preinstalled in (False, True):
        script = _script(pki, tmp_path, preinstalled=preinstalled)
        subprocess.run(["bash", "-n"], input=script.encode(), check=True)
        assert "PRIVATE KEY" not in script
        assert script.count("fsk1_") == 1
    # The install names no index: pinned wheels from the listener (its CA) or a mirror.
    script = _script(pki, tmp_path)
    assert "--no-index" in script
    assert "--require-hashes" in script
    assert "index-url" not in script
    assert "pypi" not in script.lower()
    assert f'echo "{"ab" * 32}  $WHEELS/requirements-aggregator.txt" | sha256sum -c' in script
    assert "curl -fsS --proto =https --cacert ca.pem -o" in script
    mirror = startup_script.AggregatorArtifacts(
        url="https://mirror.example/fedsky/", requirements_sha256="cd" * 32, pinned_ca=False
    )
    script = _script(pki, tmp_path, artifacts=mirror)
    assert 'https://mirror.example/fedsky/"$1"' in script
    assert "curl -fsS --proto =https -o" in script  # a mirror: the system's CAs, same digests
    with pytest.raises(ValueError, match="pinned artifacts"):
        _script(pki, tmp_path, artifacts=None)
    with pytest.raises(ValueError, match="https and end in '/'"):
        startup_script.AggregatorArtifacts(
            url="http://x/", requirements_sha256="ab" * 32, pinned_ca=False
        )
    assert _script(pki, tmp_path, artifacts=None, preinstalled=True).count("/bin/pip") == 0
    assert startup_script.artifacts_url("https://c.example/fl/v1/aggregators/enroll") == (
        "https://c.example/fl/v1/artifacts/"
    )
    with pytest.raises(ValueError, match="does not make a valid aggregator id"):
        _script(pki, tmp_path, job_id="job; rm -rf /")
    # The model file is fetched beside the enrolment route, whatever prefix a proxy adds.
    assert startup_script.model_url("https://c.example:8443/v1/aggregators/enroll") == (
        "https://c.example:8443/v1/aggregators/model"
    )
    assert startup_script.model_url("https://c.example/fl/v1/aggregators/enroll") == (
        "https://c.example/fl/v1/aggregators/model"
    )


def _vm(tmp_path: Path) -> dict[str, str]:
    """A scratch "VM": the image's venv (preinstalled), and systemctl recording its calls."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "fedsky-aggregator").write_text("#!/bin/sh\n")
    (venv_bin / "fedsky-aggregator").chmod(0o755)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/systemctl.log\n')
    (stubs / "systemctl").chmod(0o755)
    (tmp_path / "units").mkdir()
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}


async def _start_script(script: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-s",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(script.encode())
    proc.stdin.close()
    return proc


async def test_the_script_enrols_and_fetches_the_model_against_a_real_listener(
    enrolment: AggregatorEnrolment, pki: Pki, tmp_path: Path
) -> None:
    """Run the startup script (minus the package install and systemd) against the listener."""
    seen: list[tuple[str, str, bytes]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append((request.method, request.path, await request.read()))
        response: web.StreamResponse = await handler(request)
        return response

    digest = _job(enrolment)
    env = _vm(tmp_path)
    async with _listener(enrolment, pki, middlewares=[record]) as base:
        token = _issue(enrolment.store)
        _bind(enrolment.store, ip="198.51.100.20")
        script = _script(
            pki,
            tmp_path,
            token=token,
            preinstalled=True,
            enroll_url=f"{base}/v1/aggregators/enroll",
        )
        proc = await _start_script(script, env)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()

    etc, data = tmp_path / "etc", tmp_path / "data"
    cert = x509.load_pem_x509_certificate((etc / "superlink.crt").read_bytes())
    pki.verify((etc / "superlink.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=agg-job-7"
    assert (etc / "superlink.key").stat().st_mode & 0o077 == 0
    assert not (etc / "token").exists()
    assert not (etc / "request.json").exists()
    # The bus identity and the model file, where the run config says they are on a VM.
    bus = x509.load_pem_x509_certificate((data / "bus" / "agg.crt").read_bytes())
    pki.verify((data / "bus" / "agg.crt").read_bytes())
    assert bus.subject.rfc4514_string() == "CN=agg-job-7"
    assert bus.public_key() != cert.public_key()
    assert (data / "bus" / "agg.key").stat().st_mode & 0o077 == 0
    assert (data / "bus" / "ca.crt").read_bytes() == pki.ca_cert_pem
    assert (data / "model.safetensors").read_bytes() == MODEL
    assert hashlib.sha256(MODEL).hexdigest() == digest
    assert not (data / "model.part").exists()
    for path in (
        startup_script.VM_FILES.model_file,
        startup_script.VM_FILES.ca,
        startup_script.VM_FILES.cert,
    ):
        assert (data / path.relative_to(startup_script.VM_DATA_DIR)).is_file(), path
    # The keys were made on the "VM" and never sent: the controller saw two CSRs and the token,
    # then a GET with the new client certificate.
    (enrol, fetch) = seen
    assert enrol[:2] == ("POST", "/v1/aggregators/enroll")
    assert b"PRIVATE KEY" not in enrol[2]
    body = json.loads(enrol[2])
    assert body["token"] == token
    assert sorted(body) == ["bus_csr_pem", "csr_pem", "token"]
    assert fetch == ("GET", "/v1/aggregators/model", b"")
    (unit_file,) = (tmp_path / "units").iterdir()
    assert unit_file.name == startup_script.VM_UNIT
    unit = unit_file.read_text()
    # The SuperLink behind fedsky's front (its own flags are the front's: aggregator_host.py).
    assert "/bin/fedsky-aggregator --listen 0.0.0.0:" in unit
    assert f"--cert {etc}/superlink.crt" in unit
    assert "flower-superlink" not in unit
    # The bus key reaches the ServerApp as a credential, at the path the run config names.
    credential = re.search(rf"^LoadCredential=([\w-]+):{data}/bus/agg.key$", unit, re.M)
    assert credential is not None, unit
    assert startup_script.VM_FILES.key == Path(
        "/run/credentials", unit_file.name, credential.group(1)
    )
    assert (tmp_path / "systemctl.log").read_text().splitlines() == [
        "daemon-reload",
        f"enable --now {startup_script.VM_UNIT}",
    ]


async def test_the_script_installs_the_pinned_wheels_from_the_listener_then_enrols(
    enrolment: AggregatorEnrolment, pki: Pki, tmp_path: Path
) -> None:
    """No image venv: the script fetches requirements-aggregator.txt and the wheels it names
    from the listener, checks the pinned digest, installs with --no-index --require-hashes."""
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    _job(enrolment)
    manifest = write_wheelhouse(tmp_path / "wheelhouse")
    env = _vm(tmp_path)
    (tmp_path / "venv").rename(tmp_path / "image-venv")  # nothing preinstalled
    env["PIP_INDEX_URL"] = "https://index.invalid/simple"  # the VM's pip settings are ignored
    async with _listener(
        enrolment, pki, middlewares=[record], artifacts=tmp_path / "wheelhouse"
    ) as base:
        token = _issue(enrolment.store)
        _bind(enrolment.store)
        enroll_url = f"{base}/v1/aggregators/enroll"
        artifacts = bt.aggregator_artifacts(
            directory=tmp_path / "wheelhouse", enroll_url=enroll_url, mirror_url=None
        )
        assert artifacts.requirements_sha256 == manifest.requirements("aggregator").sha256
        script = _script(pki, tmp_path, token=token, enroll_url=enroll_url, artifacts=artifacts)
        proc = await _start_script(script, env)
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()

    assert seen[:3] == [
        "/v1/artifacts/requirements-aggregator.txt",
        "/v1/artifacts/fedsky-0.1.0-py3-none-any.whl",
        "/v1/artifacts/fedsky_tinydep-1.0-py3-none-any.whl",
    ]
    assert seen[3:] == ["/v1/aggregators/enroll", "/v1/aggregators/model"]
    shown = subprocess.run(
        [
            tmp_path / "venv" / "bin" / "python",
            "-c",
            "import fedsky_tinydep as m; print(m.VERSION)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == "1.0"
    assert (tmp_path / "units" / startup_script.VM_UNIT).exists()


async def test_the_script_refuses_a_requirement_file_without_the_pinned_digest(
    enrolment: AggregatorEnrolment, pki: Pki, tmp_path: Path
) -> None:
    """The wheelhouse changes after the script was rendered (consistently, manifest and all):
    the script refuses it before installing anything or spending its token."""
    _job(enrolment)
    wheelhouse = tmp_path / "wheelhouse"
    write_wheelhouse(wheelhouse)
    env = _vm(tmp_path)
    (tmp_path / "venv").rename(tmp_path / "image-venv")
    async with _listener(enrolment, pki, artifacts=wheelhouse) as base:
        token = _issue(enrolment.store)
        _bind(enrolment.store)
        enroll_url = f"{base}/v1/aggregators/enroll"
        pinned = bt.aggregator_artifacts(
            directory=wheelhouse, enroll_url=enroll_url, mirror_url=None
        )
        for path in wheelhouse.iterdir():
            path.unlink()
        write_wheelhouse(wheelhouse, role="aggregator")
        requirements = wheelhouse / "requirements-aggregator.txt"
        requirements.write_text(requirements.read_text() + "# an extra line\n")
        roles = {e.file: e.roles for e in read_manifest(wheelhouse).files}
        (wheelhouse / MANIFEST_FILE).write_text(
            build_manifest(
                directory=wheelhouse, fedsky_version="0.1.0", python="cp311", roles_of=roles
            ).to_json()
        )
        script = _script(pki, tmp_path, token=token, enroll_url=enroll_url, artifacts=pinned)
        proc = await _start_script(script, env)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "requirements-aggregator.txt does not have the digest this script pins" in err.decode()
    assert not (tmp_path / "venv").exists()
    assert not (tmp_path / "data" / "bus" / "agg.crt").exists()  # never enrolled
    unused = enrolment.store.call(
        lambda conn: conn.execute("SELECT used_at FROM bootstrap_tokens").fetchone()[0]
    )
    assert unused is None


@pytest.mark.parametrize("trouble", ["tampered", "job-ended"])
async def test_the_script_starts_nothing_without_the_right_model_file(
    enrolment: AggregatorEnrolment, pki: Pki, tmp_path: Path, trouble: str
) -> None:
    digest = _job(enrolment)
    if trouble == "tampered":
        enrolment.model_path(digest).write_bytes(b"not the model of job 7")
    env = _vm(tmp_path)
    async with _listener(enrolment, pki) as base:
        token = _issue(enrolment.store)
        _bind(enrolment.store)
        if trouble == "job-ended":
            enrolment.store.call(lambda conn: jobstore.set_state(conn, "job-7", "cancelled"))
        script = _script(
            pki,
            tmp_path,
            token=token,
            preinstalled=True,
            enroll_url=f"{base}/v1/aggregators/enroll",
        )
        proc = await _start_script(script, env)
        assert proc.stderr is not None
        if trouble == "tampered":
            # It keeps fetching (a transfer may have been cut short); stop it at the first miss.
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert f"does not have digest {digest}" in line.decode()
            proc.kill()
            await proc.wait()
        else:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 1
            assert "the model file was refused (HTTP 404)" in err.decode()
    assert (tmp_path / "data" / "bus" / "agg.crt").exists()  # enrolled, then stopped
    assert not (tmp_path / "data" / "model.safetensors").exists()
    assert not (tmp_path / "units" / startup_script.VM_UNIT).exists()
    assert not (tmp_path / "systemctl.log").exists()


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
