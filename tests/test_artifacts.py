"""The pinned artifacts: a hash-pinned install from a wheelhouse, the manifest checks, the
`[artifacts]` config, and the enrolment listener's artifact routes over TLS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, TCPConnector, web
from fedsky.controller.api.artifacts import ArtifactShelf
from fedsky.controller.api.clouds import make_enroll_app
from fedsky.controller.api.enroll_listener import listener_tls
from fedsky.controller.api.settings import ArtifactsConfig
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.config import ControllerConfig, load_controller_config
from fedsky.controller.security import bootstrap_tokens as bt
from fedsky.controller.security.pki import Pki
from fedsky.controller.services import Services
from fedsky.shared.artifacts import (
    MANIFEST_FILE,
    ArtifactError,
    Pin,
    check_file,
    parse_manifest,
    parse_wheel_name,
    read_manifest,
    render_requirements,
    requirement_files,
    verify_directory,
)
from fedsky.shared.config import ConfigError

from tests.fakes.clouds import open_enrolment
from tests.support import free_port
from tests.support.wheels import pip_install, write_wheelhouse


def _tamper(path: Path, offset: int = -40) -> None:
    """Change one byte of `path` (inside the zip's central directory by default)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment (with pip, about 3 s), shared by the install tests."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    print(f"fresh venv in {time.monotonic() - started:.1f} s")
    return venv


def test_a_pinned_wheelhouse_installs_into_a_fresh_venv_with_no_index(
    tmp_path: Path, fresh_venv: Path
) -> None:
    write_wheelhouse(tmp_path / "wh")
    started = time.monotonic()
    result = pip_install(fresh_venv / "bin" / "pip", tmp_path / "wh")
    assert result.returncode == 0, result.stderr
    print(f"pinned install in {time.monotonic() - started:.1f} s")
    shown = subprocess.run(
        [
            fresh_venv / "bin" / "python",
            "-c",
            "import fedsky_tinydep; print(fedsky_tinydep.VERSION)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == "1.0"


@pytest.mark.parametrize("which", ["fedsky", "dependency"])
def test_a_tampered_wheel_is_refused_by_the_install(
    tmp_path: Path, fresh_venv: Path, which: str
) -> None:
    wheelhouse = tmp_path / "wh"
    write_wheelhouse(wheelhouse)
    name = "fedsky-0.1.0" if which == "fedsky" else "fedsky_tinydep-1.0"
    wheel = wheelhouse / f"{name}-py3-none-any.whl"
    _tamper(wheel)
    result = pip_install(
        fresh_venv / "bin" / "pip", wheelhouse, "aggregator", "--ignore-installed", "--dry-run"
    )
    assert result.returncode != 0
    assert "DO NOT MATCH THE HASHES" in result.stderr, result.stderr
    assert wheel.name.split("-")[0].replace("_", "-") in result.stderr.replace("_", "-")
    # And the manifest check says which file.
    with pytest.raises(ArtifactError, match=f"{wheel.name}: its SHA-256 is not the manifest's"):
        verify_directory(wheelhouse)


def test_a_requirement_without_a_hash_is_refused(tmp_path: Path, fresh_venv: Path) -> None:
    wheelhouse = tmp_path / "wh"
    write_wheelhouse(wheelhouse)
    requirements = wheelhouse / "requirements-aggregator.txt"
    lines = [line for line in requirements.read_text().splitlines() if "tinydep" not in line]
    requirements.write_text("\n".join(lines) + "\n")  # the dependency is no longer pinned
    result = pip_install(
        fresh_venv / "bin" / "pip", wheelhouse, "aggregator", "--ignore-installed", "--dry-run"
    )
    assert result.returncode != 0
    assert "Hashes are required in --require-hashes mode" in result.stderr, result.stderr


# -- the manifest ------------------------------------------------------------------------------


def test_the_manifest_refuses_unlisted_files_and_wrong_digests(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wh"
    manifest = write_wheelhouse(wheelhouse)
    assert verify_directory(wheelhouse) == manifest
    assert manifest.roles() == ("aggregator",)
    assert {e.file for e in manifest.for_role("aggregator")} == {
        "fedsky-0.1.0-py3-none-any.whl",
        "fedsky_tinydep-1.0-py3-none-any.whl",
        "requirements-aggregator.txt",
    }
    (wheelhouse / "stranger-9.9-py3-none-any.whl").write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match="is not listed in the manifest"):
        check_file(manifest, wheelhouse, "stranger-9.9-py3-none-any.whl")
    for bad in ("../manifest.json", "..", ".hidden", "a/b.whl", "", "x" * 300):
        with pytest.raises(ArtifactError, match="not a plain file name"):
            check_file(manifest, wheelhouse, bad)
    dep = wheelhouse / "fedsky_tinydep-1.0-py3-none-any.whl"
    _tamper(dep)  # same size, one byte different
    with pytest.raises(ArtifactError, match="SHA-256 is not the manifest's"):
        check_file(manifest, wheelhouse, dep.name)
    check_file(manifest, wheelhouse, dep.name, digest=False)  # the size alone still matches
    dep.write_bytes(dep.read_bytes() + b"x")
    with pytest.raises(ArtifactError, match=r"bytes, the manifest says \d+"):
        check_file(manifest, wheelhouse, dep.name, digest=False)
    with pytest.raises(ArtifactError, match=r"has no requirements-client\.txt"):
        manifest.requirements("client")


def test_malformed_manifests_are_refused_with_the_reason(tmp_path: Path) -> None:
    good = json.loads(write_wheelhouse(tmp_path / "wh").to_json())
    cases: dict[str, Any] = {
        "traversal": {**good, "files": [{**good["files"][0], "file": "../../etc/passwd"}]},
        "short digest": {**good, "files": [{**good["files"][0], "sha256": "ab"}]},
        "unknown role": {**good, "files": [{**good["files"][0], "roles": ["superuser"]}]},
        "listed twice": {**good, "files": [good["files"][0], good["files"][0]]},
        "other format": {**good, "format": 2},
        "extra key": {**good, "signed_by": "someone"},
    }
    for what, data in cases.items():
        with pytest.raises(ArtifactError, match="not a valid wheelhouse manifest"):
            parse_manifest(json.dumps(data).encode(), source=what)
    with pytest.raises(ArtifactError, match="cannot read the manifest"):
        read_manifest(tmp_path / "nowhere")


def test_requirement_files_pin_by_version_and_digest(tmp_path: Path) -> None:
    write_wheelhouse(tmp_path / "wh")
    text = (tmp_path / "wh" / "requirements-aggregator.txt").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("fedsky[aggregator]==0.1.0 --hash=sha256:")
    assert lines[1].startswith("fedsky-tinydep==1.0 --hash=sha256:")
    assert requirement_files(text) == [
        "fedsky-0.1.0-py3-none-any.whl",
        "fedsky_tinydep-1.0-py3-none-any.whl",
    ]
    with pytest.raises(ArtifactError, match="not a plain file name"):
        requirement_files("x==1 --hash=sha256:00  # file: ../../bin/sh\n")
    pin = Pin("a", "1", "a-1-py3-none-any.whl", "0" * 64)
    with pytest.raises(ArtifactError, match="pinned twice"):
        render_requirements("agent", [pin, pin])
    torch = parse_wheel_name("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert (torch.name, torch.version) == ("torch", "2.13.0+cpu")
    assert parse_wheel_name("Foo_Bar-1.0-1-py3-none-any.whl").name == "foo-bar"
    with pytest.raises(ArtifactError):
        parse_wheel_name("fedsky-0.1.0.tar.gz")


# -- the config --------------------------------------------------------------------------------


def test_the_artifacts_config_is_checked_at_load(tmp_path: Path) -> None:
    write_wheelhouse(tmp_path / "wh")
    path = tmp_path / "controller.toml"
    path.write_text('state_dir = "state"\n[artifacts]\ndir = "wh"\n')
    config = load_controller_config(path)
    assert config.artifacts_dir == tmp_path / "wh"
    assert ControllerConfig(state_dir=tmp_path / "s").artifacts_dir == tmp_path / "s" / "artifacts"

    path.write_text('[artifacts]\ndir = "missing"\n')
    with pytest.raises(
        ConfigError, match=r"controller.toml: key 'artifacts.dir': .*cannot read the manifest"
    ):
        load_controller_config(path)
    (tmp_path / "wh" / "fedsky_tinydep-1.0-py3-none-any.whl").unlink()
    path.write_text('[artifacts]\ndir = "wh"\n')
    with pytest.raises(ConfigError, match=r"key 'artifacts.dir': .*fedsky_tinydep-1.0"):
        load_controller_config(path)
    path.write_text('[artifacts]\nurl = "http://mirror.example/fedsky/"\n')
    with pytest.raises(ConfigError, match=r"key 'artifacts.url': .*https"):
        load_controller_config(path)
    assert ArtifactsConfig(url="https://m.example/f").url == "https://m.example/f/"
    for key in ("package", "pip_index_url"):
        path.write_text(f'[clouds]\n{key} = "https://pypi.org/simple"\n')
        with pytest.raises(
            ConfigError, match=rf"clouds.{key} is no longer read.*never from a package index"
        ):
            load_controller_config(path)


# -- the routes, over the enrolment listener's TLS ------------------------------------------------


@pytest.fixture
async def listener(tmp_path: Path, pki: Pki) -> AsyncIterator[tuple[str, Path, ssl.SSLContext]]:
    """The enrolment app on the daemon's listener TLS, serving a tiny wheelhouse; yields its base
    URL, the wheelhouse and a client context trusting fedsky's CA (as the VM's curl --cacert)."""
    wheelhouse = tmp_path / "wh"
    write_wheelhouse(wheelhouse)
    (wheelhouse / "unlisted.txt").write_text("not in the manifest")
    (tmp_path / "secret.key").write_text("beside the wheelhouse")
    enrolment, store = open_enrolment(tmp_path / "state", pki)
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    tls = listener_tls(
        pki=pki, store=store, clouds=CloudsConfig(enroll_url=f"{base}/v1/aggregators/enroll")
    )
    config = ControllerConfig(
        state_dir=tmp_path / "state", artifacts=ArtifactsConfig(dir=wheelhouse)
    )
    app = make_enroll_app(Services(store=store, config=config, aggregators=enrolment))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        yield base, wheelhouse, ssl.create_default_context(cadata=pki.ca_cert_pem.decode())
    finally:
        await runner.cleanup()
        store.close()


async def _raw_get(base: str, ctx: ssl.SSLContext, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (no client-side normalisation of `..` or escapes)."""
    host, port = base.removeprefix("https://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


async def test_the_listener_serves_listed_artifacts_over_tls(
    listener: tuple[str, Path, ssl.SSLContext],
) -> None:
    base, wheelhouse, ctx = listener
    manifest = read_manifest(wheelhouse)
    async with ClientSession(connector=TCPConnector(ssl=ctx)) as http:
        async with http.get(f"{base}/v1/artifacts/{MANIFEST_FILE}") as resp:
            assert resp.status == 200
            assert await resp.read() == (wheelhouse / MANIFEST_FILE).read_bytes()
        for entry in manifest.files:
            async with http.get(f"{base}/v1/artifacts/{entry.file}") as resp:
                assert resp.status == 200, entry.file
                assert resp.content_length == entry.size
                body = await resp.read()
                assert hashlib.sha256(body).hexdigest() == entry.sha256
                assert resp.headers["X-Fedsky-Sha256"] == entry.sha256
        # Without fedsky's CA the client refuses the listener (as the VM's curl would).
        async with ClientSession() as plain:
            with pytest.raises(Exception, match="certificate verify failed"):
                await plain.get(f"{base}/v1/artifacts/{MANIFEST_FILE}")


async def test_the_listener_refuses_unlisted_files_and_traversal(
    listener: tuple[str, Path, ssl.SSLContext],
) -> None:
    base, wheelhouse, ctx = listener
    secrets = [b"not in the manifest", b"beside the wheelhouse", b"PRIVATE KEY", b"SQLite"]
    for target in (
        "/v1/artifacts/unlisted.txt",
        "/v1/artifacts/../secret.key",
        "/v1/artifacts/..%2Fsecret.key",
        "/v1/artifacts/%2e%2e%2fsecret.key",
        "/v1/artifacts/%2E%2E/%2E%2E/state/controller.db",
        "/v1/artifacts/..%2F..%2Fstate%2Fpki%2Fca.key",
        "/v1/artifacts/.hidden",
        "/v1/artifacts/",
        "/v1/artifacts/fedsky-0.1.0-py3-none-any.whl/..%2F..%2Fsecret.key",
        "/v1/artifacts//etc/passwd",
    ):
        status, body = await _raw_get(base, ctx, target)
        assert status in (400, 404), (target, status)
        assert not any(secret in body for secret in secrets), target
    # A listed file changed on disk is not served: the digest no longer matches.
    dep = wheelhouse / "fedsky_tinydep-1.0-py3-none-any.whl"
    status, _ = await _raw_get(base, ctx, f"/v1/artifacts/{dep.name}")
    assert status == 200
    await asyncio.sleep(0.01)
    _tamper(dep)
    status, body = await _raw_get(base, ctx, f"/v1/artifacts/{dep.name}")
    assert status == 503
    assert b"does not match its manifest" in body


async def test_without_a_wheelhouse_the_routes_answer_503(tmp_path: Path) -> None:
    shelf = ArtifactShelf(tmp_path / "nothing")
    _, store = open_enrolment(tmp_path / "state", Pki.init(tmp_path / "pki"))
    try:
        for app in (
            make_enroll_app(Services(store=store), artifacts=shelf),
            make_enroll_app(Services(store=store)),  # no config at all
        ):
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            async with ClientSession() as http:
                for path in (MANIFEST_FILE, "fedsky-0.1.0-py3-none-any.whl"):
                    async with http.get(f"http://127.0.0.1:{port}/v1/artifacts/{path}") as resp:
                        assert resp.status == 503
            await runner.cleanup()
    finally:
        store.close()


async def test_no_script_and_no_token_without_a_wheelhouse(tmp_path: Path, pki: Pki) -> None:
    _, store = open_enrolment(tmp_path / "state", pki)
    bt.ensure_schema(store)
    try:

        async def healthy(address: str) -> bool:
            return True

        bootstrap = bt.VmBootstrap(
            tokens=bt.TokenIssuer(store, 600),
            enroll_url="https://controller.example.test:8443/v1/aggregators/enroll",
            ca_pem=pki.ca_cert_pem,
            superlink_port=9092,
            preinstalled=False,
            health_check=healthy,
            ready_timeout_s=1,
            poll_interval_s=0.1,
            controller_uid="c1",
            artifacts_dir=tmp_path / "artifacts",
        )
        with pytest.raises(ValueError, match=r"make artifacts.*artifacts\.dir"):
            await bootstrap.startup_script("job-1")
        count = "SELECT COUNT(*) FROM bootstrap_tokens"
        assert store.call(lambda conn: conn.execute(count).fetchone()[0]) == 0
        manifest = write_wheelhouse(tmp_path / "artifacts")
        script = await bootstrap.startup_script("job-1")
        assert manifest.requirements("aggregator").sha256 in script
        assert "https://controller.example.test:8443/v1/artifacts/" in script
        assert store.call(lambda conn: conn.execute(count).fetchone()[0]) == 1
    finally:
        store.close()
