"""The controller's config file (`controller.toml`), validated at start.

Every key has a default that suits one machine (the embedded defaults): a managed broker on
127.0.0.1, the API on a unix socket in the state directory. Relative paths are relative to the
config file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fedsky.controller.api.settings import ApiConfig, ArtifactsConfig
from fedsky.controller.bus.settings import BrokerConfig, BusConfig
from fedsky.controller.clouds.settings import AggregatorConfig, CloudsConfig
from fedsky.controller.inventory.settings import InventoryConfig
from fedsky.controller.models.settings import ModelsConfig
from fedsky.controller.monitoring.settings import MetricsConfig
from fedsky.controller.orchestrator.policy import Policy
from fedsky.controller.placement.settings import PlacementConfig
from fedsky.controller.security.settings import PkiConfig
from fedsky.controller.settings import Section
from fedsky.shared.config import load_config, resolve_path
from pydantic import ValidationInfo, field_validator


class ControllerConfig(Section):
    state_dir: Path = Path("/var/lib/fedsky")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object per log line (FEDSKY_LOG_FORMAT overrides).
    log_format: Literal["text", "json"] = "text"
    broker: BrokerConfig = BrokerConfig()
    bus: BusConfig = BusConfig()
    api: ApiConfig = ApiConfig()
    inventory: InventoryConfig = InventoryConfig()
    orchestrator: Policy = Policy()
    registry: ModelsConfig = ModelsConfig()
    clouds: CloudsConfig = CloudsConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    artifacts: ArtifactsConfig = ArtifactsConfig()
    placement: PlacementConfig = PlacementConfig()
    pki: PkiConfig = PkiConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path, info: ValidationInfo) -> Path:
        config_dir = (info.context or {}).get("config_dir")
        return resolve_path(value, config_dir)

    # Derived locations, all inside the one state directory.
    @property
    def db_path(self) -> Path:
        return self.state_dir / "controller.db"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def broker_dir(self) -> Path:
        return self.state_dir / "broker"

    @property
    def artifacts_dir(self) -> Path:
        """The wheelhouse the controller serves and takes the artifacts' digests from."""
        return self.artifacts.dir or (self.state_dir / "artifacts")

    @property
    def api_socket(self) -> Path:
        return self.api.socket or (self.state_dir / "controller.sock")

    @property
    def broker_public_host(self) -> str:
        """The broker's advertised address: in enrolment bundles and its certificate."""
        return self.broker.public_host or self.broker.host

    @property
    def broker_public_names(self) -> list[str]:
        """Names the managed broker's certificate carries besides its bind address."""
        public = self.broker_public_host
        return [public] if public != self.broker.host else []


def load_controller_config(path: str | Path) -> ControllerConfig:
    return load_config(ControllerConfig, path)
