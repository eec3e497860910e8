"""A CloudService wired to the local fakes (moto, the GCP fake), and aggregator enrolment, for tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsky.controller.clouds.catalog import CLOUD_PLUGINS
from fedsky.controller.clouds.plugin import CloudPlugin
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.clouds.settings import AwsCloudConfig, CloudsConfig, GcpCloudConfig
from fedsky.controller.config import ControllerConfig
from fedsky.controller.inventory import store as inventory
from fedsky.controller.security.aggregators import AggregatorEnrolment
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store
from fedsky.shared.artifacts import read_manifest

from tests.fakes.gcp_server import FakeGcp
from tests.support.wheels import write_wheelhouse

ENROLL_URL = "https://controller.example.test:8443/v1/aggregators/enroll"
MOTO_IMAGE = "ami-1e749f67"  # an Ubuntu image moto ships in every region


@dataclass
class HealthSwitch:
    """The readiness seam: moto's and the fake's VMs run nothing, so tests say when they "answer"."""

    ok: bool = True
    calls: list[str] = field(default_factory=list)

    async def __call__(self, address: str) -> bool:
        self.calls.append(address)
        return self.ok


def clouds_config(
    *, moto_endpoint: str | None = None, gcp: FakeGcp | None = None, **overrides: Any
) -> CloudsConfig:
    aws = AwsCloudConfig(
        endpoint_url=moto_endpoint,
        images={"us-east-1": MOTO_IMAGE, "eu-west-1": MOTO_IMAGE, "ap-northeast-2": MOTO_IMAGE},
        sweep_regions=("us-east-1",),
    )
    gcp_config = (
        GcpCloudConfig(
            compute_endpoint=gcp.url,
            resource_manager_endpoint=gcp.url,
            allowed_token_uris=(gcp.token_uri,),
        )
        if gcp is not None
        else GcpCloudConfig()
    )
    values: dict[str, Any] = {
        "enroll_url": ENROLL_URL,
        "ready_timeout_s": 5.0,
        "poll_interval_s": 0.05,
        "aws": aws,
        "gcp": gcp_config,
    }
    values.update(overrides)
    return CloudsConfig(**values)


def open_service(
    state_dir: Path,
    pki: Pki | None,
    clouds: CloudsConfig,
    health: HealthSwitch | None = None,
    plugins: Mapping[str, CloudPlugin] = CLOUD_PLUGINS,
) -> tuple[CloudService, Store]:
    config = ControllerConfig(state_dir=state_dir, clouds=clouds)
    # A tiny pinned wheelhouse where the daemon looks for one: the start-up script pins its digest.
    write_wheelhouse(config.artifacts_dir)
    store = Store(config.db_path)
    inventory.ensure_schema(store)  # the certificates table, as the daemon has it
    service = CloudService.open(
        config=config, store=store, pki=pki, health_check=health or HealthSwitch(), plugins=plugins
    )
    return service, store


def open_enrolment(
    state_dir: Path, pki: Pki, store: Store | None = None
) -> tuple[AggregatorEnrolment, Store]:
    """Aggregator enrolment over `store` (a new one in `state_dir` if None), as the daemon has it."""
    config = ControllerConfig(state_dir=state_dir)
    if store is None:
        store = Store(config.db_path)
        inventory.ensure_schema(store)  # the certificates table, as the daemon has it
    return AggregatorEnrolment.open(config=config, store=store, pki=pki), store


def assert_pinned_install(script: str, state_dir: Path) -> None:
    """A rendered start-up script installs only the pinned artifacts: no package index named,
    pip run with --no-index --require-hashes, the requirement file's digest from the manifest."""
    lowered = script.lower()
    for public in ("pypi.org", "pythonhosted.org", "pypi.python.org", "files.pythonhosted"):
        assert public not in lowered, public
    assert "--index-url" not in script
    assert "--extra-index-url" not in script
    assert "--trusted-host" not in script
    pip_lines = [line for line in script.splitlines() if "/bin/pip" in line]
    assert pip_lines, "the script installs nothing"
    for line in pip_lines:
        assert "install --quiet --no-index" in line, line
    assert (
        '--find-links "$WHEELS" --require-hashes -r "$WHEELS/requirements-aggregator.txt"' in script
    )
    manifest = read_manifest(ControllerConfig(state_dir=state_dir).artifacts_dir)
    digest = manifest.requirements("aggregator").sha256
    assert f'echo "{digest}  $WHEELS/requirements-aggregator.txt" | sha256sum -c' in script
    assert "/v1/artifacts/" in script
