"""The `[registry]` section of `controller.toml`: the Model Manager's retention and store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fedsky.controller.models.retention import RetentionMode, RetentionPolicy
from fedsky.controller.settings import Section
from fedsky.shared.config import resolve_path
from pydantic import Field, ValidationInfo, field_validator


class ModelsConfig(Section):
    # Default retention for jobs that do not set their own: "all", "best" or "last".
    retention: RetentionMode = "best"
    keep: Annotated[int, Field(ge=1, le=100000)] = 5
    # Bound on the whole checkpoint store (distinct blobs), bytes; 0 = no bound beyond retention.
    max_bytes: Annotated[int, Field(ge=0)] = 10 << 30
    # Default: <state_dir>/models
    directory: Path | None = None

    @field_validator("directory")
    @classmethod
    def _resolve(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Relative to the config file's directory, like every path in controller.toml.
        if value is None:
            return None
        return resolve_path(value, (info.context or {}).get("config_dir"))

    @property
    def default_policy(self) -> RetentionPolicy:
        return RetentionPolicy(self.retention, self.keep)

    def root(self, state_dir: Path) -> Path:
        """Where checkpoints and the signing key live: `directory`, else `<state_dir>/models`."""
        return self.directory or (state_dir / "models")
