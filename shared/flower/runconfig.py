"""The Flower run config of a fedsky job: one typed model, flat hyphenated keys on the wire.

`flwr run` only accepts keys that the app's pyproject.toml declares under
`[tool.flwr.app.config]`, so every field here has a default there (a test keeps the two equal).
Paths in it (model file, sink directory, MQTT credentials) are paths on the aggregator's host.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from fedsky.shared.jobspec import DATASET_NAME_PATTERN, JobSpec
from fedsky.shared.topics import DEFAULT_PREFIX
from pydantic import BaseModel, ConfigDict, Field, field_validator


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    job_id: str = Field(default="bare", alias="job-id", pattern=r"^[a-z0-9-]{1,48}$")
    num_rounds: Annotated[int, Field(ge=1)] = Field(default=1, alias="num-rounds")
    local_epochs: Annotated[int, Field(ge=1)] = Field(default=1, alias="local-epochs")
    batch_size: Annotated[int, Field(ge=1)] = Field(default=32, alias="batch-size")
    eval_batch_size: Annotated[int, Field(ge=1)] = Field(default=256, alias="eval-batch-size")
    learning_rate: Annotated[float, Field(gt=0)] = Field(default=0.01, alias="learning-rate")
    optimizer: Literal["sgd", "adam"] = "sgd"
    seed: int = 0
    # Replies needed in every phase of every round; fewer fails the run.
    min_participants: Annotated[int, Field(ge=1)] = Field(default=1, alias="min-participants")
    # How many to wait for before the first round (up to join-timeout-s); 0 means min-participants.
    expected_participants: Annotated[int, Field(ge=0)] = Field(
        default=0, alias="expected-participants"
    )
    # Always finite: a node that died after pulling its message would otherwise stall the round
    # for Flower's default of an hour.
    round_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=300.0, alias="round-timeout-s"
    )
    join_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=120.0, alias="join-timeout-s"
    )
    # A phase that falls short of min-participants because nodes failed or fell silent (a VM
    # died, its node was unregistered) waits up to join-timeout-s for replacements and re-sends
    # to them, this many times, before the run fails.
    phase_retries: Annotated[int, Field(ge=0, le=10)] = Field(default=2, alias="phase-retries")
    model_file: str = Field(default="", alias="model-file")
    model_sha256: str = Field(default="", alias="model-sha256", pattern=r"^([0-9a-f]{64})?$")
    dataset: str = Field(default="digits", pattern=DATASET_NAME_PATTERN)
    # JSON object: participant -> dataset name, for sites that name their copy differently.
    dataset_overrides: str = Field(default="{}", alias="dataset-overrides")
    sink: Literal["file", "mqtt", "none"] = "file"
    sink_dir: str = Field(default="", alias="sink-dir")
    publish_weights: bool = Field(default=True, alias="publish-weights")
    mqtt_host: str = Field(default="127.0.0.1", alias="mqtt-host")
    mqtt_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8883, alias="mqtt-port")
    mqtt_ca: str = Field(default="", alias="mqtt-ca")
    mqtt_cert: str = Field(default="", alias="mqtt-cert")
    mqtt_key: str = Field(default="", alias="mqtt-key")
    topic_prefix: str = Field(default=DEFAULT_PREFIX, alias="topic-prefix")
    publish_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, alias="publish-timeout-s"
    )

    @field_validator("dataset_overrides")
    @classmethod
    def _overrides(cls, value: str) -> str:
        try:
            data = json.loads(value or "{}")
        except json.JSONDecodeError:
            raise ValueError("dataset-overrides must be a JSON object") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError("dataset-overrides must map participant ids to dataset names")
        return value or "{}"

    @property
    def overrides(self) -> dict[str, str]:
        data: dict[str, str] = json.loads(self.dataset_overrides)
        return data

    @property
    def wait_for(self) -> int:
        return max(self.expected_participants, self.min_participants)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        return cls.model_validate(dict(run_config))

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        return self.model_dump(by_alias=True)

    def to_toml(self) -> str:
        """The run config as a TOML file for `flwr run --run-config FILE`."""
        lines = []
        for key, value in self.to_run_config().items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = repr(value)
            else:
                text = json.dumps(value)  # a TOML basic string is a JSON string
            lines.append(f'"{key}" = {text}')
        return "\n".join(lines) + "\n"


def settings_for_job(
    spec: JobSpec,
    *,
    job_id: str,
    model_file: Path,
    model_sha256: str,
    sink: Literal["file", "mqtt", "none"],
    sink_dir: Path | None = None,
    mqtt: Mapping[str, Any] | None = None,
    round_timeout_s: float | None = None,
    join_timeout_s: float = 120.0,
    seed: int = 0,
) -> RunSettings:
    """The run settings for a job spec (the FL initializer's side).

    `mqtt` holds `host`, `port`, `ca`, `cert`, `key` and optionally `prefix`: the aggregator's
    own bus identity (`agg-<job id>`), as paths on the aggregator's host.
    """
    hp = spec.hyperparameters
    data: dict[str, Any] = {
        "job-id": job_id,
        "num-rounds": hp.rounds,
        "local-epochs": hp.local_epochs,
        "batch-size": hp.batch_size,
        "learning-rate": hp.learning_rate,
        "optimizer": hp.optimizer,
        "seed": seed,
        "min-participants": spec.min_participants,
        "expected-participants": len(spec.participants),
        "round-timeout-s": round_timeout_s or hp.round_timeout_s or 300.0,
        "join-timeout-s": join_timeout_s,
        "model-file": str(model_file),
        "model-sha256": model_sha256,
        "dataset": spec.dataset,
        "dataset-overrides": json.dumps(spec.dataset_overrides, sort_keys=True),
        "sink": sink,
        "sink-dir": str(sink_dir) if sink_dir else "",
    }
    if mqtt:
        data.update(
            {
                "mqtt-host": str(mqtt["host"]),
                "mqtt-port": int(mqtt["port"]),
                "mqtt-ca": str(mqtt["ca"]),
                "mqtt-cert": str(mqtt["cert"]),
                "mqtt-key": str(mqtt["key"]),
                "topic-prefix": str(mqtt.get("prefix", DEFAULT_PREFIX)),
            }
        )
    return RunSettings.model_validate(data)


class TaskConfig(BaseModel):
    """The config each train/evaluate message carries to the ClientApps (Flower's ConfigRecord
    holds str/int/float/bool values; the keys are these aliases)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    architecture: str  # the model's architecture JSON (fedsky.shared.modelfile.Architecture)
    server_round: Annotated[int, Field(ge=1)] = Field(alias="server-round")
    local_epochs: Annotated[int, Field(ge=1)] = Field(alias="local-epochs")
    batch_size: Annotated[int, Field(ge=1)] = Field(alias="batch-size")
    eval_batch_size: Annotated[int, Field(ge=1)] = Field(alias="eval-batch-size")
    learning_rate: Annotated[float, Field(gt=0)] = Field(alias="learning-rate")
    optimizer: Literal["sgd", "adam"]
    seed: int
    dataset: str = Field(pattern=DATASET_NAME_PATTERN)
    dataset_overrides: dict[str, Annotated[str, Field(pattern=DATASET_NAME_PATTERN)]] = Field(
        default={}, alias="dataset-overrides"
    )
    job_id: str = Field(alias="job-id")

    @field_validator("dataset_overrides", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @classmethod
    def for_round(
        cls, settings: RunSettings, *, architecture_json: str, server_round: int
    ) -> TaskConfig:
        return cls.model_validate(
            {
                "architecture": architecture_json,
                "server-round": server_round,
                "local-epochs": settings.local_epochs,
                "batch-size": settings.batch_size,
                "eval-batch-size": settings.eval_batch_size,
                "learning-rate": settings.learning_rate,
                "optimizer": settings.optimizer,
                "seed": settings.seed,
                "dataset": settings.dataset,
                "dataset-overrides": settings.overrides,
                "job-id": settings.job_id,
            }
        )

    def to_record_values(self) -> dict[str, str | int | float]:
        data: dict[str, str | int | float] = self.model_dump(
            by_alias=True, exclude={"dataset_overrides"}
        )
        data["dataset-overrides"] = json.dumps(self.dataset_overrides, sort_keys=True)
        return data

    def dataset_for(self, site: str) -> str:
        return self.dataset_overrides.get(site, self.dataset)
