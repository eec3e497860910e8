"""The client payload: fetched by the agent from the pinned artifacts, checked, installed into
the VM over SSH.

The "VM" is this machine's loopback sshd (as in `test_executor_ssh.py`, its host key pinned);
the artifacts are a tiny client wheelhouse (a `fedsky` wheel with a `fedsky-flower-supernode` console
script, and its dependency) served by the controller's own enrolment app and listener TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from fedsky.agent.config import load_agent_config
from fedsky.agent.executors.base import SshExecutorConfig, SuperNodeLaunch, VmSettings
from fedsky.agent.executors.factory import make_executor
from fedsky.agent.executors.ssh import SshExecutor, VmTarget
from fedsky.agent.hostkeys import pin
from fedsky.agent.payload import (
    MARKER_NAME,
    REQUIREMENTS,
    LocalPayload,
    PayloadCache,
    PayloadConfig,
    PayloadInstallFailed,
    PayloadSource,
    PayloadUnavailable,
    fetch_payload,
)
from fedsky.agent.runner import TaskRunner
from fedsky.controller.api.artifacts import ArtifactShelf
from fedsky.controller.api.clouds import make_enroll_app
from fedsky.controller.api.enroll_listener import listener_tls
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.security.pki import Pki
from fedsky.controller.services import Services
from fedsky.shared.artifacts import MANIFEST_FILE, Manifest, read_manifest, sha256_file
from fedsky.shared.config import ConfigError
from fedsky.shared.datasets import BundledDatasetSpec, write_catalog
from fedsky.shared.messages import (
    Event,
    FailureKind,
    PrepareTaskCommand,
    StartTaskCommand,
    VmInfo,
    utcnow,
)
from fedsky.shared.supernode import SUPERNODE_EXECUTABLE, generate_node_key

from tests import test_executor_ssh as ssh_tests
from tests.fakes.clouds import open_enrolment
from tests.support import free_port
from tests.support.wheels import write_wheelhouse

pytestmark = pytest.mark.timeout(120)

sshd = ssh_tests.sshd  # the loopback sshd fixture: the "VM"
Sshd = ssh_tests.Sshd
T = TypeVar("T")
DEP = "fedsky_tinydep-1.0-py3-none-any.whl"


@dataclass
class Artifacts:
    url: str  # .../v1/artifacts/
    wheelhouse: Path
    ca_file: Path  # fedsky's CA, as the agent has it from its enrolment bundle
    requested: list[str]  # the paths the listener answered, in order


@pytest.fixture
async def artifacts(tmp_path: Path, pki: Pki) -> AsyncIterator[Artifacts]:
    """The controller's enrolment app on its listener TLS, serving a client wheelhouse."""
    wheelhouse = tmp_path / "wh"
    write_wheelhouse(wheelhouse, "client", scripts=[SUPERNODE_EXECUTABLE])
    _, store = open_enrolment(tmp_path / "state", pki)
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    tls = listener_tls(
        pki=pki, store=store, clouds=CloudsConfig(enroll_url=f"{base}/v1/aggregators/enroll")
    )
    app = make_enroll_app(Services(store=store), artifacts=ArtifactShelf(wheelhouse))
    requested: list[str] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        requested.append(request.path.rsplit("/", 1)[1])

    app.on_response_prepare.append(record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        yield Artifacts(f"{base}/v1/artifacts/", wheelhouse, pki.ca_cert_path, requested)
    finally:
        await runner.cleanup()
        store.close()


def _source(tmp_path: Path, artifacts: Artifacts, **overrides: Any) -> PayloadSource:
    config = PayloadConfig.model_validate(
        {
            "url": artifacts.url,
            "remote_python": sys.executable,  # a Python 3.11, as the wheelhouse's cp311
            "remote_wheel_dir": str(tmp_path / "vm" / "wheelhouse"),
            **overrides,
        }
    )
    return PayloadSource.from_config(
        config, fedsky_ca_file=artifacts.ca_file, state_dir=tmp_path / "agent"
    )


def _executor(sshd: Sshd, tmp_path: Path, source: PayloadSource) -> SshExecutor:
    config = SshExecutorConfig.model_validate(
        {
            "kind": "ssh",
            "user": sshd.user,
            "identity_file": str(sshd.client_key),
            "known_hosts_file": str(tmp_path / "agent" / "ssh" / "known_hosts"),
            "remote_work_dir": str(tmp_path / "vm" / "tasks"),
            "remote_bin_dir": str(tmp_path / "vm" / "venv" / "bin"),
            "runtime_port": free_port(),
        }
    )
    assert config.known_hosts_file is not None
    pin(config.known_hosts_file, "vm-1", sshd.host_key)  # registered once
    executor = make_executor(
        config,
        work_dir=tmp_path / "agent" / "tasks",
        vms={"vm-1": VmSettings(address="127.0.0.1", port=sshd.port)},
        one_box=True,  # the "VM" is this host's loopback sshd
        payload=source,
    )
    assert isinstance(executor, SshExecutor)
    return executor


def _target(executor: SshExecutor) -> VmTarget:
    return executor.target_for("vm-1", ())


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # one bit, same size
    path.write_bytes(bytes(data))


def _rewrite_manifest(wheelhouse: Path) -> None:
    """Make the manifest agree with whatever the files now are (a tampered shelf)."""
    manifest = read_manifest(wheelhouse)
    files = []
    for entry in manifest.files:
        path = wheelhouse / entry.file
        files.append(
            entry.model_copy(update={"sha256": sha256_file(path), "size": path.stat().st_size})
        )
    rewritten = Manifest(
        fedsky_version=manifest.fedsky_version, python=manifest.python, files=tuple(files)
    )
    (wheelhouse / MANIFEST_FILE).write_text(rewritten.to_json())


async def test_the_payload_is_installed_once_and_the_supernode_runs_from_it(
    tmp_path: Path, sshd: Sshd, artifacts: Artifacts, pki: Pki
) -> None:
    executor = _executor(sshd, tmp_path, _source(tmp_path, artifacts))
    target = _target(executor)
    venv = tmp_path / "vm" / "venv"
    expected = read_manifest(artifacts.wheelhouse).requirements("client").sha256

    started = time.monotonic()
    await executor.ensure_payload(target)
    first_s = time.monotonic() - started
    # Installed in the VM's venv from the pinned files: the entry point the executor runs.
    shown = subprocess.run(
        [venv / "bin" / SUPERNODE_EXECUTABLE], capture_output=True, text=True, check=True
    )
    assert shown.stdout.strip() == "0.1.0"
    assert (venv / MARKER_NAME).read_text().strip() == expected
    assert sorted(artifacts.requested) == sorted(
        [MANIFEST_FILE, REQUIREMENTS, "fedsky-0.1.0-py3-none-any.whl", DEP]
    )
    assert list((tmp_path / "vm" / "wheelhouse").iterdir()) == []  # wheels removed after
    cache = tmp_path / "agent" / "payload"
    assert (cache / DEP).read_bytes() == (artifacts.wheelhouse / DEP).read_bytes()

    # Again: the marker says the VM holds this release: one manifest request, nothing copied.
    artifacts.requested.clear()
    marker_mtime = (venv / MARKER_NAME).stat().st_mtime_ns
    started = time.monotonic()
    await executor.ensure_payload(target)
    second_s = time.monotonic() - started
    assert artifacts.requested == [MANIFEST_FILE]
    assert (venv / MARKER_NAME).stat().st_mtime_ns == marker_mtime

    # A pinned digest that the VM already holds: no request at all.
    pinned = _executor(sshd, tmp_path, _source(tmp_path, artifacts, requirements_sha256=expected))
    artifacts.requested.clear()
    await pinned.ensure_payload(target)
    assert artifacts.requested == []
    print(f"payload: first install {first_s:.1f} s, second ensure {second_s:.2f} s")

    # The executor's start installs (here: finds) the payload and runs that SuperNode.
    keys = generate_node_key(tmp_path / "agent" / "keys")
    node = await executor.start(
        SuperNodeLaunch(
            task_id="t-pay",
            site="hospital-a",
            superlink="127.0.0.1:1",
            root_ca=pki.ca_cert_path,
            private_key=keys.private_key,
            dataset_config=write_catalog(tmp_path / "agent" / "datasets.json", {}),
        ),
        vm_name="vm-1",
    )
    status = await asyncio.wait_for(node.wait(), 30)
    assert status.ok, status.reason
    assert "0.1.0" in node.log_tail()


async def test_a_tampered_wheel_never_reaches_the_vm_and_pip_would_refuse_it(
    tmp_path: Path, sshd: Sshd, artifacts: Artifacts
) -> None:
    executor = _executor(sshd, tmp_path, _source(tmp_path, artifacts))
    target = _target(executor)
    wheel_dir = tmp_path / "vm" / "wheelhouse"
    dep = artifacts.wheelhouse / DEP
    good = dep.read_bytes()
    expected = read_manifest(artifacts.wheelhouse).requirements("client").sha256

    # Changed on the controller's disk: the controller itself no longer serves it.
    _tamper(dep)
    with pytest.raises(PayloadUnavailable, match=rf"{DEP} from 127\.0\.0\.1:\d+: HTTP 503"):
        await executor.ensure_payload(target)
    # ... and with the manifest rewritten to match (a tampered shelf): the requirement file's
    # hash for that wheel still refuses it, before anything is copied.
    _rewrite_manifest(artifacts.wheelhouse)
    with pytest.raises(
        PayloadUnavailable, match=rf"{DEP}: the manifest's SHA-256 is not the one {REQUIREMENTS}"
    ):
        await executor.ensure_payload(target)
    assert not wheel_dir.exists()  # nothing reached the VM
    assert not (tmp_path / "vm" / "venv").exists()
    # ... and with the requirement file rewritten too: the pinned digest refuses the release.
    requirements = artifacts.wheelhouse / REQUIREMENTS
    text = requirements.read_text()
    assert hashlib.sha256(good).hexdigest() in text
    requirements.write_text(text.replace(hashlib.sha256(good).hexdigest(), sha256_file(dep)))
    _rewrite_manifest(artifacts.wheelhouse)
    pinned = _executor(sshd, tmp_path, _source(tmp_path, artifacts, requirements_sha256=expected))
    with pytest.raises(PayloadUnavailable, match=r"another release.*requirements_sha256 pins"):
        await pinned.ensure_payload(target)
    assert not wheel_dir.exists()

    # Had a tampered wheel got into the VM, pip would refuse it (--require-hashes): the good
    # release's requirement file beside a wheel one bit off.
    good_house = tmp_path / "good"
    write_wheelhouse(good_house, "client", scripts=[SUPERNODE_EXECUTABLE])
    assert (good_house / DEP).read_bytes() == good
    local = LocalPayload(
        requirements_sha256=read_manifest(good_house).requirements("client").sha256,
        python="cp311",
        directory=good_house,
        files={
            f: sha256_file(good_house / f)
            for f in (REQUIREMENTS, "fedsky-0.1.0-py3-none-any.whl", DEP)
        },
    )
    wheel_dir.mkdir(parents=True)
    for file in local.files:
        (wheel_dir / file).write_bytes((good_house / file).read_bytes())
    _tamper(wheel_dir / DEP)
    with pytest.raises(PayloadInstallFailed, match="DO NOT MATCH THE HASHES") as refused:
        await executor.install_payload(target, local)
    assert "Expected sha256" in str(refused.value)
    assert not (tmp_path / "vm" / "venv" / MARKER_NAME).exists()
    assert not (tmp_path / "vm" / "venv" / "bin" / SUPERNODE_EXECUTABLE).exists()


async def test_the_cache_refetches_a_changed_copy(tmp_path: Path, artifacts: Artifacts) -> None:
    cache = PayloadCache(_source(tmp_path, artifacts))

    async def fetch() -> LocalPayload:
        manifest = await asyncio.to_thread(cache.manifest)
        return await fetch_payload(
            cache, manifest, cache.expected_digest(manifest), asyncio.to_thread
        )

    local = await fetch()
    assert list(local.files) == [REQUIREMENTS, "fedsky-0.1.0-py3-none-any.whl", DEP]
    _tamper(local.directory / DEP)  # the agent's cached copy changed
    artifacts.requested.clear()
    await fetch()
    assert artifacts.requested == [MANIFEST_FILE, DEP]  # only that file fetched again
    assert sha256_file(local.directory / DEP) == local.files[DEP]


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


async def test_an_unreachable_controller_fails_the_task_clearly(
    tmp_path: Path, sshd: Sshd, artifacts: Artifacts, pki: Pki
) -> None:
    # Nothing listens at the configured URL: the task fails as start_failed, saying where.
    down = Artifacts(
        f"https://127.0.0.1:{free_port()}/v1/artifacts/", artifacts.wheelhouse, pki.ca_cert_path, []
    )
    source = _source(tmp_path, down)
    executor = _executor(sshd, tmp_path, source)
    events: asyncio.Queue[Event] = asyncio.Queue()
    vm = VmInfo(
        name="vm-1",
        uuid="a597f722-111f-5790-a705-4d0847a9d5b1",
        state="running",
        vcpus=2,
        memory_mib=4096,
        disk_gib=20,
    )
    runner = TaskRunner(
        agent_id="hospital-a",
        work_dir=tmp_path / "agent" / "tasks",
        datasets={"digits": BundledDatasetSpec(kind="digits")},
        executor_config=executor.config,
        one_box=True,
        vms=executor.vms,
        known_hosts_file=executor.known_hosts_file,
        payload=source,
        blocking=_in_thread,
        snapshot=lambda: [vm],
        emit=events.put_nowait,
        on_change=lambda summary: None,
    )
    expires = utcnow() + timedelta(minutes=1)
    common = {"task_id": "t1", "job_id": "job-1", "vm": "vm-1", "dataset": "digits"}
    await runner.handle(PrepareTaskCommand(**common, expires_at=expires))
    await runner.handle(
        StartTaskCommand(
            **common, superlink="127.0.0.1:1", ca_pem=pki.ca_cert_pem.decode(), expires_at=expires
        )
    )
    kinds = []
    while not events.empty():
        event = events.get_nowait()
        kinds.append(event.kind)
        if event.kind == "task_failed":
            failed = event
    assert kinds[-1] == "task_failed", kinds
    assert failed.failure_kind == FailureKind.START_FAILED
    assert "artifacts at 127.0.0.1:" in failed.detail
    assert "cannot be reached" in failed.detail
    assert str(tmp_path) not in failed.detail
    assert not (tmp_path / "vm" / "venv").exists()

    # A server whose certificate fedsky's CA did not sign (the system CAs, say): refused.
    other = _executor(
        sshd, tmp_path, _source(tmp_path, artifacts, ca_file="system", requirements_sha256="0" * 64)
    )
    with pytest.raises(PayloadUnavailable, match="certificate is not trusted"):
        await other.ensure_payload(_target(other))


def test_the_payload_config_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    ssh = '[executor]\nkind = "ssh"\nuser = "fedsky"\nidentity_file = "id"\n'
    url = 'url = "https://ctl.example:8443/v1/artifacts"\n'
    path.write_text(ssh + "[payload]\n" + url)
    config = load_agent_config(path)
    source = config.payload_source
    assert source is not None
    assert source.url == "https://ctl.example:8443/v1/artifacts/"
    assert source.ca_file == config.ca_file  # fedsky's CA from the enrolment bundle
    assert source.manifest_trusted
    assert source.cache_dir == config.state_dir / "payload"
    cases = {
        "[payload]\n" + url: "key 'payload': .*needs \\[executor\\] kind = \"ssh\"",
        ssh + '[payload]\nurl = "http://ctl.example/v1/artifacts/"\n': "payload.url.*https",
        ssh + "[payload]\n" + url + 'ca_file = "mirror-ca.pem"\n': (
            "key 'payload': .*mirror.*set requirements_sha256"
        ),
        ssh + "[payload]\n" + url + 'requirements_sha256 = "abc"\n': "payload.requirements_sha256",
        ssh + "[payload]\n" + url + 'remote_python = "python3; rm -rf /"\n': "remote_python",
        ssh.replace('"id"\n', '"id"\nremote_bin_dir = "/opt/x"\n') + "[payload]\n" + url: (
            "key 'payload': .*remote_bin_dir.*ending in /bin"
        ),
        ssh + "[payload]\n" + url + "colour = 1\n": "payload.colour': unknown key",
    }
    for text, error in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"agent\.toml: .*{error}"):
            load_agent_config(path)
    path.write_text(
        ssh + "[payload]\n" + url + f'ca_file = "system"\nrequirements_sha256 = "{"a" * 64}"\n'
    )
    mirror = load_agent_config(path).payload_source
    assert mirror is not None
    assert (mirror.ca_file, mirror.manifest_trusted) == (None, False)
    assert mirror.requirements_sha256 == "a" * 64
